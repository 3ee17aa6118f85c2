"""Admission of TCP connect requests: who may wait for the host, who gives way.

A request is pending from its SYN until the host accepts or rejects it (the
engine answers once its upstream dial succeeds or fails).  A destination that
never answers -- a blackholed address -- keeps its requests pending until the
connect timeout, so without a rule one flood towards it would fill the table
and every SYN towards anywhere else would be dropped.  The rules:

  * at most `max_pending_per_dst` requests wait for one destination
    (address, port) and `max_pending_per_src` for one client address: a SYN
    over either bound is dropped and counted (the client retransmits it
    later; a healthy destination answers the earlier ones meanwhile);
  * at most `max_pending` wait in all.  A SYN that finds the table full is
    admitted by shedding the oldest request of the destination holding the
    most (RST to that client, TcpClosed "shed") -- unless the SYN itself goes
    to a destination holding the most, in which case it is dropped.  So a
    flood towards one place never blocks a SYN towards another.

Half-open connections -- accepted (the host dialled its upstream), SYN-ACK
sent, the client's ACK still missing, as a spoofed SYN flood leaves them --
are bounded too: at most `max_half_open`; one more sheds the oldest (RST both
ways), and their SYN-ACK is retried at most `synack_retries` times.

Requests are kept in insertion-ordered dicts per destination and per source,
so "oldest" is the first key and removal is O(1); finding the destination
holding the most is a scan over destinations, done only when the table is full.
"""

from __future__ import annotations


_ADMIT = (None, None)


class Admission:
    __slots__ = ("max_pending", "per_dst", "per_src", "by_dst", "by_src", "shed", "max_half_open",
                 "half_open")

    def __init__(self, config):
        self.max_pending = config.max_pending
        self.per_dst = config.max_pending_per_dst
        self.per_src = config.max_pending_per_src
        self.by_dst: dict = {}      # (dst, dport) -> {conn: None}, oldest first
        # src -> {conn: None}; not kept when the per-source bound cannot bind
        # before the global one does (the default: one client address)
        self.by_src: dict | None = {} if self.per_src < self.max_pending else None
        self.shed = 0               # requests and half-open connections that gave way to newer ones
        self.max_half_open = config.max_half_open
        self.half_open: dict = {}   # {conn: None} in SYN_RECEIVED, oldest first

    def add(self, conn) -> None:
        """A new request is pending."""
        k = (conn.dst, conn.dport)
        d = self.by_dst.get(k)
        if d is None:
            self.by_dst[k] = {conn: None}
        else:
            d[conn] = None
        if self.by_src is not None:
            s = self.by_src.get(conn.src)
            if s is None:
                self.by_src[conn.src] = {conn: None}
            else:
                s[conn] = None

    def remove(self, conn, half_open: bool = False):
        """A request is no longer pending (answered, shed, timed out, reset).
        With half_open (it was accepted: SYN_RECEIVED) it is counted as
        half open; returns the oldest half-open connection to shed when
        there are now too many (or None)."""
        k = (conn.dst, conn.dport)
        d = self.by_dst.get(k)
        if d is not None and d.pop(conn, 0) is None and not d:
            del self.by_dst[k]
        if self.by_src is not None:
            s = self.by_src.get(conn.src)
            if s is not None and s.pop(conn, 0) is None and not s:
                del self.by_src[conn.src]
        if half_open:
            h = self.half_open
            h[conn] = None
            if len(h) > self.max_half_open:
                victim = next(iter(h))
                del h[victim]
                self.shed += 1
                return victim
        return None

    def check(self, src, dst, dport, pending: int):
        """For a SYN from src to (dst, dport) with `pending` requests waiting:
        (drop reason, None) to refuse it, or (None, victim) to admit it once
        victim (a request to shed, or None) is gone."""
        d = self.by_dst.get((dst, dport))
        nd = len(d) if d is not None else 0
        if nd >= self.per_dst:
            return "tcp_pending_per_destination", None
        if pending < self.max_pending and self.by_src is None:
            return _ADMIT                # the common case: room, no per-source bound
        victim = None
        if pending >= self.max_pending:
            most = None
            n_most = 0
            for reqs in self.by_dst.values():
                if len(reqs) > n_most:
                    most, n_most = reqs, len(reqs)
            if most is None or nd >= n_most:
                return "tcp_backlog_full", None
            victim = next(iter(most))
        s = self.by_src.get(src) if self.by_src is not None else None
        if s is not None and len(s) - (victim in s) >= self.per_src:
            return "tcp_pending_per_source", None
        if victim is not None:
            self.shed += 1
        return None, victim
