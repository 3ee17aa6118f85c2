"""`tun2xray replay`: feed a capture's client-side packets to a Stack offline.

    tun2xray replay [--json] [--checksums auto|verify|ignore] capture.pcap [more.pcap ...]
    tun2xray replay --ladder FLOW --svg out.svg capture.pcap

The capture (pcap or pcapng; raw IP, Ethernet, Linux cooked v1/v2 or BSD
loopback framing) is split into flows; the client of a flow is the side that
sent the SYN (TCP) or the first datagram (UDP); a new SYN on a used 4-tuple
starts a new flow.  Every client packet goes to a
`Stack(StackConfig(verify_checksums=True), rng=random.Random(0))` at its
recorded time (a fake clock: `poll(now)` runs the stack's timers between
packets; after the last packet the clock runs on through the stack's
deadlines), and this module plays the host, mirroring the recorded server:

- TCP: accept each connect request, or reject it as the recorded server
  refused the SYN (RST, or the ICMP unreachable it sent); read everything the
  client sends; write the bytes the recorded server had sent by then; shut
  down once the recorded server's FIN has come and all its bytes are
  written; abort where it sent a RST.
- UDP: hand the stack the recorded server's datagrams as replies, or reject
  the flow where the recording shows an ICMP port unreachable.

The client's packets acknowledge the recorded server's sequence space, so
their ACK numbers, SACK edges and timestamp echoes are translated into the
stack's (learnt from its SYN-ACK and its segments).  The stack's sender is not
the recorded kernel's: an ACK for bytes the stack has not sent yet is lowered
to what it has sent, and the rest is acknowledged by an extra pure ACK from
the client as soon as the stack sends those bytes ("synthesized" in the
report); without that, a slower sender would see its data acked from the
future and its segments dropped (RFC 9293 3.10.7.4).

Besides the streams, the replay checks what the stack put on the wire:
checksums and lengths of every packet, a SYN-ACK acking ISN+1, no ACK
beyond what the client had sent, no segment beyond the window the client
advertised, the same bytes on every retransmission, a FIN after the last byte.

Captures taken on the sending host with checksum offload hold the client's
packets with partial TCP/UDP checksums; `--checksums` says what to do with
them (see ChecksumReport; the default, auto, completes them when they look
offloaded and says so).  `--ladder FLOW --svg F` draws one flow's packets
(tun2xray.ladder).

Exit status: 0 when every flow completed (a refused or reset flow counts
when the recording shows the same: "refused as recorded", "reset as
recorded"), 1 when some did not, 2 when a file is missing or malformed, or
FLOW names no flow (one line on stderr).
"""

from __future__ import annotations

import ipaddress
import random
import sys
import traceback

from netstack import Stack, StackConfig
from netstack import events as ev
from netstack.wire import checksum as ck
from netstack.wire import icmp as wicmp
from netstack.wire import ip as wip
from netstack.wire import ipv4 as wip4
from netstack.wire import ipv6 as wip6
from netstack.wire import tcp as wtcp
from netstack.wire import udp as wudp
from netstack.wire.errors import WireError
from netstack.wire.tcp import build_options
from netstack.wire.templates import TcpTemplate

from .device import pcap as _pcap

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
M32 = 0xFFFFFFFF


class ReplayError(Exception):
    """A file that cannot be replayed (missing, not a pcap, truncated)."""


# ------------------------------------------------------------------ reading

def read_pcap(path) -> list:
    """[(ts, ip_packet_bytes)] of a classic pcap or pcapng capture, read by
    the device pcap reader in its strict mode (every frame as captured).
    Raises ReplayError with a one-line reason on anything malformed."""
    try:
        return list(_pcap.read_pcap(path, strict=True))
    except ValueError as e:
        raise ReplayError(str(e)) from None


# ------------------------------------------------------------------ parsing

class Pkt:
    """One IP packet of the capture, with the fields the replay needs."""
    __slots__ = ("ts", "raw", "family", "proto", "src", "dst", "sport", "dport",
                 "l4", "end", "seq", "ack", "flags", "wnd", "doff", "payload", "opts",
                 "icmp", "inner", "csum_bad")

    def __init__(self, ts, raw):
        self.ts, self.raw = ts, raw
        self.proto = None
        self.csum_bad = False     # a client packet whose bad TCP/UDP checksum is fed as captured
        self.payload = b""
        self.icmp = None          # (type, code) of an ICMP/ICMPv6 message
        self.inner = None         # (proto, src, sport, dst, dport) an ICMP error quotes


def parse_ip(ts, raw) -> Pkt:
    """Fields of an IPv4/IPv6 TCP or UDP packet (or an ICMP message),
    parsed with netstack.wire; p.proto is None for anything else (other
    protocols, fragments, extension headers, bad lengths)."""
    p = Pkt(ts, raw)
    n = len(raw)
    try:
        if n >= 20 and raw[0] >> 4 == 4:
            l4, end, frag, proto, src, dst = wip4.unpack(raw)
            if frag & 0x3FFF:
                return p
            p.family = 4
        elif n >= 40 and raw[0] >> 4 == 6:
            plen, proto, src, dst = wip6.unpack(raw)
            p.family, l4, end = 6, 40, 40 + plen
        else:
            return p
    except WireError:
        return p
    p.src, p.dst, p.l4, p.end = src, dst, l4, end
    seg = raw if end == n else raw[:end]
    try:
        if proto == 6:
            sport, dport, seq, ack, doff, flags, wnd = wtcp.unpack(seg, l4)
            p.proto, p.sport, p.dport, p.seq, p.ack = 6, sport, dport, seq, ack
            p.flags, p.wnd, p.doff = flags, wnd, doff
            p.opts = raw[l4 + 20:l4 + doff]
            p.payload = raw[l4 + doff:end]
        elif proto == 17:
            sport, dport, ulen, _ = wudp.parse(seg, l4)
            p.proto, p.sport, p.dport = 17, sport, dport
            p.payload = raw[l4 + 8:l4 + ulen]
        elif proto in (1, 58) and (proto == 1) == (p.family == 4):
            type_, code, _rest = wicmp.unpack(seg, l4)
            p.proto, p.icmp = proto, (type_, code)
            p.payload = raw[l4 + 8:end]
            if type_ in ((3, 11, 12) if proto == 1 else (1, 2, 3, 4)):
                p.inner = _quoted(p.payload)
    except WireError:
        pass
    return p


