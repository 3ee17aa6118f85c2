"""The narrow interface between a flow (TcpConnection, UdpFlow) and the
Stack that holds it.  A flow never reaches into the stack: everything it may
do to its surroundings goes through its `host`.

    host.config            the StackConfig (read only)
    host.budget            the stack's MemoryBudget (netstack.budget): a flow
                           adds the bytes it buffers and subtracts what it frees
    host.rng               the injected random source (ISNs, timestamps)
    host.next_id()         a fresh flow id (timer-heap tie breaker)
    host.emit(packet)      queue a packet for the device
    host.event(ev)         queue an event for the application
    host.drop(reason)      count a segment the flow discarded (tcp_drops)
    host.touch(flow)       the flow owes output: flush it at the next poll
    host.request(conn)     a new connect request (counts it as pending and
                           raises TcpConnectRequest)
    host.answered(conn)    the request was accepted (conn.state is then
                           SYN_RECEIVED: half open), rejected, shed or timed out
    host.synchronized(conn)  a half-open connection completed its handshake or closed
    host.icmp_unreachable(quote, kind)   an ICMP error quoting a packet
    host.closed(flow, reason)  the flow left the table (called exactly once)

`emit` and `event` are the bound `append` of the stack's current output and
event lists (the stack rebinds them when `take_output` / `take_events` hand
a list over), so the per-packet path costs what `stack.output.append` cost;
`touch` likewise is the bound `setdefault` of the stack's current set of
touched flows (an insertion-ordered dict, rebound by `poll`).
"""

from __future__ import annotations

from . import events as _ev


class StackHost:
    __slots__ = ("config", "budget", "next_id", "emit", "event", "touch", "_stack", "_drops", "_admission")

    def __init__(self, stack):
        self._stack = stack
        self.config = stack.config
        self.budget = stack.budget
        self.next_id = stack._next_id
        self.emit = stack.output.append
        self.event = stack.events.append
        self.touch = stack._dirty.setdefault       # touch(flow): _dirty[flow] = None, in C
        self._drops = stack.tcp_drops
        self._admission = stack.admission

    @property
    def rng(self):
        return self._stack.rng          # read at use: a test may inject its own after construction

    def drop(self, reason: str) -> None:
        self._drops[reason] += 1

    def request(self, conn) -> None:
        self._stack.pending += 1
        self._admission.add(conn)
        self.event(_ev.TcpConnectRequest(conn))

    def answered(self, conn) -> None:
        self._stack.pending -= 1
        adm = self._admission
        adm.remove(conn)
        if conn.state == "SYN_RECEIVED":
            victim = adm.add_half_open(conn)
            if victim is not None:
                victim.shed()

    def synchronized(self, conn) -> None:
        self._admission.half_open.pop(conn, None)

    def icmp_unreachable(self, quote, kind: str) -> None:
        self._stack.icmp_unreachable(quote, kind)

    def closed(self, flow, reason: str) -> None:
        self._stack._tcp_remove(flow, reason)
