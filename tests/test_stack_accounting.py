"""Malformed input of every kind is dropped and counted by the right reason,
and the accounting invariant holds:
rx_packets == sum(drops) + delivered + frag_held."""

import os
import random
import struct
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_stack_pkt import (A4, A6, B4, B6, accounting_ok, csum, frag4, frag6, icmp_packet, ip4, ip6,  # noqa: E402
                            tcp_packet, udp, udp_packet)

from netstack import Stack, StackConfig


def mkstack(**kw):
    return Stack(StackConfig(**kw), rng=random.Random(1))


def fix4(p):
    """Recompute the IPv4 header checksum of a modified packet."""
    p = bytearray(p)
    ihl = (p[0] & 15) * 4
    struct.pack_into("!H", p, 10, 0)
    struct.pack_into("!H", p, 10, csum(bytes(p[:ihl])))
    return bytes(p)


def patch(p, off, fmt, value, fix=True):
    p = bytearray(p)
    struct.pack_into(fmt, p, off, value)
    return fix4(p) if fix and p[0] >> 4 == 4 else bytes(p)


U4 = udp_packet(A4, B4, 1000, 53, b"hello")
U6 = udp_packet(A6, B6, 1000, 53, b"hello")
MCAST6 = bytes([0xFF, 0x02]) + bytes(13) + b"\x01"


def ext6(nxt_chain, final_proto, l4):
    """An IPv6 packet with generic 8-byte extension headers in front of l4."""
    body = l4
    chain = list(nxt_chain)
    hdrs = b""
    for i, h in enumerate(chain):
        nxt = chain[i + 1] if i + 1 < len(chain) else final_proto
        hdrs += bytes([nxt, 0]) + bytes(6)
    return ip6(A6, B6, chain[0], hdrs + body)


def tcp_raw(offset_words, total=20):
    """A TCP header (SYN, 1234 -> 80) whose data offset says offset_words,
    padded or cut to *total* bytes: the checks run before any checksum."""
    hdr = struct.pack("!HHIIBBHHH", 1234, 80, 1, 0, offset_words << 4, 0x02, 65535, 0, 0)
    return (hdr + bytes(max(0, total - 20)))[:total]


