"""`tun2xray doctor`: a self-check of a running setup.

One line per check, ``[PASS]`` or ``[FAIL]`` with a hint, exit status 1 when
anything failed (2 on bad flags):

- control   the running tun2xray answers on its control socket
- tun       the TUN exists, is up, has the expected MTU and addresses
- routes    --auto-route's rules and table are in place (else: something is
            routed into the TUN at all)
- loop      no outbound server of the core is routed into the TUN (with the
            core's firewall mark, as its sockets are)
- core      the core process is alive (not stopped) and each inbound answers
            (SOCKS5 greeting on the socks inbound; a dokodemo-door's
            listening socket, without connecting: the core would dial its target)
- dns       NAME@SERVER resolves, through the tunnel when SERVER is routed there
- tcp/udp   a connectivity matrix against the addresses given (IPv4 and
            IPv6 as given), through the tunnel and around it (a socket with
            the core's mark), UDP expecting an echo
"""

from __future__ import annotations

import ipaddress
import os
import random
import socket
import struct
import sys

from ..instance import InstanceError

SO_MARK = getattr(socket, "SO_MARK", 36)


def add_arguments(p) -> None:
    p.add_argument("--control", default=None,
                   help="the running tun2xray's control socket (default: the one running here, "
                   "found under /run/tun2xray/)")
    p.add_argument("--device", help="tun://NAME (default: the running tun2xray's device; "
                   "also picks the instance when several run)")
    p.add_argument("--mtu", type=int, help="expected MTU (default: the running tun2xray's)")
    p.add_argument("--address", default="198.18.0.1/15", help="expected IPv4 address/prefix on the TUN")
    p.add_argument("--address6", default="fd00:7478::1/64", help="expected IPv6 address/prefix on the TUN")
    p.add_argument("--xray-config", help="the core's config (default: what the running tun2xray runs)")
    p.add_argument("--auto-route", action="store_true", default=None,
                   help="expect --auto-route's rules (default: as the running tun2xray reports)")
    p.add_argument("--mark", type=lambda x: int(x, 0), help="the core's firewall mark (default: reported)")
    p.add_argument("--tcp", action="append", default=[], metavar="HOST:PORT", help="TCP target (repeatable)")
    p.add_argument("--udp", action="append", default=[], metavar="HOST:PORT",
                   help="UDP echo target (repeatable)")
    p.add_argument("--dns", action="append", default=[], metavar="NAME@SERVER",
                   help="resolve NAME with SERVER (repeatable)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per probe")


class Report:
    def __init__(self, out=None):
        self.out = out or sys.stdout
        self.failed = 0
        self.passed = 0

    def ok(self, name: str, detail: str) -> None:
        self.passed += 1
        print(f"[PASS] {name}: {detail}", file=self.out, flush=True)

    def fail(self, name: str, detail: str, hint: str) -> None:
        self.failed += 1
        print(f"[FAIL] {name}: {detail} -- hint: {hint}", file=self.out, flush=True)


def _hostport(spec: str) -> tuple:
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f'"{spec}" is not HOST:PORT ([v6]:PORT)')
    host = host.strip("[]")
    ipaddress.ip_address(host)             # targets are addresses: no resolver in the way
    p = int(port)
    if not 0 < p < 65536:
        raise ValueError(f'"{spec}": port out of range')
    return host, p


# --------------------------------------------------------------------- checks

def check_control(rep: Report, url: str | None, explicit: bool) -> dict | None:
    from ..control import query
    try:
        st = query(url, timeout=3.0)
    except (OSError, ValueError) as e:
        if explicit:
            rep.fail("control", f"{url}: {e}", "is `tun2xray run --control ...` running?")
        return None
    dev = st.get("device", {})
    rep.ok("control", f"{url}: tun2xray up {st.get('uptime')}s on {dev.get('name')}")
    return st


