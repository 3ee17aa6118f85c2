"""TCP header options (RFC 9293 §3.2, RFC 7323, RFC 2018)."""

from __future__ import annotations

import struct

from .errors import WireError

OPT_EOL, OPT_NOP, OPT_MSS, OPT_WSCALE, OPT_SACK_PERM, OPT_SACK, OPT_TS = 0, 1, 2, 3, 4, 5, 8

_TS_FAST = struct.Struct("!HHII")  # NOP NOP kind=8 len=10 tsval tsecr


class TcpOptions:
    """Parsed options of one segment.  Absent options are None / False."""
    __slots__ = ("mss", "wscale", "sack_perm", "sack", "ts_val", "ts_ecr")

    def __init__(self):
        self.mss = None
        self.wscale = None
        self.sack_perm = False
        self.sack = None          # list of (left, right) edges
        self.ts_val = None
        self.ts_ecr = None

    def __repr__(self):
        return ("TcpOptions(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")")


def parse_options(buf) -> TcpOptions:
    """Parse an option block (bytes-like); raise WireError on malformed input."""
    o = TcpOptions()
    n = len(buf)
    if n == 12 and buf[0] == 1 and buf[1] == 1 and buf[2] == 8 and buf[3] == 10:
        _, _, o.ts_val, o.ts_ecr = _TS_FAST.unpack_from(buf)
        return o
    i = 0
    while i < n:
        kind = buf[i]
        if kind == OPT_EOL:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= n:
            raise WireError("bad_tcp_options", "truncated option")
        ln = buf[i + 1]
        if ln < 2 or i + ln > n:
            raise WireError("bad_tcp_options", f"option {kind} length {ln}")
        if kind == OPT_MSS:
            if ln != 4:
                raise WireError("bad_tcp_options", "mss length")
            o.mss = (buf[i + 2] << 8) | buf[i + 3]
        elif kind == OPT_WSCALE:
            if ln != 3:
                raise WireError("bad_tcp_options", "wscale length")
            o.wscale = min(buf[i + 2], 14)   # RFC 7323 §2.3: values above 14 are used as 14
        elif kind == OPT_SACK_PERM:
            if ln != 2:
                raise WireError("bad_tcp_options", "sack-permitted length")
            o.sack_perm = True
        elif kind == OPT_SACK:
            if (ln - 2) % 8 or ln == 2:
                raise WireError("bad_tcp_options", "sack length")
            blocks = []
            for j in range(i + 2, i + ln, 8):
                left, right = struct.unpack_from("!II", buf, j)
                blocks.append((left, right))
            o.sack = blocks
        elif kind == OPT_TS:
            if ln != 10:
                raise WireError("bad_tcp_options", "timestamp length")
            o.ts_val, o.ts_ecr = struct.unpack_from("!II", buf, i + 2)
        i += ln
    return o


def build_options(mss=None, wscale=None, sack_perm=False, ts=None, sack=None) -> bytes:
    """Emit an option block padded to 4 bytes.  ts is (ts_val, ts_ecr)."""
    parts = []
    if mss is not None:
        parts.append(struct.pack("!BBH", OPT_MSS, 4, mss))
    if sack_perm and ts is not None:
        parts.append(struct.pack("!BBBBII", OPT_SACK_PERM, 2, OPT_TS, 10, ts[0], ts[1]))
    else:
        if ts is not None:
            parts.append(struct.pack("!BBBBII", OPT_NOP, OPT_NOP, OPT_TS, 10, ts[0], ts[1]))
        if sack_perm:
            parts.append(struct.pack("!BBBB", OPT_NOP, OPT_NOP, OPT_SACK_PERM, 2))
    if wscale is not None:
        parts.append(struct.pack("!BBBB", OPT_NOP, OPT_WSCALE, 3, wscale))
    if sack:
        parts.append(struct.pack("!BB", OPT_NOP, OPT_NOP))
        parts.append(struct.pack("!BB", OPT_SACK, 2 + 8 * len(sack)))
        for left, right in sack:
            parts.append(struct.pack("!II", left, right))
    out = b"".join(parts)
    if len(out) & 3:
        out += b"\x00" * (4 - (len(out) & 3))
    if len(out) > 40:
        raise WireError("bad_tcp_options", "options longer than 40 bytes")
    return out
