"""IPv4 header (RFC 791 §3.1).

`unpack(mv)` is the fast checked parse every receiving path calls (the
stack, ICMP quotes, replay, the recorder, the devices): one precompiled
Struct, a few comparisons, a tuple.  `parse(mv)` checks a buffer and returns
a small `IPv4Header` representation plus the header length (tools, tests);
`build(hdr)` emits the header (options included) with its checksum.  Options are carried as raw bytes and
never interpreted: the IHL says where they end, so a malformed option cannot
mislead us.

Header layout (offsets in bytes):

     0   version(4) IHL(4)   1 TOS       2 total length
     4   identification      6 flags(3) fragment offset(13, 8-byte units)
     8   TTL   9 protocol   10 header checksum
    12   source address     16 destination address
    20   options (IHL*4 - 20 bytes), then the payload
"""

from __future__ import annotations

import struct

from .checksum import sum16
from .errors import WireError

HEADER_LEN = 20
MAX_HEADER_LEN = 60
HEADER = struct.Struct("!BBHHHBBH4s4s")
# what unpack() reads: version/IHL, total length, flags/fragment word,
# protocol, addresses (the other fields are skipped, not converted)
_FIELDS = struct.Struct("!BxH2xHxB2x4s4s")
# The fast form for hot paths: fields(mv) -> (vihl, total_len, frag, proto,
# src, dst), unchecked.  It may be trusted only when len(mv) >= 20, vihl is
# 0x45 (no options) and 20 <= total_len <= len(mv); anything else goes
# through unpack(), which says what is wrong (or handles the options).
fields = _FIELDS.unpack_from

# field offsets
OFF_TOTAL_LEN = 2
OFF_IDENT = 4
OFF_FRAG = 6
OFF_TTL = 8
OFF_PROTO = 9
OFF_CHECKSUM = 10
OFF_SRC = 12
OFF_DST = 16

# protocol numbers (also used for IPv6 next header where they agree)
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58

# the 16-bit flags/fragment-offset word
FRAG_RESERVED = 0x8000
FRAG_DF = 0x4000
FRAG_MF = 0x2000
FRAG_OFFSET_MASK = 0x1FFF
# IPv4Header.flags (the top three bits of that word, shifted down)
FLAG_RESERVED = 4
FLAG_DF = 2
FLAG_MF = 1


class IPv4Header:
    """Representation of an IPv4 header.  Addresses are 4-byte bytes;
    frag_offset is in bytes (a multiple of 8); options are raw bytes (a
    multiple of 4, at most 40).  The checksum is computed by build() and
    checked by parse(), so it is not a field here."""
    __slots__ = ("tos", "total_len", "ident", "flags", "frag_offset", "ttl", "proto", "src", "dst", "options")

    def __init__(self, src: bytes, dst: bytes, proto: int, total_len: int, ttl: int = 64,
                 ident: int = 0, flags: int = 0, frag_offset: int = 0, tos: int = 0,
                 options: bytes = b""):
        self.src = src
        self.dst = dst
        self.proto = proto
        self.total_len = total_len
        self.ttl = ttl
        self.ident = ident
        self.flags = flags
        self.frag_offset = frag_offset
        self.tos = tos
        self.options = options

    @property
    def header_len(self) -> int:
        return HEADER_LEN + len(self.options)

    @property
    def is_fragment(self) -> bool:
        return bool(self.flags & FLAG_MF) or self.frag_offset != 0

    def __eq__(self, other):
        if not isinstance(other, IPv4Header):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __repr__(self):
        return "IPv4Header(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"