def _quoted(q):
    """(proto, src, sport, dst, dport) of the packet an ICMP error quotes."""
    try:
        _family, proto, src, sport, dst, dport = wicmp.parse_quote(q, 0)
    except WireError:
        return None
    return proto, src, sport, dst, dport


# {kind: (offset, value)} of window scale (3), SACK (5) and timestamps (8)
tcp_options = wtcp.scan_options


def _ip_text(family, addr, port) -> str:
    a = ipaddress.ip_address(addr)
    return f"[{a}]:{port}" if family == 6 else f"{a}:{port}"


def _rel(x, base) -> int:
    return (x - base) & M32


class Stream:
    """A byte stream assembled from segments at relative offsets.  Segments
    are kept as given (a corrupt capture cannot make it allocate 4 GB); the
    contiguous bytes are assembled on demand."""
    __slots__ = ("segs", "conflicts", "_same_offset_conflicts", "_cache")

    LIMIT = 1 << 30     # offsets beyond this are not part of any plausible stream

    def __init__(self):
        self.segs = {}        # offset -> bytes (the longest seen at that offset)
        self.conflicts = 0    # overlapping segments whose bytes differ
        self._same_offset_conflicts = 0
        self._cache = None

    def put(self, off: int, data) -> None:
        if not data or off >= self.LIMIT:
            return
        old = self.segs.get(off)
        if old is not None and bytes(data[:len(old)]) != old[:len(data)]:
            self._same_offset_conflicts += 1
        if old is None or len(data) > len(old):
            self.segs[off] = bytes(data)
            self._cache = None

    def contiguous(self) -> bytes:
        """The bytes from offset 0 up to the first hole (and counts conflicts)."""
        if self._cache is not None:
            return self._cache
        out = bytearray()
        conflicts = self._same_offset_conflicts
        for off in sorted(self.segs):
            data = self.segs[off]
            n = len(out)
            if off > n:
                break
            overlap = min(n - off, len(data))
            if out[off:off + overlap] != data[:overlap]:
                conflicts += 1
            out += data[overlap:]
        self.conflicts = conflicts
        self._cache = bytes(out)
        return self._cache


# ------------------------------------------------------------------ flows

class Flow:
    """One flow of the capture: what was recorded, and what the replay saw."""

    def __init__(self, proto, family, key, first):
        self.proto, self.family, self.key = proto, family, key   # key: client first
        self.first = first            # Pkt that opened it (SYN / first datagram)
        self.handle = None            # the stack's TcpConnection / UdpFlow
        self.close_reason = None      # TcpClosed / UdpClosed reason
        self.outcome = None           # "completed" / "refused" / "reset" / "incomplete: ..."
        self.ok = False
        self.detail = ""
        self.received = bytearray()   # bytes the host read from the stack
        self.rec_icmp = None          # (type, code) of the recorded server's ICMP error, if any
        self.stack_icmp = []          # (type, code) of the stack's ICMP errors about this flow
        self.ladder = []              # (ts, from_client, Pkt, note): client packets fed, stack packets sent
        if proto == 6:
            self._init_tcp()
        else:
            self.client_datagrams = []    # recorded
            self.server_datagrams = []    # recorded
            self.host_datagrams = []      # delivered by the stack (UdpDatagram)
            self.stack_datagrams = []     # the stack's replies on the wire

    def _init_tcp(self):
        # recording
        self.client_isn = self.first.seq
        self.server_isn = None
        self.refused = False          # the recorded server answered the SYN with RST
        self.rec_client = Stream()
        self.rec_server = Stream()
        self._client_bytes = self._server_bytes = None
        self.rec_client_fin = None    # relative seq of the client's FIN
        self.rec_server_fin = None
        self.rec_rst = None           # "client" / "server" after the handshake
        self.expected = "open"
        # replay state
        self.stack_isn = None
        self.syn_ack = None           # (seq, ack) of the stack's SYN-ACK
        self.stack_rst = []           # (seq, ack, flags) of RSTs the stack sent
        self.snd_max = 0              # highest stack seq sent, relative to stack_isn (SYN = 1)
        self.stack_stream = Stream()  # bytes the stack sent toward the client
        self.stack_fin = None         # relative seq of the stack's FIN
        self.stack_acks = []          # (ack relative to client ISN, client's sent-so-far) per segment
        self.stack_sacks = []         # (ack, SACK blocks, client's sent-so-far) relative to the client ISN
        self.stack_tsval = None
        self.stack_segments = 0
        self.client_wscale = None     # from the client's SYN
        self.wscale = 0               # shift applied to the client's windows (both sides sent the option)
        self.right_edge = 0           # highest ack + window the client advertised to the stack (stack-relative)
        self.window_violations = 0    # stack segments beyond that edge
        self.client_sent = 0          # highest client seq fed so far, relative (SYN = 1)
        self.acked_to_stack = 0       # highest ack fed to the stack, relative to stack_isn
        self.ack_target = 0           # highest ack the recorded client sent, relative to server ISN
        self.last_client = None       # last client Pkt fed (template for synthesized ACKs)
        self.synthesized = 0
        self.lowered = 0              # client ACKs lowered to what the stack had sent
        self.write_limit = 0          # server bytes the recording had sent by now
        self.written = 0
        self.shutdown_due = False
        self.shut = False
        self.abort_due = False

    @property
    def server_stream(self) -> bytes:
        """The recorded server's bytes (up to the first hole the capture has)."""
        if self._server_bytes is None:
            self._server_bytes = self.rec_server.contiguous()
        return self._server_bytes

    @property
    def client_stream(self) -> bytes:
        if self._client_bytes is None:
            self._client_bytes = self.rec_client.contiguous()
        return self._client_bytes

    def text(self) -> str:
        c = _ip_text(self.family, self.key[0], self.key[1])
        s = _ip_text(self.family, self.key[2], self.key[3])
        return f"{'tcp' if self.proto == 6 else 'udp'} {c} -> {s}"


