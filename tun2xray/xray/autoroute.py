"""--auto-route: send everything (IPv4 and IPv6 default) through the TUN with
policy routing over netlink (pyroute2), loop-free.

The core's own sockets carry a firewall mark (``streamSettings.sockopt.mark``,
put in the derived config by tun2xray.xray.config) and a rule sends marked traffic
around the TUN.  Per family, at priorities PRIORITY..PRIORITY+3::

    PRIORITY+0  fwmark MARK             lookup main      the core's own traffic
    PRIORITY+1  to PREFIX               lookup main      excluded routes, proxy servers
    PRIORITY+2  lookup main suppress_prefixlength 0      local networks stay local
    PRIORITY+3                          lookup TABLE     default dev TUN

(wg-quick and sing-box's auto-route do the same.)  Everything added is
recorded and removed by ``down()``: on exit, after SIGTERM, after the core
crashed.  ``up()`` first removes what a killed earlier run left at our
priorities and in our table.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket

log = logging.getLogger("tun2xray.autoroute")
# pyroute2 logs every netlink message at debug level: not ours to show
logging.getLogger("pyroute2").setLevel(logging.INFO)

TABLE = 7478
PRIORITY = 9470
MAIN = 254


from .errors import XrayError


class AutoRouteError(XrayError):
    """Routes or rules could not be set (one line)."""


def _ipr():
    from pyroute2 import IPRoute
    return IPRoute()


def _fam(version: int) -> int:
    return socket.AF_INET if version == 4 else socket.AF_INET6


def _err_code(e) -> int | None:
    return getattr(e, "code", None)


def default_egress(ipr=None) -> dict:
    """{4: ifname, 6: ifname} of the main table's default routes (the
    physical egress, whatever our rules do)."""
    own = ipr is None
    ipr = ipr or _ipr()
    try:
        out = {}
        for v in (4, 6):
            for r in ipr.get_routes(family=_fam(v), table=MAIN):
                if r["dst_len"] != 0 or r.get_attr("RTA_TABLE") != MAIN:
                    continue
                oif = r.get_attr("RTA_OIF")
                if oif is None:        # multipath: the first hop's device
                    mp = r.get_attr("RTA_MULTIPATH") or []
                    oif = mp[0]["oif"] if mp else None
                if oif is None:
                    continue
                links = ipr.get_links(oif)
                out[v] = links[0].get_attr("IFLA_IFNAME") if links else str(oif)
                break
        return out
    finally:
        if own:
            ipr.close()


class AutoRoute:
    """The routes and rules of one `run --auto-route`."""

    def __init__(self, tun: str, *, mark: int, table: int = TABLE, priority: int = PRIORITY,
                 excluded=(), families=(4, 6), routes=None):
        self.tun = tun
        # {4: [prefix, ...], 6: [...]} sent into the TUN; default: everything
        self.routes = routes or {4: ["0.0.0.0/0"], 6: ["::/0"]}
        self.mark = mark
        self.table = table
        self.priority = priority
        self.families = tuple(families)
        self.excluded = self._prefixes(excluded)
        self.added = []          # ("rule"|"route", kwargs) in the order added
        self._ex_rules = {}      # prefix -> kwargs of its rule

    @staticmethod
    def _prefixes(items) -> list:
        out = []
        for x in items:
            net = ipaddress.ip_network(str(x), strict=False)
            if net not in out:
                out.append(net)
        return out

    # -- life cycle

    def up(self) -> None:
        ipr = _ipr()
        try:
            self._remove_stale(ipr)
            links = ipr.link_lookup(ifname=self.tun)
            if not links:
                raise AutoRouteError(f"--auto-route: no interface {self.tun}")
            oif = links[0]
            for v in self.families:
                fam = _fam(v)
                p = self.priority
                for net in self.routes.get(v, ()):
                    self._add(ipr, "route", dict(family=fam, dst=str(net), table=self.table, oif=oif))
                self._add(ipr, "rule", dict(family=fam, priority=p, fwmark=self.mark, table=MAIN))
                self._add(ipr, "rule", dict(family=fam, priority=p + 2, table=MAIN,
                                            suppress_prefixlen=0))
                self._add(ipr, "rule", dict(family=fam, priority=p + 3, table=self.table))
            for net in self.excluded:
                self._exclude(ipr, net)
        except BaseException:
            self._down(ipr)
            ipr.close()
            raise
        ipr.close()
        log.info("auto-route: default routes through %s (table %d, mark 0x%x, %d excluded)",
                 self.tun, self.table, self.mark, len(self._ex_rules))

    def _add(self, ipr, kind: str, kw: dict) -> None:
        try:
            getattr(ipr, kind)("add", **kw)
        except Exception as e:
            if _err_code(e) == errno.EEXIST:
                # identical entry already there (not ours to remove later)
                return
            if kind == "route" and kw["family"] == socket.AF_INET6 and _err_code(e) in (
                    errno.EACCES, errno.EAFNOSUPPORT, errno.ENETUNREACH):
                raise AutoRouteError(f"--auto-route: IPv6 routes on {self.tun}: {e}") from None
            raise AutoRouteError(f"--auto-route: cannot add {kind} {_show(kw)}: {e}") from None
        self.added.append((kind, kw))

    def _exclude(self, ipr, net) -> None:
        v = net.version
        if v not in self.families or net in self._ex_rules:
            return
        kw = dict(family=_fam(v), priority=self.priority + 1, table=MAIN,
                  dst=str(net.network_address), dst_len=net.prefixlen)
        n = len(self.added)
        self._add(ipr, "rule", kw)
        if len(self.added) > n:
            self._ex_rules[net] = kw

    def set_excluded(self, items) -> None:
        """Replace the excluded prefixes (e.g. another node's servers)."""
        want = self._prefixes(items)
        ipr = _ipr()
        try:
            for net in list(self._ex_rules):
                if net not in want:
                    kw = self._ex_rules.pop(net)
                    self._del(ipr, "rule", kw)
                    self.added = [a for a in self.added if a[1] is not kw]
            for net in want:
                self._exclude(ipr, net)
            self.excluded = want
        finally:
            ipr.close()

    def down(self) -> None:
        ipr = _ipr()
        try:
            self._down(ipr)
        finally:
            ipr.close()

    def _down(self, ipr) -> None:
        while self.added:
            kind, kw = self.added.pop()
            self._del(ipr, kind, kw)
        self._ex_rules.clear()

    @staticmethod
    def _del(ipr, kind, kw) -> None:
        try:
            getattr(ipr, kind)("del", **kw)
        except Exception as e:
            if _err_code(e) not in (errno.ENOENT, errno.ESRCH, errno.ENODEV):
                log.warning("auto-route: cannot remove %s %s: %s", kind, _show(kw), e)

    def _remove_stale(self, ipr) -> None:
        """What a killed earlier run left: rules at our priorities, routes in our table."""
        n = 0
        for v in (4, 6):
            fam = _fam(v)
            for r in ipr.get_rules(family=fam):
                prio = r.get_attr("FRA_PRIORITY")
                if prio is not None and self.priority <= prio <= self.priority + 3:
                    kw = dict(family=fam, priority=prio, table=r.get_attr("FRA_TABLE") or r["table"])
                    if r.get_attr("FRA_FWMARK") is not None:
                        kw["fwmark"] = r.get_attr("FRA_FWMARK")
                    if r["dst_len"]:
                        kw["dst"] = r.get_attr("FRA_DST")
                        kw["dst_len"] = r["dst_len"]
                    self._del(ipr, "rule", kw)
                    n += 1
            for r in ipr.get_routes(family=fam, table=self.table):
                if r.get_attr("RTA_TABLE") != self.table:
                    continue
                kw = dict(family=fam, table=self.table, dst_len=r["dst_len"])
                if r["dst_len"]:
                    kw["dst"] = r.get_attr("RTA_DST")
                if r.get_attr("RTA_OIF") is not None:
                    kw["oif"] = r.get_attr("RTA_OIF")
                self._del(ipr, "route", kw)
                n += 1
        if n:
            log.warning("auto-route: removed %d rules/routes left by an earlier run", n)


def _show(kw: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in kw.items() if k != "family")


def state(tun: str | None = None, *, mark: int | None = None, table: int = TABLE,
          priority: int = PRIORITY) -> dict:
    """What the routing tables hold of ours (for doctor and tests):
    {4: {"rules": {prio: desc}, "default_dev": ifname|None}, 6: {...}}."""
    ipr = _ipr()
    try:
        out = {}
        for v in (4, 6):
            fam = _fam(v)
            rules = {}
            for r in ipr.get_rules(family=fam):
                prio = r.get_attr("FRA_PRIORITY")
                if prio is None or not priority <= prio <= priority + 3:
                    continue
                rules.setdefault(prio, []).append({
                    "table": r.get_attr("FRA_TABLE") or r["table"],
                    "fwmark": r.get_attr("FRA_FWMARK"),
                    "dst": f"{r.get_attr('FRA_DST')}/{r['dst_len']}" if r["dst_len"] else None,
                    "suppress_prefixlen": r.get_attr("FRA_SUPPRESS_PREFIXLEN"),
                })
            dev = None
            for r in ipr.get_routes(family=fam, table=table):
                if r.get_attr("RTA_TABLE") == table and r["dst_len"] == 0:
                    links = ipr.get_links(r.get_attr("RTA_OIF"))
                    dev = links[0].get_attr("IFLA_IFNAME") if links else None
            out[v] = {"rules": rules, "default_dev": dev}
        return out
    finally:
        ipr.close()


def route_dev(addr, mark: int | None = None) -> str | None:
    """The device the kernel would send a packet to ``addr`` out of (with
    ``mark`` set, as the core's marked sockets); None when unroutable."""
    ip = ipaddress.ip_address(str(addr))
    ipr = _ipr()
    try:
        kw = dict(dst=str(ip), family=_fam(ip.version))
        if mark is not None:
            kw["mark"] = mark          # (pyroute2 ignores "fwmark" here: RTA_MARK is "mark")
        try:
            r = ipr.route("get", **kw)
        except Exception:
            return None
        oif = r[0].get_attr("RTA_OIF") if r else None
        if oif is None:
            return None
        links = ipr.get_links(oif)
        return links[0].get_attr("IFLA_IFNAME") if links else None
    finally:
        ipr.close()
