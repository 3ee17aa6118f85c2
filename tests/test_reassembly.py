"""Fragment reassembly: order, duplicates, overlaps, limits, time, IPv4 and IPv6."""

import random
import struct
from collections import defaultdict

import dpkt
import pytest

from netstack.config import StackConfig
from netstack.wire import ipv4, ipv6
from netstack.reassembly import FRAG_OVERHEAD, Reassembler

SRC4, DST4 = bytes([198, 18, 0, 2]), bytes([93, 184, 216, 34])
SRC6 = bytes.fromhex("fd007478000000000000000000000002")
DST6 = bytes.fromhex("2001db80000000000000000000000053")


def make(**kw):
    drops = defaultdict(int)
    return Reassembler(StackConfig(**kw), drops), drops


def udp_payload(n, seed=1):
    rnd = random.Random(seed)
    data = bytes(rnd.getrandbits(8) for _ in range(n))
    return struct.pack("!HHHH", 5353, 53, 8 + n, 0) + data


def whole4(l4, proto=17, ident=0x4242, options=b""):
    h = ipv4.IPv4Header(SRC4, DST4, proto, 20 + len(options) + len(l4), ttl=61, ident=ident, options=options)
    return ipv4.build(h) + l4


def frag4(whole, start, end, more, ident=None):
    """One fragment of the IPv4 datagram *whole* carrying payload[start:end]."""
    h, hl = ipv4.parse(whole)
    data = whole[hl:][start:end]
    f = ipv4.IPv4Header(h.src, h.dst, h.proto, hl + len(data), h.ttl,
                        h.ident if ident is None else ident,
                        ipv4.FLAG_MF if more else 0, start, h.tos, h.options)
    return ipv4.build(f) + data


def split4(whole, size):
    n = len(whole) - ((whole[0] & 15) << 2)
    return [frag4(whole, s, min(s + size, n), s + size < n) for s in range(0, n, size)]


def opts_hdr(nxt):
    return bytes([nxt, 0, 1, 4, 0, 0, 0, 0])


def whole6(l4, nxt=17, unfrag=b""):
    """An IPv6 packet; *unfrag* is a hop-by-hop header chain (its first byte
    is patched to name *nxt*)."""
    if unfrag:
        first_nh = 0
        unfrag = bytes([nxt]) + unfrag[1:]
    else:
        first_nh = nxt
    body = unfrag + l4
    return ipv6.build(ipv6.IPv6Header(SRC6, DST6, first_nh, len(body), 60)) + body


def frag6(whole, start, end, more, ident=0x01020304, unfrag_len=0):
    """One fragment of IPv6 packet *whole* (with *unfrag_len* bytes of
    unfragmentable extension headers after the fixed header)."""
    u = 40 + unfrag_len
    hdr = bytearray(whole[:u])
    if unfrag_len:
        nxt = hdr[40]
        hdr[40] = 44
    else:
        nxt = hdr[6]
        hdr[6] = 44
    data = whole[u:][start:end]
    fh = struct.pack("!BBHI", nxt, 0, start | int(more), ident)
    plen = unfrag_len + 8 + len(data)
    hdr[4:6] = plen.to_bytes(2, "big")
    return bytes(hdr) + fh + data


def split6(whole, size, unfrag_len=0, ident=0x01020304):
    n = len(whole) - 40 - unfrag_len
    return [frag6(whole, s, min(s + size, n), s + size < n, ident, unfrag_len) for s in range(0, n, size)]


# ------------------------------------------------------------------ IPv4

def test_v4_in_order():
    r, drops = make()
    whole = whole4(udp_payload(3000))
    frags = split4(whole, 1480)
    assert len(frags) == 3
    assert r.add(frags[0], 0.0) is None
    assert r.add(frags[1], 0.1) is None
    assert len(r) == 1 and r.bytes_held > 0
    out = r.add(frags[2], 0.2)
    assert out == whole
    h, _ = ipv4.parse(out, verify_checksum=True)
    assert h.flags == 0 and h.frag_offset == 0 and h.total_len == len(whole)
    assert len(r) == 0 and r.bytes_held == 0 and r.next_deadline() is None
    assert not drops
    d = dpkt.ip.IP(out)
    assert isinstance(d.data, dpkt.udp.UDP) and len(d.data.data) == 3000


