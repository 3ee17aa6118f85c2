"""Deriving what `run` needs from a core config.

``derive()`` looks for the tunnel-side inbounds:
- a ``socks`` inbound reachable on loopback with UDP enabled: the default
  proxy of every flow;
- ``dokodemo-door`` inbounds (also spelled ``tunnel``, with the newer field
  names ``allowedNetwork``/``rewriteAddress``/``rewritePort``) on loopback with
  a fixed target: a rule sends flows to that target there.  A target on port
  53 takes every DNS flow of its networks (DNS hijack, as ``--map
  udp:53=...``); any other target takes only flows to its own address:port.
When a tunnel-side inbound is missing or the core must mark its sockets
(``--auto-route``), it writes a *runtime* config beside the user's file --
never editing the user's file -- that adds what is missing and sets
``streamSettings.sockopt.mark`` on every outbound:
- no usable socks inbound (none, not on loopback, UDP off): a loopback
  socks inbound, UDP on, sniffing on so Xray's domain routing keeps working;
- no DNS dokodemo-door but a plain DNS server address in the config's
  ``dns.servers``: a loopback dokodemo-door to that server, and DNS flows
  go there.
``outbound_servers`` names the proxy servers the outbounds dial (the routes
--auto-route keeps out of the TUN).
"""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import json
import logging
import os
import re
import socket
import tempfile
from dataclasses import dataclass, field
from urllib.parse import quote

from ..rules import Rule
from ..upstream.url import DokodemoUpstream, SocksUpstream, format_hostport
from .errors import XrayConfigError
from .reader import load_config

log = logging.getLogger("tun2xray.xray")

DEFAULT_MARK = 0x7478          # "tx": the firewall mark --auto-route gives the core's sockets
SNIFFING = {"enabled": True, "destOverride": ["http", "tls"]}
RUNTIME_SUFFIX = ".tun2xray.json"


# --------------------------------------------------------------------------
# inbounds

_ANY = {"", "0.0.0.0", "::", "[::]"}


def _loopback_host(listen) -> str | None:
    """The address to dial for an inbound listening on ``listen``, if that is
    reachable on loopback; None otherwise (LAN-only address, Unix socket)."""
    if listen is None:
        return "127.0.0.1"
    if not isinstance(listen, str):
        return None
    listen = listen.strip()
    if listen in _ANY:
        return "127.0.0.1"
    try:
        ip = ipaddress.ip_address(listen.strip("[]"))
    except ValueError:
        return None            # a domain, a Unix socket path, "@abstract"
    if ip.is_loopback:
        return str(ip)
    return None


