"""Packet builders.

Per-flow templates (TcpTemplate, UdpTemplate): addresses, ports, TTL and the
pseudo-header sum are fixed per flow, so they are packed and summed once;
a segment then costs one struct pack for IP + transport header, a few
integer additions for the header words and one C-speed sum over the
payload.  Plain functions build ICMP messages and fragment any transport
payload to an MTU.

Checksum offload (config.checksum_offload): the transport checksum field
holds the folded pseudo-header sum, not inverted, which is what a virtio
NEEDS_CSUM packet carries; the device adds the rest.  IPv4 header checksums
and ICMP checksums are always computed, and so is the checksum of a
datagram that has to be fragmented (no device completes those).
"""

from __future__ import annotations

import itertools
import struct

from . import checksum as ck
from . import icmp as _icmp
from . import ipv4 as _ipv4
from . import ipv6 as _ipv6
from . import tcp as _tcp
from . import udp as _udp

_IP4 = _ipv4.HEADER
_IP6 = _ipv6.HEADER
_UDP = _udp.HEADER
_ICMP = _icmp.HEADER
_FRAG6 = _ipv6.FRAG


def _joined(ip_hdr, l4_hdr):
    """One Struct for an IP header followed by a transport header."""
    return struct.Struct(ip_hdr.format + l4_hdr.format.lstrip("!"))


# one pack for IP + transport header (the per-segment hot path)
_IP4TCP = _joined(_ipv4.HEADER, _tcp.HEADER)
_IP6TCP = _joined(_ipv6.HEADER, _tcp.HEADER)
_IP4UDP = _joined(_ipv4.HEADER, _udp.HEADER)
_IP6UDP = _joined(_ipv6.HEADER, _udp.HEADER)

PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_FRAG6, PROTO_ICMP6 = 1, 6, 17, 44, 58
ACK, PSH = _tcp.ACK, _tcp.PSH
IP4_DF = 0x4000
IP4_MF = 0x2000
MIN_MTU4 = 68      # RFC 791: every host must pass 68 bytes unfragmented
MIN_MTU6 = 1280    # RFC 8200 §5
MAX_PAYLOAD4 = 65535 - 20 - 8
MAX_PAYLOAD6 = 65535 - 8

# Identification counters shared by every builder that has none of its own:
# fragments of different flows between the same two addresses must not share
# an identification (RFC 6864 §4.1 / RFC 8200 §4.5).
_ids4 = itertools.count(1)
_ids6 = itertools.count(1)


def next_ident4() -> int:
    return next(_ids4) & 0xFFFF


def next_ident6() -> int:
    return next(_ids6) & 0xFFFFFFFF


def _addr_sum(a: bytes) -> int:
    return int.from_bytes(a, "big") % 0xFFFF


def ip4_header(src: bytes, dst: bytes, proto: int, total: int, ident: int, frag: int, ttl: int) -> bytes:
    """A 20-byte IPv4 header with its checksum."""
    s = 0x4500 + total + ident + frag + ((ttl << 8) | proto) + _addr_sum(src) + _addr_sum(dst)
    return _IP4.pack(0x45, 0, total, ident, frag, ttl, proto, ~ck.fold(s) & 0xFFFF, src, dst)


def ip6_header(src: bytes, dst: bytes, nxt: int, plen: int, hlim: int) -> bytes:
    return _IP6.pack(0x60000000, plen, nxt, hlim, src, dst)


def ip_packets(family: int, src: bytes, dst: bytes, proto: int, l4, ttl: int, mtu: int,
               df: bool = False, ident: int | None = None) -> list:
    """Wrap the transport message *l4* in IP, fragmenting it when the packet
    would exceed *mtu* (unless df, v4).  Returns a list of packets."""
    n = len(l4)
    if family == 4:
        if ident is None:
            ident = next_ident4()
        if 20 + n <= mtu or df:
            return [ip4_header(src, dst, proto, 20 + n, ident, IP4_DF if df else 0, ttl) + bytes(l4)]
        step = (max(mtu, MIN_MTU4) - 20) & ~7
        out = []
        for pos in range(0, n, step):
            chunk = l4[pos:pos + step]
            more = IP4_MF if pos + step < n else 0
            out.append(ip4_header(src, dst, proto, 20 + len(chunk), ident, more | (pos >> 3), ttl) + bytes(chunk))
        return out
    if 40 + n <= mtu:
        return [ip6_header(src, dst, proto, n, ttl) + bytes(l4)]
    if ident is None:
        ident = next_ident6()
    step = (max(mtu, MIN_MTU6) - 48) & ~7
    out = []
    for pos in range(0, n, step):
        chunk = l4[pos:pos + step]
        more = 1 if pos + step < n else 0
        out.append(ip6_header(src, dst, PROTO_FRAG6, 8 + len(chunk), ttl)
                   + _FRAG6.pack(proto, 0, pos | more, ident) + bytes(chunk))
    return out


