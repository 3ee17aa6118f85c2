"""DNS settings of a run: from --dns / --dns-upstream and the profile's
``dns`` object, checked here with one-line errors naming the flag or key.
Plain data (it travels to worker processes and the bridge's thread)."""

from __future__ import annotations

import ipaddress

from ..upstream.url import DokodemoUpstream, parse_upstream

MODES = ("off", "fake-ip", "remember")
DEFAULT_FAKE4 = "198.19.0.0/16"         # the upper half of the TUN's default 198.18.0.0/15
DEFAULT_FAKE6 = "fd00:7478:f::/64"      # beside the TUN's default fd00:7478::/64
DEFAULT_TTL = 60
DEFAULT_SERVER = ("1.1.1.1", 53)        # where a socks5:// upstream's queries go without ?server=


class DnsSettingsError(ValueError):
    pass


def parse_upstream_url(url: str):
    """(upstream, url, server) for --dns-upstream / dns.upstream:
    dokodemo://HOST:PORT, or socks5://HOST:PORT[?server=IP[:PORT]] (the DNS
    server its UDP ASSOCIATE datagrams go to; default 1.1.1.1:53)."""
    base, _, query = url.partition("?")
    server = DEFAULT_SERVER
    if query:
        key, sep, value = query.partition("=")
        if key != "server" or not sep or not value:
            raise DnsSettingsError(f'"{url}": the only query is ?server=IP[:PORT]')
        server = _server(value, url)
    try:
        up = parse_upstream(base)
    except ValueError as e:
        raise DnsSettingsError(str(e).replace("proxy ", "", 1)) from None
    if isinstance(up, DokodemoUpstream) and query:
        raise DnsSettingsError(f'"{url}": a dokodemo inbound has its own fixed target (no ?server=)')
    return up, base, server


def _server(value: str, url: str):
    host, port = value, 53
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest:
            port = rest.lstrip(":")
    elif value.count(":") == 1:
        host, port = value.split(":")
    try:
        ipaddress.ip_address(host)
        port = int(port)
        if not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise DnsSettingsError(f'"{url}": server "{value}" is not IP[:PORT]') from None
    return host, port


class DnsSettings:
    __slots__ = ("mode", "upstream", "fake_ipv4", "fake_ipv6", "hijack", "ttl", "cache_file", "servers",
                 "avoid")

    def __init__(self, mode: str = "off", *, upstream: str | None = None, fake_ipv4: str | None = DEFAULT_FAKE4,
                 fake_ipv6: str | None = DEFAULT_FAKE6, hijack: bool = True, ttl: int = DEFAULT_TTL,
                 cache_file: str | None = None, servers=(), avoid=()):
        if mode not in MODES:
            raise DnsSettingsError(f'--dns "{mode}": expected fake-ip, remember or off')
        self.mode = mode
        self.upstream = upstream
        self.fake_ipv4 = fake_ipv4
        self.fake_ipv6 = fake_ipv6
        self.hijack = hijack
        self.ttl = ttl
        self.cache_file = cache_file
        self.servers = list(servers)          # the addresses hosts are told to use (answered even without hijack)
        self.avoid = list(avoid)              # addresses a fake pool never hands out
        if upstream is not None:
            parse_upstream_url(upstream)
        for key, net, v in (("dns.fake_ipv4", fake_ipv4, 4), ("dns.fake_ipv6", fake_ipv6, 6)):
            if net is not None:
                check_pool(key, net, v)

    @property
    def on(self) -> bool:
        return self.mode != "off"

    @classmethod
    def from_run(cls, args, profile, addresses) -> DnsSettings:
        """From the flags (--dns, --dns-upstream win) and the profile; the
        TUN's *addresses* ("198.18.0.1/15", ...) and the DNS servers are
        kept out of the fake pools."""
        get = profile.get if profile is not None else _default_of
        mode = getattr(args, "dns", None) or get("dns.mode")
        upstream = getattr(args, "dns_upstream", None) or get("dns.upstream")
        servers = list(profile.dns_servers) if profile is not None else ["198.18.0.2"]
        avoid = [str(ipaddress.ip_interface(a).ip) for a in addresses] + servers
        cache_file = get("dns.cache_file")
        if mode != "off" and cache_file:
            check_cache_dir(cache_file)
        try:
            return cls(mode, upstream=upstream, fake_ipv4=get("dns.fake_ipv4"), fake_ipv6=get("dns.fake_ipv6"),
                       hijack=get("dns.hijack"), ttl=get("dns.ttl"), cache_file=get("dns.cache_file"),
                       servers=servers, avoid=avoid)
        except DnsSettingsError as e:
            if getattr(args, "dns_upstream", None) and str(e).startswith(f'"{args.dns_upstream}'):
                raise DnsSettingsError(f"--dns-upstream {e}") from None
            raise

    def __getstate__(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state):
        for k, v in state.items():
            setattr(self, k, v)


DEFAULTS = {"dns.mode": "off", "dns.upstream": None, "dns.fake_ipv4": DEFAULT_FAKE4, "dns.fake_ipv6": DEFAULT_FAKE6,
            "dns.hijack": True, "dns.ttl": DEFAULT_TTL, "dns.cache_file": None}


def _default_of(path):
    return DEFAULTS[path]


def check_cache_dir(path: str) -> None:
    """The cache file can be written: its directory exists and is ours to write."""
    import os
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise DnsSettingsError(f'dns.cache_file: "{path}": no directory {d}')
    if not os.access(d, os.W_OK | os.X_OK):
        raise DnsSettingsError(f'dns.cache_file: "{path}": {d} is not writable')
    if os.path.isdir(path):
        raise DnsSettingsError(f'dns.cache_file: "{path}" is a directory')


def check_pool(key: str, value, version: int) -> None:
    try:
        net = ipaddress.ip_network(value)
    except (ValueError, TypeError):
        raise DnsSettingsError(f'{key}: "{value}" is not a prefix') from None
    if net.version != version:
        raise DnsSettingsError(f'{key}: "{value}" is not IPv{version}')
    if net.num_addresses < 4:
        raise DnsSettingsError(f'{key}: "{value}" is too small for a fake pool')


def default_upstream(router):
    """The upstream when none is given: the target of the first rule that
    takes udp port 53 (a --map udp:53=... rule, or the DNS inbound the
    --xray-config reading added). None when there is none."""
    for r in getattr(router, "rules", ()):
        if "udp" in r.networks and r.ports is not None and r.ports[0] <= 53 <= r.ports[1] and not r.cidrs:
            return r.url
    return None


def check_upstream(settings, router) -> None:
    """remember mode sends every query upstream: without one it cannot serve."""
    if settings.mode == "remember" and not (settings.upstream or default_upstream(router)):
        raise DnsSettingsError("dns remember mode needs an upstream: --dns-upstream (dns.upstream), "
                               "a udp:53 rule or a DNS inbound in the Xray config")