def _port(value) -> int | None:
    """An inbound's port: a number, "1080", or a range "1080-1090" (first)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 < value < 65536 else None
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*\d+\s*)?", value)
        if m:
            p = int(m.group(1))
            return p if 0 < p < 65536 else None
    return None


def _networks(value) -> frozenset:
    if value is None:
        return frozenset({"tcp"})           # Xray's default for dokodemo-door
    if isinstance(value, str):
        parts = value.split(",")
    elif isinstance(value, list):
        parts = value
    else:
        return frozenset()
    nets = frozenset(p.strip().lower() for p in parts if isinstance(p, str) and p.strip())
    return nets & {"tcp", "udp"}


@dataclass(slots=True)
class Inbound:
    index: int
    tag: str
    protocol: str
    host: str
    port: int
    networks: frozenset = frozenset()
    target: tuple | None = None       # dokodemo: (address, port)


@dataclass(slots=True)
class Derived:
    """What `run` takes from a core config."""

    source: str                        # the user's path (maybe a link)
    real_source: str                   # what it pointed at when read
    config: dict                       # the config the core runs
    runtime_path: str | None           # where the derived config was written (None: the user's file runs)
    proxy: SocksUpstream = None
    proxy_url: str = ""
    rules: list = field(default_factory=list)
    inbounds: list = field(default_factory=list)     # [Inbound] the engine dials
    added: list = field(default_factory=list)        # tags of inbounds we added
    notes: list = field(default_factory=list)        # why inbounds were skipped
    mark: int | None = None

    def ready_checks(self) -> list:
        """(host, port, proto) the core listens on once it is up; proto
        "socks" (the socks inbound without a password) is checked by
        speaking SOCKS5 to it, "tcp"/"udp" by its listening socket."""
        checks = []
        quiet_socks = self.proxy is not None and self.proxy.password is None
        for ib in self.inbounds:
            nets = ib.networks or frozenset({"tcp"})
            for proto in sorted(nets):
                if ib.protocol == "socks" and proto == "tcp" and quiet_socks:
                    proto = "socks"
                checks.append((ib.host, ib.port, proto))
        return checks


def _tag(ib: dict, i: int) -> str:
    tag = ib.get("tag")
    return tag if isinstance(tag, str) and tag else f"inbounds[{i}]"


def _socks_inbound(i: int, ib: dict, notes: list):
    tag = _tag(ib, i)
    host = _loopback_host(ib.get("listen"))
    port = _port(ib.get("port"))
    settings = ib.get("settings") if isinstance(ib.get("settings"), dict) else {}
    if host is None:
        notes.append(f"socks inbound {tag}: not listening on loopback")
        return None
    if port is None:
        notes.append(f"socks inbound {tag}: no usable port")
        return None
    if settings.get("udp") is not True:
        notes.append(f"socks inbound {tag}: UDP is off")
        return None
    user = password = None
    if settings.get("auth") == "password":
        accounts = settings.get("accounts")
        if not (isinstance(accounts, list) and accounts and isinstance(accounts[0], dict)
                and accounts[0].get("user") and accounts[0].get("pass")):
            notes.append(f"socks inbound {tag}: password auth without an account")
            return None
        user, password = str(accounts[0]["user"]), str(accounts[0]["pass"])
    up = SocksUpstream(host, port, user, password)
    return Inbound(i, tag, "socks", host, port, frozenset({"tcp", "udp"})), up


def _dokodemo_inbound(i: int, ib: dict, notes: list):
    tag = _tag(ib, i)
    settings = ib.get("settings") if isinstance(ib.get("settings"), dict) else {}
    host = _loopback_host(ib.get("listen"))
    port = _port(ib.get("port"))
    if host is None or port is None:
        notes.append(f"{ib.get('protocol')} inbound {tag}: not on a loopback port")
        return None
    if settings.get("followRedirect"):
        notes.append(f"{ib.get('protocol')} inbound {tag}: transparent (followRedirect), no fixed target")
        return None
    address, tport, nets = _tunnel_target(settings, port)
    if not isinstance(address, str) or not address or tport is None or not nets:
        notes.append(f"{ib.get('protocol')} inbound {tag}: no fixed target address:port")
        return None
    up = DokodemoUpstream(host, port)
    url = f"dokodemo://{format_hostport(host, port)}"
    if tport == 53:
        rule = Rule(networks=nets, ports=(53, 53), to=up, url=url)
    else:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            notes.append(f"{ib.get('protocol')} inbound {tag}: target {address} is a name; "
                         f"only port 53 targets take flows by port alone")
            return None
        rule = Rule(networks=nets, cidrs=(ipaddress.ip_network(ip),), ports=(tport, tport),
                    to=up, url=url)
    return Inbound(i, tag, "dokodemo-door", host, port, nets, (address, tport)), rule


def _tunnel_target(settings: dict, listen_port: int):
    """(address, port, networks) of a dokodemo-door / tunnel inbound's fixed
    target, in either spelling: Xray's newer ``rewriteAddress`` /
    ``rewritePort`` / ``allowedNetwork`` win over the older ``address`` /
    ``port`` / ``network``.  A target port left out or 0 is the inbound's
    own listening port, as the core reads it; port None: unusable."""
    address = settings.get("rewriteAddress", settings.get("address"))
    raw = settings.get("rewritePort", settings.get("port"))
    tport = listen_port if raw is None or (raw == 0 and not isinstance(raw, bool)) else _port(raw)
    nets = _networks(settings.get("allowedNetwork", settings.get("network")))
    return address, tport, nets


def _free_loopback_port(avoid=()) -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (and not in ``avoid``)."""
    for _ in range(64):
        t = socket.socket()
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            if port in avoid:
                continue
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
        finally:
            t.close()
            u.close()
    raise XrayConfigError("no free loopback port for the socks inbound")


def runtime_path_for(source: str) -> str:
    d, base = os.path.split(os.path.abspath(source))
    stem = base[:-5] if base.endswith(".json") else base
    return os.path.join(d, f".{stem}{RUNTIME_SUFFIX}")


