"""Reading a capture into packets and flows, for the replay.

A pcap/pcapng file is read by the device pcap reader (read_pcap), each IP
packet parsed with netstack.wire into a Pkt (parse_ip, with the packet an
ICMP error quotes), and the packets grouped into flows (split_flows): the
client of a flow is the side that sent the SYN (TCP) or the first datagram
(UDP); a new SYN on a used 4-tuple starts a new flow.  Each Flow keeps what
was recorded (both sides' byte streams as Stream, FINs, RSTs, the server's
ICMP error) next to the fields the replay fills in.
"""

from __future__ import annotations

import ipaddress

from netstack.wire import icmp as wicmp
from netstack.wire import ipv4 as wip4
from netstack.wire import ipv6 as wip6
from netstack.wire import tcp as wtcp
from netstack.wire import udp as wudp
from netstack.wire.errors import WireError

from ..device import pcap as _pcap

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
