"""The sans-I/O Stack: raw IP packets in, raw IP packets and flow events out.

    stack = Stack(StackConfig(), rng=random.Random(1))
    stack.input(packet, now)          # any number of times (or input_batch)
    for ev in stack.take_events(): …  # answer requests, read/write handles
    stack.poll(now)                   # timers + pending output of touched flows
    for pkt in stack.take_output(): device.write(pkt)
    deadline = stack.next_deadline()  # call poll(deadline) then, at the latest

The stack never reads a clock, never does I/O and never raises on bad
input: a packet it cannot use is dropped and counted in `drops` by reason.

Accounting invariant (tests/test_stack_accounting.py and the fuzz test check
it after every call): each packet given to input() increments exactly one of

  drops[reason]   discarded before reaching a flow (malformed, bad checksum,
                  bad source, unsupported, over a limit, ignored ND/MLD, ...)
  delivered       handed to a flow (TCP segment to a connection or a new
                  request, UDP datagram to a flow, ICMP error to the flow it
                  quotes) or answered by the stack itself (echo reply)
  frag_held       a fragment the reassembler took without completing a
                  datagram; the fragment that completes one is counted by the
                  reassembled datagram's fate instead, and what the
                  reassembler later discards (timeouts, overlaps, limits) is
                  in `frag_drops`, outside the sum

so rx_packets == sum(drops.values()) + delivered + frag_held.  Discards
inside a TCP connection (out of window, PAWS, ...) are in `tcp_drops`, on
top of the `delivered` of their segment.

Memory is bounded by configuration: flows (TCP + UDP) by max_flows (UDP
flows also by max_udp_flows: a new one evicts the least recently used, so a
flood of distinct UDP flows never locks out a DNS query or a TCP flow), the
bytes buffered by `budget` (netstack.budget: windows shrink near it, new
flows are refused at it), pending
requests by max_pending (per destination and per source too: see
netstack.admission), reassembly by frag_max_*, and the timer heap holds one
live entry per flow plus stale entries that are compacted away.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import defaultdict, deque
from operator import attrgetter

from . import events as ev
from .admission import Admission
from .budget import MemoryBudget
from .config import StackConfig
from .host import StackHost
from .icmp import icmp4_input, icmp6_input
from .icmp import unreachable as icmp_unreachable
from .reassembly import Reassembler as _Reassembler
from .udp import QUOTE_DATA, UdpFlow
from .wire import checksum as ck
from .wire.errors import WireError
from .wire.ipv4 import header_ok as _ip4_header_ok
from .wire.ipv4 import fields as _ip4_fields
from .wire.ipv4 import unpack as _ip4
from .wire.ipv6 import fields as _ip6_fields
from .wire.ipv6 import unpack as _ip6
from .wire.ipv6 import walk as _walk6
from .wire.tcp import TcpOptions
from .wire.udp import parse as _udp

# TCP flag bits
FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20

PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_FRAG6, PROTO_ICMP6, PROTO_NONE6 = 1, 6, 17, 44, 58, 59


class Stack:
    __slots__ = (
        "config", "_rng", "now", "tcp", "udp", "output", "events", "drops", "tcp_drops", "delivered",
        "rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "frag_held", "frag_drops",
        "_heap", "_dirty", "_ids", "pending", "_frag", "_ip_id", "tcp_host", "admission",
        "budget", "udp_evicted", "ts_opts", "_tw", "_requests",
    )

    def __init__(self, config: StackConfig | None = None, *, rng: random.Random | None = None):
        self.config = config or StackConfig()
        self._rng = rng or random.Random()
        self.now = 0.0
        self.tcp: dict = {}       # (src, sport, dst, dport) -> TcpConnection
        self.udp: dict = {}       # (src, sport, dst, dport) -> UdpFlow
        self.output: list = []    # packets for the device (bytes)
        self.events: list = []
        self.drops: defaultdict = defaultdict(int)        # packets discarded before reaching a flow
        self.tcp_drops: defaultdict = defaultdict(int)    # segments a TCP connection discarded
        self.delivered = 0                                # packets handed to a flow / answered
        self.frag_held = 0                                # fragments taken by the reassembler
        self.frag_drops: defaultdict = defaultdict(int)   # what the reassembler discarded, by reason
        self.rx_packets = self.rx_bytes = self.tx_packets = self.tx_bytes = 0
        self._heap: list = []     # (deadline, id, flow); stale entries skipped lazily
        # two timers every TCP connection has, each the same length for all
        # of them, in FIFO queues of (deadline, id, conn) instead of the
        # heap: deadlines arrive in order, so the queues stay sorted (stale
        # entries are skipped like the heap's).  TIME_WAIT (config.time_wait)
        # and an unanswered request's connect timeout (config.connect_timeout)
        self._tw: deque = deque()
        self._requests: deque = deque()
        self._dirty: dict = {}    # flows touched since the last poll (ordered: deterministic)
        self._ids = itertools.count(1)
        self.pending = 0          # TCP connect requests not yet answered
        self._frag = None         # fragment reassembler (netstack.reassembly), created lazily
        self._ip_id = self._rng.getrandbits(32)   # IP identification for datagrams we build
        self.admission = Admission(self.config)  # which connect requests may wait (fairness)
        self.budget = MemoryBudget(self.config.memory_budget)   # bytes buffered, all flows together
        self.udp_evicted = 0      # UDP flows closed to make room for a new flow (least recently used)
        self.tcp_host = StackHost(self)          # what a TCP connection may do to the stack
        # the options of a segment that carries only NOP NOP TS (the demux's
        # fast path fills this one object in place; a connection reads a
        # segment's options while it handles it and never keeps them)
        self.ts_opts = TcpOptions()

    @property
    def rng(self) -> random.Random:
        """The random source (ISNs, timestamp offsets, IP ids)."""
        return self._rng

    @rng.setter
    def rng(self, rng: random.Random) -> None:
        # a test may inject its own after construction: the flows' host follows
        self._rng = rng
        self.tcp_host.rng = rng

    # ------------------------------------------------------------------ host API

    def input(self, packet, now: float) -> None:
        """Process one raw IP packet (bytes-like) from the device.

        The common case, an unfragmented TCP or UDP packet, runs through
        here without a method of its own: one netstack.wire parse per header
        and one call into the demux (a Python call costs about as much as
        parsing a header).  IPv6 extension headers, ICMPv6 and fragments
        leave for _input6_ext and _fragment."""
        self.now = now
        self.rx_packets += 1
        n = len(packet)
        self.rx_bytes += n
        if n == 0:
            self.drops["truncated"] += 1
            return
        mv = memoryview(packet)
        b0 = mv[0]
        if b0 >> 4 == 4:
            try:
                if b0 == 0x45 and n >= 20:
                    # the fast form for a header without options; what it
                    # cannot vouch for goes through the checked unpack
                    _, tot, frag, proto, src, dst = _ip4_fields(mv)
                    off = 20
                    if tot > n or tot < 20:
                        off, tot, frag, proto, src, dst = _ip4(mv)
                else:
                    off, tot, frag, proto, src, dst = _ip4(mv)
            except WireError as e:
                self.drops[e.reason] += 1
                return
            if tot < n:
                mv = mv[:tot]
            if self.config.verify_checksums and not _ip4_header_ok(mv, off):
                self.drops["bad_ip_checksum"] += 1
                return
            if src[0] >= 224 or src == _ZERO4:
                # multicast, reserved/broadcast or unspecified: no flow can answer it
                self.drops["bad_source"] += 1
                return
            if frag & 0x3FFF:
                self._fragment(mv, now)
                return
            family = 4
        elif b0 >> 4 == 6:
            try:
                if n >= 40:
                    _, plen, proto, src, dst = _ip6_fields(mv)     # the fast form, checked next
                    if 40 + plen > n:
                        plen, proto, src, dst = _ip6(mv)
                else:
                    plen, proto, src, dst = _ip6(mv)
            except WireError as e:
                self.drops[e.reason] += 1
                return
            if 40 + plen < n:
                mv = mv[:40 + plen]
            if src[0] == 0xFF or src == _ZERO6:
                self.drops["bad_source"] += 1
                return
            if proto != PROTO_TCP and proto != PROTO_UDP:
                self._input6_ext(src, dst, mv, now)
                return
            off = 40
            family = 6
        else:
            self.drops["bad_version"] += 1
            return
        if proto == PROTO_TCP:
            self._tcp_in(family, src, dst, mv, off, now)
        elif proto == PROTO_UDP:
            self._udp_in(family, src, dst, mv, off, now)
        elif proto == PROTO_ICMP:          # IPv4 only: IPv6's went to _input6_ext
            icmp4_input(self, src, dst, mv, off, now)
        else:
            self.drops["unsupported_protocol"] += 1

    def input_batch(self, packets, now: float) -> None:
        """input() for each packet, in order; runs of one TCP flow's
        segments take the demux's flow cache (netstack.tcp.demux.tcp_batch)
        past the per-packet parse."""
        _tcp_batch(self, packets, now)

    def poll(self, now: float) -> None:
        """Run expired timers and emit what flows touched since the last poll owe."""
        self.now = now
        if self._dirty:
            dirty = self._dirty
            # a fresh dict; the flows' host touches it from now on
            self._dirty = fresh = {}
            self.tcp_host.dirty = fresh
            for flow in dirty:
                if not flow.closed:
                    flow.flush(now)
                    at = flow.poll_at
                    if at is not None and at != flow._sched_at:
                        self._reschedule(flow)
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, _, flow = heapq.heappop(heap)
            if flow._sched_at != at or flow.closed:
                continue
            flow._sched_at = None
            flow.on_timer(now)
            self._reschedule(flow)
        q = self._requests
        if q:
            # most requests are answered at once: their entries go stale
            # in order and leave from the front now, not at their deadline
            # (what a stale entry holds, its connection, is freed sooner)
            at, _, conn = q[0]
            if at <= now or conn.conn_at != at or conn.closed:
                self._queue_due(q, _CONN_AT, now)
        q = self._tw
        if q and q[0][0] <= now:
            self._queue_due(q, _TW_AT, now)
        if self._frag is not None:
            self._frag.expire(now)
        b = self.budget
        if b.used > b.peak:                    # budget.sample(), without the call
            b.peak = b.used
        n = len(heap)
        if n > _HEAP_SLACK and n > _HEAP_SLACK + 2 * (len(self.tcp) + len(self.udp)):
            self._compact_heap()

    def _queue_due(self, q, deadline_of, now) -> None:
        """The due entries of a timer queue: the connection's on_timer runs
        (netstack.tcp.timers: TIME_WAIT over, request timed out); stale
        entries leave on the way (_queue_front)."""
        while True:
            at = _queue_front(q, deadline_of)
            if at is None or at > now:
                return
            conn = q.popleft()[2]
            conn.on_timer(now)
            if not conn.closed:
                self._reschedule(conn)

    def _compact_heap(self) -> None:
        """Drop stale timer entries (flows closed or rescheduled) at once."""
        heap = [e for e in self._heap if e[2]._sched_at == e[0] and not e[2].closed]
        heapq.heapify(heap)
        self._heap = heap

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
        for q, deadline_of in ((self._requests, _CONN_AT), (self._tw, _TW_AT)):
            at = _queue_front(q, deadline_of)
            if at is not None and (best is None or at < best):
                best = at
        if self._frag is not None:
            f = self._frag.next_deadline()
            if f is not None and (best is None or f < best):
                best = f
        return best

    def take_output(self) -> list:
        out = self.output
        b = self.budget
        if b.out:
            b.sample()
            b.used -= b.out
            b.out = 0
        if out:
            # a fresh list; the flows' host appends to it from now on
            self.output = fresh = []
            self.tcp_host.out = fresh
            self.tx_packets += len(out)
            self.tx_bytes += sum(map(len, out))
        return out

    def take_events(self) -> list:
        evs = self.events
        if evs:
            self.events = fresh = []
            self.tcp_host.events = fresh
        return evs

    def status(self) -> dict:
        tcp_states: dict = defaultdict(int)
        for c in self.tcp.values():
            tcp_states[str(getattr(c, "state", "?"))] += 1
        return {
            "rx_packets": self.rx_packets, "rx_bytes": self.rx_bytes,
            "tx_packets": self.tx_packets, "tx_bytes": self.tx_bytes,
            "tcp_flows": len(self.tcp), "udp_flows": len(self.udp),
            "tcp_states": dict(tcp_states), "pending": self.pending, "pending_shed": self.admission.shed,
            "drops": dict(self.drops), "tcp_drops": dict(self.tcp_drops),
            "delivered": self.delivered,
            "frag_held": self.frag_held, "frag_drops": dict(self.frag_drops),
            "timers": len(self._heap) + len(self._tw) + len(self._requests),
            "udp_evicted": self.udp_evicted,
            "memory": {**self.budget.status(), "refused": self.drops.get("memory_budget", 0)},
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

    def _next_ip_id(self) -> int:
        """Identification for a UDP/ICMP datagram we send (v4 uses the low 16
        bits, a v6 fragment header all 32): one counter for the whole stack,
        so no two flows' fragments share one."""
        i = self._ip_id = (self._ip_id + 1) & 0xFFFFFFFF
        return i

    # --------------------------------------------------------------- IPv6

    def _input6_ext(self, src, dst, mv, now):
        """An IPv6 packet whose next header is not TCP or UDP: its extension
        headers walked once (netstack.wire.ipv6.walk), then the transport,
        ICMPv6, or the reassembler."""
        drops = self.drops
        try:
            nxt, off, is_frag = _walk6(mv)
        except WireError as e:
            drops[e.reason] += 1
            return
        if is_frag:
            self._fragment(mv, now)
        elif nxt == PROTO_TCP:
            self._tcp_in(6, src, dst, mv, off, now)
        elif nxt == PROTO_UDP:
            self._udp_in(6, src, dst, mv, off, now)
        elif nxt == PROTO_ICMP6:
            icmp6_input(self, src, dst, mv, off, now)
        elif nxt == PROTO_NONE6:
            drops["no_next_header"] += 1
        else:
            drops["unsupported_protocol"] += 1

    # ---------------------------------------------------------- fragments

    def _fragment(self, mv, now):
        """An IPv4 or IPv6 fragment: held until its datagram is whole, which
        then goes through input() again (it counts as that last fragment)."""
        fr = self._frag
        if fr is None:
            fr = self._frag = _Reassembler(self.config, self.frag_drops)
        whole = fr.add(mv, now)
        if whole is None:
            self.frag_held += 1
        else:
            # input() again, counted as the fragment that completed it (which
            # input() already counted): take its own counts back first
            self.rx_packets -= 1
            self.rx_bytes -= len(whole)
            self.input(whole, now)

    # ---------------------------------------------------------------- TCP
    # The TCP demux (`_tcp_in`) is netstack.tcp.demux.tcp_input(stack, family,
    # src, dst, mv, off, now), bound below.

    def _tcp_remove(self, conn, reason: str) -> None:
        """Called by a connection when it leaves the flow table."""
        if self.tcp.get(conn.key) is conn:
            del self.tcp[conn.key]
        self.events.append(ev.TcpClosed(conn, reason))

    def icmp_unreachable(self, quote, kind: str) -> None:
        """Send an ICMP/ICMPv6 destination unreachable to the sender of the
        packet whose IP header + first 8 (or more) payload bytes are *quote*.
        kind: "port", "host", "net" or "admin" (ValueError otherwise)."""
        icmp_unreachable(self, quote, kind)

    # ---------------------------------------------------------------- UDP

    def _udp_in(self, family, src, dst, mv, off, now):
        drops = self.drops
        try:
            sport, dport, ulen, csum = _udp(mv, off)
        except WireError as e:
            drops[e.reason] += 1
            return
        if self.config.verify_checksums:
            if csum == 0:
                if family == 6:              # RFC 8200 §8.1: mandatory in IPv6
                    drops["bad_udp_checksum"] += 1
                    return
            else:
                if ck.sum16(mv[off:off + ulen], ck.pseudo(src, dst, PROTO_UDP, ulen)) != 0xFFFF:
                    drops["bad_udp_checksum"] += 1
                    return
        if sport == 0 or dport == 0:
            drops["bad_udp_port"] += 1
            return
        if (dst[0] >= 224 or dst == _BCAST4) if family == 4 else dst[0] == 0xFF:
            # multicast / limited broadcast (mDNS, SSDP, DHCP): no proxy can carry it
            drops["udp_multicast"] += 1
            return
        key = (src, sport, dst, dport)
        flow = self.udp.get(key)
        if flow is None:
            cfg = self.config
            if self.budget.full:
                drops["memory_budget"] += 1
                self.icmp_unreachable(bytes(mv[:off + 8 + QUOTE_DATA]), "port")
                return
            if (0 < cfg.max_udp_flows <= len(self.udp)
                    or len(self.tcp) + len(self.udp) >= cfg.max_flows) and not self._udp_evict():
                drops["flow_limit"] += 1
                return
            flow = UdpFlow(self, key, family, bytes(mv[:off + 8 + QUOTE_DATA]), now)
            self.udp[key] = flow
            self._reschedule(flow)
            new = True
        else:
            new = False
        data = bytes(mv[off + 8:off + ulen])
        flow.bytes_in += ulen - 8
        flow.packets_in += 1
        flow.last_seen = now
        self.events.append(ev.UdpDatagram(flow, data, new))
        self.delivered += 1


    def _udp_evict(self) -> bool:
        """Close the least recently used UDP flow to make room for a new flow;
        False when there is none.  The table is in insertion order; a flow at
        the front that saw a datagram since it was put there (`last_seen` past
        its `lru_at`) goes to the back instead, so the first one found
        untouched is the least recently used: no per-datagram work, each move
        paid for by a datagram that moved `last_seen`."""
        udp = self.udp
        for _ in range(len(udp) + 1):
            if not udp:
                return False
            key = next(iter(udp))
            flow = udp[key]
            if flow.last_seen > flow.lru_at:
                del udp[key]
                udp[key] = flow
                flow.lru_at = flow.last_seen
                continue
            self.udp_evicted += 1
            flow._close("evicted")
            return True
        return False


_HEAP_SLACK = 4096               # stale timer entries tolerated before a compaction
_TW_AT = attrgetter("tw_at")     # the deadline a TIME_WAIT queue entry is live for
_CONN_AT = attrgetter("conn_at")  # ... and a request queue entry


def _queue_front(q, deadline_of):
    """The deadline of a timer queue's first live entry, None when there is
    none. An entry whose timer was restarted or cleared (deadline_of(conn)
    moved), or whose connection closed, is stale and leaves the front."""
    while q:
        at, _, conn = q[0]
        if deadline_of(conn) == at and not conn.closed:
            return at
        q.popleft()
    return None
_ZERO4 = bytes(4)
_BCAST4 = b"\xff\xff\xff\xff"
_ZERO6 = bytes(16)

from .tcp.demux import tcp_batch as _tcp_batch  # noqa: E402
from .tcp.demux import tcp_input  # noqa: E402

Stack._tcp_in = tcp_input
