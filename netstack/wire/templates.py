"""Per-flow packet builders: addresses, ports and the pseudo-header sum are
fixed per flow, so they are packed and summed once, not per segment."""

from __future__ import annotations

import struct

from . import checksum as ck

_IP4 = struct.Struct("!BBHHHBBH4s4s")
_IP6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")
_UDP = struct.Struct("!HHHH")


class TcpTemplate:
    """Builds TCP segments from (src, sport) to (dst, dport) for one flow.
    src/dst are the packet's own source/destination (the stack's side first)."""
    __slots__ = ("family", "src", "dst", "sport", "dport", "ttl", "offload", "_ps", "_ip4_sum", "_ident")

    def __init__(self, family, src, dst, sport, dport, config):
        self.family = family
        self.src, self.dst, self.sport, self.dport = src, dst, sport, dport
        self.ttl = config.ttl
        self.offload = config.checksum_offload
        if family == 4:
            self._ps = ck.pseudo4(src, dst, 6, 0)
            # sum of the constant IPv4 header words (version/ihl, ttl/proto, addresses)
            self._ip4_sum = 0x4500 + ((self.ttl << 8) | 6) + 0x4000 + (ck.pseudo4(src, dst, 0, 0))
        else:
            self._ps = ck.pseudo6(src, dst, 6, 0)
            self._ip4_sum = 0
        self._ident = 0

    def build(self, seq, ack, flags, wnd, options, payload) -> bytes:
        hl = 20 + len(options)
        tl = hl + len(payload)
        tcph = _TCP.pack(self.sport, self.dport, seq, ack, hl << 2, flags, wnd, 0, 0)
        ps = self._ps + tl
        if self.offload:
            csum = ck.fold(ps)
        else:
            s = ck.sum16(tcph, ps)
            if options:
                s = ck.sum16(options, s)
            if payload:
                s = _sum_payload(payload, s, hl & 1)
            csum = ~s & 0xFFFF
        tcph = tcph[:16] + csum.to_bytes(2, "big") + tcph[18:]
        if self.family == 4:
            total = 20 + tl
            ident = self._ident = (self._ident + 1) & 0xFFFF
            hsum = ck.fold(self._ip4_sum + total + ident)
            iph = _IP4.pack(0x45, 0, total, ident, 0x4000, self.ttl, 6, ~hsum & 0xFFFF, self.src, self.dst)
        else:
            iph = _IP6.pack(0x60000000, tl, 6, self.ttl, self.src, self.dst)
        return b"".join((iph, tcph, options, payload))


def _sum_payload(payload, s, odd_offset):
    # the payload starts at an even offset whenever the option block is a
    # multiple of 4 (always, for options we build)
    return ck.sum16(payload, s)