CASES = [
    ("empty", b"", "truncated"),
    # the TCP header's bounds, on both sides of the stack's fast parse
    ("v4 tcp short header", ip4(A4, B4, 6, tcp_raw(5, 19)), "truncated"),
    ("v4 tcp offset 4 words", ip4(A4, B4, 6, tcp_raw(4)), "bad_tcp_offset"),
    ("v4 tcp offset past the end", ip4(A4, B4, 6, tcp_raw(6)), "bad_tcp_offset"),
    ("v6 tcp offset past the end", ip6(A6, B6, 6, tcp_raw(15, 56)), "bad_tcp_offset"),
    ("v4 options, total > packet", patch(fix4(b"\x46" + U4[1:20] + bytes(4) + U4[20:]), 2, "!H", 200),
     "bad_length"),
    ("version 5", b"\x50" + bytes(39), "bad_version"),
    ("version 0", bytes(20), "bad_version"),
    ("v4 short", U4[:19], "truncated"),
    ("v4 ihl 4", patch(U4, 0, "!B", 0x44), "bad_length"),
    ("v4 total > packet", patch(U4, 2, "!H", len(U4) + 1), "bad_length"),
    ("v4 total < ihl", patch(U4, 2, "!H", 19), "bad_length"),
    ("v4 ihl past the end", patch(U4[:20], 0, "!B", 0x4F), "bad_length"),
    ("v4 header checksum", patch(U4, 10, "!H", 0x1234, fix=False), "bad_ip_checksum"),
    ("v4 broadcast source", udp_packet(b"\xff\xff\xff\xff", B4, 68, 67, b"x"), "bad_source"),
    ("v4 multicast source", udp_packet(bytes([224, 0, 0, 5]), B4, 1, 2, b"x"), "bad_source"),
    ("v4 zero source", udp_packet(bytes(4), B4, 68, 67, b"x"), "bad_source"),
    ("v4 GRE", ip4(A4, B4, 47, bytes(8)), "unsupported_protocol"),
    ("v4 udp short header", ip4(A4, B4, 17, b"\x00\x01\x00"), "truncated"),
    ("v4 udp length 7", patch(U4, 24, "!H", 7), "bad_udp_length"),
    ("v4 udp length past end", patch(U4, 24, "!H", 100), "bad_udp_length"),
    ("v4 udp checksum", patch(U4, 26, "!H", 0x0101), "bad_udp_checksum"),
    ("v4 icmp short", ip4(A4, B4, 1, b"\x08\x00\xf7"), "truncated"),
    ("v6 short", U6[:39], "truncated"),
    ("v6 payload length > packet", patch(U6, 4, "!H", 100), "bad_length"),
    ("v6 multicast source", udp_packet(MCAST6, B6, 1, 2, b"x"), "bad_source"),
    ("v6 unspecified source", udp_packet(bytes(16), B6, 1, 2, b"x"), "bad_source"),
    ("v6 udp zero checksum", udp_packet(A6, B6, 1, 2, b"x", zero_csum=True), "bad_udp_checksum"),
    ("v6 no next header", ip6(A6, B6, 59, b""), "no_next_header"),
    ("v6 unknown protocol", ip6(A6, B6, 132, bytes(12)), "unsupported_protocol"),
    ("v6 ext truncated", ip6(A6, B6, 60, b"\x11\x05" + bytes(6)), "ipv6_ext_truncated"),
    ("v6 routing header in use", ip6(A6, B6, 43, bytes([17, 0, 0, 1]) + bytes(4) + udp(A6, B6, 1, 2, b"")),
     "ipv6_routing_header"),
    ("v6 hop-by-hop not first", ext6([60, 0], 17, udp(A6, B6, 1, 2, b"")), "ipv6_hbh_not_first"),
    ("v6 endless chain", ext6([60] * 40, 17, udp(A6, B6, 1, 2, b"")), "ipv6_ext_chain_too_long"),
    ("v6 icmp checksum", patch(icmp_packet(A6, B6, 128, 0, 1, b"x"), 42, "!H", 1), "bad_icmp_checksum"),
]


@pytest.mark.parametrize("name,pkt,reason", CASES, ids=[c[0] for c in CASES])
def test_malformed_is_counted_by_reason(name, pkt, reason):
    st = mkstack()
    st.input(pkt, 1.0)
    assert dict(st.drops) == {reason: 1}
    assert st.delivered == 0 and st.take_output() == [] and st.take_events() == []
    assert accounting_ok(st)


def test_extension_headers_are_walked_to_udp_and_icmp():
    st = mkstack()
    st.input(ext6([0, 60], 17, udp(A6, B6, 1000, 53, b"via ext")), 1.0)
    ev, = st.take_events()
    assert ev.data == b"via ext"
    from test_stack_pkt import icmp6
    st.input(ext6([60], 58, icmp6(A6, B6, 128, 0, 1, b"p")), 1.0)
    assert len(st.take_output()) == 1
    assert st.delivered == 2 and accounting_ok(st)


def test_trailing_bytes_after_ip_length_are_ignored():
    st = mkstack()
    st.input(U4 + b"\x00" * 6, 1.0)
    st.input(U6 + b"junk", 1.0)
    assert [e.data for e in st.take_events()] == [b"hello", b"hello"]


def test_ipv4_options_take_the_checked_parse_and_are_skipped():
    # IHL 6: four bytes of options (NOPs, never interpreted) before the UDP
    # header; the total length counts them
    p = bytearray(b"\x46" + U4[1:20] + b"\x01\x01\x01\x00" + U4[20:])
    struct.pack_into("!H", p, 2, len(p))
    st = mkstack()
    st.input(fix4(p), 1.0)
    assert [e.data for e in st.take_events()] == [b"hello"]
    assert st.delivered == 1 and accounting_ok(st)


