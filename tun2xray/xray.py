"""Xray integration: read a core's config.json, derive what `run` needs, and
supervise the core process.

Reading.  ``load_config`` reads a config exactly as the core does: its
comment filter (``//``, ``/* */`` and ``#`` outside strings), then strict
JSON (no trailing commas); errors name the file, line and column.

Deriving.  ``derive()`` looks for the tunnel-side inbounds:
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

Supervising.  ``Core`` starts ``xray`` (else ``v2ray``) on one long-lived
thread, waits until the inbounds are up (probes that speak SOCKS5 or read
the listening sockets from /proc: nothing for the core to log or dial),
forwards the core's log lines to the ``tun2xray.core`` logger, restarts it
with exponential backoff when it dies (saying why: the signal, or the
core's own last error), and stops it on exit.  A config the core rejects
gives a ``CoreError`` whose message is one line holding the core's own
reason and the user's file and line.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import copy
import ctypes
import errno
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import quote

from .rules import Rule
from .upstream.url import DokodemoUpstream, SocksUpstream, format_hostport

log = logging.getLogger("tun2xray.xray")
core_log = logging.getLogger("tun2xray.core")

DEFAULT_MARK = 0x7478          # "tx": the firewall mark --auto-route gives the core's sockets
SNIFFING = {"enabled": True, "destOverride": ["http", "tls"]}
RUNTIME_SUFFIX = ".tun2xray.json"
MAX_CONFIG = 16 << 20          # bytes; core configs are kilobytes
HOLD_LINES = 500               # core output held while it starts (bounded)


class XrayError(Exception):
    """Base of the errors `run --xray-config` reports as one line."""


class XrayConfigError(XrayError, ValueError):
    """The config cannot be used; the message is one line."""


class NotAnObjectError(XrayConfigError):
    """Valid JSON, but not an object: no config at all (a list, a number)."""


class CoreError(XrayError, RuntimeError):
    """The core could not be started (missing binary, rejected config, ...).

    ``path`` and ``reason``: the config the core was given and its own reason,
    when it rejected one."""

    def __init__(self, msg: str, path: str | None = None, reason: str | None = None):
        super().__init__(msg)
        self.path = path
        self.reason = reason


# --------------------------------------------------------------------------
# reading
#
# What the core reads is what Go's encoding/json decodes after the core's
# comment filter (Xray's and v2ray's infra/conf/json reader): comments are
# removed outside double- and single-quoted strings, newlines inside them are
# kept (so line numbers match the file), and nothing else is relaxed -- no
# trailing commas, no NaN, no byte order mark.  Go's decoder reads the first
# JSON value and ignores whatever follows it.  The filter below is a port of
# that state machine, so a config we accept is one the core accepts, and a
# position in the filtered text maps back to the user's file.

_SPECIAL = {"content": re.compile(r"""["'\\#/]"""), "dq": re.compile(r'["\\]'),
            "sq": re.compile(r"['\\]"), "comment": re.compile(r"\n"),
            "mlc": re.compile(r"[*\n]")}


def _filter_comments(text: str) -> tuple:
    """(filtered text, [(filtered_pos, original_pos)] at each jump) the way
    the core's reader filters: comments dropped, their newlines kept."""
    out = []
    jumps = [(0, 0)]
    o = 0                       # length of out so far
    i, n = 0, len(text)
    state = "content"

    def emit(s: str, at: int) -> None:
        nonlocal o
        fp, op = jumps[-1]
        if at - op != o - fp:
            jumps.append((o, at))
        out.append(s)
        o += len(s)

    while i < n:
        pat = _SPECIAL.get(state)
        if pat is not None:
            m = pat.search(text, i)
            j = n if m is None else m.start()
            if j > i:
                if state not in ("comment", "mlc"):
                    emit(text[i:j], i)
                i = j
                if m is None:
                    break
        c = text[i]
        if state == "content":
            if c in "\"'":
                state = "dq" if c == '"' else "sq"
                emit(c, i)
            elif c == "\\":
                state = "escape"
            elif c == "#":
                state = "comment"
            elif c == "/":
                state = "slash"
            else:
                emit(c, i)
        elif state in ("escape", "dqesc", "sqesc"):
            emit("\\" + c, i - 1)
            state = {"escape": "content", "dqesc": "dq", "sqesc": "sq"}[state]
        elif state in ("dq", "sq"):
            if c == "\\":
                state += "esc"
            else:
                if c == ('"' if state == "dq" else "'"):
                    state = "content"
                emit(c, i)
        elif state == "comment":            # c is the newline
            state = "content"
            emit(c, i)
        elif state == "slash":
            if c == "/":
                state = "comment"
            elif c == "*":
                state = "mlc"
            else:
                # the core emits "/x" and stays in this state (its quirk,
                # kept: such text is invalid JSON either way)
                emit("/" + c, i - 1)
        elif state == "mlc":
            if c == "*":
                state = "mlcstar"
            else:
                emit(c, i)                  # a newline
        elif state == "mlcstar":
            if c == "/":
                state = "content"
            elif c == "\n":
                emit(c, i)                  # (the core stays in this state)
            elif c != "*":
                state = "mlc"
        i += 1
    return "".join(out), jumps