class GsoSegment(bytes):
    """A TCP packet whose payload is larger than one wire segment: the
    device (TSO/GSO) cuts it into gso_size pieces.  It carries what the
    device needs for that, so no device parses it again: family (4 or 6),
    l4_off (where the TCP header starts), hdr_len (IP + TCP header bytes,
    options included; 0 when not known: parse) and gso_size."""
    family: int = 4
    l4_off: int = 20
    hdr_len: int = 0
    gso_size: int = 0


class TcpTemplate:
    """Builds TCP segments from (src, sport) to (dst, dport) for one flow.
    src/dst are the packet's own source/destination (the stack's side first).
    The option block must be a multiple of 4 bytes long (build_options pads)."""
    __slots__ = ("family", "src", "dst", "sport", "dport", "ttl", "offload", "_ps", "_hsum", "_ip4_sum", "_ident",
                 "_fixed")

    def __init__(self, family, src, dst, sport, dport, config):
        self.family = family
        self.src, self.dst, self.sport, self.dport = src, dst, sport, dport
        ttl = self.ttl = config.ttl
        self.offload = config.checksum_offload
        ps = self._ps = ck.pseudo(src, dst, PROTO_TCP, 0)
        if family == 4:
            # constant IPv4 header words: version/ihl/tos, DF, ttl/proto,
            # addresses; the pseudo-header sum already holds the addresses
            # and the protocol (one modulo per connection instead of three)
            self._ip4_sum = 0x4500 + IP4_DF + (ttl << 8) + ps
        else:
            self._ip4_sum = 0
        # pseudo-header + the ports: the constant part of the TCP sum
        self._hsum = self._ps + sport + dport
        self._ident = 0
        self._fixed = None      # burst(): the header bytes that never change, made at the first burst

    def gso(self, pkt, options_len: int, gso_size: int) -> GsoSegment:
        """*pkt* (built by build() with an option block of options_len
        bytes) as a GsoSegment to be cut into gso_size payload pieces."""
        g = GsoSegment(pkt)
        g.gso_size = gso_size
        if self.family == 4:
            g.hdr_len = 40 + options_len
        else:
            g.family = 6
            g.l4_off = 40
            g.hdr_len = 60 + options_len
        return g

    def build(self, seq, ack, flags, wnd, options, payload) -> bytes:
        hl = 20 + len(options)
        tl = hl + len(payload)
        offflags = (hl << 10) | flags          # data offset (hl/4) in the top 4 bits
        if self.offload:
            # ck.fold without the call: a positive sum's representative in 1..0xFFFF
            csum = (self._ps + tl - 1) % 0xFFFF + 1
        else:
            s = (self._hsum + tl + (seq >> 16) + (seq & 0xFFFF) + (ack >> 16) + (ack & 0xFFFF)
                 + offflags + wnd)
            if options:
                # whole 16-bit words: the block read as one number is
                # congruent (mod 0xFFFF) to their sum, and sum16/the fold
                # below take an unfolded start
                s += int.from_bytes(options, "big")
            if payload:
                csum = ~ck.sum16(payload, s) & 0xFFFF
            else:
                csum = 0xFFFE - (s - 1) % 0xFFFF      # ~fold(s) & 0xFFFF, s > 0
        if self.family == 4:
            total = 20 + tl
            ident = self._ident = (self._ident + 1) & 0xFFFF
            # ~fold(sum) & 0xFFFF for a positive sum, without the call
            hcs = 0xFFFE - (self._ip4_sum + total + ident - 1) % 0xFFFF
            hdr = _IP4TCP.pack(0x45, 0, total, ident, IP4_DF, self.ttl, PROTO_TCP, hcs, self.src, self.dst,
                               self.sport, self.dport, seq, ack, hl << 2, flags, wnd, csum, 0)
        else:
            hdr = _IP6TCP.pack(0x60000000, tl, PROTO_TCP, self.ttl, self.src, self.dst,
                               self.sport, self.dport, seq, ack, hl << 2, flags, wnd, csum, 0)
        if options:
            return b"".join((hdr, options, payload))
        if payload:
            return hdr + payload
        return hdr

    def burst(self, emit, mv, off, n, seg, seq, ack, wnd, options, push) -> int:
        """Queue (emit) the ACK segments that carry mv[off:off + n]: seg
        payload bytes each, the last one shorter when n is not a multiple;
        each with the option block *options* (the same for the whole
        burst), PSH on the last when *push*.  Returns the sequence number
        after them.  The same packets as build() would make one by one,
        with what is constant over a burst (ACK, window, options, their
        share of the checksum, the header length) worked out once.

        The checksum is summed in checksum.sum16's byte-swapped domain
        (the payload read little-endian) without a call: the header's
        share, multiplied by 2**8 (a byte swap, modulo 0xFFFF), joins the
        folded payload before the one modulo, and only the result is
        swapped back."""
        hl = 20 + len(options)
        offload = self.offload
        v4 = self.family == 4
        ip4 = self._ip4_sum
        ident = self._ident
        fixed = self._fixed
        if fixed is None:
            fixed = self._fixed = self._fixed_runs()
        # one pack of 10 (IPv4) or 7 (IPv6) fields per segment: what stays
        # the same over the burst (ACK, offset, flags, window; the urgent
        # pointer and the options) is packed once, as byte runs
        pack = _burst_struct(v4, len(options)).pack
        run = _ACK_RUN.pack
        doff = hl << 2
        mid = run(ack, doff, ACK, wnd)
        tail = b"\0\0" + options
        fold = ck.fold
        from_bytes = int.from_bytes
        folds = ck.folds
        if offload:
            base = self._ps
        else:
            # the sum of every header word that does not change within the
            # burst: addresses, ports, ACK, offset and flags, window, options
            base = (self._hsum + (ack >> 16) + (ack & 0xFFFF) + ((hl << 10) | ACK) + wnd
                    + (int.from_bytes(options, "big") % 0xFFFF if options else 0))
        plan = folds(seg)
        end = off + n
        while off < end:
            k = end - off
            flags = ACK
            if k > seg:
                k = seg
            else:
                if push:
                    flags = ACK | PSH
                    mid = run(ack, doff, flags, wnd)
                if k != seg:
                    plan = folds(k)
            p = mv[off:off + k]
            tl = hl + k
            if offload:
                csum = fold(base + tl)
            else:
                x = from_bytes(p, "little")
                for half, m in plan:
                    x = (x >> half) + (x & m)
                x = (x + ((base + tl + (seq >> 16) + (seq & 0xFFFF) + (flags & PSH)) << 8)) % 0xFFFF
                csum = 0xFFFF - (((x & 0xFF) << 8) | (x >> 8)) if x else 0
            if v4:
                total = 20 + tl
                ident = (ident + 1) & 0xFFFF
                h = ip4 + total + ident
                h = (h & 0xFFFF) + (h >> 16)
                h = (h & 0xFFFF) + (h >> 16)
                emit(pack(b"\x45\0", total, ident, fixed[0], ~h & 0xFFFF, fixed[1], seq, mid, csum, tail) + p)
            else:
                emit(pack(fixed[0], tl, fixed[1], seq, mid, csum, tail) + p)
            seq = (seq + k) & 0xFFFFFFFF
            off += k
        self._ident = ident
        return seq

    def _fixed_runs(self) -> tuple:
        """The header bytes no segment of this flow changes, as burst()'s
        struct takes them: IPv4 (flags/fragment, TTL, protocol; addresses
        and ports), IPv6 (version and flow label; next header, hop limit,
        addresses and ports)."""
        ports = _PORTS.pack(self.sport, self.dport)
        if self.family == 4:
            return (_DF_TTL_PROTO.pack(IP4_DF, self.ttl, PROTO_TCP), self.src + self.dst + ports)
        return (b"\x60\0\0\0", _NXT_HLIM.pack(PROTO_TCP, self.ttl) + self.src + self.dst + ports)