def check_tun(rep: Report, name: str, mtu: int | None, addresses) -> None:
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            rep.fail("tun", f"no interface {name}", "start `tun2xray run --device tun://NAME`")
            return
        link = ipr.get_links(idx[0])[0]
        have = {f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=idx[0])}
    problems = []
    if not link["flags"] & 1:                     # IFF_UP
        problems.append("down")
    got_mtu = link.get_attr("IFLA_MTU")
    if mtu is not None and got_mtu != mtu:
        problems.append(f"mtu {got_mtu}, expected {mtu}")
    missing = [a for a in addresses if a and str(ipaddress.ip_interface(a)) not in
               {str(ipaddress.ip_interface(h)) for h in have}]
    if missing:
        problems.append(f"missing {' '.join(missing)}")
    if problems:
        rep.fail("tun", f"{name}: {', '.join(problems)}",
                 "restart tun2xray with the intended --mtu/--address, or pass doctor what you expect")
    else:
        rep.ok("tun", f"{name} up, mtu {got_mtu}, {' '.join(sorted(have))}")


def check_routes(rep: Report, tun: str, auto_route: bool, mark: int | None) -> None:
    from . import autoroute
    if not auto_route:
        n = _routes_via(tun)
        if n:
            rep.ok("routes", f"{n} routes into {tun} (no --auto-route)")
        else:
            rep.fail("routes", f"nothing is routed into {tun}",
                     "add routes for the targets (ip route add PREFIX dev TUN) or use --auto-route")
        return
    st = autoroute.state(tun, mark=mark)
    p = autoroute.PRIORITY
    for v in (4, 6):
        s = st[v]
        missing = []
        rules = s["rules"]
        if not any(r["fwmark"] == mark and r["table"] == autoroute.MAIN for r in rules.get(p, [])):
            missing.append(f"{p}: fwmark {hex(mark or 0)} lookup main")
        if not any(r["suppress_prefixlen"] == 0 for r in rules.get(p + 2, [])):
            missing.append(f"{p + 2}: lookup main suppress_prefixlength 0")
        if not any(r["table"] == autoroute.TABLE for r in rules.get(p + 3, [])):
            missing.append(f"{p + 3}: lookup {autoroute.TABLE}")
        if s["default_dev"] != tun:
            missing.append(f"table {autoroute.TABLE}: default dev {tun} (have {s['default_dev']})")
        if missing:
            rep.fail(f"routes/ipv{v}", "missing " + "; ".join(missing),
                     "restart `tun2xray run --auto-route` (it re-adds and cleans up its rules)")
        else:
            n = len(rules.get(p + 1, []))
            rep.ok(f"routes/ipv{v}", f"default via {tun}, mark {hex(mark)} around it, {n} excluded")


def _routes_via(tun: str) -> int:
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=tun)
        if not idx:
            return 0
        n = 0
        for fam in (socket.AF_INET, socket.AF_INET6):
            for r in ipr.get_routes(family=fam, table=254):
                if r.get_attr("RTA_OIF") == idx[0] and r.get_attr("RTA_TABLE") == 254 \
                        and r["type"] == 1 and r["dst_len"] < (32 if fam == socket.AF_INET else 128):
                    n += 1
        return n


def check_loop(rep: Report, tun: str, cfg: dict, mark: int | None) -> None:
    from .. import xray
    from . import autoroute
    servers = xray.outbound_servers(cfg)
    if not servers:
        rep.ok("loop", "the core has no outbound servers (direct only)")
        return
    bad = []
    seen = []
    for host, port in servers:
        for addr in xray.resolve_servers([(host, port)]):
            dev = autoroute.route_dev(addr, mark=mark)
            where = f"{host}:{port}" if host == str(addr) else f"{host}:{port} ({addr})"
            if dev == tun:
                bad.append(where)
            else:
                seen.append(f"{where} via {dev}")
    how = f" with mark {hex(mark)}" if mark is not None else ""
    if bad:
        rep.fail("loop", f"outbound server {', '.join(bad)} is routed into {tun}{how} (a loop)",
                 "exclude the server (profile excluded_routes) or let the core mark its sockets "
                 "(--auto-route); remove routes that send it into the TUN")
    else:
        rep.ok("loop", "outbound servers go around the TUN: " + ", ".join(seen))


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][:1]
    except (OSError, IndexError):
        return None


