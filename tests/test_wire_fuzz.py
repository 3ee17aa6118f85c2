"""Hypothesis fuzzing of every wire parser: random and mutated bytes may
only ever raise WireError; representations round-trip through bytes; the
reassembler never raises and stays within its bounds."""

import random
import struct
from collections import defaultdict

from hypothesis import HealthCheck, given, settings, strategies as st

from netstack.config import StackConfig
from netstack.wire import checksum as ck
from netstack.wire import ipv4, ipv6, tcp
from netstack.wire.errors import WireError
from netstack.reassembly import Reassembler

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

u8, u16, u32 = st.integers(0, 0xFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF)
addr4, addr6 = st.binary(min_size=4, max_size=4), st.binary(min_size=16, max_size=16)

SRC6 = bytes.fromhex("fd007478000000000000000000000001")
DST6 = bytes.fromhex("fd007478000000000000000000000002")


def seeds():
    """Valid packets to mutate: IPv4/TCP with options, IPv6 with an
    extension chain, IPv4 and IPv6 fragments."""
    opts = tcp.build_options(mss=1460, sack_perm=True, ts=(1, 2), wscale=7)
    seg = tcp.build_header(tcp.TcpHeader(1, 2, 3, 4, tcp.SYN, 100, 0, opts)) + b"payload!"
    v4 = ipv4.build(ipv4.IPv4Header(b"\x0a\0\0\1", b"\x0a\0\0\2", 6, 20 + len(seg))) + seg
    ext = bytes([60, 0, 1, 4, 0, 0, 0, 0]) + bytes([44, 0, 1, 4, 0, 0, 0, 0])
    fh = struct.pack("!BBHI", 6, 0, 1, 77)
    body = ext + fh + seg
    v6 = ipv6.build(ipv6.IPv6Header(SRC6, DST6, 0, len(body))) + body
    v4f = ipv4.build(ipv4.IPv4Header(b"\x0a\0\0\1", b"\x0a\0\0\2", 6, 20 + 32, ident=9,
                                     flags=ipv4.FLAG_MF)) + seg[:32]
    return [v4, v6, v4f, seg, opts]


SEEDS = seeds()


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.integers(0, 3))
        if op == 0 and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(u8)
        elif op == 1:
            del data[draw(st.integers(0, len(data))):]
        elif op == 2:
            data += draw(st.binary(max_size=20))
        elif op == 3 and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


packets = st.one_of(st.binary(max_size=120), mutated())


def only_wire_errors(fn, *args):
    try:
        return fn(*args)
    except WireError as e:
        assert e.reason and e.reason.replace("_", "").isalnum()
        return None


@FUZZ
@given(packets)
def test_ip_parsers_raise_only_wire_error(data):
    only_wire_errors(ipv4.parse, data, True)
    only_wire_errors(ipv4.parse, memoryview(data))
    only_wire_errors(ipv6.parse, data)
    r = only_wire_errors(ipv6.walk, memoryview(data))
    if r is not None:
        proto, off, _ = r
        assert 0 <= off <= len(data) and 0 <= proto <= 255


@FUZZ
@given(packets, addr4, addr4)
def test_tcp_parsers_raise_only_wire_error(data, src, dst):
    r = only_wire_errors(tcp.parse, data, src, dst)
    if r is not None:
        h, doff = r
        assert 20 <= doff <= len(data) and len(h.options) == doff - 20
        only_wire_errors(tcp.parse_options, h.options)
    o = only_wire_errors(tcp.parse_options, data)
    if o is not None:
        assert o.wscale is None or 0 <= o.wscale <= 14
        assert o.sack is None or 1 <= len(o.sack) <= 4


@FUZZ
@given(st.lists(packets, max_size=30), st.integers(1, 8), st.integers(0, 20000))
def test_reassembler_never_raises_and_stays_bounded(pkts, max_dg, max_bytes):
    drops = defaultdict(int)
    r = Reassembler(StackConfig(frag_max_datagrams=max_dg, frag_max_bytes=max_bytes, frag_timeout=1.0), drops)
    now = 0.0
    for p in pkts:
        out = r.add(p, now)
        assert len(r) <= max_dg and 0 <= r.bytes_held <= max_bytes
        if out is not None:
            if out[0] >> 4 == 4:
                h, _ = ipv4.parse(out, verify_checksum=True)
                assert not h.is_fragment and h.total_len == len(out) <= 65535
            else:
                h, _ = ipv6.parse(out)
                assert h.payload_len == len(out) - 40
        now += 0.3
        r.expire(now)
        d = r.next_deadline()
        assert d is None or d > now
    r.expire(now + 10)
    assert len(r) == 0 and r.bytes_held == 0


