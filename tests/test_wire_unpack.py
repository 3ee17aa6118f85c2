"""The fast checked parsers every receiving path calls (netstack.wire
unpack functions, ip.transport, icmp.parse_quote, tcp.scan_options) and the
checksum completion, with byte vectors both ways and dpkt as the referee;
fuzzed bytes may only raise WireError."""

from __future__ import annotations

import struct

import dpkt
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from netstack import StackConfig
from netstack.wire import checksum as ck
from netstack.wire import icmp, ip, ipv4, ipv6, tcp, udp
from netstack.wire.errors import WireError
from netstack.wire.templates import GsoSegment, TcpTemplate, UdpTemplate, ip_packets

A4, B4 = bytes([10, 0, 0, 1]), bytes([93, 184, 216, 34])
A6 = bytes.fromhex("fd007478000000000000000000000001")
B6 = bytes.fromhex("20010db8000000000000000000000080")

# IPv4 + TCP, DF, ttl 64, id 0x1234, SYN with MSS 1460, from dpkt's own bytes
V4_SYN = bytes.fromhex(
    "4500002c12344000" "4006" "0000" "0a000001" "5db8d822"      # IP (checksum left 0: not checked here)
    "9c40" "0050" "00000064" "00000000" "60" "02" "ffff" "0000" "0000"  # TCP: 40000 -> 80, seq 100, doff 6
    "020405b4")                                               # MSS 1460


def test_ipv4_unpack_vector():
    assert ipv4.unpack(V4_SYN) == (20, 44, 0x4000, 6, A4, B4)
    # padding after the total length is the caller's to trim; a memoryview works the same
    assert ipv4.unpack(memoryview(V4_SYN + b"\0" * 6)) == (20, 44, 0x4000, 6, A4, B4)
    assert ipv4.ident(V4_SYN) == 0x1234


@pytest.mark.parametrize("raw, reason", [
    (V4_SYN[:19], "truncated"),
    (b"\x65" + V4_SYN[1:], "bad_version"),
    (b"\x44" + V4_SYN[1:], "bad_length"),                              # IHL 4
    (b"\x4f" + V4_SYN[1:], "bad_length"),                              # IHL 60 > total length
    (V4_SYN[:2] + (19).to_bytes(2, "big") + V4_SYN[4:], "bad_length"),  # total < IHL
    (V4_SYN[:2] + (45).to_bytes(2, "big") + V4_SYN[4:], "bad_length"),  # total > buffer
])
def test_ipv4_unpack_rejects(raw, reason):
    with pytest.raises(WireError) as e:
        ipv4.unpack(raw)
    assert e.value.reason == reason


def test_ipv4_header_ok_against_dpkt():
    good = bytes(dpkt.ip.IP(V4_SYN))           # dpkt fills the header checksum
    assert ipv4.header_ok(good, 20)
    assert not ipv4.header_ok(V4_SYN, 20)


def _v6(nxt, body):
    return struct.pack("!IHBB16s16s", 0x60000000, len(body), nxt, 64, A6, B6) + body


def test_ipv6_unpack_vector_and_rejects():
    p = _v6(17, b"\x13\x88\x00\x35\x00\x0c\x00\x00data")
    assert ipv6.unpack(p) == (12, 17, A6, B6)
    assert ipv6.unpack(memoryview(p + b"pad")) == (12, 17, A6, B6)
    for raw, reason in ((p[:39], "truncated"), (b"\x40" + p[1:], "bad_version"), (p[:-1], "bad_length")):
        with pytest.raises(WireError) as e:
            ipv6.unpack(raw)
        assert e.value.reason == reason


def test_tcp_unpack_vector_against_dpkt():
    seg = V4_SYN[20:]
    t = dpkt.tcp.TCP(seg)
    assert tcp.unpack(seg) == (t.sport, t.dport, t.seq, t.ack, t.off * 4, t.flags, t.win) == \
        (40000, 80, 100, 0, 24, tcp.SYN, 0xFFFF)
    assert tcp.unpack(V4_SYN, 20) == tcp.unpack(seg)
    for raw, off, reason in ((seg[:19], 0, "truncated"), (V4_SYN, 26, "truncated"),
                             (seg[:12] + b"\x40" + seg[13:], 0, "bad_tcp_offset"),      # 16-byte header
                             (seg[:12] + b"\x70" + seg[13:], 0, "bad_tcp_offset")):     # 28 > 24 bytes
        with pytest.raises(WireError) as e:
            tcp.unpack(raw, off)
        assert e.value.reason == reason


def test_icmp_unpack_and_quote_through_extension_headers():
    echo = bytes([8, 0, 0, 0, 0x12, 0x34, 0, 7]) + b"ping"
    assert icmp.unpack(echo) == (8, 0, 0x12340007)
    with pytest.raises(WireError) as e:
        icmp.unpack(echo, 5)
    assert e.value.reason == "truncated"
    # an ICMPv6 error quoting a packet with a destination-options header and a first fragment
    udp8 = struct.pack("!HHHH", 5353, 53, 8, 0)
    body = bytes([44, 0, 1, 4, 0, 0, 0, 0]) + struct.pack("!BBHI", 17, 0, 1, 99) + udp8
    quoted = _v6(60, body)
    assert icmp.parse_quote(b"\0" * 8 + quoted, 8) == (6, 17, A6, 5353, B6, 53)
    later = _v6(44, struct.pack("!BBHI", 17, 0, 8 << 3, 99) + udp8)   # not the first fragment
    with pytest.raises(WireError) as e:
        icmp.parse_quote(later, 0)
    assert e.value.reason == "icmp_bad_quote"


