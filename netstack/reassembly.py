"""IP fragment reassembly (RFC 791 §3.2, RFC 815, RFC 8200 §4.5, RFC 5722).

    r = Reassembler(config, drops)        # config: StackConfig, drops: counter
    whole = r.add(packet, now)            # a fragment in, the datagram out (or None)
    quotes = r.expire(now)                # bounded in time; quotes for ICMP time exceeded
    r.next_deadline()

Each datagram under reassembly keeps its fragments as sorted, disjoint runs
(start, end, data): any overlap abandons the whole datagram (RFC 5722 for
IPv6, and likewise for IPv4, where overlaps serve only to evade filters);
an exact duplicate (same offset, length and bytes) is dropped and the rest
kept (RFC 8200 §4.5 allows this).  With no overlaps the datagram is complete
when the runs' lengths add up to the total length the last fragment gave.

Bounds: at most config.frag_max_datagrams datagrams and config.frag_max_bytes
bytes (fragment data plus a fixed per-fragment overhead) at once, the oldest
evicted first; each datagram lives config.frag_timeout seconds from its first
fragment.  A reassembled datagram larger than 65535 bytes (IPv4 total
length, IPv6 payload length) and a first fragment that does not hold the
whole transport header (RFC 1858, RFC 7112) abandon the datagram.

add() never raises: every fragment it cannot use is counted in drops under
one of the reasons below and None is returned.
  frag_malformed  not a parseable IPv4/IPv6 fragment
  frag_bad_length a non-last fragment whose length is not a multiple of 8,
                  or lengths that contradict the last fragment's total
  frag_duplicate  an exact duplicate (the datagram is kept)
  frag_overlap    overlapping fragments (the datagram is abandoned)
  frag_too_big    reassembled size over 65535
  frag_tiny       first fragment without the full transport header
  frag_evicted    a datagram dropped to stay within the memory bounds
  frag_timeout    a datagram that did not complete in time
The reassembled packet (bytes) carries the first fragment's headers:
IPv4 with flags/offset cleared and total length and checksum fixed; IPv6
with the fragment header removed and the payload length and the preceding
next-header byte fixed.
"""

from __future__ import annotations

from bisect import bisect_right

from .wire import ipv4 as _ip4
from .wire import ipv6 as _ip6
from .wire.checksum import sum16
from .wire.errors import WireError

# Memory charged per stored fragment on top of its data, so that floods of
# tiny fragments hit frag_max_bytes long before they hit the host's memory.
FRAG_OVERHEAD = 64

# Smallest transport header the first fragment must hold, by protocol.
_MIN_L4 = {6: 20, 17: 8, 1: 8, 58: 8}

_MAX_PACKET = 65535


class _Datagram:
    __slots__ = ("key", "deadline", "starts", "runs", "covered", "total", "first", "charge")

    def __init__(self, key, deadline):
        self.key = key
        self.deadline = deadline
        self.starts: list = []       # sorted run starts
        self.runs: dict = {}         # start -> (end, data)
        self.covered = 0             # sum of run lengths (runs are disjoint)
        self.total = -1              # payload length, known once the last fragment came
        self.first = None            # headers in front of the data, from the offset-0 fragment
        self.charge = 0              # bytes charged to the reassembler


