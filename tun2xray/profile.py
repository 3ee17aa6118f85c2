"""The profile: one JSON schema for every platform (DESIGN.md "Profile").

load_profile() validates and fills defaults; every error names the key path,
e.g.  rules[1].port: "70000" is not a port
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field

from .rules import Rule, _printable, parse_networks, parse_port_range
from .upstream.url import parse_upstream


class ProfileError(ValueError):
    pass


@dataclass(slots=True)
class IPSettings:
    address: str
    routes: list
    excluded_routes: list


@dataclass(slots=True)
class Profile:
    proxy: str
    mtu: int = 1500
    ipv4: IPSettings = field(default_factory=lambda: IPSettings("198.18.0.1/15", ["0.0.0.0/0"], []))
    ipv6: IPSettings = field(default_factory=lambda: IPSettings("fd00:7478::1/64", ["::/0"], []))
    dns_servers: list = field(default_factory=lambda: ["198.18.0.2"])
    rules: list = field(default_factory=list)        # list[Rule]
    udp_timeout: float = 60.0
    tcp_connect_timeout: float = 10.0
    max_flows: int = 65536
    icmp_echo: str = "reply"

    def to_json(self) -> dict:
        return {
            "proxy": self.proxy, "mtu": self.mtu,
            "ipv4": {"address": self.ipv4.address, "routes": self.ipv4.routes,
                     "excluded_routes": self.ipv4.excluded_routes},
            "ipv6": {"address": self.ipv6.address, "routes": self.ipv6.routes,
                     "excluded_routes": self.ipv6.excluded_routes},
            "dns": {"servers": self.dns_servers},
            "rules": [_rule_json(r) for r in self.rules],
            "udp_timeout": self.udp_timeout, "tcp_connect_timeout": self.tcp_connect_timeout,
            "max_flows": self.max_flows, "icmp_echo": self.icmp_echo,
        }


def _rule_json(r: Rule) -> dict:
    d = {"network": ",".join(sorted(r.networks)), "to": r.url}
    if r.cidrs:
        d["cidr"] = [str(c) for c in r.cidrs]
    if r.ports is not None:
        d["port"] = r.ports[0] if r.ports[0] == r.ports[1] else f"{r.ports[0]}-{r.ports[1]}"
    return d


_TOP = {"proxy", "mtu", "ipv4", "ipv6", "dns", "rules", "udp_timeout", "tcp_connect_timeout",
        "max_flows", "icmp_echo"}


def load_profile(source) -> Profile:
    """source: JSON text, bytes, or an already-decoded dict."""
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
    _no_unknown(data, _TOP, "")
    if "proxy" not in data:
        raise ProfileError("proxy: is required")
    p = Profile(proxy=_url(data["proxy"], "proxy"))
    if "mtu" in data:
        p.mtu = _int(data["mtu"], "mtu", 576, 65535)
    for fam, version in (("ipv4", 4), ("ipv6", 6)):
        if fam in data:
            setattr(p, fam, _ip_settings(data[fam], fam, version, getattr(p, fam)))
    if "dns" in data:
        d = _obj(data["dns"], "dns")
        _no_unknown(d, {"servers"}, "dns")
        if "servers" in d:
            servers = _list(d["servers"], "dns.servers")
            for i, s in enumerate(servers):
                try:
                    ipaddress.ip_address(s)
                except (ValueError, TypeError):
                    raise ProfileError(f"dns.servers[{i}]: {json.dumps(s)} is not an IP address") from None
            p.dns_servers = list(servers)
    if "rules" in data:
        p.rules = [_rule(r, f"rules[{i}]") for i, r in enumerate(_list(data["rules"], "rules"))]
    if "udp_timeout" in data:
        p.udp_timeout = _num(data["udp_timeout"], "udp_timeout", 1, 86400)
    if "tcp_connect_timeout" in data:
        p.tcp_connect_timeout = _num(data["tcp_connect_timeout"], "tcp_connect_timeout", 0.1, 600)
    if "max_flows" in data:
        p.max_flows = _int(data["max_flows"], "max_flows", 1, 10_000_000)
    if "icmp_echo" in data:
        v = data["icmp_echo"]
        if v not in ("reply", "drop"):
            raise ProfileError(f'icmp_echo: {json.dumps(v)} is not "reply" or "drop"')
        p.icmp_echo = v
    return p


def _no_unknown(d: dict, allowed: set, path: str) -> None:
    for k in d:
        if k not in allowed:
            where = f"{path}.{k}" if path else k
            where = _printable(where)            # one line, whatever the key holds
            raise ProfileError(f"{where}: unknown key")


def _obj(v, path):
    if not isinstance(v, dict):
        raise ProfileError(f"{path}: must be an object")
    return v


def _list(v, path):
    if not isinstance(v, list):
        raise ProfileError(f"{path}: must be a list")
    return v


def _int(v, path, lo, hi):
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ProfileError(f"{path}: {json.dumps(v)} is not an integer in {lo}..{hi}")
    return v


def _num(v, path, lo, hi):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ProfileError(f"{path}: {json.dumps(v)} is not a number in {lo}..{hi}")
    return float(v)


def _url(v, path):
    if not isinstance(v, str):
        raise ProfileError(f"{path}: {json.dumps(v)} is not a URL")
    try:
        parse_upstream(v)
    except ValueError as e:
        raise ProfileError(f"{path}: {e}") from None
    return v


def _ip_settings(v, path, version, default: IPSettings) -> IPSettings:
    d = _obj(v, path)
    _no_unknown(d, {"address", "routes", "excluded_routes"}, path)
    out = IPSettings(default.address, list(default.routes), list(default.excluded_routes))
    if "address" in d:
        a = d["address"]
        try:
            iface = ipaddress.ip_interface(a)
        except (ValueError, TypeError):
            raise ProfileError(f"{path}.address: {json.dumps(a)} is not an address/prefix") from None
        if iface.version != version:
            raise ProfileError(f"{path}.address: {json.dumps(a)} is not IPv{version}")
        out.address = a
    for key in ("routes", "excluded_routes"):
        if key in d:
            nets = _list(d[key], f"{path}.{key}")
            for i, n in enumerate(nets):
                try:
                    net = ipaddress.ip_network(n)
                except (ValueError, TypeError):
                    raise ProfileError(f"{path}.{key}[{i}]: {json.dumps(n)} is not a prefix") from None
                if net.version != version:
                    raise ProfileError(f"{path}.{key}[{i}]: {json.dumps(n)} is not IPv{version}")
            setattr(out, key, list(nets))
    return out


def _rule(v, path) -> Rule:
    d = _obj(v, path)
    _no_unknown(d, {"network", "cidr", "port", "to"}, path)
    if "to" not in d:
        raise ProfileError(f"{path}.to: is required")
    to_url = _url(d["to"], f"{path}.to")
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
        items = _list(d["cidr"], f"{path}.cidr")
        out = []
        for i, c in enumerate(items):
            try:
                out.append(ipaddress.ip_network(c))
            except (ValueError, TypeError):
                raise ProfileError(f"{path}.cidr[{i}]: {json.dumps(c)} is not a prefix") from None
        cidrs = tuple(out)
    ports = None
    if "port" in d:
        try:
            ports = parse_port_range(d["port"])
        except ValueError as e:
            raise ProfileError(f"{path}.port: {e}") from None
    return Rule(networks=nets, cidrs=cidrs, ports=ports, to=parse_upstream(to_url), url=to_url)
