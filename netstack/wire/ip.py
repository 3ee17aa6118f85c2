"""Either IP family: where a packet's transport header is.

`transport(mv)` is for the paths that take a whole packet without knowing
its family (checksum completion -- `complete` / `fill`, here because they
must find the transport header, so that checksum.py needs no parser -- the
recorder's segmenter, a device's fallback for packets it did not get from
the stack): it dispatches on the
version nibble to ipv4.unpack / ipv6.unpack and, for IPv6, to ipv6.walk.
The stack itself calls the per-family functions directly (it needs their
drop reasons one by one).
"""

from __future__ import annotations

from . import ipv4 as _v4
from . import ipv6 as _v6
from .checksum import CSUM_OFFSET, checksum, pseudo
from .errors import WireError


def transport(mv):
    """(family, proto, l4_off, end, src, dst) of an unfragmented IPv4 or
    IPv6 packet: the transport header (protocol *proto*) starts at l4_off,
    the packet ends at *end* (total / payload length; what follows is link
    padding).  Raises WireError: what ipv4.unpack, ipv6.unpack and
    ipv6.walk raise, "bad_version" (empty or neither 4 nor 6), "fragment"
    (reassemble it first)."""
    if not len(mv):
        raise WireError("bad_version", "empty")
    v = mv[0] >> 4
    if v == 4:
        ihl, tot, frag, proto, src, dst = _v4.unpack(mv)
        if frag & 0x3FFF:
            raise WireError("fragment")
        return 4, proto, ihl, tot, src, dst
    if v == 6:
        plen, nxt, src, dst = _v6.unpack(mv)
        end = 40 + plen
        if nxt == 6 or nxt == 17 or nxt == 58:
            return 6, nxt, 40, end, src, dst
        proto, off, is_frag = _v6.walk(mv[:end])
        if is_frag:
            raise WireError("fragment")
        return 6, proto, off, end, src, dst
    raise WireError("bad_version", str(v))


def addresses(mv, family: int):
    """(src, dst) of the IPv4 (family 4) or IPv6 packet in *mv*, as bytes."""
    if family == 4:
        return bytes(mv[_v4.OFF_SRC:_v4.OFF_DST]), bytes(mv[_v4.OFF_DST:_v4.OFF_DST + 4])
    return bytes(mv[_v6.OFF_SRC:_v6.OFF_DST]), bytes(mv[_v6.OFF_DST:_v6.OFF_DST + 16])


def complete(p):
    """A copy of the IPv4/IPv6 packet *p* with its TCP or UDP checksum
    computed in full, whatever the field held (an offload TUN hands over
    packets whose field holds only the pseudo-header sum); *p* itself when
    it has no such checksum (fragments, other protocols, a transport header
    cut short, anything that does not parse)."""
    b = bytearray(p)
    return bytes(b) if fill(b) else p


def fill(buf) -> bool:
    """Compute the TCP or UDP checksum of the IPv4/IPv6 packet in the
    bytearray *buf* in place.  False (buf untouched) when it has none to
    compute: fragments, other protocols, a transport header cut short,
    anything that does not parse."""
    try:
        _family, proto, l4, end, src, dst = transport(buf)
    except WireError:
        return False
    off = CSUM_OFFSET.get(proto)
    if off is None or end - l4 < (20 if proto == 6 else 8):
        return False
    off += l4
    buf[off] = buf[off + 1] = 0
    c = checksum(memoryview(buf)[l4:end], pseudo(src, dst, proto, end - l4))
    if proto == 17 and c == 0:
        c = 0xFFFF
    buf[off] = c >> 8
    buf[off + 1] = c & 0xFF
    return True