def strip_comments(text: str) -> str:
    """The text the core's JSON decoder sees (comments removed)."""
    return _filter_comments(text)[0]


def _original_pos(jumps, pos: int) -> int:
    k = bisect.bisect_right(jumps, (pos, float("inf"))) - 1
    fp, op = jumps[max(k, 0)]
    return op + (pos - fp)


def _line_col(text: str, pos: int) -> tuple:
    pos = max(0, min(pos, len(text)))
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def _reject_constant(name: str):
    raise ValueError(name)


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_WS = re.compile(r"[ \t\n\r]*")


def parse_config_text(text: str, name: str = "config") -> dict:
    """Decode an Xray JSON config exactly as the core does (comments allowed,
    no trailing commas); XrayConfigError naming line and column otherwise."""
    if text.startswith("\ufeff"):
        raise XrayConfigError(f"{name}: line 1 column 1: a byte order mark (BOM) "
                              f"before the JSON (the core rejects it: save the file without it)")
    filtered, jumps = _filter_comments(text)
    start = _WS.match(filtered).end()
    if start == len(filtered):
        raise XrayConfigError(f"{name}: empty: no JSON value")
    try:
        data, _end = _DECODER.raw_decode(filtered, start)   # text after the value: ignored, as the core does
    except RecursionError:
        raise XrayConfigError(f"{name}: nested too deeply") from None
    except json.JSONDecodeError as e:
        raise XrayConfigError(_syntax_message(name, text, filtered, jumps, e.pos, e.msg)) from None
    except ValueError as e:            # NaN, Infinity
        pos = _find_outside_strings(filtered, str(e), start)
        raise XrayConfigError(_syntax_message(name, text, filtered, jumps, pos,
                                              f"{e} is not JSON")) from None
    if data is None:
        data = {}                      # the core decodes null into an empty config
    if not isinstance(data, dict):
        raise NotAnObjectError(f"{name}: the config must be a JSON object")
    return data


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _find_outside_strings(text: str, token: str, start: int) -> int:
    i = start
    while True:
        j = text.find(token, i)
        m = _STRING.search(text, i)
        if j < 0 or m is None or j < m.start():
            return j
        i = m.end()


def _syntax_message(name, text, filtered, jumps, pos, msg) -> str:
    back = len(filtered[:pos].rstrip(" \t\n\r"))
    if pos < len(filtered) and filtered[pos] in "]}" and back and filtered[back - 1] == ",":
        line, col = _line_col(text, _original_pos(jumps, back - 1))
        return (f"{name}: line {line} column {col}: trailing comma before "
                f"'{filtered[pos]}' (Xray and v2ray reject it)")
    line, col = _line_col(text, _original_pos(jumps, pos))
    return f"{name}: line {line} column {col}: not valid JSON: {msg}"


def core_position(text: str, line: int, char: int) -> tuple:
    """The core reports "at line L char C" in the filtered text (C counts
    bytes before the offending offset on that line); the (line, column) in
    the user's file."""
    filtered, jumps = _filter_comments(text)
    starts = [0] + [m.end() for m in re.finditer("\n", filtered)]
    if not 1 <= line <= len(starts):
        return line, char
    ls = starts[line - 1]
    le = starts[line] - 1 if line < len(starts) else len(filtered)
    raw = filtered[ls:le].encode()
    ncols = len(raw[:max(char - 1, 0)].decode(errors="ignore"))
    return _line_col(text, _original_pos(jumps, ls + ncols))


