"""The profile's routes and DNS servers for one `tun2xray run`.

Who applies them depends on who owns the device:

- ``tun://`` (tun2xray opened and configured the TUN): on start the routes
  go into the main table with the TUN as their device, over netlink with
  create-exclusive semantics, so a prefix that already has a route (another
  default route, say) is a one-line error instead of a silent takeover; on
  exit exactly what was added is removed.  Without ``--auto-route`` the
  default is no routes: a default route into the TUN would carry the core's
  own connections back into it.  ``excluded_routes`` are subtracted from the
  routes (10.0.0.0/8 minus 10.1.0.0/16 becomes the 16 prefixes around it), so
  traffic to them keeps following the host's other routes.  Each DNS server
  outside the TUN's own subnets gets a host route into the TUN, so queries to
  it go through the tunnel (and the profile's udp/53 rule).
- ``--auto-route``: the routes (default: everything) and the DNS host routes
  fill auto-route's table; ``excluded_routes`` become its exclusion rules.
- ``fd://`` and ``unix://``: the host owns the device and its routing, so
  nothing is applied; status["network"] reports what the host should set,
  with everything (0.0.0.0/0, ::/0) as the default routes, as the bridge does.
"""

from __future__ import annotations

import errno
import ipaddress
import logging

from .profile import DEFAULT_ROUTES, Profile

log = logging.getLogger("tun2xray.routes")

MAIN = 254


class RouteError(Exception):
    """A route could not be added (one line)."""


def subtract(nets, excluded) -> list:
    """*nets* minus the *excluded* prefixes, as few prefixes as possible."""
    out = list(nets)
    for ex in excluded:
        nxt = []
        for n in out:
            if n.version != ex.version or not n.overlaps(ex):
                nxt.append(n)
            elif ex.supernet_of(n) or ex == n:
                continue                          # wholly excluded
            else:
                nxt.extend(n.address_exclude(ex))
        out = nxt
    return _collapse(out)


def _collapse(nets) -> list:
    out = []
    for v in (4, 6):
        out.extend(ipaddress.collapse_addresses(n for n in nets if n.version == v))
    return out


