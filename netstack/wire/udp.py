"""UDP header (RFC 768): field layout, a checked parse and an emitter.

    0      2      4      6      8
    +------+------+------+------+
    | sport| dport|length| csum |   length covers header + data
    +------+------+------+------+

The checksum covers a pseudo-header (addresses, protocol 17, UDP length),
the header and the data.  IPv4: a zero field means "no checksum" and a
computed zero is sent as 0xFFFF.  IPv6 (RFC 8200 §8.1): the checksum is
mandatory, a zero field is an error.
"""

from __future__ import annotations

import struct

from . import checksum as ck
from .errors import WireError

HEADER = struct.Struct("!HHHH")
HEADER_LEN = 8
PROTO_UDP = 17


def parse(mv, off: int = 0):
    """(sport, dport, length, checksum) of the datagram at *off*; the length
    is checked against the buffer (trailing bytes beyond it are padding)."""
    n = len(mv) - off
    if n < HEADER_LEN:
        raise WireError("truncated", "udp header")
    sport, dport, ulen, csum = HEADER.unpack_from(mv, off)
    if ulen < HEADER_LEN or ulen > n:
        raise WireError("bad_udp_length", f"length {ulen} in {n} bytes")
    return sport, dport, ulen, csum


def pseudo(family: int, src: bytes, dst: bytes, length: int) -> int:
    return ck.pseudo(src, dst, PROTO_UDP, length)


def verify(family: int, src: bytes, dst: bytes, datagram) -> bool:
    """True when the checksum of *datagram* (header + data, exactly its
    length field long) is right.  A v4 zero checksum is accepted, a v6
    zero checksum is not."""
    if datagram[6] == 0 and datagram[7] == 0:
        return family == 4
    return ck.sum16(datagram, pseudo(family, src, dst, len(datagram))) == 0xFFFF


def emit(family: int, src: bytes, dst: bytes, sport: int, dport: int, payload, offload: bool = False) -> bytes:
    """Header + payload with the checksum filled (or, with offload, the folded
    pseudo-header sum the device completes)."""
    ulen = HEADER_LEN + len(payload)
    ps = pseudo(family, src, dst, ulen)
    if offload:
        csum = ck.fold(ps)
    else:
        csum = ~ck.sum16(payload, ps + sport + dport + ulen) & 0xFFFF or 0xFFFF
    return HEADER.pack(sport, dport, ulen, csum) + bytes(payload)
