"""Flows dialled by name, rules by name, and block rules, on the in-memory
device (tests/vclock.py).

The DNS layer hands the engine a book (``engine.names``) with three
methods: ``lookup(addr)`` (the name for a fake or remembered address),
``is_fake(addr)`` and ``unmapped_hit()``.  Here the book is a dict; the
upstream is the strict SOCKS5 server of tests/upstream_fixtures.py on real
loopback sockets, which records every request and datagram header.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct

import pytest
from helpers import addr, build_packet, tcp_options
from test_stack_pkt import l4_of, udp_packet
from upstream_fixtures import StrictSocks
from vclock import EngineHarness, run_virtual

from tun2xray.profile import ProfileError, load_profile
from tun2xray.rules import (
    BLOCK,
    DomainMatcher,
    Router,
    Rule,
    parse_map,
    split_domain_entry,
)
from tun2xray.upstream.url import DokodemoUpstream, SocksUpstream

SRC = addr("10.0.0.2")
NAMED = addr("198.18.0.77")        # a fake address the book has a name for
UNMAPPED = addr("198.18.0.99")     # inside the fake pool, no name (expired, lost cache)
PLAIN = addr("93.184.216.34")      # a real address the book knows nothing of
FAKE_POOL = ipaddress.ip_network("198.18.0.0/24")


class Book:
    """The DNS layer's address -> name book, as the engine sees it."""

    def __init__(self, names: dict, fake=(FAKE_POOL,)):
        self.names = {bytes(k): v for k, v in names.items()}
        self.fake = tuple(fake)
        self.unmapped = 0

    def lookup(self, addr: bytes) -> str | None:
        return self.names.get(bytes(addr))

    def is_fake(self, addr: bytes) -> bool:
        ip = ipaddress.ip_address(bytes(addr))
        return any(ip in n for n in self.fake)

    def unmapped_hit(self) -> None:
        self.unmapped += 1


def with_names(body, names=None, rules=(), servers=1):
    """Run ``body(h, socks_servers, book)`` with an engine whose default
    route is the first strict SOCKS server and whose book is ``names``."""
    async def main(loop):
        socks = [await StrictSocks().start() for _ in range(servers)]
        h = EngineHarness(f"socks5://127.0.0.1:{socks[0].port}")
        book = Book(names if names is not None else {NAMED: "www.example.com"})
        h.engine.names = book
        h.engine.router.rules = [r(socks) if callable(r) else r for r in rules]
        await h.start()
        try:
            return await body(h, socks, book)
        finally:
            await h.stop()
            for s in socks:
                await s.stop()
    return run_virtual(main)


def syn(dst, sport, dport=80):
    return build_packet(4, SRC, dst, sport, dport, 1000, 0, "S", 65535, tcp_options(mss=1400))


async def packet(h, pred, timeout=5.0):
    """The first packet of any kind the engine writes that satisfies pred
    (raw bytes), or AssertionError at the virtual deadline.  Packets
    before it are dropped; packets after it wait for the next call."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    backlog = h.__dict__.setdefault("raw_backlog", [])
    while True:
        backlog += h.host.read()
        while backlog:
            p = backlog.pop(0)
            if pred(p):
                return p
        left = deadline - loop.time()
        if left <= 0:
            raise AssertionError("no matching packet from the engine")
        h.written.clear()
        try:
            await asyncio.wait_for(h.written.wait(), left)
        except TimeoutError:
            pass


def udp_from(dst, sport):
    """pred: a UDP reply from dst to the client's port sport."""
    def pred(p):
        src, _dst, proto, l4 = l4_of(p)
        return proto == 17 and src == dst and struct.unpack_from("!H", l4, 2)[0] == sport
    return pred


def icmp_unreachable(p) -> tuple | None:
    """(type, code, quoted destination) of an ICMPv4 error, else None."""
    _src, _dst, proto, l4 = l4_of(p)
    if proto != 1:
        return None
    return l4[0], l4[1], l4[8 + 16:8 + 20]


def domain_atyp(name: str, port: int) -> bytes:
    raw = name.encode()
    return b"\x03" + bytes((len(raw),)) + raw + struct.pack("!H", port)


