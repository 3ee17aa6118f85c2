"""ICMP (RFC 792, RFC 1191) and ICMPv6 (RFC 4443, RFC 8201): types, codes,
and a checked parse of the packet quoted inside an error message.

Every message starts with type, code, checksum and a 32-bit field whose
meaning depends on the type (echo: identifier + sequence; fragmentation
needed: unused(16) + next-hop MTU(16); packet too big: MTU(32)).
ICMPv4's checksum covers the message only; ICMPv6's also a pseudo-header
(RFC 8200 §8.1, next header 58).  `unpack` reads the header, `parse_quote`
the packet an error quotes (its IPv6 extension headers through
ipv6.walk_ext).
"""

from __future__ import annotations

import struct

from . import ipv4 as _v4
from . import ipv6 as _v6
from .errors import WireError

HEADER = struct.Struct("!BBHI")
HEADER_LEN = 8

# ICMPv4 types
ECHO_REPLY4 = 0
UNREACH4 = 3
ECHO_REQUEST4 = 8
TIME_EXCEEDED4 = 11
PARAM_PROBLEM4 = 12
ERRORS4 = frozenset((UNREACH4, 4, 5, TIME_EXCEEDED4, PARAM_PROBLEM4))  # 4 quench, 5 redirect
FRAG_NEEDED4 = 4          # code of UNREACH4

# ICMPv6 types
UNREACH6 = 1
PACKET_TOO_BIG6 = 2
TIME_EXCEEDED6 = 3
PARAM_PROBLEM6 = 4
ECHO_REQUEST6 = 128
ECHO_REPLY6 = 129
MLD6 = frozenset((130, 131, 132, 143))
ND6 = frozenset((133, 134, 135, 136, 137))   # RS, RA, NS, NA, redirect

# destination unreachable codes by kind
UNREACH_CODES4 = {"net": 0, "host": 1, "port": 3, "admin": 13}
UNREACH_CODES6 = {"net": 0, "admin": 1, "host": 3, "port": 4}

# the largest ICMP error: a v4 datagram of 576 bytes (RFC 1812 §4.3.2.3),
# a v6 packet of the minimum MTU (RFC 4443 §2.4 (c))
MAX_ERROR4 = 576
MAX_ERROR6 = 1280

_PORTS = struct.Struct("!HH")      # the first 4 bytes of a quoted TCP or UDP header

PROTO_TCP, PROTO_UDP = 6, 17


def unpack(mv, off: int = 0):
    """(type, code, rest) of the ICMP/ICMPv6 message at mv[off:]; rest is
    the 32-bit word after the checksum.  Raises WireError("truncated")
    under 8 bytes.  The checksum is not verified here."""
    if len(mv) - off < HEADER_LEN:
        raise WireError("truncated", "ICMP header")
    type_, code, _cs, rest = HEADER.unpack_from(mv, off)
    return type_, code, rest


def parse_quote(mv, off: int):
    """The packet quoted by an ICMP error from *off* (its IP header first).
    Returns (family, proto, src, sport, dst, dport) as the quoted packet has
    them; raises WireError("icmp_bad_quote") when it is not a TCP/UDP packet
    with its first 8 transport bytes present.  A quote is cut short, so its
    length fields are not held against the buffer."""
    n = len(mv) - off
    if n < 1:
        raise WireError("icmp_bad_quote", "empty")
    v = mv[off] >> 4
    if v == 4:
        if n < 28:
            raise WireError("icmp_bad_quote", "short v4 quote")
        vihl, _tos, _tot, _id, frag, _ttl, proto, _cs, src, dst = _v4.HEADER.unpack_from(mv, off)
        ihl = (vihl & 15) << 2
        if ihl < 20 or n < ihl + 8 or frag & 0x1FFF:
            raise WireError("icmp_bad_quote", "v4 header")
        l4 = off + ihl
        family = 4
    elif v == 6:
        if n < 48:
            raise WireError("icmp_bad_quote", "short v6 quote")
        _vtf, _plen, proto, _hl, src, dst = _v6.HEADER.unpack_from(mv, off)
        l4 = off + 40
        end = off + n
        if proto != PROTO_TCP and proto != PROTO_UDP:
            proto, l4 = _quoted_chain(mv, proto, l4, end)
        if l4 + 8 > end:
            raise WireError("icmp_bad_quote", "v6 headers")
        family = 6
    else:
        raise WireError("icmp_bad_quote", "version")
    if proto != PROTO_TCP and proto != PROTO_UDP:
        raise WireError("icmp_bad_quote", "protocol")
    sport, dport = _PORTS.unpack_from(mv, l4)
    return family, proto, bytes(src), sport, bytes(dst), dport


def _quoted_chain(mv, nxt, off, end):
    """(proto, offset) after the extension headers of a quoted IPv6 packet
    (ipv6.walk_ext; through a first fragment's header)."""
    try:
        proto, l4, frag_off, _ = _v6.walk_ext(mv, nxt, off, end, True)
        if frag_off >= 0:
            if ((mv[frag_off + 2] << 8) | mv[frag_off + 3]) & 0xFFF8:
                raise WireError("icmp_bad_quote", "not a first fragment")
            proto, l4, _, _ = _v6.walk_ext(mv, proto, l4, end, False)
    except WireError as e:
        if e.reason == "icmp_bad_quote":
            raise
        raise WireError("icmp_bad_quote", "v6 extension headers") from None
    return proto, l4

# the smallest MTU an error may report (smaller values are ignored):
# RFC 791's 68 for IPv4; for IPv6 anything below 1280 means "use 1280"
# (RFC 8201 §4), but a value below 68 is nonsense
MIN_MTU4 = 68
MIN_MTU6_FLOOR = 68
MIN_MTU6 = 1280
