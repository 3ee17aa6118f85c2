"""IPv6 header (RFC 8200 §3) and the extension-header chain (§4).

Two levels, as for every wire format here:
  * `unpack(mv)`: the fast checked parse the receiving paths call (one
    Struct, a length check, a tuple);
  * `parse(mv)` checks a buffer and returns a small `IPv6Header`
    representation; `build(hdr)` emits the 40 header bytes.
  * `walk(mv)` follows the extension-header chain of a whole packet and
    returns where the upper-layer header starts, without building objects;
    `walk_ext` is the same walk from any point (reassembly, ICMP quotes).
    This is the only place extension headers are walked.

Header layout (offsets in bytes):

     0   version(4) traffic class(8) flow label(20)
     4   payload length(16)  next header(8)  hop limit(8)
     8   source address (16)
    24   destination address (16)
    40   extension headers / upper-layer payload
"""

from __future__ import annotations

import struct

from .errors import WireError

HEADER_LEN = 40
HEADER = struct.Struct("!IHBB16s16s")
_FIELDS = struct.Struct("!B3xHB1x16s16s")    # version/TC, payload length, next header, addresses
# The fast form for hot paths: fields(mv) -> (version/TC byte, payload_len,
# next_header, src, dst), unchecked.  It may be trusted only when len(mv) >=
# 40, the version is 6 and 40 + payload_len <= len(mv); anything else goes
# through unpack(), which says what is wrong.
fields = _FIELDS.unpack_from

# field offsets
OFF_PAYLOAD_LEN = 4
OFF_NEXT_HEADER = 6
OFF_HOP_LIMIT = 7
OFF_SRC = 8
OFF_DST = 24

# next-header values
NH_HOP_BY_HOP = 0
NH_TCP = 6
NH_UDP = 17
NH_ROUTING = 43
NH_FRAGMENT = 44
NH_ESP = 50
NH_AH = 51
NH_ICMPV6 = 58
NH_NO_NEXT = 59
NH_DEST_OPTS = 60

# A packet with more extension headers than this is dropped (RFC 7045 lets
# a node limit what it processes; real traffic carries at most a few).
MAX_EXT_HEADERS = 8

FRAG_HEADER_LEN = 8
FRAG = struct.Struct("!BBHI")   # next header, reserved, offset<<3 | M, identification


class IPv6Header:
    """Representation of the fixed IPv6 header.  Addresses are 16-byte bytes."""
    __slots__ = ("traffic_class", "flow_label", "payload_len", "next_header", "hop_limit", "src", "dst")

    def __init__(self, src: bytes, dst: bytes, next_header: int, payload_len: int,
                 hop_limit: int = 64, traffic_class: int = 0, flow_label: int = 0):
        self.src = src
        self.dst = dst
        self.next_header = next_header
        self.payload_len = payload_len
        self.hop_limit = hop_limit
        self.traffic_class = traffic_class
        self.flow_label = flow_label

    def __eq__(self, other):
        if not isinstance(other, IPv6Header):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __repr__(self):
        return "IPv6Header(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"


def unpack(mv):
    """The fixed IPv6 header at the start of *mv*, checked: returns
    (payload_len, next_header, src, dst) (16-byte addresses).  Bytes after
    40 + payload_len are link padding; the caller trims them.  Raises
    WireError: "truncated" (under 40 bytes), "bad_version", "bad_length"
    (payload length runs past the buffer)."""
    n = len(mv)
    if n < HEADER_LEN:
        raise WireError("truncated", "IPv6 header")
    v, plen, nxt, src, dst = _FIELDS.unpack_from(mv)
    if v >> 4 != 6:
        raise WireError("bad_version", str(v >> 4))
    if HEADER_LEN + plen > n:
        raise WireError("bad_length", f"payload length {plen} > {n - HEADER_LEN}")
    return plen, nxt, src, dst


