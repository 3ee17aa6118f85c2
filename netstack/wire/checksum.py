"""Internet checksum (RFC 1071) and incremental update (RFC 1624).

The one's complement sum of 16-bit words is the value of the buffer, read
as one big-endian integer, modulo 0xFFFF (2**16 = 1 mod 0xFFFF), with the
"negative zero" 0xFFFF standing for a non-zero multiple.  CPython does the
conversion and the modulo at C speed, so a 1,460-byte payload costs about
2 µs instead of ~50 µs for a loop over words.  For large buffers a few
folding steps (shift + add, also C speed) beat the long division.

Conventions:
  sum16(data, start=0) -> folded 16-bit one's complement sum (not inverted)
  checksum(data, start=0) -> value to store in a header (inverted sum)
A received header or segment (with its pseudo-header sum as start) is
valid when checksum(...) == 0.
"""

from __future__ import annotations

_FOLD_THRESHOLD = 4096


def sum16(data, start: int = 0) -> int:
    """Folded one's complement sum of *data* (bytes-like) plus *start*."""
    n = len(data)
    if n & 1:
        x = int.from_bytes(data, "big") << 8
        n += 1
    else:
        x = int.from_bytes(data, "big")
    if n > _FOLD_THRESHOLD:
        bits = n * 8
        while bits > 4096:
            half = ((bits >> 1) + 15) & ~15
            x = (x >> half) + (x & ((1 << half) - 1))
            bits = half + 16
    x += start
    if x > 0xFFFF:
        x %= 0xFFFF
        if x == 0:
            return 0xFFFF
    return x


def checksum(data, start: int = 0) -> int:
    """The checksum field value for *data*: ~sum16 & 0xFFFF."""
    return ~sum16(data, start) & 0xFFFF


def fold(x: int) -> int:
    """Fold an unfolded one's complement accumulator to 16 bits (not inverted)."""
    if x > 0xFFFF:
        x %= 0xFFFF
        if x == 0:
            return 0xFFFF
    return x


def pseudo4(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Unfolded sum of the IPv4 pseudo-header (RFC 793/768)."""
    return int.from_bytes(src, "big") % 0xFFFF + int.from_bytes(dst, "big") % 0xFFFF + proto + length


def pseudo6(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Unfolded sum of the IPv6 pseudo-header (RFC 8200 §8.1)."""
    return int.from_bytes(src, "big") % 0xFFFF + int.from_bytes(dst, "big") % 0xFFFF + proto + length


def update16(old_checksum: int, old_word: int, new_word: int) -> int:
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), for one 16-bit field change."""
    x = (~old_checksum & 0xFFFF) + (~old_word & 0xFFFF) + new_word
    x = (x & 0xFFFF) + (x >> 16)
    x = (x & 0xFFFF) + (x >> 16)
    return ~x & 0xFFFF