def test_transport_either_family():
    assert ip.transport(V4_SYN) == (4, 6, 20, 44, A4, B4)
    ext = _v6(0, bytes([17, 0, 1, 4, 0, 0, 0, 0]) + struct.pack("!HHHH", 1, 2, 8, 0))
    assert ip.transport(ext) == (6, 17, 48, 56, A6, B6)
    frag = ip_packets(4, A4, B4, 17, b"\0" * 3000, 64, 1500, ident=5)[0]
    for raw, reason in ((b"", "bad_version"), (b"\x20" * 40, "bad_version"), (frag, "fragment"),
                        (_v6(44, struct.pack("!BBHI", 17, 0, 1, 1) + bytes(8)), "fragment")):
        with pytest.raises(WireError) as e:
            ip.transport(raw)
        assert e.value.reason == reason
    assert ip.addresses(V4_SYN, 4) == (A4, B4) and ip.addresses(ext, 6) == (A6, B6)


def test_scan_options_offsets_and_leniency():
    block = tcp.build_options(ts=(5, 6), sack=[(10, 20), (30, 40)], wscale=20)
    o = tcp.scan_options(block)
    assert o[8] == (2, (5, 6)) and block[o[8][0]] == 8
    assert o[5][1] == [(10, 20), (30, 40)] and block[o[5][0]] == 5
    assert o[3][1] == 14                      # clamped as RFC 7323 says
    # a malformed option ends the scan, keeping what came before it
    assert tcp.scan_options(b"\x01\x01\x08\x0a" + bytes(8) + b"\x05\x01") == {8: (2, (0, 0))}


def test_pseudo_is_one_sum_for_both_families():
    assert ck.pseudo4 is ck.pseudo6 is ck.pseudo
    # RFC 768 by hand: 16-bit words of the addresses + proto + length
    words = sum(struct.unpack("!4H", A4 + B4)) + 17 + 12
    assert ck.fold(ck.pseudo(A4, B4, 17, 12)) == ck.fold(words)
    assert ck.partial(A4, B4, 17, 12) == ck.fold(words)


@pytest.mark.parametrize("family", [4, 6])
def test_complete_and_fill_finish_partial_checksums(family):
    a, b = (A4, B4) if family == 4 else (A6, B6)
    part, full = StackConfig(checksum_offload=True), StackConfig()
    tp, tf = TcpTemplate(family, a, b, 1, 2, part), TcpTemplate(family, a, b, 1, 2, full)
    p, q = tp.build(7, 8, tcp.ACK, 100, b"", b"odd!x"), tf.build(7, 8, tcp.ACK, 100, b"", b"odd!x")
    hl = 20 if family == 4 else 40
    assert p[hl + 16:hl + 18] == ck.partial(a, b, 6, len(p) - hl).to_bytes(2, "big")
    assert ip.complete(p)[hl:] == q[hl:] != p[hl:]
    buf = bytearray(p)
    assert ip.fill(buf) and bytes(buf)[hl:] == q[hl:]
    u = UdpTemplate(family, a, b, 5, 6, part).build(b"x")[0]
    assert ck.sum16(memoryview(ip.complete(u))[hl:], ck.pseudo(a, b, 17, len(u) - hl)) == 0xFFFF
    icmp_pkt = ip_packets(family, a, b, 1 if family == 4 else 58, bytes(8), 64, 1500, ident=1)[0]
    assert ip.complete(icmp_pkt) is icmp_pkt and not ip.fill(bytearray(icmp_pkt))


@pytest.mark.parametrize("family", [4, 6])
def test_gso_segment_carries_its_layout(family):
    a, b = (A4, B4) if family == 4 else (A6, B6)
    tpl = TcpTemplate(family, a, b, 80, 40000, StackConfig(checksum_offload=True))
    opts = tcp.build_options(ts=(1, 2))
    g = tpl.gso(tpl.build(1, 2, tcp.ACK, 100, opts, bytes(5000)), len(opts), 1448)
    assert isinstance(g, GsoSegment) and isinstance(g, bytes)
    fam, proto, l4, end, _s, _d = ip.transport(g)
    assert (g.family, g.l4_off, g.gso_size) == (fam, l4, 1448) and proto == 6 and end == len(g)
    assert g.hdr_len == l4 + tcp.unpack(g, l4)[4] == l4 + 32


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=90), st.integers(0, 60))
def test_unpackers_raise_only_wire_error(data, off):
    for fn, args in ((ipv4.unpack, (data,)), (ipv6.unpack, (data,)), (tcp.unpack, (data, off)),
                     (udp.parse, (data, off)), (icmp.unpack, (data, off)), (icmp.parse_quote, (data, off)),
                     (ip.transport, (data,))):
        try:
            fn(*args)
        except WireError as e:
            assert e.reason
    tcp.scan_options(data)
    assert len(ip.complete(data)) == len(data)     # never raises, never changes the length
