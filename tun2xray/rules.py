"""Flow -> inbound routing: the first rule that matches decides, else the default.

A rule matches on network (tcp/udp), destination prefix and destination port
range.  Matching runs once per new flow, never per packet.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from .upstream.url import parse_upstream


@dataclass(frozen=True, slots=True)
class Rule:
    networks: frozenset          # {"tcp"}, {"udp"} or both
    cidrs: tuple = ()            # ip_network objects; empty = any destination
    ports: tuple | None = None   # (lo, hi) inclusive; None = any port
    to: object = None            # SocksUpstream | DokodemoUpstream
    url: str = ""

    def matches(self, network: str, addr, port: int) -> bool:
        if network not in self.networks:
            return False
        if self.ports is not None and not (self.ports[0] <= port <= self.ports[1]):
            return False
        if self.cidrs:
            return any(addr.version == c.version and addr in c for c in self.cidrs)
        return True

    def describe(self) -> str:
        """What the rule matches, as a user would write it: "udp port 53"."""
        parts = [",".join(sorted(self.networks))]
        if self.cidrs:
            parts.append(",".join(str(c) for c in self.cidrs))
        if self.ports is not None:
            lo, hi = self.ports
            parts.append(f"port {lo}" if lo == hi else f"port {lo}-{hi}")
        return " ".join(parts)


@dataclass(slots=True)
class Router:
    default: object
    default_url: str = ""
    rules: list = field(default_factory=list)

    def route(self, network: str, dst: bytes, port: int):
        """(upstream, url) for a new flow to dst (packed address) : port."""
        if self.rules:
            addr = ipaddress.ip_address(dst)
            for r in self.rules:
                if r.matches(network, addr, port):
                    return r.to, r.url
        return self.default, self.default_url

    def route_rule(self, network: str, dst: bytes, port: int):
        """route() and which rule decided: (upstream, url, "rules[i] (what
        it matches)") or (..., "default") -- for debug logs."""
        if self.rules:
            addr = ipaddress.ip_address(dst)
            for i, r in enumerate(self.rules):
                if r.matches(network, addr, port):
                    return r.to, r.url, f"rules[{i}] ({r.describe()})"
        return self.default, self.default_url, "default"


def _printable(value) -> str:
    """A user's value for a one-line message: line breaks and other control
    characters shown as escapes."""
    text = str(value)
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def parse_networks(value: str) -> frozenset:
    nets = frozenset(p.strip() for p in value.split(",") if p.strip())
    if not nets or not nets <= {"tcp", "udp"}:
        raise ValueError(f'"{_printable(value)}" is not tcp, udp or tcp,udp')
    return nets


def parse_port_range(value) -> tuple:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a port")
    if isinstance(value, int):
        lo = hi = value
    elif isinstance(value, str):
        text = value.strip()
        try:
            if "-" in text:
                a, b = text.split("-", 1)
                lo, hi = int(a), int(b)
            else:
                lo = hi = int(text)
        except ValueError:
            raise ValueError(f'"{_printable(value)}" is not a port') from None
    else:
        raise ValueError(f"{value!r} is not a port")
    if not (0 <= lo <= 65535 and 0 <= hi <= 65535):
        raise ValueError(f'"{_printable(value)}" is not a port')
    if lo > hi:
        raise ValueError(f'"{_printable(value)}" is an empty port range')
    return (lo, hi)


def parse_map(spec: str) -> Rule:
    """--map PROTO:PORT=URL, e.g. udp:53=dokodemo://127.0.0.1:10853."""
    left, sep, url = spec.partition("=")
    if not sep or not url:
        raise ValueError(f'--map "{_printable(spec)}": expected PROTO:PORT=URL')
    proto, sep, port = left.partition(":")
    if not sep:
        raise ValueError(f'--map "{_printable(spec)}": expected PROTO:PORT=URL')
    try:
        nets = parse_networks(proto)
        ports = parse_port_range(port)
        to = parse_upstream(url)
    except ValueError as e:
        raise ValueError(f'--map "{_printable(spec)}": {e}') from None
    return Rule(networks=nets, ports=ports, to=to, url=url)
