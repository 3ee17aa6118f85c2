"""TCP header (RFC 9293 §3.1) and options (RFC 9293 §3.2, RFC 7323, RFC 2018).

Two levels:
  * `unpack(mv, off)`: the fast checked parse of the header the stack's
    demux, replay and the devices call (one Struct, a tuple);
  * `parse(mv)` checks a segment and returns a small `TcpHeader`
    representation plus the data offset; `build_header(hdr, ...)` emits it.
  * `parse_options(block)` / `build_options(...)`: the option block, with a
    fast path for the NOP NOP TS block that nearly every data segment of a
    timestamp-using connection carries.  The TCP state machine uses these
    directly on the header unpack() gave them (hot path).

Header layout (offsets in bytes):

     0 source port      2 destination port
     4 sequence number
     8 acknowledgment number
    12 data offset(4) reserved(3) AE(1)   13 CWR ECE URG ACK PSH RST SYN FIN
    14 window           16 checksum         18 urgent pointer
    20 options (data offset*4 - 20 bytes), then the data
"""

from __future__ import annotations

import struct

from .checksum import pseudo, sum16
from .errors import WireError

HEADER_LEN = 20
MAX_HEADER_LEN = 60
MAX_OPTIONS_LEN = 40
HEADER = struct.Struct("!HHIIBBHHH")
_FIELDS = struct.Struct("!HHIIBBH")      # all but checksum and urgent pointer
# The fast form for hot paths: fields(mv, off) -> (sport, dport, seq, ack,
# offset byte, flags, window), unchecked.  It may be trusted only when the
# segment has at least 20 bytes and header_len = (offset byte >> 4) << 2 is
# between 20 and the segment length; anything else goes through unpack(),
# which says what is wrong.
fields = _FIELDS.unpack_from

# field offsets
OFF_SEQ = 4
OFF_ACK = 8
OFF_DATA_OFFSET = 12
OFF_FLAGS = 13
OFF_WINDOW = 14
OFF_CHECKSUM = 16
OFF_URGENT = 18

# flag bits (TcpHeader.flags also holds AE, RFC 3540/AccECN, as 0x100)
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR, AE = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x100

OPT_EOL, OPT_NOP, OPT_MSS, OPT_WSCALE, OPT_SACK_PERM, OPT_SACK, OPT_TS = 0, 1, 2, 3, 4, 5, 8

MAX_WSCALE = 14          # RFC 7323 §2.3
MAX_SACK_BLOCKS = 4      # 2 + 4*8 = 34 bytes: all an option block can hold

_TS_FAST = struct.Struct("!HHII")  # NOP NOP kind=8 len=10 tsval tsecr
_TS_FAST_HEAD = 0x0101080A         # the first four bytes of that block, as one word
# the two SYN option blocks nearly every client sends, each read with one
# unpack: MSS, SACK-permitted, TS, NOP WS (Linux, Android) and MSS, NOP WS,
# NOP NOP SACK-permitted (Windows); MSS and TS values, the shift in the
# last word's low byte
_SYN20 = struct.Struct("!HHIIII")
_SYN12 = struct.Struct("!HHII")
_U32 = struct.Struct("!I")
_II = struct.Struct("!II")
_H = struct.Struct("!H")

# option layouts the stack's builders pack directly (hot path)
TS_BLOCK = struct.Struct("!BBBBII")   # two pad bytes (NOP NOP, or SACK-permitted), TS kind, len, tsval, tsecr
SACK_HEAD = struct.Struct("!BBBB")    # NOP NOP SACK len
SACK_EDGES = _II                      # one SACK block: left, right
MSS_BLOCK = struct.Struct("!BBH")
WS_BLOCK = struct.Struct("!BBBB")     # NOP WS len shift
# a SYN-ACK's whole block in one pack, as words: MSS, SACK-permitted + TS,
# NOP WS (0x0204, mss, 0x0402080A, tsval, tsecr, 0x01030300 | shift), and
# without timestamps MSS, NOP NOP SACK-permitted, NOP WS
SYN_TS_BLOCK = _SYN20
SYN_SACK_WS_BLOCK = struct.Struct("!HHII")


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

    def __eq__(self, other):
        if not isinstance(other, TcpOptions):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __repr__(self):
        return ("TcpOptions(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")")