def derive(source: str, *, mark: int | None = None, interface: str | None = None,
           config: dict | None = None, write: bool = True) -> Derived:
    """Read ``source`` and derive the proxy, the rules and (when needed) the
    runtime config the core must run.

    ``mark``: set ``streamSettings.sockopt.mark`` on every outbound (auto-route).
    ``interface``: set ``sockopt.interface`` instead/as well (Xray binds the
    sockets to that device).
    """
    data = load_config(source) if config is None else config
    real = os.path.realpath(source)
    name = os.path.basename(source)
    inbounds = data.get("inbounds", [])
    if inbounds is None:
        inbounds = []
    if not isinstance(inbounds, list):
        raise XrayConfigError(f"{name}: \"inbounds\" is not a list: no usable socks inbound "
                              f"and no way to add one")
    notes: list = []
    socks = None
    doks = []
    for i, ib in enumerate(inbounds):
        if not isinstance(ib, dict):
            continue
        proto = str(ib.get("protocol", "")).lower()
        if proto == "socks" and socks is None:
            socks = _socks_inbound(i, ib, notes)
        elif proto in ("dokodemo-door", "tunnel"):
            d = _dokodemo_inbound(i, ib, notes)
            if d is not None:
                doks.append(d)
    out = data
    added = []
    used_ports = set()
    tags = {ib.get("tag") for ib in inbounds
            if isinstance(ib, dict) and isinstance(ib.get("tag"), str)}

    def add_inbound(tag, protocol, settings, extra=None):
        nonlocal out
        out = _deepcopy(data, name) if out is data else out
        while tag in tags:
            tag += "-1"
        tags.add(tag)
        port = _free_loopback_port(avoid=used_ports)
        used_ports.add(port)
        new = {"tag": tag, "listen": "127.0.0.1", "port": port, "protocol": protocol,
               "settings": settings, **(extra or {})}
        out["inbounds"] = list(out.get("inbounds") or []) + [new]
        added.append(tag)
        return tag, port

    if socks is None:
        tag, port = add_inbound("tun2xray-socks", "socks",
                                {"auth": "noauth", "udp": True, "ip": "127.0.0.1"},
                                {"sniffing": dict(SNIFFING)})
        socks = (Inbound(len(out["inbounds"]) - 1, tag, "socks", "127.0.0.1", port,
                         frozenset({"tcp", "udp"})),
                 SocksUpstream("127.0.0.1", port))
    if not any(r.ports == (53, 53) for _, r in doks):
        server = _dns_server(data)
        if server is not None:
            # DNS flows to the core's own DNS server, as a DNS inbound would
            addr, sport = server
            tag, port = add_inbound("tun2xray-dns", "dokodemo-door",
                                    {"address": addr, "port": sport, "network": "tcp,udp"})
            nets = frozenset({"tcp", "udp"})
            up53 = DokodemoUpstream("127.0.0.1", port)
            doks.append((Inbound(len(out["inbounds"]) - 1, tag, "dokodemo-door", "127.0.0.1",
                                 port, nets, (addr, sport)),
                         Rule(networks=nets, ports=(53, 53), to=up53, url=f"dokodemo://127.0.0.1:{port}")))
    changed = out is not data
    if mark is not None or interface:
        out = _deepcopy(data, name) if out is data else out
        _mark_outbounds(out, mark, interface, name)
        changed = True
    ib, up = socks
    d = Derived(source=source, real_source=real, config=out, runtime_path=None, proxy=up,
                proxy_url=str(up) if up.password is None else
                f"socks5://{quote(up.username, safe='')}:{quote(up.password, safe='')}@"
                f"{format_hostport(up.host, up.port)}",
                rules=[r for _, r in doks], inbounds=[ib] + [x for x, _ in doks],
                added=added, notes=notes, mark=mark)
    if changed and write:
        d.runtime_path = write_runtime(source, out)
    return d


def _deepcopy(data: dict, name: str) -> dict:
    """A copy of a decoded config; the reader takes nesting deeper than a
    copy (or json.dumps) can follow: say so instead of a RecursionError."""
    try:
        return copy.deepcopy(data)
    except RecursionError:
        raise XrayConfigError(f"{name}: nested too deeply to derive a runtime config from") from None