def test_fragments_overlap_and_floods_are_bounded():
    st = mkstack(frag_max_datagrams=8, frag_max_bytes=64 * 1024)
    big = udp_packet(A4, B4, 1000, 53, bytes(3000), ident=77)
    f = frag4(big, 1000)
    st.input(f[0], 1.0)
    # an overlapping fragment abandons the datagram
    over = ip4(A4, B4, 17, bytes(1000), ident=77, frag=0x2000 | (504 >> 3))
    st.input(over, 1.0)
    st.input(f[1], 1.0)
    st.input(f[2], 1.0)
    assert st.take_events() == []
    assert st.frag_drops["frag_overlap"] >= 1
    # a flood of first fragments with distinct idents
    for i in range(2000):
        st.input(frag4(udp_packet(A4, B4, 1000, 53, bytes(64), ident=i), 32)[0], 1.0 + i * 1e-3)
    assert len(st._frag) <= 8 and st._frag.bytes_held <= 64 * 1024
    assert accounting_ok(st)
    assert st.next_deadline() is not None
    st.poll(1000.0)
    assert len(st._frag) == 0 and st.next_deadline() is None
    # v6 fragments, out of order and duplicated
    big6 = udp_packet(A6, B6, 1000, 53, bytes(range(200)) * 10)
    fr6 = frag6(big6, 512)
    for p in [fr6[2], fr6[0], fr6[0], fr6[1], fr6[3]]:
        st.input(p, 1001.0)
    ev, = st.take_events()
    assert ev.data == bytes(range(200)) * 10
    assert accounting_ok(st)


def test_syn_and_tiny_segment_floods_stay_bounded():
    st = mkstack(max_pending=64, max_flows=100)
    rnd = random.Random(5)
    for i in range(3000):
        st.input(tcp_packet(A4, B4, 1024 + i, 443, rnd.getrandbits(32), 0, 0x02), 1.0)
        st.input(tcp_packet(A4, B4, 1024 + i, 443, rnd.getrandbits(32), rnd.getrandbits(32), 0x10,
                            data=b"x"), 1.0)
    st.poll(2.0)
    assert len(st.tcp) <= 100 and st.pending <= 64
    assert accounting_ok(st)
    st.take_output()
    st.poll(100.0)
    assert len(st._heap) <= 4096 + 2 * (len(st.tcp) + len(st.udp))


def test_status_is_plain_json():
    import json
    st = mkstack()
    for p in [U4, U6, b"", icmp_packet(A4, B4, 8, 0, 1, b"")]:
        st.input(p, 1.0)
    st.take_output()
    s = st.status()
    assert json.loads(json.dumps(s)) == s
    assert s["rx_packets"] == 4 and s["udp_flows"] == 2 and s["drops"] == {"truncated": 1}
    assert s["delivered"] == 3 and s["tx_packets"] == 1 and s["tx_bytes"] == 28


def test_fragmented_tcp_syn_reaches_tcp():
    from netstack import events
    from netstack.wire.tcp import build_options
    for a, b in ((A6, B6), (A4, B4)):
        st = mkstack()
        syn = tcp_packet(a, b, 1000, 443, 5, 0, 0x02, options=build_options(mss=1460, sack_perm=True, ts=(1, 0)))
        # the first fragment must hold the whole TCP header (RFC 1858): 24 bytes do
        fr = frag4(syn, 24) if len(a) == 4 else frag6(syn, 24)
        assert len(fr) == 2
        fr.reverse()
        for p in fr:
            st.input(p, 1.0)
        evs = st.take_events()
        assert [type(e) for e in evs] == [events.TcpConnectRequest]
        assert evs[0].conn.key == (a, 1000, b, 443)
        assert st.frag_held == 1 and st.delivered == 1 and accounting_ok(st)
    # a first fragment too small for the TCP header is held and then discarded
    st = mkstack()
    for p in frag4(syn, 8):
        st.input(p, 1.0)
    assert st.take_events() == [] and st.frag_drops["frag_tiny"] >= 1 and accounting_ok(st)