def parse_options(buf) -> TcpOptions:
    """Parse an option block (bytes-like); raise WireError("bad_tcp_options")
    on malformed input.

    Unknown options are skipped by their length; EOL ends the block (what
    follows is padding).  Malformed: an option (other than EOL/NOP) without
    room for its length byte, a length below 2 or running past the block,
    MSS/WS/SACK-permitted/TS with the wrong length, SACK that is not 1 to 4
    whole blocks.  When an option appears twice the last one counts.
    A window scale above 14 is used as 14 (RFC 7323 §2.3).
    """
    o = TcpOptions()
    n = len(buf)
    if n == 12:
        if _U32.unpack_from(buf)[0] == _TS_FAST_HEAD:
            _, _, o.ts_val, o.ts_ecr = _TS_FAST.unpack_from(buf)
            return o
        # a SYN without timestamps (Windows): MSS, NOP WS, NOP NOP SACK-permitted
        head, mss, ws, sp = _SYN12.unpack_from(buf)
        if head == 0x0204 and ws >> 8 == 0x010303 and sp == 0x01010402:
            o.mss = mss
            ws &= 0xFF
            o.wscale = ws if ws <= MAX_WSCALE else MAX_WSCALE
            o.sack_perm = True
            return o
    elif n == 20:
        # a SYN from Linux or Android: MSS, SACK-permitted, TS, NOP WS
        head, mss, ts_head, tsv, tse, ws = _SYN20.unpack_from(buf)
        if head == 0x0204 and ts_head == 0x0402080A and ws >> 8 == 0x010303:
            o.mss = mss
            ws &= 0xFF
            o.wscale = ws if ws <= MAX_WSCALE else MAX_WSCALE
            o.sack_perm = True
            o.ts_val = tsv
            o.ts_ecr = tse
            return o
    return _walk_options(buf, n, o)


def _walk_options(buf, n, o):
    """parse_options' general case: every option in turn, into *o*."""
    i = 0
    while i < n:
        kind = buf[i]
        if kind == OPT_NOP:
            i += 1
            continue
        if kind == OPT_EOL:
            break
        if i + 1 >= n:
            raise WireError("bad_tcp_options", f"option {kind} truncated")
        ln = buf[i + 1]
        if ln < 2 or i + ln > n:
            raise WireError("bad_tcp_options", f"option {kind} length {ln}")
        if kind == OPT_TS:
            if ln != 10:
                raise WireError("bad_tcp_options", "timestamp length")
            o.ts_val, o.ts_ecr = _II.unpack_from(buf, i + 2)
        elif kind == OPT_MSS:
            if ln != 4:
                raise WireError("bad_tcp_options", "mss length")
            o.mss = _H.unpack_from(buf, i + 2)[0]
        elif kind == OPT_WSCALE:
            if ln != 3:
                raise WireError("bad_tcp_options", "wscale length")
            ws = buf[i + 2]
            o.wscale = ws if ws <= MAX_WSCALE else MAX_WSCALE
        elif kind == OPT_SACK_PERM:
            if ln != 2:
                raise WireError("bad_tcp_options", "sack-permitted length")
            o.sack_perm = True
        elif kind == OPT_SACK:
            nb = (ln - 2) >> 3
            if (ln - 2) & 7 or not 1 <= nb <= MAX_SACK_BLOCKS:
                raise WireError("bad_tcp_options", f"sack length {ln}")
            o.sack = [_II.unpack_from(buf, j) for j in range(i + 2, i + ln, 8)]
        i += ln
    return o


def scan_options(buf) -> dict:
    """{kind: (offset, value)} of the window scale (3: the shift, at most
    14), SACK (5: [(left, right), ...]) and timestamp (8: (ts_val, ts_ecr))
    options in *buf*, with the offset of each within the block, for tools
    that rewrite options in place (replay).  Lenient where parse_options is
    strict: the walk stops at a malformed option and keeps what it found,
    and an option of the wrong length is passed over."""
    out = {}
    i, n = 0, len(buf)
    while i < n:
        kind = buf[i]
        if kind == OPT_EOL:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= n or buf[i + 1] < 2 or i + buf[i + 1] > n:
            break
        ln = buf[i + 1]
        if kind == OPT_TS and ln == 10:
            out[OPT_TS] = (i, _II.unpack_from(buf, i + 2))
        elif kind == OPT_WSCALE and ln == 3:
            out[OPT_WSCALE] = (i, min(buf[i + 2], MAX_WSCALE))
        elif kind == OPT_SACK and ln >= 10 and (ln - 2) % 8 == 0:
            out[OPT_SACK] = (i, [_II.unpack_from(buf, j) for j in range(i + 2, i + ln, 8)])
        i += ln
    return out


def build_options(mss=None, wscale=None, sack_perm=False, ts=None, sack=None) -> bytes:
    """Emit an option block padded to 4 bytes.  ts is (ts_val, ts_ecr);
    sack a list of (left, right).  Raises WireError("bad_tcp_options") if
    the block would exceed 40 bytes or a value does not fit its field."""
    parts = []
    try:
        if mss is not None:
            parts.append(struct.pack("!BBH", OPT_MSS, 4, mss))
        if sack_perm and ts is not None:
            parts.append(struct.pack("!BBBBII", OPT_SACK_PERM, 2, OPT_TS, 10, ts[0], ts[1]))
        else:
            if ts is not None:
                parts.append(_TS_FAST.pack(0x0101, 0x080A, ts[0], ts[1]))
            if sack_perm:
                parts.append(b"\x01\x01\x04\x02")
        if wscale is not None:
            parts.append(struct.pack("!BBBB", OPT_NOP, OPT_WSCALE, 3, wscale))
        if sack:
            if len(sack) > MAX_SACK_BLOCKS:
                raise WireError("bad_tcp_options", f"{len(sack)} SACK blocks")
            parts.append(struct.pack("!BBBB", OPT_NOP, OPT_NOP, OPT_SACK, 2 + 8 * len(sack)))
            for left, right in sack:
                parts.append(_II.pack(left, right))
    except struct.error as e:
        raise WireError("bad_tcp_options", str(e)) from None
    out = b"".join(parts)
    if len(out) & 3:
        out += b"\x00" * (4 - (len(out) & 3))
    if len(out) > MAX_OPTIONS_LEN:
        raise WireError("bad_tcp_options", "options longer than 40 bytes")
    return out


