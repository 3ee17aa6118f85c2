"""Shared pieces of the fuzz harnesses: a byte provider and packet checks.

The harnesses never import atheris: the engine only hands them bytes, and the
same bytes replay through the same code under plain pytest
(tests/test_fuzz_regressions.py).  `Provider` is our own FuzzedDataProvider:
a cursor over the input that reads small integers, choices and byte strings
from the front and answers zeros once the input is used up, so every input
is a valid (and deterministic) program.
"""

from __future__ import annotations

import struct


class InvariantError(AssertionError):
    """A harness invariant failed (a finding, like an uncaught exception)."""


def check(cond, what) -> None:
    """Assert that survives `python -O` (atheris runs may use it)."""
    if not cond:
        raise InvariantError(what() if callable(what) else what)


def one_line(e: Exception) -> None:
    """An error message the user sees is one line: no line break of any
    kind (\\n, \\r, \\x0b, \\x1c, \\u2028, ...) from the input inside it."""
    msg = str(e)
    check(msg and len(msg.splitlines()) == 1, lambda: f"{type(e).__name__} message is not one line: {msg!r}")


class Provider:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes):
        self.data = bytes(data)
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def u8(self) -> int:
        p = self.pos
        if p >= len(self.data):
            return 0
        self.pos = p + 1
        return self.data[p]

    def u16(self) -> int:
        return (self.u8() << 8) | self.u8()

    def u32(self) -> int:
        return (self.u16() << 16) | self.u16()

    def below(self, n: int) -> int:
        """An integer in 0..n-1 (n <= 65536)."""
        if n <= 1:
            return 0
        return (self.u8() if n <= 256 else self.u16()) % n

    def pick(self, seq):
        return seq[self.below(len(seq))]

    def flag(self) -> bool:
        return bool(self.u8() & 1)

    def take(self, n: int) -> bytes:
        p = self.pos
        out = self.data[p:p + n]
        self.pos = p + len(out)
        return out

    def blob(self, limit: int = 0xFFFF) -> bytes:
        """A length-prefixed byte string (16-bit length, cut at *limit*)."""
        return self.take(min(self.u16(), limit))

    def rest(self) -> bytes:
        out = self.data[self.pos:]
        self.pos = len(self.data)
        return out


def put_blob(b: bytes) -> bytes:
    """The encoding Provider.blob reads (for seed builders)."""
    return struct.pack("!H", len(b)) + b


# ------------------------------------------------------------ checksums
# Written independently of netstack.wire so that the checks below do not
# trust the code they check.

def inet_sum(data, start: int = 0) -> int:
    data = bytes(data)
    if len(data) & 1:
        data += b"\0"
    s = start + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def pseudo(src: bytes, dst: bytes, proto: int, length: int) -> int:
    if len(src) == 4:
        return inet_sum(src + dst + struct.pack("!BBH", 0, proto, length))
    return inet_sum(src + dst + struct.pack("!IxxxB", length, proto))


def fix_checksums(pkt: bytes) -> bytes:
    """The packet with its IPv4 header and TCP/UDP/ICMP checksums made right
    (when its headers are sane enough to find them); else unchanged."""
    b = bytearray(pkt)
    n = len(b)
    if n >= 20 and b[0] >> 4 == 4:
        ihl = (b[0] & 15) * 4
        tot = struct.unpack_from("!H", b, 2)[0]
        if ihl < 20 or ihl > n:
            return pkt
        b[10:12] = b"\0\0"
        b[10:12] = struct.pack("!H", ~inet_sum(b[:ihl]) & 0xFFFF)
        if tot < ihl or tot > n or struct.unpack_from("!H", b, 6)[0] & 0x3FFF:
            return bytes(b)
        proto, src, dst, off, end = b[9], bytes(b[12:16]), bytes(b[16:20]), ihl, tot
    elif n >= 40 and b[0] >> 4 == 6:
        plen = struct.unpack_from("!H", b, 4)[0]
        if 40 + plen > n:
            return pkt
        proto, src, dst, off, end = b[6], bytes(b[8:24]), bytes(b[24:40]), 40, 40 + plen
    else:
        return pkt
    l4 = end - off
    if proto == 6 and l4 >= 20:
        at = off + 16
    elif proto == 17 and l4 >= 8:
        at = off + 6
        ulen = struct.unpack_from("!H", b, off + 4)[0]
        if 8 <= ulen <= l4:
            end = off + ulen
            l4 = ulen
    elif proto in (1, 58) and l4 >= 8:
        at = off + 2
    else:
        return bytes(b)
    b[at:at + 2] = b"\0\0"
    start = 0 if proto == 1 else pseudo(src, dst, proto, l4)
    c = ~inet_sum(b[off:end], start) & 0xFFFF
    if proto == 17 and c == 0:
        c = 0xFFFF
    b[at:at + 2] = struct.pack("!H", c)
    return bytes(b)


def is_fragment(pkt) -> bool:
    if pkt[0] >> 4 == 4:
        return bool(struct.unpack_from("!H", pkt, 6)[0] & 0x3FFF)
    return pkt[6] == 44


def check_output_packet(pkt, mtu: int, gso: bool) -> None:
    """An IP packet the stack emitted is well formed: lengths and checksums
    right, no larger than the MTU (or a TCP GSO super-segment when allowed)."""
    n = len(pkt)
    check(n >= 20, lambda: f"output packet of {n} bytes")
    v = pkt[0] >> 4
    check(v in (4, 6), lambda: f"output packet version {v}")
    check(n <= 65535 + (40 if v == 6 else 0), lambda: f"output packet of {n} bytes")
    if v == 4:
        ihl = (pkt[0] & 15) * 4
        check(ihl >= 20 and n >= ihl, "IPv4 header length")
        check(inet_sum(pkt[:ihl]) == 0xFFFF, "IPv4 header checksum")
        check(struct.unpack_from("!H", pkt, 2)[0] == n, "IPv4 total length")
        proto, src, dst, l4 = pkt[9], bytes(pkt[12:16]), bytes(pkt[16:20]), pkt[ihl:]
    else:
        check(n >= 40, "IPv6 header")
        check(struct.unpack_from("!H", pkt, 4)[0] == n - 40, "IPv6 payload length")
        proto, src, dst, l4 = pkt[6], bytes(pkt[8:24]), bytes(pkt[24:40]), pkt[40:]
    if is_fragment(pkt):
        check(n <= mtu, lambda: f"fragment of {n} bytes over the MTU {mtu}")
        return
    check(n <= mtu or (gso and proto == 6), lambda: f"packet of {n} bytes over the MTU {mtu} (proto {proto})")
    if proto in (6, 17, 58):
        check(inet_sum(l4, pseudo(src, dst, proto, len(l4))) == 0xFFFF, lambda: f"proto {proto} checksum")
        if proto == 6:
            check(len(l4) >= 20 and 20 <= (l4[12] >> 4) * 4 <= len(l4), "TCP data offset")
        elif proto == 17:
            check(len(l4) >= 8 and struct.unpack_from("!H", l4, 4)[0] == len(l4), "UDP length")
    elif proto == 1:
        check(inet_sum(l4) == 0xFFFF, "ICMP checksum")
    else:
        raise InvariantError(f"output packet with protocol {proto}")
