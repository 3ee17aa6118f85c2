"""TCP header view and option block: vectors both ways, malformed input,
dpkt as a checksum oracle."""

import dpkt
import pytest

from netstack.wire import tcp
from netstack.wire.errors import WireError

# Linux SYN options: MSS 1460, SACK-permitted, TS (0x00010203, 0), NOP, WS 7
LINUX_SYN_OPTS = bytes.fromhex("020405b4" "0402080a" "00010203" "00000000" "01030307")
# sport 4660, dport 80, seq 0xfffffff0, ack 5, doff 5, SYN|ACK, window 65535, csum 0, urg 0
HDR = bytes.fromhex("12340050" "fffffff0" "00000005" "5012ffff" "00000000")
REPR = tcp.TcpHeader(0x1234, 80, 0xFFFFFFF0, 5, tcp.SYN | tcp.ACK, 0xFFFF, 0, b"")
SRC4, DST4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
SRC6 = bytes.fromhex("fd007478000000000000000000000001")
DST6 = bytes.fromhex("fd007478000000000000000000000002")


def test_parse_options_linux_syn():
    o = tcp.parse_options(LINUX_SYN_OPTS)
    assert (o.mss, o.sack_perm, o.ts_val, o.ts_ecr, o.wscale, o.sack) == (1460, True, 0x10203, 0, 7, None)


def test_build_options_linux_syn_layout():
    assert tcp.build_options(mss=1460, sack_perm=True, ts=(0x10203, 0), wscale=7) == LINUX_SYN_OPTS


def test_timestamp_fast_path_vector():
    block = bytes.fromhex("0101080a" "89abcdef" "01234567")
    assert tcp.build_options(ts=(0x89ABCDEF, 0x01234567)) == block
    o = tcp.parse_options(block)
    assert (o.ts_val, o.ts_ecr, o.mss, o.sack) == (0x89ABCDEF, 0x01234567, None, None)
    o = tcp.parse_options(memoryview(block))
    assert o.ts_val == 0x89ABCDEF


def test_sack_blocks_vector():
    block = bytes.fromhex("0101080a0000000100000002" "0101051a" + "00000010" "00000020" * 1
                          + "fffffff0" "00000010" + "00000030" "00000040")
    o = tcp.parse_options(block)
    assert o.sack == [(0x10, 0x20), (0xFFFFFFF0, 0x10), (0x30, 0x40)]
    assert (o.ts_val, o.ts_ecr) == (1, 2)
    assert tcp.build_options(ts=(1, 2), sack=o.sack) == block


def test_sack_perm_without_ts_and_padding():
    assert tcp.build_options(sack_perm=True) == b"\x01\x01\x04\x02"
    assert tcp.build_options(mss=536, wscale=0) == bytes.fromhex("02040218" "01030300")
    assert tcp.build_options() == b""


def test_unknown_options_skipped_and_eol_stops():
    # kind 30 (MPTCP) length 6, kind 254 (experimental) length 4, then MSS
    block = bytes([30, 6, 1, 2, 3, 4, 254, 4, 0xF9, 0x89, 2, 4, 0x05, 0xDC])
    assert tcp.parse_options(block).mss == 1500
    # after EOL only padding: garbage there is not parsed
    block = bytes([2, 4, 1, 0, 0, 8, 99, 1])
    o = tcp.parse_options(block)
    assert o.mss == 256 and o.ts_val is None
    assert tcp.parse_options(b"") == tcp.TcpOptions()
    assert tcp.parse_options(b"\x01\x01\x01\x01") == tcp.TcpOptions()


def test_wscale_clamped_to_14():
    assert tcp.parse_options(bytes([3, 3, 15, 0])).wscale == 14
    assert tcp.parse_options(bytes([3, 3, 14, 0])).wscale == 14
    assert tcp.parse_options(bytes([3, 3, 0, 0])).wscale == 0


@pytest.mark.parametrize("block", [
    bytes([2]),                            # kind without a length byte
    bytes([1, 1, 1, 8]),                   # TS kind at the very end
    bytes([2, 4, 5]),                      # MSS running past the block
    bytes([2, 3, 5, 0]),                   # MSS length 3
    bytes([2, 5, 5, 0, 0, 0]),             # MSS length 5
    bytes([3, 4, 7, 0]),                   # WS length 4
    bytes([3, 2, 0, 0]),                   # WS length 2
    bytes([4, 3, 0, 0]),                   # SACK-permitted length 3
    bytes([8, 8]) + bytes(6),              # TS length 8
    bytes([8, 12]) + bytes(10),            # TS length 12
    bytes([5, 2, 0, 0]),                   # SACK with no block
    bytes([5, 9]) + bytes(7),              # SACK not whole blocks
    bytes([5, 42]) + bytes(40),            # five SACK blocks
    bytes([99, 0, 0, 0]),                  # length 0
    bytes([99, 1, 0, 0]),                  # length 1
    bytes([99, 9, 0, 0]),                  # unknown option past the end
])
def test_parse_options_rejects(block):
    with pytest.raises(WireError) as e:
        tcp.parse_options(block)
    assert e.value.reason == "bad_tcp_options"


