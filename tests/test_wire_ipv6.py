"""IPv6 header and extension-header walker: byte vectors, bounds, dpkt oracle."""

import struct

import dpkt
import pytest

from netstack.wire import ipv6
from netstack.wire.errors import WireError

SRC = bytes.fromhex("fd007478000000000000000000000001")
DST = bytes.fromhex("fd007478000000000000000000000002")
# traffic class 0x12, flow label 0xabcde, payload 20, TCP, hop limit 64
HDR = bytes.fromhex("612abcde00140640") + SRC + DST
REPR = ipv6.IPv6Header(SRC, DST, next_header=6, payload_len=20, hop_limit=64,
                       traffic_class=0x12, flow_label=0xABCDE)


def packet(nxt, ext=b"", l4=b"\x00" * 20):
    """A whole IPv6 packet with extension headers *ext* and payload *l4*."""
    body = ext + l4
    return ipv6.build(ipv6.IPv6Header(SRC, DST, nxt, len(body))) + body


def opts_hdr(nxt, length_units=0):
    """A hop-by-hop / destination options header of (length_units+1)*8 bytes (PadN)."""
    size = (length_units + 1) * 8
    return bytes([nxt, length_units, 1, size - 4]) + bytes(size - 4)


def routing_hdr(nxt, segments_left):
    return bytes([nxt, 0, 4, segments_left]) + bytes(4)


def frag_hdr(nxt, offset, more, ident):
    return struct.pack("!BBHI", nxt, 0, offset | int(more), ident)


def test_parse_vector():
    h, off = ipv6.parse(HDR + bytes(20))
    assert off == 40
    assert h == REPR


def test_build_vector():
    assert ipv6.build(REPR) == HDR


def test_parse_against_dpkt():
    d = dpkt.ip6.IP6(HDR + bytes(20))
    h, _ = ipv6.parse(memoryview(HDR + bytes(20)))
    assert (h.src, h.dst, h.next_header, h.hop_limit, h.flow_label, h.traffic_class) == \
        (d.src, d.dst, d.nxt, d.hlim, d.flow, d.fc)


@pytest.mark.parametrize("raw,reason", [
    (HDR[:39], "truncated"),
    (b"\x40" + HDR[1:] + bytes(20), "bad_version"),
    (HDR + bytes(19), "bad_length"),
])
def test_parse_rejects(raw, reason):
    with pytest.raises(WireError) as e:
        ipv6.parse(raw)
    assert e.value.reason == reason


def test_walk_plain():
    assert ipv6.walk(packet(6)) == (6, 40, False)
    assert ipv6.walk(packet(17, l4=bytes(8))) == (17, 40, False)
    assert ipv6.walk(packet(58, l4=bytes(8))) == (58, 40, False)


def test_walk_hbh_destopts_routing():
    ext = opts_hdr(60) + opts_hdr(43, 1) + routing_hdr(6, 0)
    pkt = packet(0, ext)
    assert ipv6.walk(pkt) == (6, 40 + 8 + 16 + 8, False)
    d = dpkt.ip6.IP6(pkt)
    assert d.p == 6 and len(d.data) == len(pkt) - 72   # dpkt agrees where TCP starts
    proto, off, frag_off, nh_off = ipv6.walk_ext(memoryview(pkt), 0, 40, len(pkt), True)
    assert (proto, off, frag_off, nh_off) == (6, 72, -1, 64)


def test_walk_fragment():
    ext = opts_hdr(44) + frag_hdr(6, 0, True, 0xDEADBEEF)
    pkt = packet(0, ext, bytes(24))
    assert ipv6.walk(pkt) == (6, 40 + 8 + 8, True)
    assert ipv6.walk_ext(pkt, 0, 40, len(pkt), True) == (6, 56, 48, 40)
    pkt = packet(44, frag_hdr(17, 8, False, 1), bytes(8))
    assert ipv6.walk(pkt) == (17, 48, True)
    assert ipv6.walk_ext(pkt, 44, 40, len(pkt), True) == (17, 48, 40, 6)


def test_walk_no_next_header_and_unwalked():
    assert ipv6.walk(packet(59, l4=b"")) == (59, 40, False)
    assert ipv6.walk(packet(60, opts_hdr(59), b"")) == (59, 48, False)
    assert ipv6.walk(packet(50, l4=bytes(16))) == (50, 40, False)   # ESP: not ours to walk


@pytest.mark.parametrize("nxt,ext,l4,reason", [
    (60, opts_hdr(0), bytes(20), "ipv6_hbh_not_first"),          # hop-by-hop after dest opts
    (0, opts_hdr(0), bytes(20), "ipv6_hbh_not_first"),           # two hop-by-hop headers
    (43, routing_hdr(6, 1), bytes(20), "ipv6_routing_header"),   # segments left
    (60, b"\x06\x00\x01", b"", "ipv6_ext_truncated"),            # header shorter than 8
    (60, b"\x06\x05" + bytes(14), b"", "ipv6_ext_truncated"),    # length 48 past the end
    (44, b"\x06\x00\x00", b"", "ipv6_ext_truncated"),            # short fragment header
    (60, b"".join(opts_hdr(60) for _ in range(9)) + opts_hdr(6), bytes(20), "ipv6_ext_chain_too_long"),
])
def test_walk_rejects(nxt, ext, l4, reason):
    with pytest.raises(WireError) as e:
        ipv6.walk(packet(nxt, ext, l4))
    assert e.value.reason == reason


def test_walk_chain_at_the_limit_is_fine():
    ext = b"".join(opts_hdr(60) for _ in range(ipv6.MAX_EXT_HEADERS - 1)) + opts_hdr(6)
    assert ipv6.walk(packet(60, ext)) == (6, 40 + 8 * ipv6.MAX_EXT_HEADERS, False)


def test_walk_bounded_by_buffer_not_payload_field():
    # the caller trims to 40 + payload length; the walker trusts len(mv)
    pkt = packet(60, opts_hdr(6))
    with pytest.raises(WireError):
        ipv6.walk(memoryview(pkt)[:45])
    with pytest.raises(WireError) as e:
        ipv6.walk(pkt[:20])
    assert e.value.reason == "truncated"
