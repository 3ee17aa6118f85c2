"""The profile: one JSON document for `tun2xray run --config` and the bridge's
``config_json`` (reference: docs/profile.md).

One declarative table, KEYS, drives everything: validation here (every error
names the key path, e.g. ``rules[1].port: "70000" is not a port``), the JSON
Schema (``python3 -m tun2xray.profile --schema`` writes
tun2xray/profile.schema.json), and the `run` flag each key mirrors
(``Key.flag``: the argparse dest; tun2xray.cli fills unset flags from the
profile with apply_to_args()).  Adding a key for a new `run` flag is one
Key(...) entry below.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from dataclasses import dataclass, field

from .rules import BLOCK, DomainMatcher, Rule, _printable, parse_networks, parse_port_range, split_domain_entry
from .upstream.url import parse_upstream


class ProfileError(ValueError):
    pass


DEFAULT_ROUTES = {4: ["0.0.0.0/0"], 6: ["::/0"]}


@dataclass(frozen=True, slots=True)
class Key:
    path: str                   # dotted path; "ipv4.routes"
    kind: str                   # a name in _CHECKS / _SCHEMAS
    default: object             # what an absent key means (None: see doc)
    doc: str
    flag: str | None = None     # the `run` flag's argparse dest it mirrors
    run_only: bool = False      # the bridge rejects it
    lo: float | None = None
    hi: float | None = None
    choices: tuple = ()


KEYS: tuple = (
    Key("proxy", "socks_url", None, "the default route: the Xray socks inbound (socks5://[user:pass@]host:port); "
        "required by the bridge; `run` takes it from --proxy, this key or the xray config's socks inbound",
        flag="proxy"),
    Key("mtu", "int", 1500, "device MTU (run: set on a tun:// device; the stack's MSS follows it)",
        flag="mtu", lo=576, hi=65535),
    Key("ipv4.address", "iface4", "198.18.0.1/15", "the TUN's IPv4 address/prefix", flag="address"),
    Key("ipv4.routes", "prefixes4", None, "IPv4 prefixes routed into the TUN (see docs/profile.md "
        "\"Routes\" for the default)"),
    Key("ipv4.excluded_routes", "prefixes4", [], "IPv4 prefixes kept out of the TUN"),
    Key("ipv6.address", "iface6", "fd00:7478::1/64", "the TUN's IPv6 address/prefix", flag="address6"),
    Key("ipv6.routes", "prefixes6", None, "IPv6 prefixes routed into the TUN"),
    Key("ipv6.excluded_routes", "prefixes6", [], "IPv6 prefixes kept out of the TUN"),
    Key("dns.servers", "ips", ["198.18.0.2"], "DNS servers whose queries go through the TUN "
        "(run: host routes into a tun:// device; hosts: their DNS settings)"),
    Key("dns.mode", "enum", "off", "fake-ip: the engine answers A/AAAA with fake addresses and dials flows to "
        "them by name; remember: queries go to the upstream and answered addresses are dialled by name; "
        "off: DNS flows are ordinary flows (docs/dns.md)", flag="dns", choices=("off", "fake-ip", "remember")),
    Key("dns.upstream", "dns_url", None, "where real queries go: dokodemo://HOST:PORT (a DNS dokodemo/tunnel "
        "inbound) or socks5://HOST:PORT[?server=IP[:PORT]] (UDP ASSOCIATE to that DNS server, default "
        "1.1.1.1:53); default: the target of a udp:53 rule", flag="dns_upstream"),
    Key("dns.fake_ipv4", "prefix4", "198.19.0.0/16", "the IPv4 fake pool (fake-ip); never hands out the "
        "TUN's own or the DNS servers' addresses"),
    Key("dns.fake_ipv6", "prefix6", "fd00:7478:f::/64", "the IPv6 fake pool (fake-ip)"),
    Key("dns.hijack", "bool", True, "answer DNS flows to every address (true) or only to dns.servers (false)"),
    Key("dns.ttl", "int", 60, "TTL of fake answers, seconds", lo=1, hi=86400),
    Key("dns.cache_file", "path", None, "keep the fake mappings in this file across restarts (written "
        "atomically, at most 65536 per family)"),
    Key("rules", "rules", [], "flow rules, first match wins, no match goes to proxy "
        "(run: --map rules come first); a rule's to is an inbound URL or \"block\"; its domain "
        "entries (full:, suffix:/domain:, keyword:, regexp:) match flows whose name is known"),
    Key("udp_timeout", "number", 60.0, "seconds an idle UDP flow lives", lo=1, hi=86400),
    Key("tcp_connect_timeout", "number", 10.0, "seconds to wait for an inbound to accept a TCP flow",
        lo=0.1, hi=600),
    Key("tcp_refusal_window", "number", 1.5, "seconds after the inbound accepts a TCP flow within which "
        "a close with no data counts as a refusal (client gets RST); after it a clean close is a FIN",
        lo=0, hi=60),
    Key("max_flows", "int", 65536, "flows at once; more are refused and counted", lo=1, hi=10_000_000),
    Key("icmp_echo", "enum", "reply", "answer pings to any address (reply) or not (drop)",
        choices=("reply", "drop")),
    Key("max_udp_flows", "int", 16384, "UDP flows at once; a new one beyond evicts the least recently used "
        "(counted), so a flood of UDP flows never locks out DNS or a new TCP flow", lo=1, hi=10_000_000),
    Key("udp_port_timeouts", "port_timeouts", {"53": 10, "123": 10}, "idle seconds for UDP flows to these "
        "destination ports, instead of udp_timeout (the object given replaces the default)", lo=1, hi=86400),
    Key("tcp_buffer_kb", "int", 1024, "per TCP flow: the receive buffer (largest advertised window) and "
        "the send buffer, each, in KiB", lo=16, hi=65536),
    Key("memory_budget_mb", "number", 0, "MiB for every byte the engine buffers, all flows together "
        "(0: no budget); near it windows shrink, at it new flows are refused and counted", lo=0, hi=65536),
    Key("tcp_synack_retries", "int", 5, "SYN-ACK retransmissions before a half-open TCP flow (a client that "
        "sent a SYN and never answered the SYN-ACK) is dropped and its upstream released (5: about 63 s, "
        "as Linux's tcp_synack_retries)", lo=1, hi=10),
    Key("trust_checksums", "bool", False, "the packets come from this machine's own network stack "
        "(a packet-flow host, a VpnService or utun fd): do not verify their TCP/UDP/IPv4 checksums "
        "(a tun:// device never does)"),
    # ---- `run` only: the bridge's host owns the device, the core and the logs
    Key("device", "device", None, "tun://NAME, fd://N[?header=af] or unix:///path", flag="device",
        run_only=True),
    Key("control", "control", None, "serve JSON status on unix:///path (default: unix:///run/tun2xray/NAME.sock, "
        "per device; \"none\": no socket)", flag="control", run_only=True),
    Key("record", "path", None, "write every packet crossing the device to this pcap", flag="record",
        run_only=True),
    Key("record_wire", "bool", False, "record wire-sized packets (cut TCP super-segments to the MTU)",
        flag="record_wire", run_only=True),
    Key("record_max_mb", "number", None, "rotate the capture at this size in MB (default 256, 0: no cap)",
        flag="record_max_mb", run_only=True, lo=0, hi=9_999_999),
    Key("log_level", "enum", "info", "log level", flag="log_level", run_only=True,
        choices=("debug", "info", "warning", "error")),
    Key("log_format", "enum", "text", "text: one timestamped line per record; json: one JSON object per line",
        flag="log_format", run_only=True, choices=("text", "json")),
    Key("workers", "int", None, "worker processes (default: one per two cores for a tun:// device, else 1)",
        flag="workers", run_only=True, lo=1, hi=64),
    Key("xray.config", "path", None, "start and supervise the core with this config.json", flag="xray_config",
        run_only=True),
    Key("xray.bin", "path", None, "the core binary (default: xray, else v2ray, on PATH)", flag="xray_bin",
        run_only=True),
    Key("xray.auto_route", "bool", False, "route everything through the TUN (needs xray.config)",
        flag="auto_route", run_only=True),
)

KEY_BY_PATH = {k.path: k for k in KEYS}


def _objects() -> dict:
    """{object path: [child names]}; "" is the top level."""
    out: dict = {"": []}
    for k in KEYS:
        parent, _, name = k.path.rpartition(".")
        if parent and parent not in out:
            out[parent] = []
            out[""].append(parent)
        out[parent].append(name)
    return out


OBJECTS = _objects()


@dataclass(slots=True)
class IPSettings:
    address: str
    routes: list | None          # None: not given (see effective_routes)
    excluded_routes: list


@dataclass(slots=True)
class Profile:
    proxy: str | None
    mtu: int = 1500
    ipv4: IPSettings = field(default_factory=lambda: IPSettings("198.18.0.1/15", None, []))
    ipv6: IPSettings = field(default_factory=lambda: IPSettings("fd00:7478::1/64", None, []))
    dns_servers: list = field(default_factory=lambda: ["198.18.0.2"])
    rules: list = field(default_factory=list)        # list[Rule]
    udp_timeout: float = 60.0
    tcp_connect_timeout: float = 10.0
    tcp_refusal_window: float = 1.5
    max_flows: int = 65536
    icmp_echo: str = "reply"
    values: dict = field(default_factory=dict)       # every key path given -> its checked value

    def get(self, path: str):
        """The value of *path*: as given, else the key's default."""
        if path in self.values:
            return self.values[path]
        return KEY_BY_PATH[path].default

    def routes(self, version: int, default_all: bool) -> list:
        """The IPv4/IPv6 routes: as given, else everything (default_all: a
        host applies them, or --auto-route) or nothing (a plain `run`)."""
        given = (self.ipv4 if version == 4 else self.ipv6).routes
        if given is not None:
            return list(given)
        return list(DEFAULT_ROUTES[version]) if default_all else []

    def to_json(self) -> dict:
        out: dict = {}
        for path, value in self.values.items():
            node = out
            parts = path.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = value
        return out