@pytest.mark.parametrize("seed", range(5))
def test_v4_out_of_order(seed):
    r, drops = make()
    whole = whole4(udp_payload(5000, seed), ident=seed)
    frags = split4(whole, 8 * random.Random(seed).randint(20, 200))
    random.Random(seed).shuffle(frags)
    outs = [r.add(f, 1.0) for f in frags]
    assert outs[:-1] == [None] * (len(frags) - 1)
    assert outs[-1] == whole
    assert not drops


def test_v4_header_taken_from_first_fragment_and_flags_cleared():
    r, drops = make()
    opts = bytes([0x94, 4, 0, 0])   # router alert, copied into every fragment
    whole = whole4(udp_payload(100), options=opts)
    frags = split4(whole, 64)
    for f in reversed(frags):
        out = r.add(f, 0)
    h, hl = ipv4.parse(out, verify_checksum=True)
    assert hl == 24 and h.options == opts and out == whole


def test_v4_exact_duplicate_is_dropped_datagram_kept():
    r, drops = make()
    whole = whole4(udp_payload(2000))
    f = split4(whole, 1000)
    assert r.add(f[0], 0) is None
    assert r.add(f[0], 0) is None
    assert drops["frag_duplicate"] == 1
    assert r.add(f[1], 0) is None
    assert r.add(f[2], 0) == whole


@pytest.mark.parametrize("second", [
    (8, 1008, True),      # starts inside the first run
    (0, 1008, True),      # same start, different length
    (992, 1600, True),    # overlaps the first run's tail
])
def test_v4_overlap_drops_whole_datagram(second):
    r, drops = make()
    whole = whole4(udp_payload(3000))
    assert r.add(frag4(whole, 0, 1000, True), 0) is None
    assert r.add(frag4(whole, *second), 0) is None
    assert drops["frag_overlap"] == 1
    assert len(r) == 0 and r.bytes_held == 0


def test_v4_same_range_different_bytes_is_overlap():
    r, drops = make()
    whole = whole4(udp_payload(3000))
    f = frag4(whole, 1000, 2000, True)
    evil = f[:-1] + bytes([f[-1] ^ 0xFF])
    r.add(f, 0)
    r.add(evil, 0)
    assert drops["frag_overlap"] == 1 and len(r) == 0


def test_v4_overlap_with_later_run():
    r, drops = make()
    whole = whole4(udp_payload(3000))
    r.add(frag4(whole, 1000, 2000, True), 0)
    r.add(frag4(whole, 0, 1008, True), 0)
    assert drops["frag_overlap"] == 1 and len(r) == 0


def test_v4_non_last_not_multiple_of_8():
    r, drops = make()
    whole = whole4(udp_payload(3000))
    assert r.add(frag4(whole, 0, 1001, True), 0) is None
    assert drops["frag_bad_length"] == 1 and len(r) == 0


def test_v4_data_beyond_the_last_fragment():
    r, drops = make()
    whole = whole4(udp_payload(3000))
    r.add(frag4(whole, 2000, 2400, True), 0)
    r.add(frag4(whole, 1000, 1200, False), 0)     # says the datagram ends at 1200
    assert drops["frag_bad_length"] == 1 and len(r) == 0
    r.add(frag4(whole, 1000, 1200, False), 0)
    r.add(frag4(whole, 2000, 2400, True), 0)      # beyond the known end
    assert drops["frag_bad_length"] == 2 and len(r) == 0
    r.add(frag4(whole, 1000, 1200, False), 0)
    r.add(frag4(whole, 1000, 1208, False), 0)     # two different ends
    assert drops["frag_bad_length"] == 3 and len(r) == 0


