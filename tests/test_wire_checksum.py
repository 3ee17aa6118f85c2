"""Checksums: RFC 1071 full sum and RFC 1624 incremental update, checked
against known vectors and a plain word-by-word reference."""

import os
import random

import pytest
from hypothesis import given, settings, strategies as st

from netstack.wire import checksum as ck


def ref_sum16(data: bytes, start: int = 0) -> int:
    """The textbook loop: add big-endian words, end-around carry."""
    if len(data) & 1:
        data = data + b"\x00"
    s = start
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        while s > 0xFFFF:
            s = (s & 0xFFFF) + (s >> 16)
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def test_rfc1071_example():
    # RFC 1071 §3: bytes 00 01 f2 03 f4 f5 f6 f7 sum to ddf2 (after the carries)
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert ck.sum16(data) == 0xDDF2
    assert ck.checksum(data) == 0x220D


def test_real_ipv4_header():
    # 192.168.0.1 -> 192.168.0.199, UDP, checksum b861
    hdr = bytes.fromhex("45000073000040004011b861c0a80001c0a800c7")
    assert ck.sum16(hdr) == 0xFFFF
    assert ck.checksum(hdr) == 0
    zeroed = hdr[:10] + b"\x00\x00" + hdr[12:]
    assert ck.checksum(zeroed) == 0xB861
    assert ck.checksum(memoryview(zeroed)) == 0xB861


def test_edge_values():
    assert ck.sum16(b"") == 0
    assert ck.sum16(b"\x00" * 100) == 0
    assert ck.checksum(b"\x00" * 100) == 0xFFFF
    # a non-zero multiple of 0xFFFF is "negative zero", never 0
    assert ck.sum16(b"\xff\xff") == 0xFFFF
    assert ck.sum16(b"\xff\xff" * 1000) == 0xFFFF
    assert ck.sum16(b"\x80\x00\x80\x00\xff\xff\x00\x00") == ref_sum16(b"\x80\x00\x80\x00\xff\xff\x00\x00")
    assert ck.sum16(b"\x00\x01", 0xFFFE) == 0xFFFF
    assert ck.sum16(b"\xff\xfe", 1) == 0xFFFF
    # odd length: the last byte is the high byte of a zero-padded word
    assert ck.sum16(b"\x01") == 0x0100
    assert ck.sum16(b"\x12\x34\x56") == 0x1234 + 0x5600
    assert ck.sum16(b"", 0x12345) == ref_sum16(b"", 0x12345)


@pytest.mark.parametrize("n", [1, 2, 3, 19, 20, 255, 256, 257, 1459, 1460, 4096, 9001, 65534, 65535])
def test_random_buffers_match_reference(n):
    rnd = random.Random(n)
    for _ in range(3):
        data = bytes(rnd.getrandbits(8) for _ in range(n)) if n < 4096 else os.urandom(n)
        start = rnd.choice([0, 1, 0xFFFF, 0x1FFFE, rnd.getrandbits(20)])
        assert ck.sum16(data, start) == ref_sum16(data, start)
        assert ck.sum16(memoryview(data), start) == ref_sum16(data, start)


def test_large_all_ones_and_all_zero():
    # 32767 words of 0xFFFF and a last padded word 0xFF00
    assert ck.sum16(b"\xff" * 65535) == ref_sum16(b"\xff" * 65535) == 0xFF00
    assert ck.sum16(b"\xff" * 65536) == 0xFFFF
    assert ck.sum16(bytes(65536)) == 0


def test_chained_sums_equal_one_sum():
    rnd = random.Random(7)
    a = bytes(rnd.getrandbits(8) for _ in range(40))
    b = bytes(rnd.getrandbits(8) for _ in range(1001))
    assert ck.sum16(b, ck.sum16(a)) == ck.sum16(a + b)


def test_pseudo_headers_match_explicit_bytes():
    src, dst = bytes([10, 0, 0, 1]), bytes([192, 168, 1, 2])
    ph = src + dst + bytes([0, 6]) + (1234).to_bytes(2, "big")
    assert ck.fold(ck.pseudo4(src, dst, 6, 1234)) == ref_sum16(ph)
    src6 = bytes.fromhex("fd007478000000000000000000000001")
    dst6 = bytes.fromhex("2001db8000000000000000000000abcd")
    ph6 = src6 + dst6 + (70000).to_bytes(4, "big") + bytes([0, 0, 0, 17])
    assert ck.fold(ck.pseudo6(src6, dst6, 17, 70000)) == ref_sum16(ph6)


def test_fold():
    assert ck.fold(0) == 0
    assert ck.fold(0xFFFF) == 0xFFFF
    assert ck.fold(0x1FFFE) == 0xFFFF
    assert ck.fold(0x10000) == 1
    assert ck.fold(0x12345678) == ref_sum16(b"", 0x12345678)


def test_rfc1624_example():
    # RFC 1624 §4: HC = 0xDD2F, m = 0x5555 -> m' = 0x3285 gives HC' = 0x0000
    assert ck.update16(0xDD2F, 0x5555, 0x3285) == 0x0000


def test_update16_ttl_decrement_matches_recompute():
    hdr = bytearray.fromhex("45000073000040004011b861c0a80001c0a800c7")
    old_word = (hdr[8] << 8) | hdr[9]
    hdr[8] -= 1
    new_word = (hdr[8] << 8) | hdr[9]
    new = ck.update16(0xB861, old_word, new_word)
    hdr[10:12] = b"\x00\x00"
    assert new == ck.checksum(hdr)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=2, max_size=300).filter(lambda b: len(b) % 2 == 0), st.data())
def test_update16_equals_recompute(data, d):
    buf = bytearray(data)
    i = d.draw(st.integers(0, len(buf) // 2 - 1)) * 2
    new_word = d.draw(st.integers(0, 0xFFFF))
    old_word = (buf[i] << 8) | buf[i + 1]
    old_ck = ck.checksum(buf)
    buf[i:i + 2] = new_word.to_bytes(2, "big")
    got = ck.update16(old_ck, old_word, new_word)
    want = ck.checksum(buf)
    # 0x0000 and 0xFFFF both stand for zero in one's complement; eqn. 3 can
    # only produce 0xFFFF for a truly all-zero sum (RFC 1624 §3)
    assert got == want or {got, want} == {0, 0xFFFF}
    # either way the packet verifies
    check = bytes(buf) + got.to_bytes(2, "big")
    assert ck.sum16(check) == 0xFFFF or not any(buf)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.integers(0, 1 << 24))
def test_sum16_property(data, start):
    assert ck.sum16(data, start) == ref_sum16(data, start)


def test_pseudo_headers_take_memoryview_addresses():
    mv = memoryview(bytes(range(32)))
    assert ck.pseudo4(mv[:4], mv[4:8], 6, 5) == ck.pseudo4(bytes(range(4)), bytes(range(4, 8)), 6, 5)
    assert ck.pseudo6(mv[:16], mv[16:], 17, 5) == ck.pseudo6(bytes(range(16)), bytes(range(16, 32)), 17, 5)