def split_flows(packets):
    """Group parsed packets into flows.  Returns (flows in order of first
    packet, [(Pkt, flow, from_client)] in capture order, count of packets
    that belong to no flow)."""
    flows: dict = {}
    order = []
    seq = []
    stray = 0
    for p in packets:
        if p.proto is None or p.proto in (1, 58):
            f = flows.get(p.inner) if p.inner is not None else None
            if f is not None and p.src == f.key[2]:
                seq.append((p, f, False))     # the recorded server's ICMP error about the client's packet
            else:
                stray += 1
                seq.append((p, None, None))
            continue
        fwd = (p.proto, p.src, p.sport, p.dst, p.dport)
        rev = (p.proto, p.dst, p.dport, p.src, p.sport)
        f = flows.get(fwd)
        if f is not None and not (p.proto == 6 and (p.flags & (SYN | ACK)) == SYN and p.seq != f.client_isn):
            seq.append((p, f, True))
            continue
        if f is not None:
            del flows[fwd]      # a new SYN on a used 4-tuple: a new connection (port reuse)
            f = None
        f = flows.get(rev)
        if f is not None:
            seq.append((p, f, False))
            continue
        if p.proto == 17 or (p.flags & (SYN | ACK | RST)) == SYN:
            f = Flow(p.proto, p.family, (p.src, p.sport, p.dst, p.dport), p)
            flows[fwd] = f
            order.append(f)
            seq.append((p, f, True))
        else:
            stray += 1       # mid-stream TCP without its SYN: not replayable
            seq.append((p, None, None))
    for p, f, from_client in seq:
        if f is not None:
            _record(f, p, from_client)
    for f in order:
        if f.proto == 17:
            f.expected = "refused" if _unreachable(f.rec_icmp) else "open"
        elif f.proto == 6:
            if f.refused:
                f.expected = "refused"
            elif f.rec_rst:
                f.expected = "reset"
            elif f.rec_client_fin is not None and f.rec_server_fin is not None:
                f.expected = "closed"
    return order, seq, stray


def _record(f, p, from_client):
    if p.icmp is not None:
        if f.rec_icmp is None:
            f.rec_icmp = p.icmp
            if f.proto == 6 and f.server_isn is None:
                f.refused = True
        return
    if f.proto == 17:
        (f.client_datagrams if from_client else f.server_datagrams).append(bytes(p.payload))
        return
    if from_client:
        if p.flags & SYN:
            return
        if p.flags & RST:
            if f.server_isn is not None and f.rec_rst is None:
                f.rec_rst = "client"
            return
        rel = _rel(p.seq, f.client_isn) - 1
        f.rec_client.put(rel, bytes(p.payload))
        if p.flags & FIN:
            f.rec_client_fin = rel + len(p.payload)
    else:
        if p.flags & SYN and p.flags & ACK:
            f.server_isn = p.seq
            return
        if p.flags & RST:
            if f.server_isn is None:
                f.refused = True
            elif f.rec_rst is None:
                f.rec_rst = "server"
            return
        if f.server_isn is None:
            return
        rel = _rel(p.seq, f.server_isn) - 1
        f.rec_server.put(rel, bytes(p.payload))
        if p.flags & FIN:
            f.rec_server_fin = rel + len(p.payload)


def _unreachable(icmp) -> str | None:
    """The reject kind for a recorded ICMP destination unreachable, else None."""
    if icmp is None:
        return None
    t, c = icmp
    if t == 3:
        return {0: "net", 1: "host", 3: "port", 9: "admin", 10: "admin", 13: "admin"}.get(c, "host")
    if t == 1:
        return {0: "net", 1: "admin", 3: "host", 4: "port"}.get(c, "host")
    return None


# ------------------------------------------------------------------ checksums

CHECKSUM_MODES = ("auto", "verify", "ignore")


