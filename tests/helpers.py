"""Packet-in/packet-out conversation DSL for the netstack TCP (and friends).

Modelled on gVisor's tcp testing context + checker and smoltcp's send!/recv!:
a `Client` plays the remote peer whose packets arrive from the TUN; it builds
segments with struct (correct checksums), feeds them to a real `Stack` under a
fake clock, and checks what the stack emits:

    c = Client(mss=1460, ws=7, sack=True, ts=True)
    conn = c.handshake()                 # SYN -> request -> accept -> SYN-ACK -> ACK
    c.send(b"hello")                     # data from the client
    c.poll(0.05)                         # advance the fake clock, run timers
    seg = c.recv(flags="A", ack=c.seq)   # check the stack's next segment
    c.recv_none()

Flags are strings: S=SYN A=ACK F=FIN R=RST P=PSH (PSH is ignored in checks
unless `psh=` is given).  Sequence fields default to the client's own
bookkeeping (`c.seq` = its next sequence number, `c.rcv` = the next byte it
expects from the stack).
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

from netstack import Stack, StackConfig, events
from netstack.wire import checksum as ck
from netstack.wire.tcp import parse_options

FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_FLAG_CHARS = {"F": FIN, "S": SYN, "R": RST, "P": PSH, "A": ACK, "U": URG}
M = 0xFFFFFFFF

_IP4 = struct.Struct("!BBHHHBBH4s4s")
_IP6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")


def flags_of(s) -> int:
    if isinstance(s, int):
        return s
    v = 0
    for ch in s:
        v |= _FLAG_CHARS[ch]
    return v


def flags_str(v: int) -> str:
    return "".join(ch for ch, bit in _FLAG_CHARS.items() if v & bit)


def addr(a: str) -> bytes:
    import ipaddress
    return ipaddress.ip_address(a).packed


def tcp_options(mss=None, ws=None, sack_perm=False, ts=None, sack=None) -> bytes:
    """Client-side option block (any order a real client might use)."""
    out = b""
    if mss is not None:
        out += struct.pack("!BBH", 2, 4, mss)
    if sack_perm:
        out += b"\x04\x02" if ts is not None else b"\x01\x01\x04\x02"
    if ts is not None:
        out += (b"" if sack_perm else b"\x01\x01") + struct.pack("!BBII", 8, 10, ts[0] & M, ts[1] & M)
    if ws is not None:
        out += struct.pack("!BBBB", 1, 3, 3, ws)
    if sack:
        out += struct.pack("!BBBB", 1, 1, 5, 2 + 8 * len(sack))
        for a, b in sack:
            out += struct.pack("!II", a & M, b & M)
    while len(out) & 3:
        out += b"\x00"
    return out


def build_packet(family, src, dst, sport, dport, seq, ack, flags, wnd, opts=b"", payload=b"",
                 bad_checksum=False) -> bytes:
    """An IPv4/IPv6 + TCP packet with correct checksums."""
    hl = 20 + len(opts)
    tl = hl + len(payload)
    tcph = _TCP.pack(sport, dport, seq & M, ack & M, (hl // 4) << 4, flags_of(flags), wnd, 0, 0)
    seg = tcph + opts + bytes(payload)
    ps = (ck.pseudo4 if family == 4 else ck.pseudo6)(src, dst, 6, tl)
    c = ck.checksum(seg, ps)
    if bad_checksum:
        c ^= 0x5555
    seg = seg[:16] + struct.pack("!H", c) + seg[18:]
    if family == 4:
        iph = _IP4.pack(0x45, 0, 20 + tl, 0, 0x4000, 64, 6, 0, src, dst)
        iph = iph[:10] + struct.pack("!H", ck.checksum(iph)) + iph[12:]
    else:
        iph = _IP6.pack(0x60000000, tl, 6, 64, src, dst)
    return iph + seg


@dataclass
class Seg:
    """A parsed TCP segment the stack emitted."""
    family: int
    src: bytes
    dst: bytes
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    wnd: int
    opts: object
    payload: bytes
    raw: bytes = field(repr=False)

    @property
    def f(self) -> str:
        return flags_str(self.flags)

    def __repr__(self):
        o = self.opts
        extra = ""
        if o is not None:
            parts = [f"{k}={getattr(o, k)}" for k in ("mss", "wscale", "sack_perm", "ts_val", "ts_ecr", "sack")
                     if getattr(o, k) not in (None, False)]
            extra = " " + " ".join(parts)
        return (f"<Seg {self.f} seq={self.seq} ack={self.ack} wnd={self.wnd} len={len(self.payload)}{extra}>")


def parse_packet(pkt) -> Seg:
    """Parse and verify (IP and TCP checksums, lengths) one emitted packet."""
    pkt = bytes(pkt)
    v = pkt[0] >> 4
    if v == 4:
        vihl, _tos, tot, _id, _frag, _ttl, proto, _c, src, dst = _IP4.unpack_from(pkt)
        ihl = (vihl & 15) * 4
        assert tot == len(pkt), f"IPv4 total length {tot} != {len(pkt)}"
        assert ck.sum16(pkt[:ihl]) == 0xFFFF, "bad IPv4 header checksum"
        assert proto == 6
        l4 = pkt[ihl:]
        ps = ck.pseudo4(src, dst, 6, len(l4))
    else:
        assert v == 6
        _vtf, plen, nxt, _hl, src, dst = _IP6.unpack_from(pkt)
        assert plen + 40 == len(pkt)
        assert nxt == 6
        l4 = pkt[40:]
        ps = ck.pseudo6(src, dst, 6, len(l4))
    assert ck.sum16(l4, ps) == 0xFFFF, "bad TCP checksum"
    sport, dport, seq, ack, doff, flags, wnd, _csum, _urp = _TCP.unpack_from(l4)
    doff = (doff >> 4) * 4
    opts = parse_options(l4[20:doff]) if doff > 20 else None
    return Seg(v, src, dst, sport, dport, seq, ack, flags, wnd, opts, bytes(l4[doff:]), pkt)


class Client:
    """The remote peer of one TCP conversation with a Stack (fake clock)."""

    def __init__(self, stack: Stack | None = None, *, family=4, client=None, server=None,
                 isn=1000, mss=1460, ws=None, sack=False, ts=False, wnd=65535,
                 config: StackConfig | None = None, seed=1, **cfg):
        if stack is None:
            config = config or StackConfig(**cfg)
            stack = Stack(config, rng=random.Random(seed))
        self.stack = stack
        self.family = family
        if client is None:
            client = ("10.0.0.2", 40000) if family == 4 else ("fd00::2", 40000)
        if server is None:
            server = ("93.184.216.34", 80) if family == 4 else ("2001:db8::80", 80)
        self.caddr, self.cport = addr(client[0]), client[1]
        self.saddr, self.sport = addr(server[0]), server[1]
        self.isn = isn & M
        self.seq = self.isn            # next sequence number we send
        self.rcv = None                # next byte we expect from the stack (set by the SYN-ACK)
        self.mss, self.ws, self.sack, self.ts = mss, ws, sack, ts
        self.wnd = wnd                 # raw window field we advertise
        self.now = 0.0
        self.tsval = 1
        self.ts_recent = 0             # last tsval seen from the stack
        self.out: list = []            # parsed segments not yet checked
        self.events: list = []
        self.conn = None

    # ------------------------------------------------------------- sending

    def packet(self, flags="A", *, seq=None, ack=None, wnd=None, data=b"", opts=None, ts=None,
               sack_blocks=None, bad_checksum=False, advance=True) -> bytes:
        f = flags_of(flags)
        if seq is None:
            seq = self.seq
        if ack is None:
            ack = self.rcv if (f & ACK and self.rcv is not None) else 0
        if wnd is None:
            wnd = self.wnd
        if opts is None:
            o_ts = None
            if self.ts:
                o_ts = ts if ts is not None else (self.tsval, self.ts_recent if f & ACK else 0)
            if f & SYN:
                opts = tcp_options(mss=self.mss, ws=self.ws, sack_perm=self.sack, ts=o_ts)
            else:
                opts = tcp_options(ts=o_ts, sack=sack_blocks)
        pkt = build_packet(self.family, self.caddr, self.saddr, self.cport, self.sport, seq, ack, f, wnd,
                           opts, data, bad_checksum)
        if advance and seq == self.seq:
            self.seq = (self.seq + len(data) + (1 if f & SYN else 0) + (1 if f & FIN else 0)) & M
        return pkt

    def send(self, data=b"", flags="A", **kw):
        """Send one segment (data defaults to none, flags to ACK; PSH added with data)."""
        if data and "flags" not in kw and flags == "A":
            flags = "PA"
        pkt = self.packet(flags, data=data, **kw)
        self.inject(pkt)
        return pkt

    def inject(self, pkt):
        self.stack.input(pkt, self.now)
        self.tsval += 1
        self._collect_events()

    def _collect_events(self):
        self.events.extend(self.stack.take_events())

    # ------------------------------------------------------------ receiving

    def poll(self, dt=0.0):
        """Advance the fake clock by dt and run the stack's poll."""
        self.now += dt
        self.stack.poll(self.now)
        self._collect_events()
        for p in self.stack.take_output():
            s = parse_packet(p)
            s.raw_obj = p
            if s.opts is not None and s.opts.ts_val is not None:
                self.ts_recent = s.opts.ts_val
            self.out.append(s)

    def run_until(self, t):
        """Poll at every stack deadline up to absolute time t (timers fire in order)."""
        while True:
            self.poll(0)
            d = self.stack.next_deadline()
            if d is None or d > t:
                break
            self.now = max(self.now, d)
        self.now = max(self.now, t)
        self.poll(0)

    def recv(self, flags=None, *, seq=None, ack=None, wnd=None, data=None, length=None, psh=None,
             sack=None, mss=None, wscale=None, sack_perm=None, ts=None, update=True) -> Seg:
        """Pop the stack's next segment and check the given fields (None: not checked).
        seq defaults to the client's expectation self.rcv (unless a SYN is expected),
        ack to self.seq."""
        if not self.out:
            self.poll(0)
        assert self.out, "expected a segment, stack sent nothing"
        s = self.out.pop(0)
        assert s.sport == self.sport and s.dport == self.cport and s.dst == self.caddr, s
        if flags is not None:
            want = flags_of(flags)
            got = s.flags if psh is not None else s.flags & ~PSH
            want = want if psh is None else (want | PSH if psh else want & ~PSH)
            assert got == want, f"flags {flags_str(got)} != {flags_str(want)}: {s}"
        if seq is None and update and self.rcv is not None and not s.flags & (SYN | RST):
            seq = self.rcv
        if seq is not None and seq is not False:
            assert s.seq == seq & M, f"seq {s.seq} != {seq & M}: {s}"
        if ack is None and s.flags & ACK and not s.flags & RST:
            ack = self.seq
        if ack is not None and ack is not False:
            assert s.ack == ack & M, f"ack {s.ack} != {ack & M}: {s}"
        if wnd is not None:
            assert s.wnd == wnd, f"wnd {s.wnd} != {wnd}: {s}"
        if data is not None:
            assert s.payload == bytes(data), f"payload {s.payload[:40]!r}... != {bytes(data)[:40]!r}...: {s}"
        if length is not None:
            assert len(s.payload) == length, f"len {len(s.payload)} != {length}: {s}"
        o = s.opts
        if sack is not None:
            got = [tuple(b) for b in (o.sack if o is not None and o.sack else [])]
            assert got == [(a & M, b & M) for a, b in sack], f"sack {got} != {sack}: {s}"
        if mss is not None:
            assert o is not None and o.mss == mss, f"mss: {s}"
        if wscale is not None:
            assert (o.wscale if o is not None else None) == (None if wscale is False else wscale), f"wscale: {s}"
        if sack_perm is not None:
            assert bool(o is not None and o.sack_perm) == sack_perm, f"sack_perm: {s}"
        if ts is not None:
            has = o is not None and o.ts_val is not None
            assert has == bool(ts), f"ts: {s}"
            if has and ts is not True:
                assert o.ts_ecr == ts, f"ts_ecr {o.ts_ecr} != {ts}: {s}"
        if update and s.flags & SYN and s.flags & ACK:
            self.rcv = (s.seq + 1) & M
        elif update and s.payload and s.seq == self.rcv:
            self.rcv = (self.rcv + len(s.payload)) & M
        if update and s.flags & FIN and self.rcv is not None and (s.seq + len(s.payload)) & M == self.rcv:
            self.rcv = (self.rcv + 1) & M
        return s

    def recv_none(self, poll=True):
        if poll:
            self.poll(0)
        assert not self.out, f"expected nothing, got {self.out}"

    def drain(self) -> list:
        """All pending segments, unchecked (they do not update self.rcv)."""
        self.poll(0)
        out, self.out = self.out, []
        return out

    def take(self, kind=None) -> list:
        evs = [e for e in self.events if kind is None or isinstance(e, kind)]
        self.events = [e for e in self.events if not (kind is None or isinstance(e, kind))]
        return evs

    # ------------------------------------------------------------ scripts

    def syn(self, **kw):
        return self.send(flags="S", **kw)

    def request(self, **kw):
        """Send a SYN and return the handle from the TcpConnectRequest event."""
        self.syn(**kw)
        reqs = self.take(events.TcpConnectRequest)
        assert len(reqs) == 1, f"expected one connect request, got {reqs}"
        self.conn = reqs[0].conn
        return self.conn

    def handshake(self, **kw):
        """SYN -> request -> accept -> SYN-ACK -> ACK; returns the connection."""
        conn = self.request(**kw)
        conn.accept()
        self.recv("SA", ack=self.seq)
        self.send(flags="A")
        assert conn.state == "ESTABLISHED", conn.state
        return conn

    def closed_reasons(self) -> list:
        return [e.reason for e in self.take(events.TcpClosed)]