class TcpHeader:
    """Representation of a TCP header.  flags holds the 8 flag bits plus AE
    (0x100); options is the raw option block (bytes, a multiple of 4, at
    most 40; decode it with parse_options).  The checksum is computed by
    build_header() and checked by parse(), so it is not a field here."""
    __slots__ = ("src_port", "dst_port", "seq", "ack", "flags", "window", "urgent", "options")

    def __init__(self, src_port: int, dst_port: int, seq: int = 0, ack: int = 0, flags: int = 0,
                 window: int = 0, urgent: int = 0, options: bytes = b""):
        self.src_port = src_port
        self.dst_port = dst_port
        self.seq = seq
        self.ack = ack
        self.flags = flags
        self.window = window
        self.urgent = urgent
        self.options = options

    @property
    def header_len(self) -> int:
        return HEADER_LEN + len(self.options)

    def __eq__(self, other):
        if not isinstance(other, TcpHeader):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __repr__(self):
        return "TcpHeader(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"


def unpack(mv, off: int = 0):
    """The TCP header of the segment mv[off:], checked: returns
    (sport, dport, seq, ack, header_len, flags, window); flags is the flag
    byte (FIN..CWR), header_len in bytes (the data starts at off +
    header_len, options at off + 20).  The checksum is not verified here
    (checksum.sum16 over the segment with its pseudo-header).  Raises
    WireError: "truncated" (under 20 bytes), "bad_tcp_offset" (data offset
    below 5 words or past the segment)."""
    n = len(mv) - off
    if n < HEADER_LEN:
        raise WireError("truncated", "TCP header")
    sport, dport, seq, ack, doff, flags, wnd = _FIELDS.unpack_from(mv, off)
    hl = (doff >> 4) << 2
    if hl < HEADER_LEN or hl > n:
        raise WireError("bad_tcp_offset", f"data offset {hl}, segment {n}")
    return sport, dport, seq, ack, hl, flags, wnd


def parse(mv, src: bytes | None = None, dst: bytes | None = None) -> tuple[TcpHeader, int]:
    """Check and parse the TCP segment in *mv* (exactly the segment: IP
    payload).  Returns (header, data_offset); the data is mv[data_offset:].

    With src and dst (4- or 16-byte addresses) the checksum is verified
    over the pseudo-header and the whole segment.  Raises WireError:
    "truncated" (under 20 bytes), "bad_tcp_offset" (data offset below 5
    words or past the segment), "bad_tcp_checksum".
    """
    n = len(mv)
    if n < HEADER_LEN:
        raise WireError("truncated", "TCP header")
    sport, dport, seq, ack, doff, flags, wnd, _csum, urp = HEADER.unpack_from(mv)
    hl = (doff >> 4) << 2
    if hl < HEADER_LEN or hl > n:
        raise WireError("bad_tcp_offset", f"data offset {hl}, segment {n}")
    if src is not None:
        if sum16(mv, _pseudo(src, dst, n)) != 0xFFFF:
            raise WireError("bad_tcp_checksum")
    h = TcpHeader(sport, dport, seq, ack, ((doff & 1) << 8) | flags, wnd, urp,
                  bytes(mv[HEADER_LEN:hl]) if hl > HEADER_LEN else b"")
    return h, hl


def build_header(h: TcpHeader, src: bytes | None = None, dst: bytes | None = None,
                 payload=b"") -> bytes:
    """Emit the header (options included) for *h*.  With src and dst the
    checksum over the pseudo-header, header and *payload* is filled in;
    without them the checksum field is 0 (a template for the caller).
    Raises WireError("bad_tcp_options") for an option block that is not a
    multiple of 4 bytes or longer than 40."""
    opts = h.options
    olen = len(opts)
    if olen & 3 or olen > MAX_OPTIONS_LEN:
        raise WireError("bad_tcp_options", f"{olen} bytes of options")
    hl = HEADER_LEN + olen
    hdr = HEADER.pack(h.src_port, h.dst_port, h.seq, h.ack, (hl << 2) | ((h.flags >> 8) & 1),
                      h.flags & 0xFF, h.window, 0, h.urgent)
    if olen:
        hdr += opts
    if src is None:
        return hdr
    s = sum16(hdr, _pseudo(src, dst, hl + len(payload)))
    if payload:
        s = sum16(payload, s)   # hl is a multiple of 4: the payload starts on a word
    csum = ~s & 0xFFFF
    return hdr[:OFF_CHECKSUM] + csum.to_bytes(2, "big") + hdr[OFF_CHECKSUM + 2:]


def _pseudo(src, dst, length):
    return pseudo(src, dst, 6, length)