class ChecksumReport:
    """What the replay did about the client's TCP/UDP checksums.

    A capture taken on the sending host with checksum offload on (the
    default on most NICs and on veth) holds the client's packets as the
    kernel handed them to the driver: the TCP/UDP checksum field carries
    only the pseudo-header sum ("partial"), the NIC finishes it on the wire.
    The IP header checksum is always complete there.  Modes:

    - verify: feed the packets as captured (the stack drops bad ones);
    - ignore: complete every client TCP/UDP checksum that is wrong while
      the IP header checksum is right;
    - auto (default): do that for a client address whose packets look
      offloaded: at least one carries exactly the partial sum, or at least
      half of its TCP/UDP packets are wrong with a right IP header.  Stray
      damage elsewhere is fed as captured (and dropped by the stack).
    """

    __slots__ = ("mode", "bad_tcp", "bad_udp", "partial", "completed", "offloaded")

    def __init__(self, mode: str):
        self.mode = mode
        self.bad_tcp = 0          # client TCP packets with a wrong checksum (IP header right)
        self.bad_udp = 0
        self.partial = 0          # ... of them carrying exactly the pseudo-header sum
        self.completed = 0        # checksums completed before feeding the stack
        self.offloaded = []       # client addresses treated as offloaded (auto)

    def as_dict(self) -> dict:
        return {"mode": self.mode, "bad_tcp": self.bad_tcp, "bad_udp": self.bad_udp,
                "partial": self.partial, "completed": self.completed,
                "offloaded_clients": [str(ipaddress.ip_address(a)) for a in self.offloaded]}

    def text(self) -> str | None:
        """One line for the report, None when every checksum was right."""
        bad = self.bad_tcp + self.bad_udp
        if not bad:
            return None
        what = _count_text(self.bad_tcp, "TCP") + (" and " if self.bad_tcp and self.bad_udp else "") + \
            _count_text(self.bad_udp, "UDP")
        if self.completed:
            how = ("offloaded (pseudo-header sum only)" if self.partial == bad else
                   f"wrong ({self.partial} pseudo-header sum only)")
            return (f"checksums ({self.mode}): {what} client packets had {how} checksums; "
                    f"{self.completed} completed before the replay"
                    + (" (--checksums verify to refuse them)" if self.mode == "auto" else ""))
        return f"checksums ({self.mode}): {what} client packets had bad checksums, fed as captured"


def _count_text(n, proto) -> str:
    return f"{n} {proto}" if n else ""


def _l4_checksum(p):
    """(field, correct value, pseudo-header sum) of a TCP/UDP packet's
    checksum, or None (UDP over IPv4 without a checksum, bad IPv4 header)."""
    raw = p.raw
    off = p.l4 + ck.CSUM_OFFSET[p.proto]
    field = int.from_bytes(raw[off:off + 2], "big")
    if p.family == 4 and not wip4.header_ok(raw, p.l4):
        return None
    end = p.end
    ps = ck.pseudo(p.src, p.dst, p.proto, end - p.l4)
    if p.proto == 17 and field == 0:
        return None if p.family == 4 else (field, -1, ps)
    seg = bytearray(raw[p.l4:end])
    seg[off - p.l4:off - p.l4 + 2] = b"\x00\x00"
    good = ck.checksum(seg, ps)
    if p.proto == 17 and good == 0:
        good = 0xFFFF
    return field, good, ck.fold(ps)


def prepare_checksums(sequence, rep: ChecksumReport) -> None:
    """Count the client's bad TCP/UDP checksums and, as the mode says,
    complete them in place (Pkt.raw) before the replay feeds them."""
    bad_by_src: dict = {}
    total_by_src: dict = {}
    for p, f, from_client in sequence:
        if f is None or not from_client or p.proto not in (6, 17):
            continue
        total_by_src[p.src] = total_by_src.get(p.src, 0) + 1
        c = _l4_checksum(p)
        if c is None or c[0] == c[1]:
            continue
        field, good, ps = c
        partial = field == ps or field == (~ps & 0xFFFF)
        if p.proto == 6:
            rep.bad_tcp += 1
        else:
            rep.bad_udp += 1
        rep.partial += partial
        p.csum_bad = True
        entry = bad_by_src.setdefault(p.src, [0, []])
        entry[0] += partial
        entry[1].append((p, good))
    if rep.mode == "verify":
        return
    for src, (partial, pkts) in bad_by_src.items():
        if rep.mode == "auto":
            if not partial and 2 * len(pkts) < total_by_src[src]:
                continue
            rep.offloaded.append(bytes(src))
        for p, good in pkts:
            if good < 0:
                continue          # IPv6 UDP without a checksum: not ours to invent
            buf = bytearray(p.raw)
            off = p.l4 + ck.CSUM_OFFSET[p.proto]
            buf[off:off + 2] = good.to_bytes(2, "big")
            p.raw = bytes(buf)
            p.csum_bad = False
            rep.completed += 1


# ------------------------------------------------------------------ the replay