async def until(cond, timeout=5.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------ dialing by name


def test_tcp_to_a_named_address_connects_by_domain(caplog):
    caplog.set_level(logging.DEBUG, logger="tun2xray.engine")

    async def body(h, socks, book):
        h.send(syn(NAMED, 41000))
        s = await h.expect(lambda x: x.dport == 41000 and x.flags & 0x06)
        assert s.flags & 0x12 == 0x12, s
        # CONNECT with ATYP 3: the name, never the fake address
        assert socks[0].requests == [(1, domain_atyp("www.example.com", 80))]
        [flow] = h.status()["flows"]
        assert flow["name"] == "www.example.com" and flow["dst"] == "198.18.0.77:80"
        h.send(build_packet(4, SRC, NAMED, 41000, 80, 1001, s.seq + 1, "R", 0))
        await until(lambda: h.status()["closed_flows"])
        [closed] = h.status()["closed_flows"]
        assert closed["name"] == "www.example.com"

    with_names(body)
    assert "CONNECT www.example.com:80 by name" in caplog.text


def test_ipv6_tcp_and_udp_to_a_named_address_go_by_domain():
    src6, named6 = addr("fd00:7478::2"), addr("fd00:7478:fa4e::1")

    def from6(sport, proto):
        def pred(p):
            s, _d, pr, l4 = l4_of(p)
            return pr == proto and s == named6 and struct.unpack_from("!H", l4, 2)[0] == sport
        return pred

    async def body(h, socks, book):
        h.send(build_packet(6, src6, named6, 42000, 443, 1000, 0, "S", 65535, tcp_options(mss=1400)))
        p = await packet(h, from6(42000, 6))
        assert l4_of(p)[3][13] & 0x12 == 0x12            # SYN-ACK
        h.send(udp_packet(src6, named6, 42001, 7, b"v6"))
        p = await packet(h, from6(42001, 17))
        assert l4_of(p)[3][8:] == b"v6!"
        assert socks[0].requests[0] == (1, domain_atyp("v6.example", 443))
        assert socks[0].udp_seen == [b"\x00\x00\x00" + domain_atyp("v6.example", 7) + b"v6"]

    with_names(body, names={named6: "v6.example"})


def test_an_address_the_book_does_not_know_is_dialled_by_address():
    async def body(h, socks, book):
        h.send(syn(PLAIN, 41001))
        s = await h.expect(lambda x: x.dport == 41001 and x.flags & 0x06)
        assert s.flags & 0x12 == 0x12, s
        assert socks[0].requests == [(1, b"\x01" + PLAIN + b"\x00\x50")]
        assert h.status()["flows"][0]["name"] is None
        assert book.unmapped == 0

    with_names(body)


def test_unmapped_fake_address_tcp_is_reset_counted_and_never_dialled():
    async def body(h, socks, book):
        h.send(syn(UNMAPPED, 41002))
        r = await h.expect(lambda x: x.dport == 41002)
        assert r.flags & 0x04, r                      # RST
        await until(lambda: h.status()["closed_flows"])
        st = h.status()
        assert socks[0].requests == []
        assert st["engine"]["tcp_unmapped_fake"] == 1 and book.unmapped == 1
        [closed] = st["closed_flows"]
        assert closed["reason"] == "unmapped fake address" and closed["dst"] == "198.18.0.99:80"

    with_names(body)


def test_tcp_refusals_follow_the_engines_reject_setting():
    rule = Rule(networks=frozenset({"tcp"}), ports=(443, 443), to=BLOCK, url="block")

    async def body(h, socks, book):
        h.engine.reject_with = "icmp-admin"
        h.send(syn(UNMAPPED, 41010), syn(PLAIN, 41011, 443))
        got = []
        while len(got) < 2:
            p = await packet(h, icmp_unreachable)
            got.append(icmp_unreachable(p))
        # ICMP destination unreachable, communication administratively prohibited (code 13)
        assert sorted(got) == sorted([(3, 13, UNMAPPED), (3, 13, PLAIN)])
        eng = h.status()["engine"]
        assert eng["tcp_unmapped_fake"] == 1 and eng["tcp_blocked"] == 1 and socks[0].requests == []

    with_names(body, rules=[rule])


def test_unmapped_fake_address_udp_gets_icmp_port_unreachable_and_is_counted():
    async def body(h, socks, book):
        h.send(udp_packet(SRC, UNMAPPED, 5000, 443, b"quic"))
        p = await packet(h, icmp_unreachable)
        assert icmp_unreachable(p) == (3, 3, UNMAPPED)
        st = h.status()
        assert st["engine"]["udp_unmapped_fake"] == 1 and book.unmapped == 1
        assert socks[0].requests == [] and st["udp_associations"] == 0

    with_names(body)


def test_udp_to_a_named_address_goes_by_domain_and_the_reply_comes_back_from_the_address():
    async def body(h, socks, book):
        h.send(udp_packet(SRC, NAMED, 5001, 7, b"ping"))
        p = await packet(h, udp_from(NAMED, 5001))
        assert l4_of(p)[3][8:] == b"ping!"            # the relay's echo, from the fake address
        assert socks[0].requests[0][0] == 3             # one UDP ASSOCIATE
        # the datagram carried the name (RFC 1928 section 7 header, ATYP 3)
        assert socks[0].udp_seen == [b"\x00\x00\x00" + domain_atyp("www.example.com", 7) + b"ping"]
        [flow] = h.status()["flows"]
        assert flow["proto"] == "udp" and flow["name"] == "www.example.com"

    with_names(body)


def test_dokodemo_targets_are_unaffected_by_names():
    async def main(loop):
        target = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        target.bind(("127.0.0.1", 0))
        target.setblocking(False)
        port = target.getsockname()[1]
        socks = await StrictSocks().start()
        h = EngineHarness(f"socks5://127.0.0.1:{socks.port}")
        h.engine.names = Book({NAMED: "dns.example"})
        url = f"dokodemo://127.0.0.1:{port}"
        h.engine.router.rules = [Rule(networks=frozenset({"udp"}), ports=(53, 53),
                                      to=DokodemoUpstream("127.0.0.1", port), url=url)]
        await h.start()
        try:
            # a named address and an unmapped fake one both reach the fixed target, raw
            h.send(udp_packet(SRC, NAMED, 5002, 53, b"q1"), udp_packet(SRC, UNMAPPED, 5003, 53, b"q2"))
            got = []

            def read():
                try:
                    while True:
                        got.append(target.recv(100))
                except BlockingIOError:
                    pass
                return len(got) == 2
            await until(read)
            assert sorted(got) == [b"q1", b"q2"]
            assert socks.requests == [] and h.status()["engine"].get("udp_unmapped_fake", 0) == 0
        finally:
            await h.stop()
            await socks.stop()
            target.close()
    run_virtual(main)


# ------------------------------------------------------------------ block rules


def test_block_rule_resets_tcp_and_counts_it():
    rule = Rule(networks=frozenset({"tcp"}), ports=(80, 80), to=BLOCK, url="block")

    async def body(h, socks, book):
        h.send(syn(PLAIN, 41003))
        r = await h.expect(lambda x: x.dport == 41003)
        assert r.flags & 0x04, r
        await until(lambda: h.status()["closed_flows"])
        st = h.status()
        assert st["engine"]["tcp_blocked"] == 1 and socks[0].requests == []
        [closed] = st["closed_flows"]
        assert (closed["reason"], closed["detail"]) == ("blocked", "rules[0] (tcp port 80)")

    with_names(body, rules=[rule])


def test_block_rule_answers_udp_with_icmp_port_unreachable_and_counts_it():
    rule = Rule(networks=frozenset({"udp"}), ports=(443, 443), to=BLOCK, url="block")

    async def body(h, socks, book):
        h.send(udp_packet(SRC, PLAIN, 5004, 443, b"quic-initial"))
        p = await packet(h, icmp_unreachable)
        assert icmp_unreachable(p) == (3, 3, PLAIN)
        # UDP to another port still goes through
        h.send(udp_packet(SRC, PLAIN, 5005, 7, b"hi"))
        await packet(h, udp_from(PLAIN, 5005))
        st = h.status()
        assert st["engine"]["udp_blocked"] == 1
        assert [s for s in socks[0].udp_seen if s.endswith(b"quic-initial")] == []

    with_names(body, rules=[rule])


def test_block_by_domain_refuses_only_the_named_flow():
    rule = Rule(networks=frozenset({"tcp", "udp"}), to=BLOCK, url="block",
                domains=DomainMatcher(["suffix:example.com"]))

    async def body(h, socks, book):
        h.send(syn(NAMED, 41004))
        r = await h.expect(lambda x: x.dport == 41004)
        assert r.flags & 0x04, r
        h.send(syn(PLAIN, 41005))                      # no name: the domain rule cannot match
        s = await h.expect(lambda x: x.dport == 41005)
        assert s.flags & 0x12 == 0x12, s
        assert socks[0].requests == [(1, b"\x01" + PLAIN + b"\x00\x50")]
        assert h.status()["engine"]["tcp_blocked"] == 1

    with_names(body, rules=[rule])


# ------------------------------------------------------------------ rules by name


def test_a_domain_rule_picks_its_inbound_and_the_flow_goes_by_name():
    def rule(socks):
        return Rule(networks=frozenset({"tcp"}), to=SocksUpstream("127.0.0.1", socks[1].port),
                    url=f"socks5://127.0.0.1:{socks[1].port}", domains=DomainMatcher(["domain:example.com"]))

    async def body(h, socks, book):
        h.send(syn(NAMED, 41006))
        s = await h.expect(lambda x: x.dport == 41006 and x.flags & 0x06)
        assert s.flags & 0x12 == 0x12, s
        h.send(syn(PLAIN, 41007))
        s = await h.expect(lambda x: x.dport == 41007 and x.flags & 0x06)
        assert s.flags & 0x12 == 0x12, s
        assert socks[1].requests == [(1, domain_atyp("www.example.com", 80))]
        assert socks[0].requests == [(1, b"\x01" + PLAIN + b"\x00\x50")]
        inbound = {f["dst"]: f["inbound"] for f in h.status()["flows"]}
        assert inbound["198.18.0.77:80"] == f"socks5://127.0.0.1:{socks[1].port}"

    with_names(body, rules=[rule], servers=2)


@pytest.mark.parametrize("entry, yes, no", [
    ("full:www.example.com", ["www.example.com", "WWW.Example.COM.", "www.example.com."],
     ["example.com", "a.www.example.com", "www.example.co"]),
    ("suffix:example.com", ["example.com", "a.example.com", "a.b.EXAMPLE.com"],
     ["notexample.com", "example.com.evil", "com"]),
    ("domain:example.com", ["example.com", "x.example.com"], ["badexample.com"]),
    ("keyword:track", ["tracker.net", "a.track.io", "backtrack.org"], ["tra.ck"]),
    ("ads", ["ads.example", "loads.net"], ["a.d.s"]),            # no prefix: a keyword, as in Xray
    (r"regexp:^ad[0-9]+\.", ["ad1.example.com", "ad22.net"], ["ad.example.com", "bad1.example"]),
])
def test_each_domain_matcher(entry, yes, no):
    m = DomainMatcher([entry])
    assert [n for n in yes if not m.matches(n)] == []
    assert [n for n in no if m.matches(n)] == []


def test_a_rule_with_a_domain_matches_only_named_flows_and_keeps_its_other_conditions():
    r = Rule(networks=frozenset({"udp"}), ports=(443, 443), to=BLOCK, url="block",
             domains=DomainMatcher(["suffix:video.example"]))
    ip = ipaddress.ip_address("198.18.0.5")
    assert r.matches("udp", ip, 443, "cdn.video.example")
    assert not r.matches("udp", ip, 443, None)
    assert not r.matches("tcp", ip, 443, "cdn.video.example")
    assert not r.matches("udp", ip, 80, "cdn.video.example")
    router = Router(default="D", default_url="d", rules=[r])
    assert router.route("udp", ip.packed, 443, "cdn.video.example") == (BLOCK, "block")
    assert router.route("udp", ip.packed, 443) == ("D", "d")
    assert router.route_rule("udp", ip.packed, 443, "a.video.example")[2] == \
        "rules[0] (udp port 443 domain suffix:video.example)"


@pytest.mark.parametrize("entry, msg", [
    ("geosite:cn", 'unknown prefix "geosite:"'),
    ("regexp:(", "is not a regular expression"),
    ("full:", 'nothing after "full:"'),
    ("", "is not a domain entry"),
])
def test_bad_domain_entries_are_rejected(entry, msg):
    with pytest.raises(ValueError, match=msg):
        split_domain_entry(entry)


# ------------------------------------------------------------------ profile keys


def test_profile_rules_with_domain_and_block_load():
    p = load_profile({"proxy": "socks5://127.0.0.1:1080", "rules": [
        {"network": "udp", "port": 443, "to": "block"},
        {"domain": ["full:a.example", "regexp:^b"], "to": "socks5://127.0.0.1:1081"}]})
    block, named = p.rules
    assert block.to is BLOCK and block.url == "block" and block.domains is None
    assert named.domains.matches("a.example") and named.domains.matches("bcd.net")
    assert not named.domains.matches("c.example")


@pytest.mark.parametrize("rule, msg", [
    ({"domain": ["full:a", "regexp:[z-a]"], "to": "block"}, r'rules\[0\]\.domain\[1\]: "regexp:\[z-a\]" is not a regular expression'),
    ({"domain": [], "to": "block"}, r"rules\[0\]\.domain: is empty"),
    ({"domain": "suffix:a", "to": "block"}, r"rules\[0\]\.domain: must be a list"),
    ({"domain": ["geoip:cn"], "to": "block"}, r'rules\[0\]\.domain\[0\]: "geoip:cn": unknown prefix'),
    ({"to": "blocked"}, r"rules\[0\]\.to: "),
])
def test_profile_domain_and_block_errors_name_the_key(rule, msg):
    with pytest.raises(ProfileError, match=msg):
        load_profile({"proxy": "socks5://127.0.0.1:1080", "rules": [rule]})


def test_map_flag_takes_block():
    r = parse_map("udp:443=block")
    assert r.to is BLOCK and r.networks == {"udp"} and r.ports == (443, 443)