def test_build_options_rejects():
    with pytest.raises(WireError):
        tcp.build_options(ts=(1, 2), sack=[(1, 2)] * 4)            # 12 + 36 > 40
    with pytest.raises(WireError):
        tcp.build_options(sack=[(1, 2)] * 5)
    with pytest.raises(WireError):
        tcp.build_options(mss=70000)


def test_header_vectors_both_ways():
    h, doff = tcp.parse(HDR)
    assert doff == 20 and h == REPR
    assert tcp.build_header(REPR) == HDR
    h, doff = tcp.parse(memoryview(HDR + b"data"))
    assert doff == 20 and h == REPR


def test_header_with_options_and_ae_flag():
    h = tcp.TcpHeader(1, 2, 3, 4, tcp.AE | tcp.CWR | tcp.ECE | tcp.SYN, 1000, 7, LINUX_SYN_OPTS)
    raw = tcp.build_header(h)
    assert raw[12] == 0xA1 and raw[13] == 0xC2
    got, doff = tcp.parse(raw + b"xyz")
    assert doff == 40 and got == h
    assert tcp.parse_options(got.options).mss == 1460


@pytest.mark.parametrize("src,dst", [(SRC4, DST4), (SRC6, DST6)])
def test_checksum_against_dpkt(src, dst):
    payload = b"hello, odd payload"
    opts = tcp.build_options(ts=(7, 8))
    h = tcp.TcpHeader(40000, 443, 0xFFFFFFFF, 0x12345678, tcp.ACK | tcp.PSH, 512, 0, opts)
    seg = tcp.build_header(h, src, dst, payload) + payload
    t = dpkt.tcp.TCP(seg)
    t.sum = 0
    if len(src) == 4:
        ip = dpkt.ip.IP(src=src, dst=dst, p=6, data=t)
        ip.len = 20 + len(seg)
        oracle = dpkt.ip.IP(bytes(ip)).data.sum
    else:
        ip = dpkt.ip6.IP6(src=src, dst=dst, nxt=6, hlim=64, data=t)
        ip.plen = len(seg)
        oracle = dpkt.ip6.IP6(bytes(ip)).data.sum
    assert int.from_bytes(seg[16:18], "big") == oracle
    got, doff = tcp.parse(seg, src, dst)
    assert got == h and seg[doff:] == payload
    bad = bytearray(seg)
    bad[-1] ^= 1
    with pytest.raises(WireError) as e:
        tcp.parse(bytes(bad), src, dst)
    assert e.value.reason == "bad_tcp_checksum"


@pytest.mark.parametrize("raw,reason", [
    (HDR[:19], "truncated"),
    (HDR[:12] + b"\x40" + HDR[13:], "bad_tcp_offset"),   # 4 words
    (HDR[:12] + b"\x60" + HDR[13:], "bad_tcp_offset"),   # 24 > 20-byte segment
    (HDR[:12] + b"\xf0" + HDR[13:] + bytes(39), "bad_tcp_offset"),
])
def test_parse_rejects(raw, reason):
    with pytest.raises(WireError) as e:
        tcp.parse(raw)
    assert e.value.reason == reason


def test_build_header_rejects_unaligned_options():
    with pytest.raises(WireError):
        tcp.build_header(tcp.TcpHeader(1, 2, options=b"\x01"))
    with pytest.raises(WireError):
        tcp.build_header(tcp.TcpHeader(1, 2, options=b"\x01" * 44))


@pytest.mark.parametrize("block", [
    LINUX_SYN_OPTS,
    bytes.fromhex("020405b4" "0402080a" "ffffffff" "12345678" "0103030f"),   # WS 15: used as 14
    bytes.fromhex("02040218" "01030300" "01010402"),                          # Windows: MSS, NOP WS, NOP NOP SACK-perm
    bytes.fromhex("020405b4" "01030308" "01010402"),
    # the same lengths in other layouts: the general walk reads them
    bytes.fromhex("020405b4" "0402080a" "00000001" "00000002" "01010000"),
    bytes.fromhex("01030307" "020405b4" "0402080a" "00000001" "00000002"),
    bytes.fromhex("020405b4" "01030308" "01010101"),
    bytes.fromhex("02040218" "01030300" "00000000"),
])
def test_syn_fast_paths_match_the_walk(block):
    """The one-unpack readings of the usual SYN blocks give what the
    option-by-option walk gives, and blocks that only share their length
    are walked."""
    assert tcp.parse_options(block) == tcp._walk_options(block, len(block), tcp.TcpOptions())
    assert tcp.parse_options(memoryview(block)) == tcp.parse_options(bytes(block))


def test_syn_fast_path_values():
    o = tcp.parse_options(bytes.fromhex("020405b4" "0402080a" "ffffffff" "12345678" "0103030f"))
    assert (o.mss, o.sack_perm, o.ts_val, o.ts_ecr, o.wscale, o.sack) == (1460, True, 0xFFFFFFFF, 0x12345678,
                                                                          14, None)
    o = tcp.parse_options(bytes.fromhex("02040218" "01030300" "01010402"))
    assert (o.mss, o.sack_perm, o.ts_val, o.wscale) == (536, True, None, 0)