def parse(mv) -> tuple[IPv6Header, int]:
    """Check and parse the fixed header of the packet in *mv* (bytes-like).

    Returns (header, 40).  Raises WireError: "truncated" (under 40 bytes),
    "bad_version", "bad_length" (payload length runs past the buffer).
    Bytes after 40 + payload_len are link padding; the caller trims them.
    """
    if len(mv) < HEADER_LEN:
        raise WireError("truncated", "IPv6 header")
    vtf, plen, nxt, hlim, src, dst = HEADER.unpack_from(mv)
    if vtf >> 28 != 6:
        raise WireError("bad_version", str(vtf >> 28))
    if HEADER_LEN + plen > len(mv):
        raise WireError("bad_length", f"payload length {plen} > {len(mv) - HEADER_LEN}")
    return IPv6Header(src, dst, nxt, plen, hlim, (vtf >> 20) & 0xFF, vtf & 0xFFFFF), HEADER_LEN


def build(h: IPv6Header) -> bytes:
    """Emit the 40-byte fixed header for *h*."""
    vtf = 0x60000000 | ((h.traffic_class & 0xFF) << 20) | (h.flow_label & 0xFFFFF)
    return HEADER.pack(vtf, h.payload_len, h.next_header, h.hop_limit, h.src, h.dst)


def walk(mv) -> tuple[int, int, bool]:
    """Follow the extension-header chain of the whole IPv6 packet in *mv*.

    Returns (proto, offset, is_fragment):
      * no fragment header: proto is the upper-layer protocol (or 59, no next
        header, or one we do not walk such as ESP/AH) and offset is where its
        header starts;
      * a fragment header: is_fragment is True, proto is the fragment
        header's next header and offset is where the fragment's data starts
        (hand the whole packet to netstack.reassembly.Reassembler).
    The packet must already be trimmed to 40 + payload length (len(mv) is
    the bound for every header).  Raises WireError on a truncated or
    malformed chain (see walk_ext).
    """
    if len(mv) < HEADER_LEN:
        raise WireError("truncated", "IPv6 header")
    nxt = mv[OFF_NEXT_HEADER]
    if nxt == NH_TCP or nxt == NH_UDP or nxt == NH_ICMPV6:
        return nxt, HEADER_LEN, False
    proto, off, frag_off, _ = walk_ext(mv, nxt, HEADER_LEN, len(mv), True)
    return proto, off, frag_off >= 0


def walk_ext(mv, nxt: int, off: int, end: int, hbh_allowed: bool) -> tuple[int, int, int, int]:
    """Walk extension headers in mv[off:end] starting with next-header *nxt*.

    Returns (proto, offset, frag_offset, nh_offset): proto/offset as for
    walk(); frag_offset is the offset of the fragment header (-1 if none) and
    nh_offset the offset of the next-header byte that names the last header
    walked (6 for the fixed header), which reassembly rewrites.  The walk
    stops at a fragment header.  hbh_allowed: a hop-by-hop header may come
    first (RFC 8200 §4.1: only immediately after the fixed header).

    WireError reasons: "ipv6_ext_truncated", "ipv6_hbh_not_first",
    "ipv6_ext_chain_too_long", "ipv6_routing_header" (segments left is not
    zero: we are not the final destination of a source route, §4.4).
    """
    nh_off = OFF_NEXT_HEADER
    count = 0
    while True:
        if nxt == NH_HOP_BY_HOP or nxt == NH_ROUTING or nxt == NH_DEST_OPTS:
            if nxt == NH_HOP_BY_HOP and not (hbh_allowed and count == 0):
                raise WireError("ipv6_hbh_not_first")
            if off + 8 > end:
                raise WireError("ipv6_ext_truncated", f"header {nxt} at {off}")
            ln = (mv[off + 1] + 1) << 3
            if off + ln > end:
                raise WireError("ipv6_ext_truncated", f"header {nxt} length {ln} at {off}")
            if nxt == NH_ROUTING and mv[off + 3] != 0:
                raise WireError("ipv6_routing_header", f"segments left {mv[off + 3]}")
        elif nxt == NH_FRAGMENT:
            if off + FRAG_HEADER_LEN > end:
                raise WireError("ipv6_ext_truncated", f"fragment header at {off}")
            return mv[off], off + FRAG_HEADER_LEN, off, nh_off
        else:
            return nxt, off, -1, nh_off
        count += 1
        if count > MAX_EXT_HEADERS:
            raise WireError("ipv6_ext_chain_too_long")
        nh_off = off
        nxt = mv[off]
        off += ln