class Replay:
    """Replays one capture.  After run(): flows, stack, stray, drops."""

    def __init__(self, packets, config: StackConfig | None = None, seed: int = 0, rng=None,
                 checksums: str = "auto"):
        if checksums not in CHECKSUM_MODES:
            raise ValueError(f"checksums: {checksums!r} is not one of {', '.join(CHECKSUM_MODES)}")
        self.packets = [parse_ip(ts, raw) for ts, raw in packets]
        self.flows, self.sequence, self.stray = split_flows(self.packets)
        self.checksums = ChecksumReport(checksums)
        prepare_checksums(self.sequence, self.checksums)
        self.stack = Stack(config or StackConfig(verify_checksums=True), rng=rng or random.Random(seed))
        self.by_key = {}              # 4-tuple -> its current flow (a capture may reuse one)
        self.by_reply_key = {}
        for f in reversed(self.flows):
            self.by_key[f.key] = f
            self.by_reply_key[(f.proto, f.key[2], f.key[3], f.key[0], f.key[1])] = f
        self.bad_output = 0           # stack packets that are not well-formed (checksums, lengths)
        self.unmatched_output = 0     # stack packets for no recorded flow
        self.output = []              # every packet the stack emitted: (ts, bytes)
        self._active = {}             # TCP flows the host holds an open handle of (ordered)
        self.now = packets[0][0] if packets else 0.0

    # ---------------------------------------------------------------- driving

    def run(self, drain_for: float = 600.0):
        st = self.stack
        for p, f, from_client in self.sequence:
            self._timers_until(p.ts)
            self.now = now = max(self.now, p.ts)     # a capture's clock may step back: ours does not
            if f is None:
                st.input(p.raw, now)      # the stack must cope (counts a drop)
                self._settle()
                continue
            if self.by_key[f.key] is not f:    # the 4-tuple's next connection (port reuse)
                self.by_key[f.key] = f
                self.by_reply_key[(f.proto, f.key[2], f.key[3], f.key[0], f.key[1])] = f
            if from_client:
                if f.proto == 6:
                    self._feed_tcp(f, p, now)
                else:
                    self._input(f, p.raw, now, p)
            else:
                self._server_acts(f, p)
            self._settle()
        # after the capture: let timers (retransmissions, TIME-WAIT, idle) run out
        end = self.now + drain_for
        for _ in range(100000):
            if all(self._done(f) for f in self.flows):
                break
            at = st.next_deadline()
            if at is None or at > end:
                break
            self.now = max(self.now, at)
            st.poll(self.now)
            self._settle()
        for f in self.flows:
            judge(f)
        return self

    def _done(self, f) -> bool:
        if f.proto == 17:
            return True
        return f.close_reason is not None or (f.handle is None and f.expected != "open" and f.refused)

    def _timers_until(self, t):
        st = self.stack
        for _ in range(10000):
            at = st.next_deadline()
            if at is None or at > t:
                return
            self.now = max(self.now, at)
            st.poll(self.now)
            self._settle()

    def _settle(self):
        """Poll, answer events and collect output until nothing changes."""
        st = self.stack
        for _ in range(1000):
            self._events()
            self._host_io()
            st.poll(self.now)
            self._events()
            out = st.take_output()
            for pkt in out:
                self._observe(pkt)
            if not self._synthesize_acks() and not out and not st.events:
                return

    # ------------------------------------------------------------------ host

    def _events(self):
        for e in self.stack.take_events():
            t = type(e)
            if t is ev.TcpConnectRequest:
                f = self.by_key.get(e.conn.key)
                if f is None or f.proto != 6:
                    e.conn.reject("rst")
                    continue
                f.handle = e.conn
                self._active[f] = None
                if f.refused:
                    kind = _unreachable(f.rec_icmp)
                    e.conn.reject("icmp-" + kind if kind else "rst")
                else:
                    e.conn.accept()
            elif t is ev.TcpReadable or t is ev.TcpWritable:
                pass                       # _host_io reads and writes every flow
            elif t is ev.TcpClosed:
                f = self.by_key.get(e.conn.key)
                if f is not None and f.handle is e.conn:
                    self._read_all(f)
                    f.close_reason = e.reason
                    self._active.pop(f, None)
            elif t is ev.UdpDatagram:
                f = self.by_key.get(e.flow.key)
                if f is not None:
                    f.handle = e.flow
                    f.host_datagrams.append(bytes(e.data))
                    kind = _unreachable(f.rec_icmp)
                    if kind is not None:
                        e.flow.reject(kind)
            elif t is ev.UdpClosed:
                f = self.by_key.get(e.flow.key)
                if f is not None:
                    f.close_reason = e.reason

    def _read_all(self, f):
        c = f.handle
        while c.readable:
            data = c.read()
            if not data:
                break
            f.received += data

    def _host_io(self):
        for f in self._active:
            c = f.handle
            if f.close_reason is not None or f.refused:
                continue
            self._read_all(f)
            if f.abort_due:
                f.abort_due = False
                c.abort()
                continue
            if f.written < f.write_limit:
                data = f.server_stream[f.written:f.write_limit]
                if data:
                    f.written += c.write(data)
            if f.shutdown_due and not f.shut and f.written >= len(f.server_stream):
                f.shut = True
                c.shutdown()

    def _server_acts(self, f, p):
        """A recorded server packet: the host does what that server did."""
        if p.icmp is not None:
            return                 # mirrored when the flow's request reached the host
        if f.proto == 17:
            if f.handle is not None:
                f.handle.send(p.payload)
            return
        if f.server_isn is None or p.flags & SYN:
            return
        if p.flags & RST:
            if f.handle is not None and f.close_reason is None:
                f.abort_due = True
            return
        end = _rel(p.seq, f.server_isn) - 1 + len(p.payload)
        if end > f.write_limit:
            f.write_limit = end
        if p.flags & FIN:
            f.shutdown_due = True

    # ---------------------------------------------------------------- client

    def _feed_tcp(self, f, p, now):
        if p.flags & SYN:
            f.last_client = p
            f.client_sent = max(f.client_sent, 1)
            f.client_wscale = tcp_options(p.opts).get(3, (0, None))[1]
            self._input(f, p.raw, now, p)
            return
        raw = self._translate(f, p)
        end = _rel(p.seq, f.client_isn) + len(p.payload) + (1 if p.flags & FIN else 0)
        if end > f.client_sent and end < 1 << 31:
            f.client_sent = end
        f.last_client = p
        self._input(f, raw, now, p)

    def _input(self, f, raw, now, p, note=""):
        """Feed one client packet to the stack, noting it (and whether the
        stack dropped it on arrival) in the flow's ladder."""
        st = self.stack
        d0, t0 = dict(st.drops), dict(st.tcp_drops)
        st.input(raw, now)
        why = _grown(d0, st.drops)
        if why:
            note = (note + ", " if note else "") + "dropped by the stack: " + why
        else:
            why = _grown(t0, st.tcp_drops)
            if why:
                note = (note + ", " if note else "") + "discarded by the connection: " + why
        f.ladder.append((now, True, p if raw is p.raw else parse_ip(now, raw), note))

    def _translate(self, f, p) -> bytes:
        """The client packet with its ACK, SACK edges and TS echo moved from
        the recorded server's sequence/timestamp space to the stack's."""
        if f.stack_isn is None or f.server_isn is None or not (p.flags & ACK):
            return p.raw
        rel = _rel(p.ack, f.server_isn)
        if rel >= 1 << 31:
            rel = 0
        if rel > f.ack_target:
            f.ack_target = rel
        ack_rel = min(rel, f.snd_max)
        if ack_rel < rel:
            f.lowered += 1
        if ack_rel > f.acked_to_stack:
            f.acked_to_stack = ack_rel
        buf = bytearray(p.raw)
        l4 = p.l4
        buf[l4 + wtcp.OFF_ACK:l4 + wtcp.OFF_ACK + 4] = ((f.stack_isn + ack_rel) & M32).to_bytes(4, "big")
        opts = tcp_options(p.opts)
        base = l4 + 20
        if 8 in opts and f.stack_tsval is not None:
            i, (_tsval, _ecr) = opts[8]
            buf[base + i + 6:base + i + 10] = f.stack_tsval.to_bytes(4, "big")
        if 5 in opts:
            i, blocks = opts[5]
            for j, (left, right) in enumerate(blocks):
                lr = min(_rel(left, f.server_isn), f.snd_max)
                rr = min(_rel(right, f.server_isn), f.snd_max)
                wtcp.SACK_EDGES.pack_into(buf, base + i + 2 + 8 * j, (f.stack_isn + lr) & M32, (f.stack_isn + rr) & M32)
        _fix_tcp_checksum(buf, p.family, l4)
        if p.csum_bad:
            buf[l4 + 17] ^= 1         # rewritten, it stays as wrong as captured (--checksums verify)
        self._advertised(f, ack_rel, p.wnd)
        return bytes(buf)

    def _advertised(self, f, ack_rel, wnd):
        edge = ack_rel + (wnd << f.wscale)
        if edge > f.right_edge:
            f.right_edge = edge

    def _synthesize_acks(self) -> bool:
        """Acknowledge, for the client, stack bytes the recording shows the
        client had acknowledged but which the stack had not sent back then."""
        fed = False
        for f in self._active:
            if (f.stack_isn is None or f.close_reason is not None or f.last_client is None
                    or f.last_client.flags & (SYN | RST)):
                continue
            want = min(f.ack_target, f.snd_max)
            if want <= f.acked_to_stack:
                continue
            f.acked_to_stack = want
            f.synthesized += 1
            self._advertised(f, want, f.last_client.wnd)
            raw = self._client_ack(f, want)
            self._input(f, raw, self.now, parse_ip(self.now, raw), "synthesized")
            fed = True
        return fed

    def _client_ack(self, f, ack_rel) -> bytes:
        lp = f.last_client
        c_src, c_port, s_dst, s_port = f.key
        tpl = TcpTemplate(f.family, c_src, s_dst, c_port, s_port, self.stack.config)
        opts = b""
        ts = tcp_options(lp.opts).get(8)
        if ts is not None:
            opts = build_options(ts=(ts[1][0], f.stack_tsval if f.stack_tsval is not None else 0))
        return tpl.build((f.client_isn + f.client_sent) & M32, (f.stack_isn + ack_rel) & M32, ACK, lp.wnd, opts, b"")

    # ---------------------------------------------------------------- output

    def _observe(self, pkt):
        """Record one packet the stack emitted toward the client."""
        pkt = bytes(pkt)
        self.output.append((self.now, pkt))
        p = parse_ip(self.now, pkt)
        if p.proto is None or not _checksum_ok(p):
            self.bad_output += 1
            return
        if p.icmp is not None:
            f = self.by_key.get(p.inner[1:]) if p.inner is not None else None
            if f is None or p.inner[0] != f.proto:
                self.unmatched_output += 1
            else:
                f.stack_icmp.append(p.icmp)
                f.ladder.append((self.now, False, p, ""))
            return
        f = self.by_reply_key.get((p.proto, p.src, p.sport, p.dst, p.dport))
        if f is None:
            self.unmatched_output += 1
            return
        f.ladder.append((self.now, False, p, ""))
        if f.proto == 17:
            f.stack_datagrams.append(bytes(p.payload))
            return
        f.stack_segments += 1
        if p.flags & SYN:
            f.stack_isn = p.seq
            f.syn_ack = (p.seq, p.ack if p.flags & ACK else None)
            f.snd_max = max(f.snd_max, 1)
            if f.client_wscale is not None and 3 in tcp_options(p.opts):
                f.wscale = f.client_wscale
            f.right_edge = max(f.right_edge, 1 + f.last_client.wnd if f.last_client is not None else 1)
        if p.flags & RST:
            f.stack_rst.append((p.seq, p.ack, p.flags))
        if f.stack_isn is None:
            return
        opts = tcp_options(p.opts)
        if 8 in opts:
            f.stack_tsval = opts[8][1][0]
        if p.flags & ACK:
            f.stack_acks.append((_rel(p.ack, f.client_isn), f.client_sent))
        if 5 in opts:
            f.stack_sacks.append((_rel(p.ack, f.client_isn), [(_rel(a, f.client_isn), _rel(b, f.client_isn)) for a, b in opts[5][1]],
                                  f.client_sent))
        if p.flags & SYN:
            return
        rel = _rel(p.seq, f.stack_isn)
        if rel >= 1 << 31:
            return
        f.stack_stream.put(rel - 1, bytes(p.payload))
        end = rel + len(p.payload)
        # flow control: nothing beyond the window the client offered (a
        # one-byte probe of a closed window is allowed, RFC 9293 3.8.6.1)
        if len(p.payload) and end > f.right_edge + (1 if len(p.payload) == 1 else 0):
            f.window_violations += 1
        if p.flags & FIN:
            f.stack_fin = end - 1
            end += 1
        if end > f.snd_max:
            f.snd_max = end