def test_v4_too_big():
    r, drops = make()
    whole = whole4(udp_payload(100))
    big = frag4(whole, 0, 64, True)
    h, hl = ipv4.parse(big)
    h.frag_offset = 65528
    h.flags = 0
    pkt = ipv4.build(h) + bytes(64)
    pkt = pkt[:2] + (20 + 64).to_bytes(2, "big") + pkt[4:]
    assert r.add(pkt, 0) is None
    assert drops["frag_too_big"] == 1 and len(r) == 0


def test_v4_tiny_first_fragment():
    r, drops = make()
    seg = struct.pack("!HHIIBBHHH", 1234, 80, 1, 0, 0x50, 0x02, 1000, 0, 0) + b"x" * 100
    whole = whole4(seg, proto=6)
    assert r.add(frag4(whole, 0, 8, True), 0) is None
    assert drops["frag_tiny"] == 1 and len(r) == 0
    # the same datagram cut after 24 bytes is fine
    assert r.add(frag4(whole, 0, 24, True), 0) is None
    assert r.add(frag4(whole, 24, 120, False), 0) == whole


def test_v4_datagrams_keyed_apart():
    r, drops = make()
    a = whole4(udp_payload(2000, 1), ident=7)
    b = whole4(udp_payload(2000, 2), ident=8)
    c = whole4(udp_payload(2000, 3), ident=7, proto=99)
    fa, fb, fc = split4(a, 1000), split4(b, 1000), split4(c, 1000)
    outs = []
    for trio in zip(fa, fb, fc):
        for f in trio:
            outs.append(r.add(f, 0))
    assert [o for o in outs if o is not None] == [a, b, c]
    assert not drops


def test_v4_not_a_fragment_or_garbage_counted_not_raised():
    r, drops = make()
    assert r.add(whole4(udp_payload(10)), 0) is None
    assert r.add(b"", 0) is None
    assert r.add(b"\x45\x00", 0) is None
    assert r.add(b"\x00" * 40, 0) is None
    assert drops["frag_malformed"] == 4


# ------------------------------------------------------------ time, memory

def test_timeout():
    r, drops = make(frag_timeout=30.0)
    whole = whole4(udp_payload(3000))
    f = split4(whole, 1480)
    r.add(f[0], 10.0)
    r.add(f[1], 12.0)
    assert r.next_deadline() == 40.0
    r.expire(39.9)
    assert len(r) == 1
    r.expire(40.0)
    assert len(r) == 0 and drops["frag_timeout"] == 1 and r.bytes_held == 0
    assert r.next_deadline() is None
    # the late last fragment starts a new datagram that cannot complete
    assert r.add(f[2], 41.0) is None and len(r) == 1


def test_timeout_oldest_first():
    r, drops = make(frag_timeout=5.0)
    a, b = whole4(udp_payload(2000), ident=1), whole4(udp_payload(2000), ident=2)
    r.add(split4(a, 1000)[0], 0.0)
    r.add(split4(b, 1000)[0], 3.0)
    r.expire(6.0)
    assert len(r) == 1 and r.next_deadline() == 8.0
    for f in split4(b, 1000)[1:]:
        out = r.add(f, 7.0)
    assert out == b


def test_max_datagrams_evicts_oldest():
    r, drops = make(frag_max_datagrams=2)
    ws = [whole4(udp_payload(2000, i), ident=i) for i in range(3)]
    fs = [split4(w, 1000) for w in ws]
    for f in fs:
        r.add(f[0], 0)
    assert len(r) == 2 and drops["frag_evicted"] == 1
    for f in fs[1][1:]:
        out = r.add(f, 0)
    assert out == ws[1]
    # datagram 0 lost its first fragment to the eviction
    assert [r.add(f, 0) for f in fs[0][1:]] == [None, None]


def test_max_bytes_evicts_oldest():
    r, drops = make(frag_max_bytes=3000)
    a, b = whole4(udp_payload(4000, 1), ident=1), whole4(udp_payload(4000, 2), ident=2)
    fa, fb = split4(a, 1480), split4(b, 1480)
    r.add(fa[0], 0)
    r.add(fb[0], 0)
    assert drops["frag_evicted"] == 1 and len(r) == 1
    assert r.bytes_held <= 3000
    r.add(fb[1], 0)          # b alone now exceeds the budget: it goes too
    assert drops["frag_evicted"] == 2 and len(r) == 0 and r.bytes_held == 0