def load_config(path: str) -> dict:
    """Read and decode ``path`` (following a config.json link)."""
    if os.path.islink(path) and not os.path.exists(path):
        raise XrayConfigError(f"{path}: dangling link to {os.readlink(path)}")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG + 1)
    except OSError as e:
        raise XrayConfigError(f"{path}: {e.strerror}") from None
    if len(raw) > MAX_CONFIG:
        raise XrayConfigError(f"{path}: larger than {MAX_CONFIG >> 20} MB: not a core config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise XrayConfigError(f"{path}: not UTF-8 text") from None
    # name the file the user edits: a node, not the config.json link to it
    return parse_config_text(text, os.path.realpath(path) if os.path.islink(path) else path)


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
    address = settings.get("rewriteAddress", settings.get("address"))
    tport = _port(settings.get("rewritePort", settings.get("port")))
    nets = _networks(settings.get("allowedNetwork", settings.get("network")))
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


# --------------------------------------------------------------------------
# the core process

def find_binary(explicit: str | None = None) -> str:
    if explicit:
        path = explicit if os.sep in explicit else shutil.which(explicit)
        if not path or not os.path.isfile(path):
            raise CoreError(f"--xray-bin {explicit}: not found")
        if not os.access(path, os.X_OK):
            raise CoreError(f"--xray-bin {explicit}: not executable")
        return path
    for name in ("xray", "v2ray"):
        path = shutil.which(name)
        if path:
            return path
    raise CoreError("no xray or v2ray on PATH (install one or give --xray-bin)")


_VERSION_CACHE: dict = {}
_RTMGRP_LINK, _RTMGRP_IPV4_ROUTE, _RTMGRP_IPV6_ROUTE = 0x1, 0x40, 0x400


def core_command(binary: str, config: str) -> list:
    """argv for running ``binary`` with ``config``: xray and v2ray 5 take
    ``run -c``, v2ray 4 takes ``-config``."""
    if os.path.basename(binary).startswith("xray"):
        return [binary, "run", "-c", config]
    style = _VERSION_CACHE.get(binary)
    if style is None:
        try:
            r = subprocess.run([binary, "-version"], capture_output=True, text=True, timeout=5)
            out = r.stdout + r.stderr
        except (OSError, subprocess.SubprocessError):
            out = ""
        style = "v4" if re.search(r"V2Ray 4\.", out) else "run"
        _VERSION_CACHE[binary] = style
    if style == "v4":
        return [binary, "-config", config]
    return [binary, "run", "-c", config]


_NOISE = ("A unified platform", "A unified platform for anti-censorship.")


def core_reason(lines) -> str:
    """The core's own reason for failing, as one line."""
    # access-log lines ("... rejected ...") are traffic, not the core's reason
    lines = [ln.strip() for ln in lines if ln.strip() and not _ACCESS.match(_drop_stamp(ln.strip()))]
    for ln in lines:
        if ln.startswith("panic: "):
            return ln[len("panic: "):]
    for ln in lines:
        low = ln.lower()
        if "failed to" in low or "failed " in low or "error" in low:
            return _drop_stamp(ln)
    body = [ln for ln in lines if not ln.startswith(("V2Ray ", "Xray ")) and ln not in _NOISE
            and not ln.startswith("goroutine ") and not ln.startswith("\t")]
    return _drop_stamp(body[-1]) if body else "exited without a message"


def exit_reason(code: int | None, lines) -> str:
    """Why the core ended: the signal that killed it, else its exit status
    with its own last words."""
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}: {core_reason(lines)}"


_ACCESS = re.compile(r"^(?:tcp:|udp:)?\[?[0-9A-Fa-f.:]+\]?:\d+ (?:accepted|rejected) ")