# --------------------------------------------------------------- validation

def load_profile(source, *, bridge: bool = False) -> Profile:
    """Check and load a profile; *source* is JSON text, bytes or a decoded
    dict.  bridge=True: also reject the keys only `run` reads and require
    proxy (the bridge starts no core).  `run` checks that it has a proxy
    after merging flags: --proxy, proxy, or xray.config's socks inbound."""
    if isinstance(source, (str, bytes, bytearray)):
        try:
            data = json.loads(source)
        except json.JSONDecodeError as e:
            raise ProfileError(f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        except UnicodeDecodeError as e:          # bytes that are not UTF-8/16/32 text
            raise ProfileError(f"not valid JSON: not UTF-8 text (byte {e.start})") from None
        except RecursionError:
            raise ProfileError("not valid JSON: nested too deeply") from None
    else:
        data = source
    if not isinstance(data, dict):
        raise ProfileError("the profile must be a JSON object")
    values: dict = {}
    _walk(data, "", values)
    if bridge:
        for path in values:
            if KEY_BY_PATH[path].run_only:
                raise ProfileError(f"{path}: only `tun2xray run` reads this key; the bridge's host "
                                   "owns the device, the core and the logs")
    if bridge and "proxy" not in values:
        raise ProfileError("proxy: is required")
    return _build(values)


def _walk(d: dict, path: str, values: dict) -> None:
    names = OBJECTS[path]
    for name, v in d.items():
        where = f"{path}.{name}" if path else name
        if name not in names:
            raise ProfileError(f"{_printable(where)}: unknown key")   # one line, whatever the key holds
        if where in OBJECTS:
            _walk(_obj(v, where), where, values)
        else:
            key = KEY_BY_PATH[where]
            values[where] = _CHECKS[key.kind](v, where, key)


def _build(values: dict) -> Profile:
    p = Profile(proxy=values.get("proxy"), values=values)
    p.mtu = p.get("mtu")
    p.ipv4 = IPSettings(p.get("ipv4.address"), values.get("ipv4.routes"), list(p.get("ipv4.excluded_routes")))
    p.ipv6 = IPSettings(p.get("ipv6.address"), values.get("ipv6.routes"), list(p.get("ipv6.excluded_routes")))
    p.dns_servers = list(p.get("dns.servers"))
    p.rules = [_rule_obj(r) for r in values.get("rules", [])]
    p.udp_timeout = float(p.get("udp_timeout"))
    p.tcp_connect_timeout = float(p.get("tcp_connect_timeout"))
    p.tcp_refusal_window = float(p.get("tcp_refusal_window"))
    p.max_flows = p.get("max_flows")
    p.icmp_echo = p.get("icmp_echo")
    return p


def _obj(v, path):
    if not isinstance(v, dict):
        raise ProfileError(f"{path}: must be an object")
    return v


def _list(v, path):
    if not isinstance(v, list):
        raise ProfileError(f"{path}: must be a list")
    return v


def _int(v, path, key):
    if isinstance(v, bool) or not isinstance(v, int) or not key.lo <= v <= key.hi:
        raise ProfileError(f"{path}: {json.dumps(v)} is not an integer in {key.lo}..{key.hi}")
    return v


def _num(v, path, key):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not key.lo <= v <= key.hi:
        raise ProfileError(f"{path}: {json.dumps(v)} is not a number in {key.lo}..{key.hi}")
    return v


def _bool(v, path, key):
    if not isinstance(v, bool):
        raise ProfileError(f"{path}: {json.dumps(v)} is not true or false")
    return v


def _enum(v, path, key):
    if v not in key.choices or not isinstance(v, str):
        names = [f'"{c}"' for c in key.choices]
        raise ProfileError(f"{path}: {json.dumps(v)} is not " + ", ".join(names[:-1]) + " or " + names[-1])
    return v


def _url(v, path, key=None):
    if not isinstance(v, str):
        raise ProfileError(f"{path}: {json.dumps(v)} is not a URL")
    try:
        parse_upstream(v)
    except ValueError as e:
        raise ProfileError(f"{path}: {e}") from None
    return v


def _socks_url(v, path, key):
    _url(v, path)
    if not v.strip().lower().startswith(("socks5://", "socks5h://")):
        scheme = v.strip().partition("://")[0]
        raise ProfileError(f"{path}: the default route must be a socks5:// inbound, not {scheme}:// "
                           "(a dokodemo inbound has one fixed destination: use it in a rule)")
    return v


def _path(v, path, key):
    if not isinstance(v, str) or not v or "\0" in v:
        raise ProfileError(f"{path}: {json.dumps(v)} is not a file path")
    return v


def _device(v, path, key):
    if not isinstance(v, str) or not v.startswith(("tun://", "fd://", "unix://")) or len(v.partition("://")[2]) == 0:
        raise ProfileError(f"{path}: {json.dumps(v)} is not tun://NAME, fd://N or unix:///path")
    return v


def _control(v, path, key):
    if not isinstance(v, str) or not (v.startswith("unix:///") or v.lower() in ("none", "off")):
        raise ProfileError(f"{path}: {json.dumps(v)} is not unix:///path or \"none\"")
    return v


def _dns_url(v, path, key):
    from .dns.settings import DnsSettingsError, parse_upstream_url
    if not isinstance(v, str):
        raise ProfileError(f"{path}: {json.dumps(v)} is not a URL")
    try:
        parse_upstream_url(v)
    except DnsSettingsError as e:
        raise ProfileError(f"{path}: {e}") from None
    return v


def _prefix(version):
    def check(v, path, key):
        from .dns.settings import DnsSettingsError, check_pool
        try:
            check_pool(path, v, version)
        except DnsSettingsError as e:
            raise ProfileError(str(e)) from None
        return v
    return check


def _iface(version):
    def check(v, path, key):
        try:
            iface = ipaddress.ip_interface(v)
        except (ValueError, TypeError):
            raise ProfileError(f"{path}: {json.dumps(v)} is not an address/prefix") from None
        if iface.version != version:
            raise ProfileError(f"{path}: {json.dumps(v)} is not IPv{version}")
        return v
    return check


def _prefixes(version):
    def check(v, path, key):
        for i, n in enumerate(_list(v, path)):
            try:
                net = ipaddress.ip_network(n)
            except (ValueError, TypeError):
                raise ProfileError(f"{path}[{i}]: {json.dumps(n)} is not a prefix{_host_bits(n)}") from None
            if net.version != version:
                raise ProfileError(f"{path}[{i}]: {json.dumps(n)} is not IPv{version}")
        return list(v)
    return check


def _host_bits(n) -> str:
    try:
        return f" (host bits set; {ipaddress.ip_network(n, strict=False)}?)"
    except (ValueError, TypeError):
        return ""


def _ips(v, path, key):
    for i, s in enumerate(_list(v, path)):
        try:
            ipaddress.ip_address(s)
        except (ValueError, TypeError):
            raise ProfileError(f"{path}[{i}]: {json.dumps(s)} is not an IP address") from None
    return list(v)


_RULE_KEYS = ("network", "cidr", "port", "domain", "to")


def _port_timeouts(v, path, key):
    out = {}
    for p, t in _obj(v, path).items():
        if not (isinstance(p, str) and p.isdigit() and p.isascii() and 1 <= int(p) <= 65535):
            raise ProfileError(f"{path}.{_printable(p)}: not a port (1..65535)")
        _num(t, f"{path}.{p}", key)
        out[str(int(p))] = t
    return out


def _rules(v, path, key):
    out = []
    for i, r in enumerate(_list(v, path)):
        where = f"{path}[{i}]"
        d = _obj(r, where)
        for k in d:
            if k not in _RULE_KEYS:
                raise ProfileError(f"{where}.{_printable(k)}: unknown key")
        _rule_obj(d, where)             # checks; the Rule is built again in _build
        out.append(dict(d))
    return out


def _rule_obj(d: dict, path: str = "rules[]") -> Rule:
    if "to" not in d:
        raise ProfileError(f"{path}.to: is required")
    if isinstance(d["to"], str) and d["to"].strip() == "block":
        to_url, to = "block", BLOCK
    else:
        to_url = _url(d["to"], f"{path}.to")
        to = parse_upstream(to_url)
    nets = frozenset({"tcp", "udp"})
    if "network" in d:
        if not isinstance(d["network"], str):
            raise ProfileError(f"{path}.network: {json.dumps(d['network'])} is not tcp, udp or tcp,udp")
        try:
            nets = parse_networks(d["network"])
        except ValueError as e:
            raise ProfileError(f"{path}.network: {e}") from None
    cidrs = ()
    if "cidr" in d:
        out = []
        for i, c in enumerate(_list(d["cidr"], f"{path}.cidr")):
            try:
                out.append(ipaddress.ip_network(c))
            except (ValueError, TypeError):
                raise ProfileError(f"{path}.cidr[{i}]: {json.dumps(c)} is not a prefix{_host_bits(c)}") from None
        cidrs = tuple(out)
    ports = None
    if "port" in d:
        try:
            ports = parse_port_range(d["port"])
        except ValueError as e:
            raise ProfileError(f"{path}.port: {e}") from None
    domains = _domains(d["domain"], f"{path}.domain") if "domain" in d else None
    return Rule(networks=nets, cidrs=cidrs, ports=ports, to=to, url=to_url, domains=domains)


def _domains(v, path) -> DomainMatcher:
    entries = _list(v, path)
    if not entries:
        raise ProfileError(f"{path}: is empty (leave the key out to match any name)")
    for i, e in enumerate(entries):
        try:
            split_domain_entry(e)
        except ValueError as err:
            raise ProfileError(f"{path}[{i}]: {err}") from None
    return DomainMatcher(entries)


_CHECKS = {
    "url": _url, "socks_url": _socks_url, "int": _int, "number": _num, "bool": _bool, "enum": _enum, "path": _path,
    "device": _device, "control": _control, "iface4": _iface(4), "iface6": _iface(6),
    "prefixes4": _prefixes(4), "prefixes6": _prefixes(6), "ips": _ips, "rules": _rules,
    "dns_url": _dns_url, "prefix4": _prefix(4), "prefix6": _prefix(6),
    "port_timeouts": _port_timeouts,
}


# ------------------------------------------------------------------- schema
# The patterns say what a regular expression can say; the validator above is
# the authority on the rest (an IPv6 address's full grammar, host bits set in
# a prefix, a URL's host and port).

_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_V4 = rf"{_OCTET}(\.{_OCTET}){{3}}"
_V6 = r"[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*"
_LEN4 = r"(3[0-2]|[12]?[0-9])"
_LEN6 = r"(12[0-8]|1[01][0-9]|[1-9]?[0-9])"
_PORT = r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"
_URL = rf"^(socks5|socks5h|dokodemo|dokodemo-door|tunnel)://[^\s/?#]+:{_PORT}/?$"
_SOCKS_URL = rf"^(socks5|socks5h)://[^\s/?#]+:{_PORT}/?$"

_SCHEMAS = {
    "url": lambda k: {"type": "string", "pattern": _URL},
    "socks_url": lambda k: {"type": "string", "pattern": _SOCKS_URL},
    "int": lambda k: {"type": "integer", "minimum": k.lo, "maximum": k.hi},
    "number": lambda k: {"type": "number", "minimum": k.lo, "maximum": k.hi},
    "bool": lambda k: {"type": "boolean"},
    "enum": lambda k: {"enum": list(k.choices)},
    "path": lambda k: {"type": "string", "minLength": 1},
    "device": lambda k: {"type": "string", "pattern": "^(tun|fd|unix)://."},
    "control": lambda k: {"type": "string", "pattern": "^(unix:///|(?i:none|off)$)"},
    "iface4": lambda k: {"type": "string", "pattern": rf"^{_V4}(/{_LEN4})?$"},
    "iface6": lambda k: {"type": "string", "pattern": rf"^{_V6}(/{_LEN6})?$"},
    "prefixes4": lambda k: {"type": "array", "items": {"type": "string", "pattern": rf"^{_V4}(/{_LEN4})?$"}},
    "prefixes6": lambda k: {"type": "array", "items": {"type": "string", "pattern": rf"^{_V6}(/{_LEN6})?$"}},
    "ips": lambda k: {"type": "array", "items": {"type": "string", "pattern": rf"^({_V4}|{_V6})$"}},
    "dns_url": lambda k: {"type": "string", "pattern": rf"^(socks5|socks5h|dokodemo|dokodemo-door|tunnel)://"
                          rf"[^\s/?#]+:{_PORT}/?(\?server=[^\s]+)?$"},
    "prefix4": lambda k: {"type": "string", "pattern": rf"^{_V4}(/{_LEN4})?$"},
    "prefix6": lambda k: {"type": "string", "pattern": rf"^{_V6}(/{_LEN6})?$"},
    "port_timeouts": lambda k: {"type": "object", "additionalProperties": False, "patternProperties": {
        rf"^{_PORT}$": {"type": "number", "minimum": k.lo, "maximum": k.hi}}},
    "rules": lambda k: {"type": "array", "items": {
        "type": "object", "additionalProperties": False, "required": ["to"],
        "properties": {
            "network": {"type": "string", "pattern": r"^\s*(tcp|udp)\s*(,\s*(tcp|udp)\s*)*$"},
            "cidr": {"type": "array", "items": {"type": "string", "pattern":
                                                rf"^({_V4}(/{_LEN4})?|{_V6}(/{_LEN6})?)$"}},
            "port": {"oneOf": [{"type": "integer", "minimum": 0, "maximum": 65535},
                               {"type": "string", "pattern": rf"^\s*{_PORT}(-{_PORT})?\s*$"}]},
            "domain": {"type": "array", "minItems": 1, "items": {
                "type": "string", "pattern": r"^\s*((full|suffix|domain|keyword|regexp):.+|[^:]+)$"}},
            "to": {"oneOf": [{"type": "string", "pattern": _URL},
                             {"type": "string", "pattern": r"^\s*block\s*$"}]},
        }}},
}


def _schema_for(path: str) -> dict:
    props = {}
    for name in OBJECTS[path]:
        where = f"{path}.{name}" if path else name
        if where in OBJECTS:
            props[name] = _schema_for(where)
        else:
            key = KEY_BY_PATH[where]
            s = dict(_SCHEMAS[key.kind](key))
            s["description"] = key.doc + (" (`run` only)" if key.run_only else "")
            if key.default is not None:
                s["default"] = key.default
            props[name] = s
    return {"type": "object", "additionalProperties": False, "properties": props}


def json_schema() -> dict:
    """The profile's JSON Schema (draft 2020-12), from KEYS."""
    s = {"$schema": "https://json-schema.org/draft/2020-12/schema",
         "$id": "https://github.com/tun2xray/tun2xray/profile.schema.json",
         "title": "tun2xray profile",
         "description": "tun2xray run --config / bridge config_json; reference: docs/profile.md"}
    s.update(_schema_for(""))
    return s


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2) + "\n"