def _grown(before: dict, after: dict) -> str:
    """The counters that grew, by name ("" if none)."""
    return ", ".join(k for k, v in after.items() if v > before.get(k, 0))


def _fix_tcp_checksum(buf, family, l4):
    """Recompute the TCP checksum of the packet in *buf* (a bytearray) in
    place (family and l4 are the packet's own; kept for the callers)."""
    wip.fill(buf)


def _checksum_ok(p) -> bool:
    raw = p.raw
    if p.family == 4 and not wip4.header_ok(raw, p.l4):
        return False
    seg = memoryview(raw)[p.l4:p.end]
    if p.proto == 1:
        return ck.sum16(seg) == 0xFFFF
    if p.proto == 17 and raw[p.l4 + 6:p.l4 + 8] == b"\x00\x00":
        return p.family == 4      # no UDP checksum: allowed over IPv4 only
    return ck.sum16(seg, ck.pseudo(p.src, p.dst, p.proto, p.end - p.l4)) == 0xFFFF


# ------------------------------------------------------------------ verdicts

def judge(f) -> None:
    """Set f.outcome / f.ok / f.detail from what the replay saw."""
    if f.proto == 17:
        up = sum(map(len, f.client_datagrams))
        down = sum(map(len, f.server_datagrams))
        f.detail = f"{len(f.client_datagrams)} datagrams {up} B up, {len(f.server_datagrams)} datagrams {down} B down"
        if f.expected == "refused":
            want = f.rec_icmp
            if f.close_reason == "rejected" and f.stack_icmp[:1] == [want] and f.host_datagrams == f.client_datagrams[:1]:
                f.outcome, f.ok = "refused", True
            else:
                _incomplete(f, f"recorded as refused (ICMP {want}), stack sent {f.stack_icmp or 'no ICMP'}")
        elif f.host_datagrams != f.client_datagrams:
            _incomplete(f, f"host got {len(f.host_datagrams)} of {len(f.client_datagrams)} datagrams intact")
        elif f.stack_datagrams != f.server_datagrams:
            _incomplete(f, f"stack sent {len(f.stack_datagrams)} of {len(f.server_datagrams)} replies intact")
        else:
            f.outcome, f.ok = "completed", True
        return
    cs, ss = f.client_stream, f.server_stream
    got, sent = bytes(f.received), f.stack_stream.contiguous()
    f.detail = f"up {len(got)}/{len(cs)} B, down {len(sent)}/{len(ss)} B"
    if f.synthesized or f.lowered:
        f.detail += f", {f.lowered} ACKs lowered, {f.synthesized} synthesized"
    if f.expected == "refused" and f.rec_icmp is not None:
        if f.close_reason == "rejected" and f.stack_icmp[:1] == [f.rec_icmp]:
            f.outcome, f.ok = "refused", True
        else:
            _incomplete(f, f"recorded as refused (ICMP {f.rec_icmp}), stack sent {f.stack_icmp or 'no ICMP'}")
        return
    if f.expected == "refused":
        if f.close_reason == "rejected" and any(a == (f.client_isn + 1) & M32 and fl & RST for _, a, fl in f.stack_rst):
            f.outcome, f.ok = "refused", True
        else:
            _incomplete(f, f"recorded as refused, stack {'closed: ' + f.close_reason if f.close_reason else 'sent no RST'}")
        return
    if f.handle is None or f.syn_ack is None:
        _incomplete(f, "no SYN-ACK from the stack")
        return
    if f.syn_ack[1] != (f.client_isn + 1) & M32:
        _incomplete(f, "SYN-ACK does not ack the client's ISN+1")
        return
    if f.stack_stream.conflicts:
        _incomplete(f, "stack retransmitted different bytes")
        return
    if f.window_violations:
        _incomplete(f, f"stack sent {f.window_violations} segments beyond the client's window")
        return
    if f.expected == "reset":
        # the recording ends in a RST: everything the client sent before it
        # must have reached the host, in order
        if not cs.startswith(got):
            _incomplete(f, "host bytes differ from the client's")
        elif f.close_reason not in ("reset", "aborted"):
            _incomplete(f, f"recorded as reset, stack {'closed: ' + f.close_reason if f.close_reason else 'still open'}")
        elif not ss.startswith(sent):
            _incomplete(f, "stack bytes differ from the server's")
        else:
            f.outcome, f.ok = "reset", True
            f.detail += f", reset by the {f.rec_rst}"
        return
    if got != cs:
        where = next((i for i, (a, b) in enumerate(zip(got, cs)) if a != b), min(len(got), len(cs)))
        _incomplete(f, f"host got {len(got)} of {len(cs)} client bytes (first difference at {where})")
    elif sent != ss:
        _incomplete(f, f"stack sent {len(sent)} of {len(ss)} server bytes")
    elif f.expected == "open":
        f.outcome, f.ok = "incomplete: capture ends before the connection closed", False
    elif f.close_reason != "closed":
        state = getattr(f.handle, "state", "?")
        _incomplete(f, f"closed as {f.close_reason!r}" if f.close_reason else f"still {state}")
    elif f.stack_fin != len(ss):
        _incomplete(f, "stack sent no FIN after the server's bytes")
    else:
        f.outcome, f.ok = "completed", True