def check_core(rep: Report, core: dict | None, inbounds, timeout: float) -> None:
    if core is not None:
        pid = core.get("pid")
        state = _proc_state(pid) if pid else None
        if not core.get("alive") or state is None or state in "ZX":
            rep.fail("core", f"not running (last exit {core.get('last_exit')}: {core.get('last_reason')})",
                     "see tun2xray's log for the core's own messages")
        elif state == "T":
            rep.fail("core", f"pid {pid} is stopped (state T)", "kill -CONT it, or restart tun2xray")
        else:
            rep.ok("core", f"{os.path.basename(core.get('binary', ''))} pid {pid} running, "
                   f"{core.get('restarts')} restarts, {core.get('reloads', 0)} reloads")
    for ib in inbounds:
        name = f"inbound {ib.tag}"
        where = f"{ib.protocol} {ib.host}:{ib.port}"
        err = _probe_inbound(ib, timeout, (core or {}).get("pid"))
        if err:
            rep.fail(name, f"{where}: {err}", "is the core running and listening there?")
        else:
            rep.ok(name, f"{where} answers")


def _probe_inbound(ib, timeout: float, pid: int | None = None) -> str | None:
    """A SOCKS5 greeting (and a UDP ASSOCIATE it closes) for socks; for
    dokodemo-door its listening sockets, read from /proc: a connection
    would make the core dial the inbound's target."""
    from .probe import inbound_listening, socks_probe
    if ib.protocol == "socks":
        return socks_probe(ib.host, ib.port, timeout)
    nets = ib.networks or {"tcp"}
    for proto in sorted(nets):
        if not inbound_listening(ib.host, ib.port, proto, pid=pid):
            return f"nothing listens on {proto}"
    return None


def dns_query(name: str, qtype: int = 1) -> tuple:
    qid = random.getrandbits(16)
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.rstrip(".").split("."):
        b = label.encode("idna")
        q += bytes([len(b)]) + b
    return qid, q + b"\x00" + struct.pack("!HH", qtype, 1)


def check_dns(rep: Report, spec: str, tun: str, timeout: float) -> None:
    from . import autoroute
    name, sep, server = spec.rpartition("@")
    if not sep:
        rep.fail(f"dns {spec}", "expected NAME@SERVER", "e.g. --dns example.com@1.1.1.1")
        return
    server = server.strip("[]")
    path = "through the tunnel" if autoroute.route_dev(server) == tun else "NOT through the tunnel"
    fam = socket.AF_INET6 if ":" in server else socket.AF_INET
    answers = []
    for qtype in (1, 28):
        qid, q = dns_query(name, qtype)
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.settimeout(timeout)
        try:
            s.sendto(q, (server, 53))
            while True:
                data = s.recv(4096)
                if len(data) >= 12 and struct.unpack_from("!H", data)[0] == qid:
                    break
        except OSError as e:
            rep.fail(f"dns {name}", f"no answer from {server} ({path}): {e.strerror or e}",
                     "check the dokodemo-door/DNS rule and that the server is reachable through the core")
            return
        finally:
            s.close()
        flags, _, an = struct.unpack_from("!HHH", data, 2)
        rcode = flags & 0xF
        if rcode != 0:
            rep.fail(f"dns {name}", f"{server} answered rcode {rcode} ({path})",
                     "the name does not resolve there")
            return
        answers.append(an)
    if not any(answers):
        rep.fail(f"dns {name}", f"{server} answered without records ({path})", "check the name")
    elif path.startswith("NOT"):
        rep.fail(f"dns {name}", f"resolves, but {server} is not routed into {tun}",
                 "route the DNS server into the TUN (or use --auto-route)")
    else:
        rep.ok(f"dns {name}", f"{server} answered {answers[0]} A / {answers[1]} AAAA records {path}")


def _probe(proto: str, host: str, port: int, mark: int | None, timeout: float) -> str | None:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        if mark is not None:
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        if proto == "tcp":
            s.connect((host, port))
            return None
        payload = b"tun2xray-doctor %d" % random.getrandbits(32)
        s.sendto(payload, (host, port))
        data, _ = s.recvfrom(65535)
        return None if data == payload else f"unexpected reply {data[:20]!r}"
    except OSError as e:
        return str(e.strerror or e)
    finally:
        s.close()