def schema_path() -> str:
    import os
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "profile.schema.json")


# ------------------------------------------------------------- run's flags

def flag_keys() -> list:
    """The keys that mirror a `run` flag."""
    return [k for k in KEYS if k.flag]


def apply_to_args(profile: Profile | None, args) -> None:
    """Fill every mirrored flag left unset (None) on the command line from
    the profile, else from the key's default: flags win over keys."""
    for key in flag_keys():
        if getattr(args, key.flag, None) is not None:
            continue
        if profile is not None and key.path in profile.values:
            setattr(args, key.flag, profile.values[key.path])
        elif key.default is not None:
            setattr(args, key.flag, key.default)
        elif not hasattr(args, key.flag):
            setattr(args, key.flag, None)


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python3 -m tun2xray.profile",
                                description="check a profile, or print/write its JSON Schema")
    p.add_argument("profile", nargs="?", help="a profile to check")
    p.add_argument("--schema", action="store_true", help="print the JSON Schema")
    p.add_argument("--write-schema", action="store_true", help=f"write it to {schema_path()}")
    args = p.parse_args(argv)
    if args.write_schema:
        with open(schema_path(), "w") as f:
            f.write(schema_text())
        return 0
    if args.schema:
        sys.stdout.write(schema_text())
        return 0
    if not args.profile:
        p.error("give a profile to check, --schema or --write-schema")
    try:
        with open(args.profile, "rb") as f:
            load_profile(f.read())
    except OSError as e:
        print(f"{args.profile}: {e.strerror}", file=sys.stderr)
        return 1
    except ProfileError as e:
        print(f"{args.profile}: {e}", file=sys.stderr)
        return 1
    print(f"{args.profile}: valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
