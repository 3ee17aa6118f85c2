"""The narrow interface between a flow (TcpConnection, UdpFlow) and the
Stack that holds it.  A flow never reaches into the stack: everything it may
do to its surroundings goes through its `host`.

    host.config            the StackConfig (read only)
    host.budget            the stack's MemoryBudget (netstack.budget): a flow
                           adds the bytes it buffers and subtracts what it frees
    host.rng               the injected random source (ISNs, timestamps)
    host.next_id()         a fresh flow id (timer-heap tie breaker)
    host.out.append(packet)   queue a packet for the device
    host.events.append(ev)    queue an event for the application
    host.drop(reason)      count a segment the flow discarded (tcp_drops)
    host.dirty[flow] = None   the flow owes output: flush it at the next poll
    host.tw_queue, host.request_queue   the two timers of the same length
                           for every connection (TIME_WAIT, the connect
                           timeout of an unanswered request): a connection
                           appends (deadline, id, conn) instead of arming
                           poll_at, and the stack's poll calls its on_timer
                           at that deadline
    host.request(conn)     a new connect request (counts it as pending and
                           raises TcpConnectRequest)
    host.answered(conn)    the request was accepted (conn.state is then
                           SYN_RECEIVED: half open), rejected, shed or timed out
    host.synchronized(conn)  a half-open connection completed its handshake or closed
    host.icmp_unreachable(quote, kind)   an ICMP error quoting a packet
    host.closed(flow, reason)  the flow left the table (called exactly once)

`out`, `events` and `dirty` are the stack's current output list, event
list and insertion-ordered dict of touched flows (the stack points them at
fresh ones when take_output, take_events and poll hand theirs over), so the
per-packet path costs what `stack.output.append` cost: attribute loads and
a list append that CPython specializes.  (A bound method kept in a slot,
`host.emit(packet)`, would be looked up the slow way on every call.)
"""

from __future__ import annotations

from . import events as _ev


class StackHost:
    __slots__ = ("config", "budget", "rng", "next_id", "out", "events", "dirty", "tw_queue", "request_queue",
                 "closed", "_stack", "_drops", "_admission")

    def __init__(self, stack):
        self._stack = stack
        self.config = stack.config
        self.rng = stack.rng            # Stack.rng's setter keeps it current
        self.budget = stack.budget
        self.next_id = stack._ids.__next__     # a C call, not a method around it
        self.out = stack.output
        self.events = stack.events
        self.dirty = stack._dirty
        self.tw_queue = stack._tw
        self.request_queue = stack._requests
        self._drops = stack.tcp_drops
        self._admission = stack.admission
        # once per connection: the stack's method itself (one frame, not a
        # method of ours calling it)
        self.closed = stack._tcp_remove

    def drop(self, reason: str) -> None:
        self._drops[reason] += 1

    def request(self, conn) -> None:
        self._stack.pending += 1
        self._admission.add(conn)
        self.events.append(_ev.TcpConnectRequest(conn))

    def answered(self, conn) -> None:
        self._stack.pending -= 1
        victim = self._admission.remove(conn, conn.state == "SYN_RECEIVED")
        if victim is not None:
            victim.shed()

    def synchronized(self, conn) -> None:
        self._admission.half_open.pop(conn, None)

    def icmp_unreachable(self, quote, kind: str) -> None:
        self._stack.icmp_unreachable(quote, kind)