class Reassembler:
    __slots__ = ("config", "drops", "_dgrams", "_bytes")

    def __init__(self, config, drops):
        self.config = config
        self.drops = drops
        self._dgrams: dict = {}      # key -> _Datagram, oldest first (insertion order)
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._dgrams)

    @property
    def bytes_held(self) -> int:
        return self._bytes

    # ------------------------------------------------------------------ API

    def add(self, packet, now: float):
        """Take one whole IPv4 or IPv6 packet that is a fragment.  Returns the
        reassembled packet (bytes) when this fragment completes it, else None."""
        mv = memoryview(packet)
        n = len(mv)
        if n == 0:
            self.drops["frag_malformed"] += 1
            return None
        v = mv[0] >> 4
        try:
            if v == 4:
                return self._add4(mv, n, now)
            if v == 6:
                return self._add6(mv, n, now)
        except WireError as e:
            self.drops[e.reason] += 1
            return None
        self.drops["frag_malformed"] += 1
        return None

    def expire(self, now: float) -> list:
        """Drop datagrams whose time is up.  Returns, for those whose first
        fragment had come, a quote of that fragment (its headers and the
        start of its data, as an ICMP error carries them) for an ICMP time
        exceeded / fragment reassembly time exceeded (RFC 792, RFC 8200
        §4.5, RFC 4443 §3.3 code 1); the caller may send or ignore them."""
        d = self._dgrams
        quotes = []
        while d:
            key = next(iter(d))
            dg = d[key]
            if dg.deadline > now:
                # deadlines grow with insertion order (one timeout for all),
                # so the first live datagram bounds the rest
                break
            self._discard(dg)
            self.drops["frag_timeout"] += 1
            if dg.first is not None:
                quotes.append(self._quote(dg))
        return quotes

    @staticmethod
    def _quote(dg) -> bytes:
        data = dg.runs[0][1]
        if dg.key[0] == 4:
            # RFC 792: the header and the first 64 bits of the data
            return dg.first + data[:8]
        # RFC 4443 §2.4(c): as much as fits in a minimum-MTU ICMPv6 packet
        unfrag = dg.first[0]
        fh = _ip6.FRAG.pack(dg.first[2], 0, 1, dg.key[3])
        return unfrag + fh + data[:max(0, 1232 - len(unfrag) - 8)]

    def next_deadline(self):
        """Earliest time expire() has work, or None."""
        d = self._dgrams
        if not d:
            return None
        return d[next(iter(d))].deadline

    # ---------------------------------------------------------------- IPv4

    def _add4(self, mv, n, now):
        try:
            ihl, tot, fw, proto, src, dst = _ip4.unpack(mv)
        except WireError as e:
            raise WireError("frag_malformed", f"IPv4 header: {e.reason}") from None
        start = (fw & _ip4.FRAG_OFFSET_MASK) << 3
        more = bool(fw & _ip4.FRAG_MF)
        ln = tot - ihl
        if not more and start == 0:
            raise WireError("frag_malformed", "not a fragment")
        key = (4, src, dst, proto, _ip4.ident(mv))
        first = bytes(mv[:ihl]) if start == 0 else None
        return self._add(key, start, ln, more, mv[ihl:tot], first, ihl, proto, now)

    def _finish4(self, dg, data):
        hdr = bytearray(dg.first)
        ihl = len(hdr)
        tot = ihl + len(data)
        if tot > _MAX_PACKET:
            # later fragments may carry a shorter header than the first
            raise WireError("frag_too_big")
        hdr[2] = tot >> 8
        hdr[3] = tot & 0xFF
        hdr[6] = hdr[7] = 0
        hdr[10] = hdr[11] = 0
        c = ~sum16(hdr) & 0xFFFF
        hdr[10] = c >> 8
        hdr[11] = c & 0xFF
        return bytes(hdr) + data

    # ---------------------------------------------------------------- IPv6

    def _add6(self, mv, n, now):
        try:
            plen, nxt, src, dst = _ip6.unpack(mv)
        except WireError as e:
            raise WireError("frag_malformed", f"IPv6 header: {e.reason}") from None
        end = 40 + plen
        try:
            proto, off, frag_off, nh_off = _ip6.walk_ext(mv, nxt, 40, end, True)
        except WireError:
            raise WireError("frag_malformed", "IPv6 extension headers") from None
        if frag_off < 0:
            raise WireError("frag_malformed", "no fragment header")
        _nh, _res, ofl, ident = _ip6.FRAG.unpack_from(mv, frag_off)
        start = ofl & 0xFFF8
        more = bool(ofl & 1)
        ln = end - off
        if start == 0 and not more:
            # RFC 6946 atomic fragment: no reassembly, just drop the header
            return self._unfrag6(mv[:frag_off], nh_off, proto, mv[off:end])
        key = (6, src, dst, ident)
        first = None
        if start == 0:
            # unfragmentable part, the offset of the byte naming the
            # fragment header in it, and the first fragmentable header
            first = (bytes(mv[:frag_off]), nh_off, proto)
            # the first fragment must hold the rest of the header chain and
            # the transport header (RFC 7112)
            try:
                l4, l4_off, f2, _ = _ip6.walk_ext(mv, proto, off, end, False)
            except WireError:
                l4, l4_off, f2 = -1, end + 1, -1
            if f2 >= 0 or l4_off + _MIN_L4.get(l4, 0) > end:
                self._abandon(key, "frag_tiny")
                return None
        return self._add(key, start, ln, more, mv[off:end], first, frag_off, -1, now)

    @staticmethod
    def _unfrag6(unfrag, nh_off, proto, data):
        hdr = bytearray(unfrag)
        hdr[nh_off] = proto
        plen = len(hdr) - 40 + len(data)
        if plen > _MAX_PACKET:
            raise WireError("frag_too_big")
        hdr[4] = plen >> 8
        hdr[5] = plen & 0xFF
        return bytes(hdr) + bytes(data)

    def _finish6(self, dg, data):
        unfrag, nh_off, proto = dg.first
        return self._unfrag6(unfrag, nh_off, proto, data)

    # -------------------------------------------------------------- common

    def _add(self, key, start, ln, more, data, first, hdr_len, proto, now):
        """One fragment's data mv[start:start+ln] for datagram *key*.
        hdr_len: the bytes in front of the fragment data (IPv4 header length;
        IPv6: the fragment header's offset, i.e. 40 + the unfragmentable
        extension headers).  proto: IPv4 protocol for the tiny-fragment check
        (IPv6 checked the whole chain before).  first: the headers kept from
        the offset-0 fragment, else None."""
        drops = self.drops
        end = start + ln
        if more and (ln & 7 or ln == 0):
            self._abandon(key, "frag_bad_length")
            return None
        if key[0] == 4:
            if hdr_len + end > _MAX_PACKET:
                self._abandon(key, "frag_too_big")
                return None
            if start == 0 and ln < _MIN_L4.get(proto, 0):
                self._abandon(key, "frag_tiny")
                return None
        elif hdr_len - 40 + end > _MAX_PACKET:
            # the reassembled payload length: unfragmentable extension
            # headers + the fragmentable part
            self._abandon(key, "frag_too_big")
            return None
        dgrams = self._dgrams
        dg = dgrams.get(key)
        if dg is None:
            cfg = self.config
            while dgrams and len(dgrams) >= cfg.frag_max_datagrams:
                self._evict_oldest()
            if cfg.frag_max_datagrams <= 0:
                drops["frag_evicted"] += 1
                return None
            dg = dgrams[key] = _Datagram(key, now + cfg.frag_timeout)
        total = dg.total
        if not more:
            if total >= 0 and total != end:
                self._discard(dg)
                drops["frag_bad_length"] += 1
                return None
            if dg.starts:
                last = dg.starts[-1]
                if dg.runs[last][0] > end:
                    self._discard(dg)
                    drops["frag_bad_length"] += 1
                    return None
        elif total >= 0 and end > total:
            self._discard(dg)
            drops["frag_bad_length"] += 1
            return None
        if ln:
            starts = dg.starts
            runs = dg.runs
            i = bisect_right(starts, start)
            if i:
                p = starts[i - 1]
                pend, pdata = runs[p]
                if pend > start:
                    if p == start and pend == end and pdata == data:
                        drops["frag_duplicate"] += 1
                        return None
                    self._discard(dg)
                    drops["frag_overlap"] += 1
                    return None
            if i < len(starts) and starts[i] < end:
                self._discard(dg)
                drops["frag_overlap"] += 1
                return None
            starts.insert(i, start)
            runs[start] = (end, bytes(data))
            dg.covered += ln
            charge = ln + FRAG_OVERHEAD
        else:
            charge = 0
        if not more:
            dg.total = end
        if first is not None:
            dg.first = first
            charge += len(first) if key[0] == 4 else len(first[0])
        dg.charge += charge
        self._bytes += charge
        if dg.covered == dg.total and dg.first is not None:
            self._discard(dg)
            runs = dg.runs
            data = b"".join([runs[s][1] for s in dg.starts])
            if key[0] == 4:
                return self._finish4(dg, data)
            return self._finish6(dg, data)
        if self._bytes > self.config.frag_max_bytes:
            while self._bytes > self.config.frag_max_bytes and dgrams:
                self._evict_oldest()
        return None

    def _evict_oldest(self):
        d = self._dgrams
        if d:
            self._discard(d[next(iter(d))])
            self.drops["frag_evicted"] += 1

    def _abandon(self, key, reason):
        """Count *reason* and forget the datagram *key* (if held)."""
        dg = self._dgrams.get(key)
        if dg is not None:
            self._discard(dg)
        self.drops[reason] += 1

    def _discard(self, dg):
        del self._dgrams[dg.key]
        self._bytes -= dg.charge