_PORTS = struct.Struct("!HH")
_DF_TTL_PROTO = struct.Struct("!HBB")
_NXT_HLIM = struct.Struct("!BB")
_ACK_RUN = struct.Struct("!IBBH")        # ACK number, data offset, flags, window
_BURST: dict = {}


def _burst_struct(v4: bool, olen: int) -> struct.Struct:
    """IP + TCP header with options of olen bytes, its constant parts as
    byte runs: IPv4 45 00 | total | ident | DF TTL proto | header checksum |
    addresses, ports | seq | ACK offset flags window | checksum | urgent
    pointer, options; IPv6 the same from its own layout."""
    s = _BURST.get((v4, olen))
    if s is None:
        s = _BURST[(v4, olen)] = struct.Struct(f"!2sHH4sH12sI8sH{2 + olen}s" if v4 else
                                               f"!4sH38sI8sH{2 + olen}s")
    return s


class UdpTemplate:
    """Builds UDP datagrams from (src, sport) to (dst, dport) for one flow,
    fragmented when larger than `mtu` (lowered by a packet-too-big)."""
    __slots__ = ("family", "src", "dst", "sport", "dport", "ttl", "offload", "mtu", "_hsum", "_ip4_sum", "_ids")

    def __init__(self, family, src, dst, sport, dport, config, ids=None):
        """ids: a callable giving the next IP identification (a stack-wide
        counter, so fragments of different flows never share one); default
        a module-wide counter."""
        self._ids = ids or (next_ident4 if family == 4 else next_ident6)
        self.family = family
        self.src, self.dst, self.sport, self.dport = src, dst, sport, dport
        self.ttl = config.ttl
        self.offload = config.checksum_offload
        self.mtu = max(config.mtu, MIN_MTU4 if family == 4 else MIN_MTU6)
        ps = ck.pseudo(src, dst, PROTO_UDP, 0)
        if family == 4:
            self._ip4_sum = 0x4500 + ((self.ttl << 8) | PROTO_UDP) + _addr_sum(src) + _addr_sum(dst)
        else:
            self._ip4_sum = 0
        self._hsum = ps + sport + dport

    def max_payload(self) -> int:
        return MAX_PAYLOAD4 if self.family == 4 else MAX_PAYLOAD6

    def build(self, payload) -> list:
        """Packets carrying one datagram; ValueError if it cannot be a datagram."""
        ulen = 8 + len(payload)
        if self.family == 4:
            total = 20 + ulen
            if total > 65535:
                raise ValueError(f"UDP payload of {len(payload)} bytes is larger than an IPv4 datagram")
            fits = total <= self.mtu
        else:
            if ulen > 65535:
                raise ValueError(f"UDP payload of {len(payload)} bytes is larger than an IPv6 datagram")
            fits = 40 + ulen <= self.mtu
        if self.offload and fits:
            csum = ck.fold(self._hsum - self.sport - self.dport + ulen)
        else:
            # the length is counted twice: pseudo-header and UDP header
            csum = ~ck.sum16(payload, self._hsum + ulen + ulen) & 0xFFFF or 0xFFFF
        if fits:
            if self.family == 4:
                ident = self._ids() & 0xFFFF
                hcs = ~ck.fold(self._ip4_sum + total + ident) & 0xFFFF
                hdr = _IP4UDP.pack(0x45, 0, total, ident, 0, self.ttl, PROTO_UDP, hcs, self.src, self.dst,
                                   self.sport, self.dport, ulen, csum)
            else:
                hdr = _IP6UDP.pack(0x60000000, ulen, PROTO_UDP, self.ttl, self.src, self.dst,
                                   self.sport, self.dport, ulen, csum)
            return [hdr + payload if payload else hdr]
        l4 = _UDP.pack(self.sport, self.dport, ulen, csum) + bytes(payload)
        ident = self._ids()
        return ip_packets(self.family, self.src, self.dst, PROTO_UDP, l4, self.ttl, self.mtu,
                          ident=ident & 0xFFFF if self.family == 4 else ident & 0xFFFFFFFF)