def unpack(mv):
    """The IPv4 header at the start of *mv*, checked: returns
    (header_len, total_len, frag, proto, src, dst), where frag is the raw
    flags/fragment-offset word (frag & FRAG_MF or frag & FRAG_OFFSET_MASK:
    a fragment) and src/dst are 4-byte bytes.  Bytes after total_len are
    link padding; the caller trims them.  Raises WireError:
      "truncated"    under 20 bytes,
      "bad_version"  version is not 4,
      "bad_length"   IHL below 5, total length below the header length or
                     beyond the buffer.
    The header checksum is not verified here (header_ok)."""
    n = len(mv)
    if n < HEADER_LEN:
        raise WireError("truncated", "IPv4 header")
    vihl, tot, frag, proto, src, dst = _FIELDS.unpack_from(mv)
    if vihl >> 4 != 4:
        raise WireError("bad_version", str(vihl >> 4))
    ihl = (vihl & 15) << 2
    if ihl < HEADER_LEN or tot < ihl or tot > n:
        raise WireError("bad_length", f"IHL {ihl}, total length {tot}, buffer {n}")
    return ihl, tot, frag, proto, src, dst


def ident(mv) -> int:
    """The identification field of the IPv4 header at the start of *mv*
    (fragments of one datagram share it)."""
    return (mv[OFF_IDENT] << 8) | mv[OFF_IDENT + 1]


def header_ok(mv, ihl: int) -> bool:
    """True when the first *ihl* bytes of *mv* (an IPv4 header) sum right."""
    return sum16(mv[:ihl]) == 0xFFFF


def parse(mv, verify_checksum: bool = False) -> tuple[IPv4Header, int]:
    """Check and parse the IPv4 header at the start of *mv* (bytes-like).

    Returns (header, header_len).  Raises WireError with reason
      "truncated"        buffer shorter than 20 bytes or than the IHL says,
      "bad_version"      version is not 4,
      "bad_length"       IHL below 5, or total length below the header
                         length or beyond the buffer,
      "bad_ip_checksum"  (verify_checksum only) the header does not sum to 0xFFFF.
    Bytes after total_len are link padding; the caller trims them.
    """
    n = len(mv)
    if n < HEADER_LEN:
        raise WireError("truncated", "IPv4 header")
    vihl, tos, tot, ident, frag, ttl, proto, _csum, src, dst = HEADER.unpack_from(mv)
    if vihl >> 4 != 4:
        raise WireError("bad_version", str(vihl >> 4))
    ihl = (vihl & 15) << 2
    if ihl < HEADER_LEN:
        raise WireError("bad_length", f"IHL {ihl}")
    if ihl > n:
        raise WireError("truncated", f"IHL {ihl} > {n}")
    if tot < ihl or tot > n:
        raise WireError("bad_length", f"total length {tot} (header {ihl}, buffer {n})")
    if verify_checksum and sum16(mv[:ihl]) != 0xFFFF:
        raise WireError("bad_ip_checksum")
    h = IPv4Header(src, dst, proto, tot, ttl, ident, frag >> 13, (frag & FRAG_OFFSET_MASK) << 3, tos,
                   bytes(mv[HEADER_LEN:ihl]) if ihl > HEADER_LEN else b"")
    return h, ihl


def build(h: IPv4Header) -> bytes:
    """Emit the header for *h* (options included) with a correct checksum.
    Raises WireError("bad_ip_options") if the options are not a multiple of
    4 bytes or longer than 40, WireError("bad_frag_offset") if frag_offset
    is not a multiple of 8 below 65536."""
    opts = h.options
    olen = len(opts)
    if olen & 3 or olen > 40:
        raise WireError("bad_ip_options", f"{olen} bytes")
    fo = h.frag_offset
    if fo & 7 or not 0 <= fo < 65536:
        raise WireError("bad_frag_offset", str(fo))
    vihl = 0x40 | ((HEADER_LEN + olen) >> 2)
    frag = ((h.flags & 7) << 13) | (fo >> 3)
    hdr = HEADER.pack(vihl, h.tos, h.total_len, h.ident, frag, h.ttl, h.proto, 0, h.src, h.dst)
    if olen:
        hdr += opts
    csum = ~sum16(hdr) & 0xFFFF
    return hdr[:OFF_CHECKSUM] + csum.to_bytes(2, "big") + hdr[OFF_CHECKSUM + 2:]


def header_checksum(hdr) -> int:
    """Checksum field value for the header bytes *hdr* (its own checksum
    field must be zero, or use sum16(hdr) == 0xFFFF to verify)."""
    return ~sum16(hdr) & 0xFFFF