def _incomplete(f, why):
    f.outcome, f.ok = f"incomplete: {why}", False


# ------------------------------------------------------------------ CLI

def replay_file(path, config: StackConfig | None = None, checksums: str = "auto") -> Replay:
    return Replay(read_pcap(path), config, checksums=checksums).run()


# how a flow that did what the recording shows is named in the text report
OUTCOME_TEXT = {"completed": "completed", "refused": "refused as recorded", "reset": "reset as recorded"}


def summary(r: Replay) -> dict:
    """Counts of the flows' outcomes: completed / refused / reset (each as
    recorded) and not_completed."""
    out = {"completed": 0, "refused": 0, "reset": 0, "not_completed": 0}
    for f in r.flows:
        out[f.outcome if f.ok else "not_completed"] += 1
    return out


def stack_drops(r: Replay) -> dict:
    """The stack's non-zero drop counters (TCP ones prefixed "tcp.")."""
    drops = {k: v for k, v in r.stack.drops.items() if v}
    drops.update({"tcp." + k: v for k, v in r.stack.tcp_drops.items() if v})
    return drops


def drops_text(drops: dict) -> str:
    """"drops: bad_tcp_checksum 12, truncated 2" (largest first), or "drops: none"."""
    if not drops:
        return "drops: none"
    items = sorted(drops.items(), key=lambda kv: (-kv[1], kv[0]))
    return "drops: " + ", ".join(f"{k} {v}" for k, v in items)