def icmp4_message(type_: int, code: int, rest: int, body) -> bytes:
    s = ck.sum16(body, (type_ << 8) + code + (rest >> 16) + (rest & 0xFFFF))
    return _ICMP.pack(type_, code, ~s & 0xFFFF, rest) + bytes(body)


def icmp6_message(src: bytes, dst: bytes, type_: int, code: int, rest: int, body) -> bytes:
    ps = ck.pseudo(src, dst, PROTO_ICMP6, 8 + len(body))
    s = ck.sum16(body, ps + (type_ << 8) + code + (rest >> 16) + (rest & 0xFFFF))
    return _ICMP.pack(type_, code, ~s & 0xFFFF, rest) + bytes(body)


def icmp4_packets(src, dst, type_, code, rest, body, ttl, mtu=65535, ident=None) -> list:
    """An ICMPv4 message from src to dst (fragmented above mtu)."""
    return ip_packets(4, src, dst, PROTO_ICMP, icmp4_message(type_, code, rest, body), ttl, mtu,
                      ident=None if ident is None else ident & 0xFFFF)


def icmp6_packets(src, dst, type_, code, rest, body, hlim, mtu=65535, ident=None) -> list:
    """An ICMPv6 message from src to dst (fragmented above mtu)."""
    return ip_packets(6, src, dst, PROTO_ICMP6, icmp6_message(src, dst, type_, code, rest, body), hlim, mtu,
                      ident=None if ident is None else ident & 0xFFFFFFFF)