def _drop_stamp(line: str) -> str:
    return re.sub(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d(\.\d+)? ", "", line)


_LEVELS = (("[Error]", logging.ERROR), ("[Warning]", logging.WARNING),
           ("[Info]", logging.INFO), ("[Debug]", logging.DEBUG))


def _level(line: str) -> int:
    for token, lvl in _LEVELS:
        if token in line:
            return lvl
    return logging.INFO


def _pdeathsig():
    # the core dies with the thread that started it (our supervisor thread,
    # which lives as long as tun2xray): no orphaned core after a crash or kill
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def inbound_listening(host: str, port: int, proto: str, pid: int | None = None) -> bool:
    """Is the inbound up?  "socks": it answers SOCKS5 (socks_probe); "tcp" /
    "udp": a socket listens on ``port`` (owned by process ``pid`` when
    given), read from /proc without connecting, so a dokodemo-door inbound
    does not dial its target for a probe."""
    if proto == "socks":
        return socks_probe(host, port) is None
    found = proc_listening(port, proto, pid)
    if found is not None:
        return found
    # no /proc to read: a UDP bind test; TCP connect (as a last resort)
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    if proto == "tcp":
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(0.5)
        try:
            s.connect((host, port))
            return True
        except OSError:
            return False
        finally:
            s.close()
    s = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        s.bind((host, port))
        return False
    except OSError as e:
        return e.errno == errno.EADDRINUSE
    finally:
        s.close()


def _socket_inodes(pid: int) -> set | None:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    out = set()
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def proc_listening(port: int, proto: str, pid: int | None = None) -> bool | None:
    """A TCP socket in LISTEN / a bound unconnected UDP socket on ``port``
    (of process ``pid``: its network namespace, a socket among its fds);
    None when /proc cannot tell."""
    base = f"/proc/{pid}/net" if pid else "/proc/self/net"
    inodes = None
    if pid:
        inodes = _socket_inodes(pid)
        if inodes is None:
            return None
    state = "0A" if proto == "tcp" else "07"       # TCP_LISTEN; UDP unconnected (TCP_CLOSE)
    want = f":{port:04X}"
    readable = False
    for fam in ("", "6"):
        try:
            with open(f"{base}/{proto}{fam}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for row in rows:
            parts = row.split()
            if (len(parts) > 9 and parts[1].endswith(want) and parts[3] == state
                    and (inodes is None or parts[9] in inodes)):
                return True
    return False if readable else None


_ASSOCIATE_ANY = b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00"      # UDP ASSOCIATE 0.0.0.0:0


def socks_probe(host: str, port: int, timeout: float = 0.5) -> str | None:
    """Speak SOCKS5 to an inbound without auth: the greeting (05 01 00,
    expecting 05 00), then a UDP ASSOCIATE that the client closes.  The
    core logs nothing for that, where a bare connect is logged as "rejected
    ... insufficient header" and a session ending after the greeting as
    "rejected ... failed to read request".  None when it answered as SOCKS5,
    else what went wrong."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
        s.sendall(b"\x05\x01\x00")
        reply = _recv_exact(s, 2)
        if reply != b"\x05\x00":
            return f"not a SOCKS5 answer to the greeting: {reply.hex(' ') or 'closed'}"
        s.sendall(_ASSOCIATE_ANY)
        reply = _recv_exact(s, 4)
        if len(reply) < 2 or reply[0] != 5:
            return f"not a SOCKS5 answer to UDP ASSOCIATE: {reply.hex(' ') or 'closed'}"
        if reply[1] != 0:
            return f"UDP ASSOCIATE refused (reply {reply[1]}): is UDP on?"
        # read the bound address too: closing with unread bytes would be a reset
        rest = {1: 6, 4: 18}.get(reply[3]) if len(reply) == 4 else None
        if rest is None and len(reply) == 4 and reply[3] == 3:
            rest = (_recv_exact(s, 1) or b"\x00")[0] + 2
        _recv_exact(s, rest or 0)
        return None
    except OSError as e:
        return f"no SOCKS5 answer ({e.strerror or e})"
    finally:
        s.close()


def _recv_exact(s, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


class Core:
    """One supervised core process.

    ``start()`` blocks until the inbounds listen (or raises CoreError with
    the core's reason); afterwards a death is answered by a restart after a
    backoff (0.5 s doubling to ``max_backoff``; reset after ``stable`` s up).
    ``reload(path, checks)`` restarts it on another config; ``stop()`` ends it.
    All process handling happens on one thread (see _pdeathsig).
    """

    def __init__(self, binary: str, config_path: str, checks, *, ready_timeout: float = 15.0,
                 min_backoff: float = 0.5, max_backoff: float = 30.0, stable: float = 30.0,
                 on_restart=None):
        self.binary = binary
        self.config_path = config_path
        self.checks = list(checks)
        self.ready_timeout = ready_timeout
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.stable = stable
        self.on_restart = on_restart          # called (on the supervisor thread) after a restart
        self.proc = None
        self.restarts = 0                     # after the core died on its own
        self.reloads = 0                      # on another config (node switch, new egress)
        self.retry_at = None                  # monotonic time of the next start after a death
        self.reloading = False
        self.started_at = None
        self.last_exit = None
        self.last_reason = ""
        self._cv = threading.Condition()
        self._cmd = None                      # ("reload", path, checks, result) | ("stop",)
        self._thread = None
        self._result = None
        self._lines = collections.deque(maxlen=40)

    # ---- public API (any thread)

    def start(self) -> None:
        result = {"done": threading.Event(), "error": None}
        self._thread = threading.Thread(target=self._main, args=(result,), name="xray-core",
                                        daemon=True)
        self._thread.start()
        result["done"].wait()
        if result["error"] is not None:
            self._thread.join(5)
            raise result["error"]

    def reload(self, config_path: str, checks=None, timeout: float | None = None) -> None:
        """Restart on ``config_path``; raises CoreError when the new config
        does not come up (the core then keeps retrying it with backoff)."""
        result = {"done": threading.Event(), "error": None}
        with self._cv:
            if self._thread is None or not self._thread.is_alive():
                raise CoreError("the core is not running")
            self._cmd = ("reload", config_path, checks, result)
            self._cv.notify_all()
        result["done"].wait(timeout)
        if result["error"] is not None:
            raise result["error"]

    def stop(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._cmd = ("stop",)
            self._cv.notify_all()
        t = self._thread
        if t is not None:
            t.join(timeout + 3)

    @property
    def alive(self) -> bool:
        p = self.proc
        return p is not None and p.poll() is None

    def status(self) -> dict:
        p = self.proc
        return {"binary": self.binary, "config": self.config_path,
                "pid": p.pid if p is not None and p.poll() is None else None,
                "alive": self.alive, "restarts": self.restarts, "reloads": self.reloads,
                "uptime": round(time.monotonic() - self.started_at, 3)
                if self.started_at is not None and self.alive else 0.0,
                "last_exit": self.last_exit, "last_reason": self.last_reason}

    def health(self) -> tuple:
        """(ok, reason): ok while the core runs; else why not, e.g. "core
        exited: killed by SIGKILL, restarting in 2s"."""
        if self.alive and self.retry_at is None and not self.reloading:
            return True, None
        if self._thread is None or not self._thread.is_alive():
            return False, "core stopped"
        at = self.retry_at
        if at is None and self.reloading:
            return False, f"core restarting on {self.config_path}"
        p = self.proc
        if at is None and p is not None and p.poll() is not None:
            # just died: the supervisor thread is about to say so
            return False, f"core exited: {exit_reason(p.returncode, list(self._lines))}, restarting"
        why = f"core exited: {self.last_reason or 'no reason given'}"
        if at is not None and at > time.monotonic():
            return False, f"{why}, restarting in {max(1, round(at - time.monotonic()))}s"
        return False, f"{why}, restarting"

    # ---- supervisor thread

    def _spawn(self):
        self._lines.clear()
        argv = core_command(self.binary, self.config_path)
        try:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, preexec_fn=_pdeathsig)
        except OSError as e:
            raise CoreError(f"cannot start {self.binary}: {e.strerror}") from None
        lines = self._lines
        # lines are held until the core is ready: a rejected config is one
        # error line, not the core's banner and stack trace
        p._t2x_hold = collections.deque(maxlen=HOLD_LINES)
        p._t2x_lock = threading.Lock()
        t = threading.Thread(target=self._forward, args=(p, lines), name="xray-log", daemon=True)
        t.start()
        p._t2x_reader = t
        self.proc = p
        return p

    @staticmethod
    def _forward(p, lines):
        for raw in p.stdout:
            line = raw.decode(errors="replace").rstrip()
            if not line:
                continue
            lines.append(line)
            with p._t2x_lock:
                if p._t2x_hold is not None:
                    p._t2x_hold.append(line)
                    continue
            core_log.log(_level(line), "%s", _drop_stamp(line))
        p.stdout.close()

    @staticmethod
    def _release(p) -> None:
        """The core is up: log what it said while starting, then live."""
        with p._t2x_lock:
            held, p._t2x_hold = p._t2x_hold, None
            for line in held or ():
                core_log.log(_level(line), "%s", _drop_stamp(line))

    def _wait_ready(self, p) -> CoreError | None:
        deadline = time.monotonic() + self.ready_timeout
        pending = list(self.checks)
        while True:
            if p.poll() is not None:
                p._t2x_reader.join(2)
                reason = file_reason(core_reason(self._lines), self.config_path)
                return CoreError(f"{os.path.basename(self.binary)} rejected "
                                 f"{self.config_path}: {reason}", self.config_path, reason)
            pending = [c for c in pending if not inbound_listening(*c, pid=p.pid)]
            if not pending:
                return None
            if time.monotonic() > deadline:
                host, port, proto = pending[0]
                return CoreError(f"{os.path.basename(self.binary)} did not open "
                                 f"{proto} {format_hostport(host, port)} within "
                                 f"{self.ready_timeout:g}s")
            with self._cv:
                if self._cmd is not None and self._cmd[0] == "stop":
                    return CoreError("stopped while starting")
            time.sleep(0.05)

    def _terminate(self, p, grace: float = 3.0) -> None:
        if p is None:
            return
        if p.poll() is None:
            try:
                p.terminate()
                p.wait(grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            except ProcessLookupError:
                pass
        reader = getattr(p, "_t2x_reader", None)
        if reader is not None:
            reader.join(2)

    def _main(self, first) -> None:
        try:
            p = self._spawn()
        except CoreError as e:
            first["error"] = e
            first["done"].set()
            return
        err = self._wait_ready(p)
        if err is not None:
            self._terminate(p)
            self.proc = None
            first["error"] = err
            first["done"].set()
            return
        self.started_at = time.monotonic()
        self._release(p)
        first["done"].set()
        backoff = self.min_backoff
        pending_result = None
        while True:
            # wait for a command or the process's end
            cmd = None
            with self._cv:
                while self._cmd is None and p is not None and p.poll() is None:
                    self._cv.wait(0.2)
                cmd, self._cmd = self._cmd, None
            if cmd is not None and cmd[0] == "stop":
                self._terminate(p)
                if pending_result is not None:
                    pending_result["error"] = CoreError("stopped")
                    pending_result["done"].set()
                return
            if cmd is not None and cmd[0] == "reload":
                if pending_result is not None:
                    pending_result["done"].set()
                _, path, checks, pending_result = cmd
                self.reloading = True
                self._terminate(p)
                self.config_path = path
                if checks is not None:
                    self.checks = list(checks)
                backoff = self.min_backoff
                delay = 0.0
            else:
                # the core died on its own
                self.last_exit = p.returncode if p is not None else None
                if p is not None:
                    p._t2x_reader.join(2)
                    self.last_reason = exit_reason(p.returncode, self._lines)
                    up = time.monotonic() - (self.started_at or 0)
                    if up >= self.stable:
                        backoff = self.min_backoff
                    log.warning("core exited: %s; restarting in %.1fs", self.last_reason, backoff)
                delay = backoff
                self.retry_at = time.monotonic() + delay
                self.reloading = False
                backoff = min(backoff * 2, self.max_backoff)
            self.proc = None
            p = None
            if delay:
                with self._cv:
                    if self._cmd is None:
                        self._cv.wait(delay)
                    if self._cmd is not None:
                        continue       # stop or another reload wins over the restart
            try:
                p = self._spawn()
            except CoreError as e:
                log.error("%s", e)
                if pending_result is not None:
                    pending_result["error"] = e
                    pending_result["done"].set()
                    pending_result = None
                continue
            err = self._wait_ready(p)
            if err is not None:
                log.error("%s", err)
                if pending_result is not None:
                    pending_result["error"] = err
                    pending_result["done"].set()
                    pending_result = None
                if p.poll() is None and "did not open" not in str(err):
                    self._terminate(p)
                self._release(p)
                continue
            self.started_at = time.monotonic()
            self._release(p)
            if self.reloading:
                self.reloads += 1
            else:
                self.restarts += 1
            self.reloading = False
            self.retry_at = None
            log.info("core running (pid %d, %s)", p.pid, self.config_path)
            if pending_result is not None:
                pending_result["done"].set()
                pending_result = None
            if self.on_restart is not None:
                try:
                    self.on_restart(self)
                except Exception:               # a callback must not kill supervision
                    log.exception("on_restart callback failed")


def check_config(binary: str, path: str, timeout: float = 15.0) -> None:
    """Ask the core whether it accepts ``path`` (``-test``); CoreError with the
    core's own reason (positions given as the file's line and column) when
    it does not."""
    argv = core_command(binary, path)
    argv.insert(-2, "-test")      # [bin, -test, -config, X] / [bin, run, -test, -c, X]
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout)
    except OSError as e:
        raise CoreError(f"cannot start {binary}: {e.strerror}") from None
    except subprocess.TimeoutExpired:
        raise CoreError(f"{os.path.basename(binary)} -test {path}: no answer within {timeout:g}s") from None
    if r.returncode != 0:
        reason = file_reason(core_reason((r.stdout + "\n" + r.stderr).splitlines()), path)
        raise CoreError(f"{os.path.basename(binary)} rejected {path}: {reason}", path, reason)


_CORE_POS = re.compile(r"at line (\d+) char (\d+)")


def file_reason(reason: str, path: str) -> str:
    """The core's reason with its "at line L char C" (counted in the text
    after its comment filter) turned into the line and column of ``path``."""
    m = _CORE_POS.search(reason)
    if m is None:
        return reason
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_CONFIG).decode("utf-8", errors="replace")
    except OSError:
        return reason
    line, col = core_position(text, int(m.group(1)), int(m.group(2)))
    return f"{reason[:m.start()]}at line {line} column {col}{reason[m.end():]}"


def user_rejection(binary: str, d: Derived, err: CoreError) -> CoreError:
    """A rejection of the runtime config, told about the user's file: when
    the core rejects the user's file too, its own reason and line there;
    otherwise the reason with the user's file named first."""
    if d.runtime_path is None or err.path != d.runtime_path:
        return err
    try:
        check_config(binary, d.real_source)
    except CoreError as own:
        return own
    return CoreError(f"{os.path.basename(binary)} rejected {d.real_source} (run as tun2xray's "
                     f"runtime copy {d.runtime_path}): {err.reason}", d.real_source, err.reason)


# --------------------------------------------------------------------------
# `run --xray-config`: the core, its config link, and the engine's routes

class XraySession:
    """Everything `run --xray-config` adds around the engine.

    prepare() reads and derives the config (no process, nothing written but
    the runtime config); start() starts the core; attach(engine, router)
    watches the config link (node switching) and the default route (with
    --auto-route) from the engine's loop; close() undoes it all.
    """

    def __init__(self, source: str, *, binary: str | None = None, mark: int | None = None,
                 poll: float = 1.0):
        self.source = source
        self.binary_arg = binary
        self.mark = mark
        self.poll = poll
        self.binary = None
        self.derived = None
        self.core = None
        self.owns_proxy = True          # False when --proxy overrides the config's socks inbound
        self.router = None
        self.engine = None
        self.autoroute = None
        self.switches = 0
        self._stamp = None
        self._egress = None
        self._task = None
        self._runtime_paths = set()
        self.extra_excluded = []        # the profile's excluded_routes
        self._nl = None                 # netlink socket: route/link change events
        self._nl_loop = None
        self._route_dirty = False

    # -- before the engine

    def prepare(self) -> Derived:
        self.binary = find_binary(self.binary_arg)
        self._stamp = self._target_stamp()
        self.derived = self._derive()
        return self.derived

    def _derive(self) -> Derived:
        d = derive(self.source, mark=self.mark)
        if d.runtime_path:
            self._runtime_paths.add(d.runtime_path)
        return d

    def _core_config(self, d: Derived) -> str:
        return d.runtime_path or d.real_source

    def start(self) -> None:
        d = self.derived
        self.core = Core(self.binary, self._core_config(d), d.ready_checks())
        try:
            self.core.start()
        except CoreError as e:
            raise user_rejection(self.binary, d, e) from None
        log.info("core %s running (pid %d) on %s; socks %s%s", os.path.basename(self.binary),
                 self.core.proc.pid, self.core.config_path, format_hostport(d.proxy.host, d.proxy.port),
                 f"; added inbounds {', '.join(d.added)}" if d.added else "")
        for note in d.notes:
            log.info("config: %s", note)

    def server_addresses(self, d: Derived | None = None) -> list:
        return resolve_servers(outbound_servers((d or self.derived).config))

    def _target_stamp(self):
        real = os.path.realpath(self.source)
        try:
            st = os.stat(real)
        except OSError:
            return (real, None)
        return (real, st.st_mtime_ns, st.st_size)

    def start_with(self, settings) -> None:
        """Add the config's rules to the router and start the core."""
        settings.router.rules.extend(self.derived.rules)
        profile = getattr(settings, "profile", None)
        if profile is not None:
            self.extra_excluded = [ipaddress.ip_network(x, strict=False) for x in
                                   list(profile.ipv4.excluded_routes) + list(profile.ipv6.excluded_routes)]
        self.start()

    def route_up(self, tun: str) -> None:
        """--auto-route: the default routes through ``tun`` (after the device is up)."""
        if self.mark is None:
            return
        from .autoroute import AutoRoute
        from .autoroute import default_egress
        ar = AutoRoute(tun, mark=self.mark, excluded=self.excluded_routes())
        self.autoroute = ar
        ar.up()
        # (pyroute2 runs its own asyncio loop: call it here, before ours
        # runs, and later only from executor threads)
        try:
            self._egress = default_egress()
        except Exception as e:                      # netlink trouble: no watching
            log.warning("cannot read the default route: %s", e)

    # -- with the engine

    def attach(self, engine, router) -> None:
        import asyncio
        loop = asyncio.get_running_loop()
        self.engine = engine
        self.router = router
        if self.autoroute is not None and self._egress is not None:
            # route and link changes arrive as netlink multicast messages; a
            # lookup of the default route follows only when something changed
            try:
                s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)   # NETLINK_ROUTE
                s.setblocking(False)
                s.bind((0, _RTMGRP_LINK | _RTMGRP_IPV4_ROUTE | _RTMGRP_IPV6_ROUTE))
            except OSError as e:
                log.warning("cannot watch the default route: %s", e)
            else:
                self._nl = s
                self._nl_loop = loop
                loop.add_reader(s.fileno(), self._on_route_event)
        self._task = loop.create_task(self._watch())

    def _on_route_event(self) -> None:
        s = self._nl
        try:
            while s.recv(65536):
                pass
        except OSError:              # drained (EAGAIN), or ENOBUFS after a burst: check anyway
            pass
        self._route_dirty = True

    async def _watch(self) -> None:
        import asyncio
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.poll)
            stamp = self._target_stamp()
            if stamp != self._stamp:
                self._stamp = stamp
                if stamp[1] is None:
                    log.error("%s now points at %s, which does not exist: keeping the running node",
                              self.source, stamp[0])
                    continue
                await self.switch(loop)
                continue
            if self._route_dirty and self.autoroute is not None:
                self._route_dirty = False
                from .autoroute import default_egress
                try:
                    eg = await loop.run_in_executor(None, default_egress)
                except Exception as e:                 # netlink trouble: try at the next event
                    log.warning("cannot read the default route: %s", e)
                    continue
                if eg and eg != self._egress:
                    log.info("default route moved from %s to %s: reloading the core", self._egress, eg)
                    self._egress = eg
                    await self.switch(loop, why="egress")

    async def switch(self, loop, why: str = "node") -> bool:
        """Reload the core on what the config link points at now; reset the
        old node's flows.  On a bad config the running node stays."""
        old = self.derived
        try:
            d = await loop.run_in_executor(None, self._reload_blocking)
        except (XrayConfigError, CoreError) as e:
            log.error("%s switch failed, keeping %s: %s", why, old.real_source, e)
            return False
        r = self.router
        if self.owns_proxy:
            r.default = d.proxy
            r.default_url = d.proxy_url
        old_ids = {id(x) for x in old.rules}
        r.rules[:] = [x for x in r.rules if id(x) not in old_ids] + list(d.rules)
        n = self.engine.reset_flows() if self.engine is not None else 0
        self.switches += 1
        log.info("switched to %s (%s): %d flows of the old node reset", d.real_source, why, n)
        return True

    def _reload_blocking(self) -> Derived:
        d = self._derive()
        cfg = self._core_config(d)
        try:
            check_config(self.binary, cfg)
            self.core.reload(cfg, d.ready_checks(), timeout=self.core.ready_timeout + 10)
        except CoreError as e:
            raise user_rejection(self.binary, d, e) from None
        if self.autoroute is not None:
            self.autoroute.set_excluded(self.excluded_routes(d))
        self.derived = d
        return d

    def excluded_routes(self, d: Derived | None = None) -> list:
        return list(self.extra_excluded) + [ipaddress.ip_network(a) for a in self.server_addresses(d)]

    def status(self) -> dict:
        d = self.derived
        return {"config": self.source, "node": d.real_source if d else None,
                "runtime_config": d.runtime_path if d else None, "switches": self.switches,
                "mark": self.mark, "auto_route": self.autoroute is not None,
                "core": self.core.status() if self.core is not None else None}

    def health(self) -> tuple:
        """(ok, reason) of the core for the state: ok while it runs; else
        e.g. (False, "core exited: killed by SIGKILL, restarting in 2s")."""
        if self.core is None:
            return False, "core not started"
        return self.core.health()

    def wrap_status(self, status_fn):
        def status():
            st = status_fn()
            st["xray"] = self.status()
            return st
        return status

    def detach(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._nl is not None:
            with contextlib.suppress(Exception):
                self._nl_loop.remove_reader(self._nl.fileno())
            self._nl.close()
            self._nl = None

    def close(self) -> None:
        self.detach()
        if self.autoroute is not None:
            try:
                self.autoroute.down()
            except Exception as e:                  # keep cleaning up
                log.error("auto-route cleanup: %s", e)
            self.autoroute = None
        if self.core is not None:
            self.core.stop()
            self.core = None
        for p in self._runtime_paths:
            with contextlib.suppress(OSError):
                os.unlink(p)
        self._runtime_paths.clear()


def session_from_args(args) -> XraySession:
    """`run` flags -> a prepared session (config read and derived, nothing
    started).  Sets ``args.proxy`` to the config's socks inbound unless
    --proxy was given."""
    if args.auto_route and not args.xray_config:
        raise XrayConfigError("--auto-route needs --xray-config (the core's sockets must carry "
                              "the mark that keeps them out of the TUN)")
    if args.auto_route and not args.device.startswith("tun://"):
        raise XrayConfigError("--auto-route needs a tun:// device")
    xs = XraySession(args.xray_config, binary=args.xray_bin,
                     mark=DEFAULT_MARK if args.auto_route else None)
    xs.prepare()
    if args.proxy:
        xs.owns_proxy = False
    else:
        args.proxy = xs.derived.proxy_url
    return xs