def test_tiny_fragment_flood_is_bounded():
    r, drops = make(frag_max_bytes=64 * 1024, frag_max_datagrams=16)
    whole = whole4(udp_payload(60000))
    for i in range(2000):
        r.add(frag4(whole, 8 + 16 * i, 16 + 16 * i, True, ident=i % 40), 0)
    assert len(r) <= 16
    assert r.bytes_held <= 64 * 1024
    assert drops["frag_evicted"] > 0


def test_zero_datagrams_allowed():
    r, drops = make(frag_max_datagrams=0)
    whole = whole4(udp_payload(2000))
    assert r.add(split4(whole, 1000)[0], 0) is None
    assert len(r) == 0 and drops["frag_evicted"] == 1


# ------------------------------------------------------------------ IPv6

@pytest.mark.parametrize("seed", range(4))
def test_v6_reassembly(seed):
    r, drops = make()
    whole = whole6(udp_payload(4000, seed))
    frags = split6(whole, 1232)
    random.Random(seed).shuffle(frags)
    outs = [r.add(f, 0) for f in frags]
    assert outs[-1] == whole and outs[:-1] == [None] * (len(frags) - 1)
    assert ipv6.walk(outs[-1]) == (17, 40, False)
    assert not drops and len(r) == 0


def test_v6_with_unfragmentable_hop_by_hop():
    r, drops = make()
    whole = whole6(udp_payload(3000), unfrag=opts_hdr(17))
    frags = split6(whole, 1000, unfrag_len=8)
    assert ipv6.walk(frags[0]) == (17, 56, True)
    for f in frags[::-1]:
        out = r.add(f, 0)
    assert out == whole
    assert out[40] == 17 and out[6] == 0
    assert ipv6.walk(out) == (17, 48, False)
    d = dpkt.ip6.IP6(out)
    assert d.p == 17 and len(d.data) == 3008


def test_v6_fragmentable_dest_options_kept():
    r, drops = make()
    l4 = opts_hdr(17) + udp_payload(2000)   # dest options travel inside the fragments
    whole = whole6(l4, nxt=60)
    frags = split6(whole, 1000)
    for f in frags:
        out = r.add(f, 0)
    assert out == whole and ipv6.walk(out) == (17, 48, False)


def test_v6_atomic_fragment():
    r, drops = make()
    whole = whole6(udp_payload(100))
    atomic = frag6(whole, 0, 108, False)
    assert r.add(atomic, 0) == whole
    assert len(r) == 0 and not drops


def test_v6_tiny_first_fragment():
    r, drops = make()
    l4 = opts_hdr(6) + struct.pack("!HHIIBBHHH", 1, 2, 3, 4, 0x50, 2, 100, 0, 0) + bytes(200)
    whole = whole6(l4, nxt=60)
    assert r.add(frag6(whole, 0, 16, True), 0) is None      # dest opts + 8 bytes of TCP
    assert drops["frag_tiny"] == 1 and len(r) == 0
    assert r.add(frag6(whole, 0, 32, True), 0) is None
    assert r.add(frag6(whole, 32, len(l4), False), 0) == whole


def test_v6_overlap_and_keys():
    r, drops = make()
    whole = whole6(udp_payload(3000))
    r.add(frag6(whole, 0, 1000, True, ident=1), 0)
    r.add(frag6(whole, 0, 1000, True, ident=2), 0)
    assert len(r) == 2
    r.add(frag6(whole, 992, 2000, True, ident=1), 0)
    assert drops["frag_overlap"] == 1 and len(r) == 1


def test_v6_too_big():
    r, drops = make()
    whole = whole6(udp_payload(100))
    f = bytearray(frag6(whole, 0, 64, True))
    f[42:44] = (65528 | 0).to_bytes(2, "big")   # offset 65528, last
    assert r.add(bytes(f), 0) is None
    assert drops["frag_too_big"] == 1


