"""IPv4 header: byte vectors both ways, every check, dpkt as an oracle."""

import dpkt
import pytest

from netstack.wire import ipv4
from netstack.wire.errors import WireError

# 192.168.0.1 -> 192.168.0.199, UDP, DF, TTL 64, total length 115
HDR = bytes.fromhex("45000073000040004011b861c0a80001c0a800c7")
PKT = HDR + bytes(range(95))
REPR = ipv4.IPv4Header(src=bytes([192, 168, 0, 1]), dst=bytes([192, 168, 0, 199]), proto=ipv4.PROTO_UDP,
                       total_len=115, ttl=64, ident=0, flags=ipv4.FLAG_DF, frag_offset=0)


def test_parse_vector():
    h, hl = ipv4.parse(PKT, verify_checksum=True)
    assert hl == 20
    assert h == REPR
    assert not h.is_fragment
    assert h.header_len == 20


def test_parse_memoryview_and_padding():
    h, hl = ipv4.parse(memoryview(PKT + b"\x00" * 10))
    assert h.total_len == 115 and hl == 20


def test_build_vector():
    assert ipv4.build(REPR) == HDR


def test_options_skipped_and_kept():
    # IHL 7: a record-route-ish option block with a nonsense length inside:
    # the IHL alone decides where the payload starts
    opts = bytes([7, 200, 4, 0, 0, 0, 0, 1])
    h = ipv4.IPv4Header(b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02", ipv4.PROTO_TCP, 28 + 4,
                        ident=0x1234, options=opts)
    raw = ipv4.build(h) + b"abcd"
    assert raw[0] == 0x47
    got, hl = ipv4.parse(raw, verify_checksum=True)
    assert hl == 28 and got.options == opts and got == h
    assert raw[hl:] == b"abcd"
    d = dpkt.ip.IP(raw)
    assert d.hl == 7 and d.id == 0x1234 and bytes(d.data) == b"abcd"


def test_fragment_fields():
    h = ipv4.IPv4Header(b"\x01\x02\x03\x04", b"\x05\x06\x07\x08", 17, 20 + 8, ident=99,
                        flags=ipv4.FLAG_MF, frag_offset=1480)
    raw = ipv4.build(h)
    assert raw[6:8] == (0x2000 | 185).to_bytes(2, "big")
    got, _ = ipv4.parse(raw + bytes(8))
    assert got.frag_offset == 1480 and got.flags == ipv4.FLAG_MF and got.is_fragment
    d = dpkt.ip.IP(raw + bytes(8))
    assert d.mf == 1 and d.offset == 1480 // 8


def test_build_against_dpkt():
    d = dpkt.ip.IP(src=b"\x0a\x00\x00\x01", dst=b"\xc0\x00\x02\x01", p=6, ttl=33, id=4242, tos=0x10,
                   data=b"x" * 30)
    d.df = 1
    raw = bytes(d)
    h, hl = ipv4.parse(raw, verify_checksum=True)
    assert (h.src, h.dst, h.proto, h.ttl, h.ident, h.tos, h.total_len) == (d.src, d.dst, 6, 33, 4242, 0x10, 50)
    assert h.flags == ipv4.FLAG_DF
    assert ipv4.build(h) == raw[:20]


@pytest.mark.parametrize("raw,reason", [
    (HDR[:19], "truncated"),
    (b"", "truncated"),
    (b"\x65" + PKT[1:], "bad_version"),
    (b"\x44" + PKT[1:], "bad_length"),            # IHL 4
    (b"\x4f" + HDR[1:], "truncated"),             # IHL 15 = 60 > 20-byte buffer
    (HDR[:2] + (19).to_bytes(2, "big") + PKT[4:], "bad_length"),     # total < IHL
    (HDR[:2] + (116).to_bytes(2, "big") + PKT[4:], "bad_length"),    # total > buffer
])
def test_parse_rejects(raw, reason):
    with pytest.raises(WireError) as e:
        ipv4.parse(raw)
    assert e.value.reason == reason


def test_bad_checksum_only_when_verifying():
    bad = PKT[:10] + b"\xb8\x62" + PKT[12:]
    ipv4.parse(bad)
    with pytest.raises(WireError) as e:
        ipv4.parse(bad, verify_checksum=True)
    assert e.value.reason == "bad_ip_checksum"


def test_build_rejects_bad_options_and_offset():
    with pytest.raises(WireError) as e:
        ipv4.build(ipv4.IPv4Header(b"\0" * 4, b"\0" * 4, 6, 20, options=b"\x01"))
    assert e.value.reason == "bad_ip_options"
    with pytest.raises(WireError):
        ipv4.build(ipv4.IPv4Header(b"\0" * 4, b"\0" * 4, 6, 20, options=b"\x01" * 44))
    with pytest.raises(WireError) as e:
        ipv4.build(ipv4.IPv4Header(b"\0" * 4, b"\0" * 4, 6, 20, frag_offset=7))
    assert e.value.reason == "bad_frag_offset"


def test_header_checksum_helper():
    assert ipv4.header_checksum(HDR[:10] + b"\0\0" + HDR[12:]) == 0xB861
