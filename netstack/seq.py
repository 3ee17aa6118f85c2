"""Sequence-number arithmetic modulo 2**32 (RFC 9293 §3.4, RFC 1982 style).

Sequence numbers are never compared with plain `<` or `max`: a connection may
start near 2**32 and wrap.  `a` is "less than" `b` when b is ahead of a by
less than 2**31.
"""

from __future__ import annotations

MASK = 0xFFFFFFFF
HALF = 0x80000000


def seq_add(a: int, n: int) -> int:
    return (a + n) & MASK


def seq_sub(a: int, b: int) -> int:
    """Signed distance a - b, in [-2**31, 2**31): the 32-bit two's complement
    reading Linux uses ((s32)(a - b)).  Exactly 2**31 apart, neither number
    is ahead (seq_lt and seq_gt are both false) and the distance reads -2**31."""
    d = (a - b) & MASK
    return d - 0x100000000 if d >= HALF else d


def seq_lt(a: int, b: int) -> bool:
    d = (b - a) & MASK
    return 0 < d < HALF


def seq_le(a: int, b: int) -> bool:
    return ((b - a) & MASK) < HALF


def seq_gt(a: int, b: int) -> bool:
    d = (a - b) & MASK
    return 0 < d < HALF


def seq_ge(a: int, b: int) -> bool:
    return ((a - b) & MASK) < HALF


def seq_max(a: int, b: int) -> int:
    return b if 0 < ((b - a) & MASK) < HALF else a


def seq_min(a: int, b: int) -> int:
    return b if 0 < ((a - b) & MASK) < HALF else a


def in_window(x: int, start: int, length: int) -> bool:
    """start <= x < start + length (modulo 2**32); length may be 0 (empty)."""
    return ((x - start) & MASK) < length