def checksum_hint(r: Replay) -> str | None:
    """Why flows failed, when bad client checksums are the likely cause."""
    drops = r.stack.drops
    tcp, udp = drops.get("bad_tcp_checksum", 0), drops.get("bad_udp_checksum", 0)
    if not (tcp or udp) or all(f.ok for f in r.flows):
        return None
    what = ", ".join(x for x in (f"{tcp} packets had bad TCP checksums" if tcp else "",
                                 f"{udp} {'had' if tcp else 'packets had'} bad UDP checksums" if udp else "") if x)
    if r.checksums.mode == "ignore":
        return f"hint: {what} even with --checksums ignore: a damaged capture?"
    return f"hint: {what}: capture taken with checksum offload? try --checksums ignore"


def report(path, r: Replay, out=None) -> bool:
    out = out or sys.stdout
    print(f"{path}:", file=out)
    width = len(str(len(r.flows)))
    for i, f in enumerate(r.flows, 1):
        label = OUTCOME_TEXT.get(f.outcome, f.outcome) if f.ok else f.outcome
        print(f"  {i:>{width}} {f.text():52s} {label}  ({f.detail})", file=out)
    c = summary(r)
    parts = [f"{c['completed']} completed"]
    if c["refused"]:
        parts.append(f"{c['refused']} refused as recorded")
    if c["reset"]:
        parts.append(f"{c['reset']} reset as recorded")
    parts.append(f"{c['not_completed']} not completed")
    extra = f", {r.stray} packets outside flows" if r.stray else ""
    if r.bad_output:
        extra += f", {r.bad_output} malformed packets from the stack"
    print(f"  {len(r.flows)} flows: {', '.join(parts)}{extra}", file=out)
    line = r.checksums.text()
    if line:
        print(f"  {line}", file=out)
    print(f"  {drops_text(stack_drops(r))}", file=out)
    hint = checksum_hint(r)
    if hint:
        print(f"  {hint}", file=out)
    return c["not_completed"] == 0 and not r.bad_output


def flow_dict(f, number: int = 0) -> dict:
    """One flow's result as plain data (for --json); number: as in the text
    report and --ladder."""
    d = {"flow": number, "proto": "tcp" if f.proto == 6 else "udp",
         "client": _ip_text(f.family, f.key[0], f.key[1]), "server": _ip_text(f.family, f.key[2], f.key[3]),
         "outcome": f.outcome, "ok": f.ok, "close_reason": f.close_reason}
    if f.proto == 6:
        d.update(expected=f.expected, up=len(f.received), up_recorded=len(f.client_stream),
                 down=len(f.stack_stream.contiguous()), down_recorded=len(f.server_stream),
                 acks_lowered=f.lowered, acks_synthesized=f.synthesized)
    else:
        d.update(datagrams_up=len(f.host_datagrams), datagrams_up_recorded=len(f.client_datagrams),
                 datagrams_down=len(f.stack_datagrams), datagrams_down_recorded=len(f.server_datagrams))
    return d


def main(args) -> int:
    as_json = getattr(args, "json", False)
    mode = getattr(args, "checksums", None) or "auto"
    ladder, svg = getattr(args, "ladder", None), getattr(args, "svg", None)
    if (ladder is None) != (svg is None):
        print("tun2xray replay: --ladder FLOW and --svg FILE go together", file=sys.stderr)
        return 2
    if ladder is not None and len(args.pcap) != 1:
        print("tun2xray replay: --ladder draws a flow of one capture (give one file)", file=sys.stderr)
        return 2
    status = 0
    for path in args.pcap:
        try:
            packets = read_pcap(path)
        except ReplayError as e:
            print(f"tun2xray replay: {e}", file=sys.stderr)
            status = 2
            continue
        try:
            r = Replay(packets, checksums=mode).run()
        except Exception as e:  # a stack bug: say where, keep the other files going
            print(f"tun2xray replay: {path}: stack raised {type(e).__name__}: {e}", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            status = 1
            continue
        target = None
        if ladder is not None:
            from .ladder import LadderError, find_flow
            try:
                target = find_flow(r.flows, ladder)
            except LadderError as e:
                print(f"tun2xray replay: {path}: {e}", file=sys.stderr)
                return 2
        if as_json:
            import json
            ok = all(f.ok for f in r.flows) and not r.bad_output
            print(json.dumps({"file": path, "ok": ok, "flows": [flow_dict(f, i) for i, f in enumerate(r.flows, 1)],
                              "summary": summary(r), "checksums": r.checksums.as_dict(),
                              "drops": stack_drops(r), "hint": checksum_hint(r),
                              "stray_packets": r.stray, "bad_output": r.bad_output,
                              "stack": r.stack.status()}, default=str))
        else:
            ok = report(path, r)
        if not ok and status == 0:
            status = 1
        if target is not None:
            from .ladder import write_ladder
            try:
                i, f, n = write_ladder(target, svg, path)
            except OSError as e:
                print(f"tun2xray replay: --svg {svg}: {e.strerror or e}", file=sys.stderr)
                return 2
            print(f"ladder of flow {i} ({f.text()}, {n} packets) written to {svg}",
                  file=sys.stderr if as_json else sys.stdout)
    return status