def check_matrix(rep: Report, tcp, udp, tun: str, mark: int | None, timeout: float) -> None:
    from . import autoroute
    for proto, specs in (("tcp", tcp), ("udp", udp)):
        for spec in specs:
            host, port = _hostport(spec)
            v = ipaddress.ip_address(host).version
            ways = [("through", None)]
            if mark is not None:
                ways.append(("around", mark))
            for way, m in ways:
                name = f"{proto}/ipv{v} {way} {spec}"
                dev = autoroute.route_dev(host, mark=m)
                if way == "through" and dev != tun:
                    rep.fail(name, f"routed via {dev}, not {tun}", "route it into the TUN (or --auto-route)")
                    continue
                err = _probe(proto, host, port, m, timeout)
                if err:
                    rep.fail(name, f"via {dev}: {err}",
                             "through: check the core and its outbound; around: the physical path")
                else:
                    rep.ok(name, f"via {dev}")


# ------------------------------------------------------------------------ main

def running_control(args) -> str | None:
    """--control, else the control socket of the tun2xray running here (on
    --device when given); None when none runs (the checks go on without
    it). InstanceError when several run and none was chosen."""
    from ..instance import find_instance
    if args.control:
        return args.control
    if args.device:
        try:
            info = find_instance(args.device)
        except InstanceError:
            return None                 # not running on that device: check what is there
    else:
        info = find_instance()
    return (info or {}).get("control")


def config_to_check(given: str | None, xst: dict) -> str | None:
    """The config whose inbounds doctor probes: what the running core runs
    (the runtime config tun2xray derived, inbounds it added included) when
    --xray-config is absent or names the instance's own link or node."""
    running = (xst.get("core") or {}).get("config") or xst.get("runtime_config")
    if not given:
        return running
    if running:
        mine = {os.path.realpath(p) for p in (xst.get("config"), xst.get("node")) if p}
        if os.path.realpath(given) in mine:
            return running
    return given


def main(args) -> int:
    from .. import xray
    rep = Report()
    try:
        for spec in args.tcp + args.udp:
            _hostport(spec)
    except ValueError as e:
        print(f"tun2xray: error: doctor: {e}", file=sys.stderr)
        return 2
    try:
        url = running_control(args)
    except InstanceError as e:
        print(f"tun2xray: error: doctor: {e}", file=sys.stderr)
        return 2
    st = check_control(rep, url, True) if url else None
    xst = (st or {}).get("xray") or {}
    tun = args.device[len("tun://"):] if args.device and args.device.startswith("tun://") else None
    if tun is None and st:
        tun = st.get("device", {}).get("name")
    if tun is None:
        from ..instance import run_dir
        why = "which TUN?" if url else f"which TUN? (no tun2xray runs here: none in {run_dir()})"
        rep.fail("tun", why, "give --device tun://NAME or --control of a running tun2xray")
    else:
        mtu = args.mtu if args.mtu is not None else (st or {}).get("device", {}).get("mtu")
        check_tun(rep, tun, mtu, [args.address, args.address6])
    auto = args.auto_route if args.auto_route is not None else bool(xst.get("auto_route"))
    mark = args.mark if args.mark is not None else xst.get("mark")
    if auto and mark is None:
        mark = xray.DEFAULT_MARK
    if tun is not None:
        check_routes(rep, tun, auto, mark)
    core = xst.get("core")
    cfg_path = config_to_check(args.xray_config, xst)
    if cfg_path:
        try:
            d = xray.derive(cfg_path, write=False)
        except xray.XrayError as e:
            rep.fail("config", str(e), "fix the config the core runs")
            d = None
        if d is not None:
            if tun is not None:
                check_loop(rep, tun, d.config, mark)
            check_core(rep, core, [] if d.added else d.inbounds, args.timeout)
            if d.added and core is None:
                rep.fail("core", f"{cfg_path} has no usable socks inbound",
                         "tun2xray adds one in its runtime config: point doctor at that (--control)")
    elif st is not None:
        rep.ok("core", "no --xray-config: the core is not tun2xray's to check")
    if tun is not None:
        for spec in args.dns:
            check_dns(rep, spec, tun, args.timeout)
        check_matrix(rep, args.tcp, args.udp, tun, mark if auto else None, args.timeout)
    print(f"{rep.passed} passed, {rep.failed} failed", flush=True)
    return 1 if rep.failed else 0