@FUZZ
@given(st.binary(min_size=8, max_size=3000), st.integers(1, 40), st.randoms(use_true_random=False),
       st.booleans())
def test_any_split_in_any_order_reassembles(payload, unit, rnd, v6):
    drops = defaultdict(int)
    r = Reassembler(StackConfig(), drops)
    size = unit * 8
    n = len(payload)
    frags = []
    if v6:
        whole = ipv6.build(ipv6.IPv6Header(SRC6, DST6, 59, n)) + payload
        for s in range(0, n, size):
            data = payload[s:s + size]
            more = s + size < n
            frags.append(ipv6.build(ipv6.IPv6Header(SRC6, DST6, 44, 8 + len(data)))
                         + struct.pack("!BBHI", 59, 0, s | more, 5) + data)
    else:
        whole = ipv4.build(ipv4.IPv4Header(b"\1\2\3\4", b"\5\6\7\x08", 200, 20 + n, ident=3)) + payload
        for s in range(0, n, size):
            data = payload[s:s + size]
            more = s + size < n
            frags.append(ipv4.build(ipv4.IPv4Header(b"\1\2\3\4", b"\5\6\7\x08", 200, 20 + len(data), ident=3,
                                                    flags=ipv4.FLAG_MF if more else 0, frag_offset=s)) + data)
    if len(frags) == 1 and not v6:
        return   # an unfragmented IPv4 datagram is not the reassembler's business
    # duplicates are harmless
    frags += [rnd.choice(frags) for _ in range(rnd.randint(0, 3))]
    rnd.shuffle(frags)
    outs = [o for o in (r.add(f, 0) for f in frags) if o is not None]
    assert outs and outs[0] == whole
    assert drops.get("frag_overlap", 0) == 0


@FUZZ
@given(addr4, addr4, u8, u16, u8, u16, st.integers(0, 7), st.integers(0, 0x1FFF), u8,
       st.integers(0, 10).map(lambda k: bytes(range(4 * k))))
def test_ipv4_round_trip(src, dst, proto, ident, ttl, tot, flags, fo, tos, opts):
    h = ipv4.IPv4Header(src, dst, proto, max(tot, 20 + len(opts)), ttl, ident, flags, fo << 3, tos, opts)
    raw = ipv4.build(h)
    pkt = raw + bytes(h.total_len - len(raw))
    got, hl = ipv4.parse(pkt, verify_checksum=True)
    assert got == h and hl == len(raw) and ck.sum16(raw) == 0xFFFF


@FUZZ
@given(addr6, addr6, u8, u16, u8, u8, st.integers(0, 0xFFFFF))
def test_ipv6_round_trip(src, dst, nxt, plen, hlim, tc, fl):
    h = ipv6.IPv6Header(src, dst, nxt, plen, hlim, tc, fl)
    raw = ipv6.build(h)
    got, off = ipv6.parse(raw + bytes(plen))
    assert got == h and off == 40 == len(raw)


@FUZZ
@given(u16, u16, u32, u32, st.integers(0, 0x1FF), u16, u16,
       st.one_of(st.none(), u16), st.one_of(st.none(), st.integers(0, 14)), st.booleans(),
       st.one_of(st.none(), st.tuples(u32, u32)),
       st.lists(st.tuples(u32, u32), max_size=4), addr6, addr6, st.binary(max_size=64))
def test_tcp_round_trip(sport, dport, seq, ack, flags, wnd, urg, mss, ws, sp, ts, sack, src, dst, payload):
    try:
        opts = tcp.build_options(mss=mss, wscale=ws, sack_perm=sp, ts=ts, sack=sack or None)
    except WireError:
        return   # too many options for 40 bytes: build refuses, nothing to round-trip
    o = tcp.parse_options(opts)
    assert (o.mss, o.wscale, o.sack_perm, o.sack) == (mss, ws, sp, sack or None)
    assert (o.ts_val, o.ts_ecr) == (ts if ts is not None else (None, None))
    h = tcp.TcpHeader(sport, dport, seq, ack, flags, wnd, urg, opts)
    seg = tcp.build_header(h, src, dst, payload) + payload
    got, doff = tcp.parse(seg, src, dst)
    assert got == h and seg[doff:] == payload