class Network:
    """Routes and DNS servers of a run, from the profile (or the defaults)."""

    def __init__(self, profile: Profile | None, device_url: str, addresses, *, auto_route: bool = False,
                 mtu: int = 1500):
        self.owner = "tun2xray" if str(device_url or "").startswith("tun://") else "host"
        self.auto_route = bool(auto_route)
        self.mtu = mtu
        self.addresses = [ipaddress.ip_interface(a) for a in addresses]
        default_all = self.owner == "host" or self.auto_route
        self.routes = {}
        self.excluded = {}
        for v in (4, 6):
            if profile is None:
                self.routes[v] = list(DEFAULT_ROUTES[v]) if default_all else []
                self.excluded[v] = []
            else:
                self.routes[v] = profile.routes(v, default_all)
                self.excluded[v] = list((profile.ipv4 if v == 4 else profile.ipv6).excluded_routes)
        self.dns = list(profile.dns_servers) if profile is not None else ["198.18.0.2"]
        self.fake = []           # the DNS fake pools (tun2xray.dns; set by the run when fake-ip is on)
        self.added = []          # (kwargs, source) of routes we added, in order
        self.ifname = None

    # -- what to route

    def dns_hosts(self) -> list:
        """Host routes for the DNS servers not already on the TUN's subnets."""
        out = []
        for s in self.dns:
            ip = ipaddress.ip_address(s)
            if any(a.version == ip.version and ip in a.network for a in self.addresses):
                continue
            out.append(ipaddress.ip_network(ip))
        return out

    def _sources(self) -> list:
        """[(prefix, key path)]: the profile's routes, then the DNS hosts."""
        items = []
        for v, fam in ((4, "ipv4"), (6, "ipv6")):
            items += [(ipaddress.ip_network(r), f"{fam}.routes") for r in self.routes[v]]
        items += [(n, "dns.servers") for n in self.dns_hosts()]
        items += [(n, f"dns.fake_ipv{n.version}") for n in self.fake_pools()]
        return items

    def fake_pools(self) -> list:
        """The fake pools not already inside the TUN's own subnets."""
        out = []
        for p in self.fake:
            net = ipaddress.ip_network(p)
            if not any(a.version == net.version and net.subnet_of(a.network) for a in self.addresses):
                out.append(net)
        return out

    def planned(self) -> list:
        """[(prefix, key path)] to add to the main table on a tun:// device
        without --auto-route: routes and DNS hosts minus excluded_routes."""
        excluded = [ipaddress.ip_network(x) for v in (4, 6) for x in self.excluded[v]]
        out = []
        seen = set()
        for net, src in self._sources():
            for part in subtract([net], excluded):
                if part not in seen and not any(part.version == o.version and part.subnet_of(o)
                                                for o, _ in out):
                    seen.add(part)
                    out.append((part, src))
        return out

    def autoroute_prefixes(self) -> dict:
        """{4: [...], 6: [...]}: the prefixes auto-route sends into the TUN."""
        out = {4: [], 6: []}
        for net, _ in self._sources():
            if net not in out[net.version]:
                out[net.version].append(net)
        return {v: _collapse(nets) for v, nets in out.items()}

    # -- applying (tun:// without --auto-route)

    def up(self, ifname: str) -> None:
        """Add the planned routes through *ifname* (call before the event
        loop runs: pyroute2 drives an asyncio loop of its own)."""
        self.ifname = ifname
        if self.owner != "tun2xray" or self.auto_route:
            return
        plan = self.planned()
        if not plan:
            return
        from pyroute2 import IPRoute
        ipr = IPRoute()
        try:
            links = ipr.link_lookup(ifname=ifname)
            if not links:
                raise RouteError(f"routes: no interface {ifname}")
            oif = links[0]
            for net, src in plan:
                self._add(ipr, oif, net, src)
        except BaseException:
            self._down(ipr)
            raise
        finally:
            ipr.close()
        log.info("routes through %s: %s", ifname, ", ".join(str(a[0]["dst"]) for a in self.added) or "none")

    def _add(self, ipr, oif: int, net, src: str) -> None:
        import socket
        fam = socket.AF_INET if net.version == 4 else socket.AF_INET6
        from pyroute2.netlink.exceptions import NetlinkError
        kw = {"family": fam, "dst": str(net.network_address), "dst_len": net.prefixlen, "oif": oif,
              "table": MAIN}
        try:
            ipr.route("add", **kw)
        except (NetlinkError, OSError) as e:
            code = getattr(e, "code", None)
            if code == errno.EEXIST and self._ours_already(ipr, kw):
                return                          # left by a killed run on a kept TUN: fine, not ours
            if code == errno.EEXIST:
                raise RouteError(f"{src}: {net}: a route to it already exists through another "
                                 f"device or gateway (see `ip route show {net}`); remove it or "
                                 "leave the prefix out") from None
            why = getattr(e, "args", [None, None])
            reason = why[1] if len(why) > 1 else e
            raise RouteError(f"{src}: cannot route {net} through {self.ifname}: {reason}") from None
        self.added.append((kw, src))

    @staticmethod
    def _ours_already(ipr, kw) -> bool:
        for r in ipr.get_routes(family=kw["family"], table=MAIN):
            if (r["dst_len"] == kw["dst_len"] and r.get_attr("RTA_TABLE") == MAIN
                    and (r.get_attr("RTA_DST") or ("0.0.0.0" if kw["family"] == 2 else "::")) == kw["dst"]
                    and r.get_attr("RTA_OIF") == kw["oif"]):
                return True
        return False

    def down(self) -> None:
        """Remove what up() added (a TUN we created takes its routes with it)."""
        if not self.added:
            return
        from pyroute2 import IPRoute
        ipr = IPRoute()
        try:
            self._down(ipr)
        finally:
            ipr.close()

    def _down(self, ipr) -> None:
        from pyroute2.netlink.exceptions import NetlinkError
        while self.added:
            kw, _ = self.added.pop()
            try:
                ipr.route("del", **kw)
            except (NetlinkError, OSError) as e:
                if getattr(e, "code", None) not in (errno.ENOENT, errno.ESRCH, errno.ENODEV):
                    log.warning("cannot remove route %s/%s: %s", kw["dst"], kw["dst_len"], e)

    # -- reporting

    def status(self) -> dict:
        applied_by = "host" if self.owner == "host" else ("auto-route" if self.auto_route else "tun2xray")
        fam = {}
        for v, name in ((4, "ipv4"), (6, "ipv6")):
            addr = next((str(a) for a in self.addresses if a.version == v), None)
            fam[name] = {"address": addr, "routes": list(self.routes[v]),
                         "excluded_routes": list(self.excluded[v])}
        dns = {"servers": list(self.dns)}
        if self.fake:
            dns["fake_pools"] = [str(p) for p in self.fake]     # fake-ip: to route into the tunnel too
        return {"owner": self.owner, "mtu": self.mtu, **fam, "dns": dns,
                "routes_applied_by": applied_by,
                "routes_added": [f"{kw['dst']}/{kw['dst_len']}" for kw, _ in self.added]}

    def wrap_status(self, status_fn):
        def status():
            st = status_fn()
            st["network"] = self.status()
            return st
        return status