def test_v6_malformed():
    r, drops = make()
    whole = whole6(udp_payload(100))
    assert r.add(whole, 0) is None                           # no fragment header
    assert r.add(split6(whole, 64)[0][:45], 0) is None       # payload length past the buffer
    assert r.add(whole[:30], 0) is None
    assert drops["frag_malformed"] == 3


def test_accounting_returns_to_zero():
    r, drops = make()
    whole = whole6(udp_payload(3000))
    frags = split6(whole, 1000)
    r.add(frags[0], 0)
    assert r.bytes_held == len(frags[0]) - 48 + FRAG_OVERHEAD + 40
    for f in frags[1:]:
        r.add(f, 0)
    assert r.bytes_held == 0 and len(r) == 0


def test_v6_malformed_extension_chain_in_fragment():
    r, drops = make()
    whole = whole6(udp_payload(100))
    f = bytearray(split6(whole, 64)[0])
    f[6] = 60                          # a destination options header that runs past the end
    f[40:48] = bytes([44, 200, 0, 0, 0, 0, 0, 0])
    assert r.add(bytes(f), 0) is None
    assert drops["frag_malformed"] == 1


def test_v6_first_fragment_with_truncated_chain_is_tiny():
    r, drops = make()
    l4 = bytes([6, 3]) + bytes(30) + bytes(200)    # dest options of 32 bytes, then TCP
    whole = whole6(l4, nxt=60)
    assert r.add(frag6(whole, 0, 24, True), 0) is None
    assert drops["frag_tiny"] == 1 and len(r) == 0


def test_zero_length_last_fragment():
    r, drops = make()
    whole = whole4(udp_payload(1992))                 # 2000 bytes of UDP
    assert r.add(frag4(whole, 0, 2000, True), 0) is None
    assert r.add(frag4(whole, 2000, 2000, False), 0) == whole
    assert not drops


def test_bad_fragment_abandons_held_datagram():
    r, drops = make()
    whole = whole4(udp_payload(3000))
    r.add(frag4(whole, 1000, 2000, True), 0)
    assert len(r) == 1
    r.add(frag4(whole, 0, 996, True), 0)              # not a multiple of 8
    assert drops["frag_bad_length"] == 1 and len(r) == 0 and r.bytes_held == 0


def test_v4_too_big_only_with_the_first_fragments_long_header():
    # later fragments carry 20-byte headers and fit; the first fragment's
    # 60-byte header makes the whole datagram 65572 bytes
    r, drops = make()
    opts = bytes([0x94, 4, 0, 0]) * 10
    end = 65512
    payload = bytes(end)
    outs = []
    for s in range(0, end, 1480):
        e = min(s + 1480, end)
        more = e < end
        h = ipv4.IPv4Header(SRC4, DST4, 17, 0, ident=5, flags=ipv4.FLAG_MF if more else 0, frag_offset=s,
                            options=opts if s == 0 else b"")
        h.total_len = h.header_len + e - s
        outs.append(r.add(ipv4.build(h) + payload[s:e], 0))
    assert outs == [None] * len(outs)
    assert drops["frag_too_big"] == 1 and len(r) == 0 and r.bytes_held == 0


def test_timeout_quotes_first_fragments():
    r, drops = make(frag_timeout=1.0)
    w4 = whole4(udp_payload(3000), ident=1)
    f4 = split4(w4, 1480)
    w6 = whole6(udp_payload(3000), unfrag=opts_hdr(17))
    f6 = split6(w6, 1480, unfrag_len=8, ident=0xABCDEF01)
    w4b = whole4(udp_payload(3000), ident=2)
    r.add(f4[0], 0)
    r.add(f6[0], 0)
    r.add(split4(w4b, 1480)[1], 0)          # no first fragment: nothing to quote
    assert r.expire(0.5) == []
    quotes = r.expire(1.0)
    assert drops["frag_timeout"] == 3 and len(r) == 0
    assert quotes[0] == f4[0][:28]          # IPv4 header + 8 bytes
    assert quotes[1] == f6[0][:1232]        # the whole fragment up to 1232 bytes
    assert len(quotes) == 2