def _dns_server(cfg: dict):
    """(address, port) of the config's first plain DNS server given as an IP
    address (``"dns": {"servers": ["1.1.1.1", {"address": ..., "port": ...}]}``);
    DoH/DoT URLs, names, "localhost" and "fakedns" do not count."""
    dns = cfg.get("dns")
    servers = dns.get("servers") if isinstance(dns, dict) else None
    for srv in servers if isinstance(servers, list) else ():
        port = 53
        if isinstance(srv, dict):
            port = _port(srv.get("port", 53))
            srv = srv.get("address")
        if not isinstance(srv, str) or port is None:
            continue
        addr = srv[len("udp://"):] if srv.startswith("udp://") else srv
        host, p = addr, None
        if addr.startswith("[") and "]:" in addr:
            host, p = addr[1:].split("]:", 1)
        elif addr.count(":") == 1:
            host, p = addr.split(":", 1)
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            continue
        if p is not None:
            port = _port(p)
            if port is None:
                continue
        return str(ip), port
    return None


def _mark_outbounds(cfg: dict, mark, interface, name) -> None:
    outs = cfg.get("outbounds")
    if outs is None:
        # Xray's implicit default outbound is freedom: make it explicit to mark it
        outs = cfg["outbounds"] = [{"protocol": "freedom", "tag": "direct"}]
    if not isinstance(outs, list):
        raise XrayConfigError(f"{name}: \"outbounds\" is not a list")
    for ob in outs:
        if not isinstance(ob, dict):
            continue
        if str(ob.get("protocol", "")).lower() in ("blackhole", "loopback"):
            continue           # no socket of their own
        ss = ob.get("streamSettings")
        if not isinstance(ss, dict):
            ss = ob["streamSettings"] = {}
        so = ss.get("sockopt")
        if not isinstance(so, dict):
            so = ss["sockopt"] = {}
        if mark is not None:
            so["mark"] = int(mark)
        if interface:
            so["interface"] = interface


def write_runtime(source: str, cfg: dict) -> str:
    """Write the derived config beside ``source`` (else in the temp dir);
    mode 0600: it holds the user's secrets too."""
    try:
        text = json.dumps(cfg, indent=1).encode()
    except RecursionError:
        raise XrayConfigError(f"{source}: nested too deeply to write a runtime config") from None
    for path in (runtime_path_for(source),
                 os.path.join(tempfile.gettempdir(),
                              f"tun2xray-{os.getpid()}{RUNTIME_SUFFIX}")):
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, text)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            return path
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            log.warning("cannot write the runtime config %s: %s", path, e.strerror)
    raise XrayConfigError(f"{source}: cannot write a runtime config beside it or in "
                          f"{tempfile.gettempdir()}")


def outbound_servers(cfg: dict) -> list:
    """(host, port) of every proxy server the config's outbounds dial:
    ``vnext``/``servers`` entries, the newer flat ``address``, WireGuard
    ``peers`` endpoints."""
    servers = []
    outs = cfg.get("outbounds")
    for ob in outs if isinstance(outs, list) else ():
        s = ob.get("settings") if isinstance(ob, dict) else None
        if not isinstance(s, dict):
            continue
        for key in ("vnext", "servers"):
            entries = s.get(key)
            for srv in entries if isinstance(entries, list) else ():
                if isinstance(srv, dict) and isinstance(srv.get("address"), str):
                    servers.append((srv["address"], _port(srv.get("port")) or 0))
        if isinstance(s.get("address"), str):
            servers.append((s["address"], _port(s.get("port")) or 0))
        peers = s.get("peers")
        for peer in peers if isinstance(peers, list) else ():
            if isinstance(peer, dict) and isinstance(peer.get("endpoint"), str):
                host, _, port = peer["endpoint"].rpartition(":")
                servers.append((host.strip("[]"), _port(port) or 0))
    return servers


def resolve_servers(servers) -> list:
    """IP addresses of the servers (names resolved now); unresolvable names skipped."""
    addrs = []
    for host, _port_ in servers:
        try:
            addrs.append(ipaddress.ip_address(host))
            continue
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            log.warning("outbound server %s does not resolve: %s", host, e)
            continue
        for info in infos:
            addrs.append(ipaddress.ip_address(info[4][0].split("%", 1)[0]))
    seen = []
    for a in addrs:
        if a not in seen:
            seen.append(a)
    return seen
