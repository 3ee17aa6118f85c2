"""The sans-I/O Stack: raw IP packets in, raw IP packets and flow events out.

    stack = Stack(StackConfig(), rng=random.Random(1))
    stack.input(packet, now)          # any number of times (or input_batch)
    for ev in stack.take_events(): …  # answer requests, read/write handles
    stack.poll(now)                   # timers + pending output of touched flows
    for pkt in stack.take_output(): device.write(pkt)
    deadline = stack.next_deadline()  # call poll(deadline) then, at the latest

The stack never reads a clock, never does I/O and never raises on bad
input: a packet it cannot use is dropped and counted in `drops` by reason.
"""

from __future__ import annotations

import heapq
import itertools
import random
import struct
from collections import defaultdict

from . import events as ev
from .config import StackConfig
from .wire import checksum as ck

_IP4 = struct.Struct("!BBHHHBBH4s4s")
_IP6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")

# TCP flag bits
FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20

PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_ICMP6 = 1, 6, 17, 58


class Stack:
    __slots__ = (
        "config", "rng", "now", "tcp", "udp", "output", "events", "drops", "tcp_drops", "delivered",
        "rx_packets", "rx_bytes", "tx_packets", "tx_bytes",
        "_heap", "_dirty", "_ids", "pending", "_frag",
    )

    def __init__(self, config: StackConfig | None = None, *, rng: random.Random | None = None):
        self.config = config or StackConfig()
        self.rng = rng or random.Random()
        self.now = 0.0
        self.tcp: dict = {}       # (src, sport, dst, dport) -> TcpConnection
        self.udp: dict = {}       # (src, sport, dst, dport) -> UdpFlow
        self.output: list = []    # packets for the device (bytes)
        self.events: list = []
        self.drops: defaultdict = defaultdict(int)        # packets discarded before reaching a flow
        self.tcp_drops: defaultdict = defaultdict(int)    # segments a TCP connection discarded
        self.delivered = 0                                # packets handed to a flow / answered
        self.rx_packets = self.rx_bytes = self.tx_packets = self.tx_bytes = 0
        self._heap: list = []     # (deadline, id, flow); stale entries skipped lazily
        self._dirty: dict = {}    # flows touched since the last poll (ordered: deterministic)
        self._ids = itertools.count(1)
        self.pending = 0          # TCP connect requests not yet answered
        self._frag = None         # fragment reassembler (netstack.wire.frag), created lazily

    # ------------------------------------------------------------------ host API

    def input(self, packet, now: float) -> None:
        """Process one raw IP packet (bytes-like) from the device."""
        self.now = now
        self.rx_packets += 1
        n = len(packet)
        self.rx_bytes += n
        if n == 0:
            self.drops["truncated"] += 1
            return
        mv = memoryview(packet)
        v = mv[0] >> 4
        if v == 4:
            self._input4(mv, n, now)
        elif v == 6:
            self._input6(mv, n, now)
        else:
            self.drops["bad_version"] += 1

    def input_batch(self, packets, now: float) -> None:
        inp = self.input
        for p in packets:
            inp(p, now)

    def poll(self, now: float) -> None:
        """Run expired timers and emit what flows touched since the last poll owe."""
        self.now = now
        if self._dirty:
            dirty = self._dirty
            self._dirty = {}
            for flow in dirty:
                if not flow.closed:
                    flow.flush(now)
                    self._reschedule(flow)
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, _, flow = heapq.heappop(heap)
            if flow._sched_at != at or flow.closed:
                continue
            flow._sched_at = None
            flow.on_timer(now)
            self._reschedule(flow)
        if self._frag is not None:
            self._frag.expire(now)

    def next_deadline(self) -> float | None:
        """When poll() must run next (None: only when a packet arrives)."""
        if self._dirty:
            return self.now
        heap = self._heap
        while heap:
            at, _, flow = heap[0]
            if flow._sched_at == at and not flow.closed:
                break
            heapq.heappop(heap)
        best = heap[0][0] if heap else None
        if self._frag is not None:
            f = self._frag.next_deadline()
            if f is not None and (best is None or f < best):
                best = f
        return best

    def take_output(self) -> list:
        out = self.output
        if out:
            self.output = []
            self.tx_packets += len(out)
        return out

    def take_events(self) -> list:
        evs = self.events
        if evs:
            self.events = []
        return evs

    def status(self) -> dict:
        tcp_states: dict = defaultdict(int)
        for c in self.tcp.values():
            tcp_states[c.state] += 1
        return {
            "rx_packets": self.rx_packets, "rx_bytes": self.rx_bytes,
            "tx_packets": self.tx_packets,
            "tcp_flows": len(self.tcp), "udp_flows": len(self.udp),
            "tcp_states": dict(tcp_states), "pending": self.pending,
            "drops": dict(self.drops), "tcp_drops": dict(self.tcp_drops),
            "delivered": self.delivered,
        }

    # ------------------------------------------------------------ for flows

    def _touch(self, flow) -> None:
        """A flow has output due at the next poll (host call, ACK owed)."""
        self._dirty[flow] = None

    def _reschedule(self, flow) -> None:
        at = flow.poll_at
        if at is not None and at != flow._sched_at:
            flow._sched_at = at
            heapq.heappush(self._heap, (at, flow.id, flow))

    def _next_id(self) -> int:
        return next(self._ids)

    # --------------------------------------------------------------- IPv4

    def _input4(self, mv, n, now):
        if n < 20:
            self.drops["truncated"] += 1
            return
        vihl, _tos, tot, _ident, frag, _ttl, proto, _hcs, src, dst = _IP4.unpack_from(mv)
        ihl = (vihl & 15) << 2
        if ihl < 20 or tot < ihl or tot > n:
            self.drops["bad_length"] += 1
            return
        if tot < n:
            mv = mv[:tot]
        if self.config.verify_checksums and ck.sum16(mv[:ihl]) != 0xFFFF:
            self.drops["bad_ip_checksum"] += 1
            return
        if frag & 0x3FFF:
            # TODO(stack): fragment reassembly through netstack.wire.frag
            self.drops["fragment"] += 1
            return
        if proto == PROTO_TCP:
            self._tcp_in(4, src, dst, mv, ihl, now)
        elif proto == PROTO_UDP:
            self._udp_in(4, src, dst, mv, ihl, now)
        elif proto == PROTO_ICMP:
            self._icmp4_in(src, dst, mv, ihl, now)
        else:
            self.drops["unsupported_protocol"] += 1

    # --------------------------------------------------------------- IPv6

    def _input6(self, mv, n, now):
        if n < 40:
            self.drops["truncated"] += 1
            return
        _vtf, plen, nxt, _hl, src, dst = _IP6.unpack_from(mv)
        if 40 + plen > n:
            self.drops["bad_length"] += 1
            return
        if 40 + plen < n:
            mv = mv[:40 + plen]
        off = 40
        # TODO(stack): walk extension headers (hop-by-hop, routing, dest opts, fragment)
        if nxt == PROTO_TCP:
            self._tcp_in(6, src, dst, mv, off, now)
        elif nxt == PROTO_UDP:
            self._udp_in(6, src, dst, mv, off, now)
        elif nxt == PROTO_ICMP6:
            self._icmp6_in(src, dst, mv, off, now)
        else:
            self.drops["unsupported_protocol"] += 1

    # ---------------------------------------------------------------- TCP
    # The TCP demux (`_tcp_in`) lives in netstack.tcp as tcp_input(stack, family,
    # src, dst, mv, off, now); it is bound below.

    def _tcp_remove(self, conn, reason: str) -> None:
        """Called by a connection when it leaves the flow table."""
        if self.tcp.get(conn.key) is conn:
            del self.tcp[conn.key]
        self.events.append(ev.TcpClosed(conn, reason))

    def icmp_unreachable(self, quote: bytes, kind: str) -> None:
        """Send an ICMP/ICMPv6 destination unreachable to the sender of the
        packet whose IP header + first 8 payload bytes are *quote*.
        kind: "port", "host", "net" or "admin"."""
        # TODO(stack): build with netstack.wire.icmp
        self.drops["icmp_unreachable_unimplemented"] += 1

    # ---------------------------------------------------------- UDP / ICMP

    def _udp_in(self, family, src, dst, mv, off, now):
        # TODO(stack): UDP flows
        self.drops["udp_unimplemented"] += 1

    def _icmp4_in(self, src, dst, mv, off, now):
        # TODO(stack): echo, destination unreachable, fragmentation needed
        self.drops["icmp_unimplemented"] += 1

    def _icmp6_in(self, src, dst, mv, off, now):
        # TODO(stack): echo, destination unreachable, packet too big
        self.drops["icmp_unimplemented"] += 1


from .tcp import tcp_input  # noqa: E402  (netstack.tcp imports this module's constants)

Stack._tcp_in = tcp_input
