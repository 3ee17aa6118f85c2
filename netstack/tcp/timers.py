"""TCP timers (RFC 6298 retransmission, RFC 9293 §3.8.6.1 persist, RFC 1122 keepalive, TIME_WAIT)."""

from __future__ import annotations

from bisect import insort

from ..seq import HALF as _HALF
from ..seq import MASK as _M
from ..seq import seq_sub as _sdiff
from .const import (
    ACK, KEEPALIVE_STATES, LISTEN, PSH, SEND_STATES, SYN_RECEIVED, TIME_WAIT,
)


class TcpTimers:
    """The connection's timers: one deadline (poll_at) over retransmission, persist, delayed
    ACK, keepalive, TIME_WAIT and connect timeout.  A mixin of TcpConnection."""

    __slots__ = ()

    def on_timer(self, now: float) -> None:
        if self.closed:
            return
        t = self.conn_at
        if t is not None and now >= t:
            if self.state == LISTEN and self._pending_close is None:
                self.host.drop("connect_timeout")
                self._send_rst_to_syn()
                self._remove("timeout")
                return
            self.conn_at = None
        t = self.tw_at
        if t is not None and now >= t:
            self._remove("closed")
            return
        t = self.delack_at
        if t is not None and now >= t:
            self.delack_at = None
            if self._ack_owed:
                self._emit(self.snd_nxt, ACK, b"", now)
        t = self.rto_at
        if t is not None and now >= t:
            self.rto_at = None
            self._on_rto(now)
            if self.closed:
                return
        t = self.persist_at
        if t is not None and now >= t:
            self.persist_at = None
            self._on_persist(now)
            if self.closed:
                return
        ka = self.host.config.keepalive
        if ka is not None and self.state in KEEPALIVE_STATES:
            cfg = self.host.config
            due = self.last_rcv + ka + self._ka_n * cfg.keepalive_interval
            if now >= due and self.snd_una == self.snd_max:
                if self._ka_n >= cfg.keepalive_count:
                    self.host.drop("keepalive_timeout")
                    self._send_rst()
                    self._remove("timeout")
                    return
                self._ka_n += 1
                self._emit((self.snd_una - 1) & _M, ACK, b"", now)
        self._arm()

    def _on_rto(self, now):
        if self.snd_una == self.snd_max:
            return
        cfg = self.host.config
        shrunk = self.snd_wnd == 0 and self.state != SYN_RECEIVED
        if shrunk:
            # the receiver closed its window over data in flight: keep probing
            # while it answers (like a persist timer); give up when it is silent
            self._ka_n += 1
            over = self._ka_n > cfg.max_retries
        else:
            self.retries += 1
            limit = cfg.max_retries
            if self.state == SYN_RECEIVED and cfg.synack_retries < limit:
                limit = cfg.synack_retries         # a half-open connection holds an upstream socket
            over = self.retries > limit
        if over:
            self.host.drop("retransmit_timeout")
            self._send_rst()
            self._remove("timeout")
            return
        self.rto = min(self.rto * 2, cfg.max_rto)       # back off (RFC 6298 §5.5)
        self._rtt_seq = None                             # Karn
        if self.state == SYN_RECEIVED:
            self.snd_nxt = self.iss
            self._send_synack(now)
        else:
            seg = self._seg
            if self.retries == 1:
                flight = (self.snd_max - self.snd_una) & _M
                self.ssthresh = max(flight >> 1, 2 * seg)
            self.cwnd = seg                              # RFC 5681 §3.1: loss window
            self.in_recovery = False
            self.recover = self.snd_max
            self.dupacks = 0
            self.scoreboard = []
            self.sacked = 0
            self.snd_nxt = self.snd_una                  # go back N
            if shrunk:
                self._send_old(self.snd_una, seg, now)   # the first segment, window or not
            else:
                self._output(now)
        self.rto_at = None
        self._arm_at(now + self.rto, "rto_at")

    def _on_persist(self, now):
        if self.state not in SEND_STATES or not self.snd_buf:
            return
        if ((self.snd_nxt - self._buf_seq) & _M) >= len(self.snd_buf):
            return
        cfg = self.host.config
        if self.snd_una == self.snd_max and self.snd_wnd == 0:
            # keep probing while the peer answers (RFC 1122 §4.2.2.17); give up
            # after max_retries probes with no segment at all from it
            self._persist_n += 1
            self._ka_n += 1
            if self._ka_n > cfg.max_retries:
                self.host.drop("persist_timeout")
                self._send_rst()
                self._remove("timeout")
                return
            # zero-window probe: an ACK just below the window elicits the peer's window
            self._emit((self.snd_una - 1) & _M, ACK, b"", now)
            t = min(self.rto * (1 << min(self._persist_n, 16)), cfg.max_rto)
            self._arm_at(now + t, "persist_at")
        else:
            # a small window the SWS rule refused to fill: send what fits now
            room = _sdiff((self.snd_una + self.snd_wnd) & _M, self.snd_nxt)
            off = (self.snd_nxt - self._buf_seq) & _M
            n = min(room, len(self.snd_buf) - off,
                    self._seg - (self._sack_len() if self.ooo.runs and self.sack_ok else 0))
            if n > 0:
                self._emit(self.snd_nxt, ACK | PSH, bytes(self.snd_buf[off:off + n]), now)
                self.snd_nxt = (self.snd_nxt + n) & _M
                if 0 < ((self.snd_nxt - self.snd_max) & _M) < _HALF:
                    self.snd_max = self.snd_nxt
                if self.rto_at is None:
                    self._arm_at(now + self.rto, "rto_at")

    def _arm_at(self, t, which=None):
        """Set a timer (by slot name) and lower poll_at to it if earlier."""
        if which is not None:
            setattr(self, which, t)
        p = self.poll_at
        if p is None or t < p:
            self.poll_at = t

    def _arm(self):
        """Recompute poll_at exactly from the armed timers (tw_at and
        conn_at wait in the stack's queues instead)."""
        t = None
        for x in (self.rto_at, self.persist_at, self.delack_at):
            if x is not None and (t is None or x < t):
                t = x
        ka = self.host.config.keepalive
        if ka is not None and self.state in KEEPALIVE_STATES and self.snd_una == self.snd_max:
            x = self.last_rcv + ka + self._ka_n * self.host.config.keepalive_interval
            if t is None or x < t:
                t = x
        self.poll_at = t

    def _enter_time_wait(self, now):
        self.state = TIME_WAIT
        self.rto_at = self.persist_at = self.delack_at = None
        self._tw_restart(now)

    def _tw_restart(self, now):
        """(Re)start the 2MSL wait (config.time_wait): the stack's TIME_WAIT
        queue holds the deadline, not the timer heap.  The connection has
        no other timer in TIME_WAIT (an ACK it owes goes out at the next
        flush), so it gives up poll_at and its heap entries go stale."""
        at = self.tw_at = now + self.host.config.time_wait
        self.poll_at = None
        self._sched_at = None
        q = self.host.tw_queue
        if q and at < q[-1][0]:
            self._queue(q, at)
        else:
            q.append((at, self.id, self))     # as _queue does, without the call

    def _queue(self, q, at):
        """Wait in one of the stack's timer queues (host.tw_queue,
        host.request_queue) until *at*."""
        if q and at < q[-1][0]:
            insort(q, (at, self.id, self))     # the clock went back: keep the queue sorted
        else:
            q.append((at, self.id, self))
