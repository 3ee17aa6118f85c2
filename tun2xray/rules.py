"""Flow -> inbound routing: the first rule that matches decides, else the default.

A rule matches on network (tcp/udp), destination prefix, destination port
range and, for flows whose name is known (fake-IP or remembered DNS
answers), the destination's domain name.  Matching runs once per new flow,
never per packet.  A rule's target is an inbound URL or ``block`` (the
flow is refused: RST / ICMP unreachable).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from .upstream.url import parse_upstream


class Block:
    """The ``"to": "block"`` target: the engine refuses the flow."""

    __slots__ = ()

    def __str__(self) -> str:
        return "block"

    def __repr__(self) -> str:
        return "BLOCK"

    def __reduce__(self):
        return "BLOCK"          # one object, also in a worker that unpickles the rules


BLOCK = Block()

# Xray's spellings: "domain:" is its name for a suffix match; a plain
# string (no prefix) matches anywhere in the name, as in Xray
_DOMAIN_KINDS = ("full", "suffix", "domain", "keyword", "regexp")


def _norm(name: str) -> str:
    return name.rstrip(".").lower()


class DomainMatcher:
    """Xray-style domain conditions of one rule: ``full:`` (the name
    exactly), ``suffix:``/``domain:`` (the name or any name below it),
    ``keyword:`` (anywhere in the name), ``regexp:`` (Python ``re.search``
    on the lower-case name).  Names compare case-insensitively and without
    a trailing dot."""

    __slots__ = ("entries", "full", "keywords", "regexps", "suffixes")

    def __init__(self, entries):
        self.entries = tuple(entries)
        full, suffixes, keywords, regexps = set(), [], [], []
        for e in self.entries:
            kind, value = split_domain_entry(e)
            if kind == "full":
                full.add(value)
            elif kind == "suffix":
                suffixes.append(value)
            elif kind == "keyword":
                keywords.append(value)
            else:
                regexps.append(value)
        self.full = frozenset(full)
        self.suffixes = tuple(suffixes)
        self.keywords = tuple(keywords)
        self.regexps = tuple(regexps)

    def matches(self, name: str) -> bool:
        n = _norm(name)
        if n in self.full:
            return True
        for s in self.suffixes:
            if n == s or n.endswith("." + s):
                return True
        for k in self.keywords:
            if k in n:
                return True
        for r in self.regexps:
            if r.search(n):
                return True
        return False

    def __eq__(self, other) -> bool:
        return isinstance(other, DomainMatcher) and other.entries == self.entries

    def __hash__(self) -> int:
        return hash(self.entries)

    def __repr__(self) -> str:
        return f"DomainMatcher({list(self.entries)!r})"


def split_domain_entry(entry) -> tuple:
    """("full"|"suffix"|"keyword"|"regexp", value) for one ``domain`` entry;
    ValueError with a one-line reason for an entry that cannot match
    (unknown prefix such as ``geosite:``, empty value, bad regexp)."""
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"{entry!r} is not a domain entry")
    text = entry.strip()
    kind, sep, value = text.partition(":")
    if not sep:
        kind, value = "keyword", text
    elif kind not in _DOMAIN_KINDS:
        raise ValueError(f'"{_printable(text)}": unknown prefix "{_printable(kind)}:" '
                         f"(use full:, suffix:, domain:, keyword: or regexp:)")
    if not value:
        raise ValueError(f'"{_printable(text)}": nothing after "{kind}:"')
    if kind == "regexp":
        try:
            return "regexp", re.compile(value)
        except (re.error, RecursionError, OverflowError) as e:
            raise ValueError(f'"{_printable(text)}" is not a regular expression: {e}') from None
    value = _norm(value)
    if not value:
        raise ValueError(f'"{_printable(text)}": nothing after "{kind}:"')
    return ("suffix" if kind == "domain" else kind), value


def parse_target(url: str):
    """A rule's ``to``: ``block`` or an inbound URL (ValueError otherwise)."""
    if isinstance(url, str) and url.strip() == "block":
        return BLOCK
    return parse_upstream(url)


@dataclass(frozen=True, slots=True)
class Rule:
    networks: frozenset          # {"tcp"}, {"udp"} or both
    cidrs: tuple = ()            # ip_network objects; empty = any destination
    ports: tuple | None = None   # (lo, hi) inclusive; None = any port
    to: object = None            # SocksUpstream | DokodemoUpstream | BLOCK
    url: str = ""
    domains: DomainMatcher | None = None   # None = any (or no) name

    def matches(self, network: str, addr, port: int, name: str | None = None) -> bool:
        if network not in self.networks:
            return False
        if self.ports is not None and not (self.ports[0] <= port <= self.ports[1]):
            return False
        if self.cidrs and not any(addr.version == c.version and addr in c for c in self.cidrs):
            return False
        if self.domains is not None:
            # a domain condition matches only flows whose name is known
            return name is not None and self.domains.matches(name)
        return True

    def describe(self) -> str:
        """What the rule matches, as a user would write it: "udp port 53"."""
        parts = [",".join(sorted(self.networks))]
        if self.cidrs:
            parts.append(",".join(str(c) for c in self.cidrs))
        if self.ports is not None:
            lo, hi = self.ports
            parts.append(f"port {lo}" if lo == hi else f"port {lo}-{hi}")
        if self.domains is not None:
            parts.append("domain " + ",".join(self.domains.entries))
        return " ".join(parts)


@dataclass(slots=True)
class Router:
    default: object
    default_url: str = ""
    rules: list = field(default_factory=list)

    def route(self, network: str, dst: bytes, port: int, name: str | None = None):
        """(upstream, url) for a new flow to dst (packed address) : port;
        ``name``: the destination's domain name when known.  upstream is
        BLOCK for a flow a rule refuses."""
        if self.rules:
            addr = ipaddress.ip_address(dst)
            for r in self.rules:
                if r.matches(network, addr, port, name):
                    return r.to, r.url
        return self.default, self.default_url

    def route_rule(self, network: str, dst: bytes, port: int, name: str | None = None):
        """route() and which rule decided: (upstream, url, "rules[i] (what
        it matches)") or (..., "default") -- for debug logs."""
        if self.rules:
            addr = ipaddress.ip_address(dst)
            for i, r in enumerate(self.rules):
                if r.matches(network, addr, port, name):
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
    """--map PROTO:PORT=URL, e.g. udp:53=dokodemo://127.0.0.1:10853 (URL
    may be ``block``: udp:443=block)."""
    left, sep, url = spec.partition("=")
    if not sep or not url:
        raise ValueError(f'--map "{_printable(spec)}": expected PROTO:PORT=URL')
    proto, sep, port = left.partition(":")
    if not sep:
        raise ValueError(f'--map "{_printable(spec)}": expected PROTO:PORT=URL')
    try:
        nets = parse_networks(proto)
        ports = parse_port_range(port)
        to = parse_target(url)
    except ValueError as e:
        raise ValueError(f'--map "{_printable(spec)}": {e}') from None
    return Rule(networks=nets, ports=ports, to=to, url=url)
