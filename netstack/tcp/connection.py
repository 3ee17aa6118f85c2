"""TcpConnection: one passive-side connection, RFC 9293 for any address and port.

The connection is assembled from its parts, each owning one kind of state:
netstack.tcp.receiver (rcv_*, receive buffer, out-of-order runs, SACK option,
advertised window), netstack.tcp.sender (snd_*, congestion control, SACK
scoreboard, RTT, output bursts) and netstack.tcp.timers (the one deadline).
This module holds what ties them together: the host API (accept, reject,
shutdown, abort), the stack contract (flush, segment_arrives), the header
prediction fast path and the RFC 9293 §3.10.7.4 state machine, one method per
step, and closing.  All parts are mixins over one set of slots declared here,
so the per-segment path pays no extra indirection.

Everything a connection does to its surroundings goes through `self.host`
(netstack.host: out, events, drop, dirty, request/answered, closed).
"""

from __future__ import annotations

from ..seq import HALF as _HALF
from ..seq import MASK as _M
from ..wire.templates import TcpTemplate
from .const import (
    ACK, ACK_NONE, CLOSE_WAIT, CLOSED, CLOSING, DEFAULT_MSS, ESTABLISHED, FIN, FIN_WAIT_1, FIN_WAIT_2,
    INITIAL_RTO, LAST_ACK, LISTEN, MIN_MSS, RECV_STATES, REJECT_KINDS, RST, SYN, SYN_RECEIVED, TIME_WAIT,
    TcpError,
)
from .receiver import NO_RUNS, TcpReceiver
from .sender import TcpSender
from .timers import TcpTimers


def _wscale_for(cap: int) -> int:
    """The smallest window scale (at most 14, RFC 7323 §2.3) at which a
    16-bit window field can offer *cap* bytes."""
    if cap <= 65535:
        return 0
    s = ((cap + 65534) // 65535 - 1).bit_length()      # 65535 << s >= cap
    return s if s < 14 else 14


class TcpConnection(TcpReceiver, TcpSender, TcpTimers):
    __slots__ = (
        "host", "key", "family", "src", "sport", "dst", "dport", "id", "_sched_at", "poll_at",
        "closed", "state", "user", "bytes_in", "bytes_out", "created", "syn_quote", "tpl", "_ps",
        # send side (RFC 9293 §3.3.1)
        "iss", "snd_una", "snd_nxt", "snd_max", "snd_wnd", "snd_wl1", "snd_wl2", "max_snd_wnd",
        "snd_buf", "_buf_seq", "_snd_cap", "fin_queued", "snd_mss", "_seg", "_gso",
        # receive side
        "irs", "rcv_nxt", "rcv_wnd", "rcv_adv", "rcv_buf", "_rcv_cap", "rcv_mss", "ooo",
        "_rcv_off", "fin_rcvd", "_fin_off", "_peer_seg", "_rcv_unacked",
        # options (RFC 7323, RFC 2018)
        "snd_wscale", "rcv_wscale", "_ws_ok", "ts_ok", "ts_recent", "last_ack_sent", "_ts_off", "sack_ok",
        # RTT / RTO (RFC 6298)
        "srtt", "rttvar", "rto", "_rtt_seq", "_rtt_time", "retries", "rto_at",
        # congestion control (RFC 5681 / 6582 / 6675)
        "cwnd", "ssthresh", "recover", "dupacks", "in_recovery", "scoreboard", "sacked", "_rtx_nxt",
        "_rtx_force",
        # timers
        "delack_at", "persist_at", "_persist_n", "_ka_n", "tw_at", "conn_at", "last_rcv",
        # output and events
        "_ack_owed", "_rd_ev", "_wr_blocked", "_pending_close", "_chal_t", "_chal_n",
        # the stack's memory budget (netstack.budget): every buffered byte counts
        "_mem",
    )

    def __init__(self, host, key, family, syn_quote, now):
        cfg = host.config
        self.host = host
        self._mem = host.budget
        self.key = key
        self.family = family
        self.src, self.sport, self.dst, self.dport = key
        self.id = host.next_id()
        self._sched_at = None
        self.poll_at = None
        self.closed = False
        self.state = LISTEN
        self.user = None
        self.bytes_in = self.bytes_out = 0
        self.created = now
        self.syn_quote = syn_quote
        self.tpl = TcpTemplate(family, self.dst, self.src, self.dport, self.sport, cfg)
        self._ps = self.tpl._ps      # the pseudo-header sum is the same both ways
        iss = self.iss = host.rng.getrandbits(32)
        self.snd_una = self.snd_nxt = self.snd_max = iss
        self.snd_wnd = self.max_snd_wnd = 0
        self.snd_wl1 = self.snd_wl2 = 0
        self.snd_buf = bytearray()
        self._buf_seq = (iss + 1) & _M
        self._snd_cap = cfg.snd_buf
        self.fin_queued = False
        hdr = 40 if family == 4 else 60
        self.rcv_mss = max(cfg.mtu - hdr, MIN_MSS)
        self.snd_mss = self._seg = DEFAULT_MSS[family]
        self._gso = 0
        self.irs = None
        self.rcv_nxt = self.rcv_adv = 0
        self.rcv_wnd = 0
        self.rcv_buf = bytearray()
        self._rcv_cap = cfg.rcv_buf
        self.ooo = NO_RUNS            # its own Assembler once data arrives out of order
        self._rcv_off = 0
        self.fin_rcvd = False
        self._fin_off = None
        self._peer_seg = 1
        self._rcv_unacked = 0
        self.snd_wscale = self.rcv_wscale = 0
        self._ws_ok = False
        self.ts_ok = False
        self.ts_recent = 0
        self.last_ack_sent = 0
        self._ts_off = host.rng.getrandbits(32)
        self.sack_ok = False
        self.srtt = None
        self.rttvar = 0.0
        self.rto = INITIAL_RTO
        self._rtt_seq = None
        self._rtt_time = 0.0
        self.retries = 0
        self.rto_at = None
        self.cwnd = 0
        self.ssthresh = 1 << 30
        self.recover = iss
        self.dupacks = 0
        self.in_recovery = False
        self.scoreboard = []
        self.sacked = 0
        self._rtx_nxt = iss
        self._rtx_force = False
        self.delack_at = self.persist_at = self.tw_at = self.conn_at = None
        self._persist_n = self._ka_n = 0
        self.last_rcv = now
        self._ack_owed = ACK_NONE
        self._rd_ev = False
        self._wr_blocked = False
        self._pending_close = None
        self._chal_t = 0.0
        self._chal_n = 0

    def __repr__(self):
        return f"<TcpConnection {self.state} {self.sport}->{self.dport} id={self.id}>"

    def accept(self) -> None:
        """Answer the connect request: the SYN-ACK goes out at the next poll."""
        if self.state != LISTEN or self._pending_close is not None or self.closed:
            raise TcpError(f"accept() in state {self.state}")
        self.state = SYN_RECEIVED
        self.host.answered(self)
        self.syn_quote = None
        self.conn_at = None
        self.host.dirty[self] = None

    def reject(self, how: str = "rst") -> None:
        """Refuse the connect request: "rst", "icmp-port|host|net|admin" or "drop"."""
        if how not in REJECT_KINDS:
            raise ValueError(f"reject(how={how!r}): expected one of {sorted(REJECT_KINDS)}")
        if self.state != LISTEN or self._pending_close is not None or self.closed:
            raise TcpError(f"reject() in state {self.state}")
        self._pending_close = ("rejected", how)
        self.host.dirty[self] = None

    def shed(self) -> None:
        """Admission control (netstack.admission): this unanswered request,
        or this half-open connection, gives way to a newer one.  A RST goes
        out now and it closes ("shed")."""
        if self.closed:
            return
        if self.state == LISTEN:
            self._send_rst_to_syn()
        elif self.state == SYN_RECEIVED:
            self._send_rst()
        else:
            return
        self._remove("shed")

    def shutdown(self) -> None:
        """Half-close: our FIN follows the queued data.  Idempotent."""
        if self.closed or self._pending_close is not None or self.fin_queued:
            return
        self.fin_queued = True
        st = self.state
        if st == ESTABLISHED:
            self.state = FIN_WAIT_1
        elif st == CLOSE_WAIT:
            self.state = LAST_ACK
        # LISTEN / SYN_RECEIVED: the FIN waits for ESTABLISHED
        self.host.dirty[self] = None

    def abort(self) -> None:
        """Reset the connection (RST at the next poll, then TcpClosed "aborted")."""
        if self.closed or self._pending_close is not None:
            return
        self._pending_close = ("aborted", "rst")
        self.host.dirty[self] = None

    def flush(self, now: float) -> None:
        if self.closed:
            return
        if self._pending_close is not None:
            self._do_pending_close()
            return
        st = self.state
        if st == LISTEN:
            return
        if st == SYN_RECEIVED:
            if self.snd_nxt == self.iss:
                self._send_synack(now)
            if self._ack_owed:
                self._emit(self.snd_nxt, ACK, b"", now)
            return
        if st == TIME_WAIT:
            if self._ack_owed:
                self._emit(self.snd_nxt, ACK, b"", now)
            return
        self._output(now)

    def segment_arrives(self, seq, ack, flags, wnd, opts, payload, now):
        st = self.state
        # ---- header prediction: ESTABLISHED, in-order, only ACK(/PSH), nothing special
        # (tests/test_tcp_ackpath.py: every decision as _slow's)
        if (st is ESTABLISHED and (flags & 0xF7) == ACK and seq == self.rcv_nxt
                and not self.in_recovery and not self.ooo.runs):
            ts_val = None
            if opts is not None:
                if opts.sack is not None or opts.mss is not None:
                    return self._slow(st, seq, ack, flags, wnd, opts, payload, now)
                if self.ts_ok:
                    ts_val = opts.ts_val
                    if ts_val is not None and ((ts_val - self.ts_recent) & _M) >= _HALF:
                        return self._slow(st, seq, ack, flags, wnd, opts, payload, now)
            n = len(payload)
            if n and n > self._rcv_cap - len(self.rcv_buf):
                room = (self.rcv_adv - seq) & _M
                if room >= _HALF or n > room:
                    return self._slow(st, seq, ack, flags, wnd, opts, payload, now)
            una = self.snd_una
            acked = (ack - una) & _M
            if acked == 0:
                if n == 0:
                    # pure ACK for nothing new: a dup ACK or a window update -> slow path
                    return self._slow(st, seq, ack, flags, wnd, opts, payload, now)
            elif acked > ((self.snd_max - una) & _M):
                return self._slow(st, seq, ack, flags, wnd, opts, payload, now)
            self.last_rcv = now
            self._ka_n = 0
            if ts_val is not None and seq == self.last_ack_sent:
                self.ts_recent = ts_val
            if acked:
                self._new_ack(ack, acked, opts, now)
            # window update (RFC 9293 §3.10.7.4 step 5)
            if ((seq - self.snd_wl1) & _M) < _HALF and ((ack - self.snd_wl2) & _M) < _HALF:
                swnd = wnd << self.snd_wscale
                old = self.snd_wnd
                self.snd_wnd = swnd
                self.snd_wl1 = seq
                self.snd_wl2 = ack
                if swnd > old:
                    if swnd > self.max_snd_wnd:
                        self.max_snd_wnd = swnd
                    self.persist_at = None
                    self._persist_n = 0
                    if self.snd_buf:
                        self.host.dirty[self] = None
            if n:
                self._deliver(payload, n, now)
            return
        return self._slow(st, seq, ack, flags, wnd, opts, payload, now)

    # ---------------------------------------- RFC 9293 §3.10.7.4, step by step

    def _slow(self, st, seq, ack, flags, wnd, opts, payload, now):
        """Every segment the header prediction did not take, in the order of
        RFC 9293 §3.10.7.4 "SEGMENT ARRIVES" (otherwise), one method per step."""
        if st is LISTEN:
            if self.irs is None:
                self._listen_syn(seq, wnd, opts, payload, now)
            else:
                self._request_segment(seq, flags)
            return
        self.last_rcv = now
        self._ka_n = 0
        if st == SYN_RECEIVED and flags & SYN and not flags & (ACK | RST) and seq == self.irs:
            self._synack_lost()
            return
        n = len(payload)
        seglen = n + ((flags >> 1) & 1) + (flags & FIN)          # SYN and FIN take one each
        ts_val = opts.ts_val if opts is not None else None
        if (ts_val is not None and self.ts_ok and not flags & RST
                and ((ts_val - self.ts_recent) & _M) >= _HALF):
            self._paws_reject()
            return
        rnxt = self.rcv_nxt
        d = ((seq - rnxt + _HALF) & _M) - _HALF                   # seq_sub, inline
        if d == 0 and seglen == 0:
            # an empty segment at rcv_nxt (the handshake's ACK, an ACK of
            # our FIN, a duplicate ACK) is acceptable whatever the window
            # (0 <= d <= rwnd below), and nothing in it is trimmed
            rwnd = 0
        else:
            # step 1's window: what we advertised, or the free buffer if
            # larger -- bytes we have room for are never thrown away (the
            # buffer still bounds memory)
            rwnd = ((self.rcv_adv - rnxt + _HALF) & _M) - _HALF      # seq_sub, inline
            free = self._rcv_cap - len(self.rcv_buf) - self.ooo.nbytes
            if rwnd < free:
                rwnd = free
            if rwnd < 0:
                rwnd = 0
            # step 1: sequence number acceptability (like Linux's tcp_sequence,
            # an ACK exactly at the right edge is accepted: a sender that
            # filled our window sends its ACKs there)
            if not (0 <= d <= rwnd if seglen == 0 else
                    rwnd > 0 and (0 <= d < rwnd or 0 <= d + seglen - 1 < rwnd)):
                self._step1_unacceptable(st, d, seglen, flags, now)
                return
        if flags & RST:
            self._step2_rst(st, d, now)
            return
        if flags & SYN:
            # step 4: a SYN in a synchronized state (RFC 5961 §4): challenge ACK
            self.host.drop("syn_challenge")
            self._challenge_ack(now)
            return
        if not flags & ACK:
            # step 5: "if the ACK bit is off, drop the segment and return"
            self.host.drop("no_ack")
            return
        # trim to the window: the front (already received) and the tail (beyond it)
        if d < 0:
            cut = -d
            if cut > n:             # the FIN was received before too
                flags &= ~FIN
                cut = n
            payload = payload[cut:]
            n -= cut
            seq = self.rcv_nxt
            d = 0
        if d + n > rwnd:
            payload = payload[:rwnd - d]
            n = len(payload)
            flags &= ~FIN
            self.host.drop("trimmed_to_window")
        st = self._step5_ack(st, seq, ack, flags, wnd, opts, ts_val, n, now)
        if st is None:
            return
        fin_off = self._rcv_off + d + n      # stream offset of a FIN in this segment
        if n:
            self._step7_text(st, d, payload, n, now)
        if flags & FIN:
            self._step8_fin(st, fin_off, now)

    def _request_segment(self, seq, flags):
        """A segment after the SYN of a request the host has not answered (our LISTEN)."""
        if flags & RST:
            if seq == self.rcv_nxt and self._pending_close is None:
                self._remove("reset")      # the client gave up
            else:
                self.host.drop("rst_pending_ignored")
        elif flags & SYN and seq == self.irs:
            self.host.drop("dup_syn")      # absorbed: the host will answer
        else:
            self.host.drop("not_accepted_yet")

    def _synack_lost(self):
        """SYN_RECEIVED and the client's SYN again: it did not get our SYN-ACK."""
        self.host.drop("dup_syn")
        if self.snd_una == self.iss:
            self.snd_nxt = self.iss
            self.host.dirty[self] = None

    def _paws_reject(self):
        """PAWS (RFC 7323 §5.3 R1): an old timestamp (the test is in _slow)
        marks an old duplicate: dropped, answered with an ACK."""
        self.host.drop("paws")
        self._owe_ack()

    def _step1_unacceptable(self, st, d, seglen, flags, now) -> None:
        """Step 1: a segment outside the receive window (the test is in
        _slow) is answered (ACK, challenge ACK) or dropped."""
        if flags & RST:
            self.host.drop("rst_out_of_window")
        elif flags & SYN:
            self.host.drop("syn_challenge")
            self._challenge_ack(now)
        else:
            # one below rcv_nxt with at most one byte: a keepalive or a
            # zero-window probe, answered with an ACK like any stray segment
            if d + seglen <= 0:
                self.host.drop("probe_answered" if d == -1 and seglen <= 1 else "duplicate")
            else:
                self.host.drop("out_of_window")
            self._owe_ack()
            if st is TIME_WAIT and flags & FIN:
                self._tw_restart(now)      # a retransmitted FIN restarts 2MSL

    def _step2_rst(self, st, d, now):
        """Step 2: RST (RFC 5961 §3.2: an exact match resets, else a challenge ACK)."""
        if d == 0:
            # in TIME_WAIT both sides were done: it only ends the wait early
            self._remove("closed" if st is TIME_WAIT else "reset")
        else:
            self.host.drop("rst_challenge")
            self._challenge_ack(now)

    def _handshake_done(self, seq, ack, wnd, ts_val, now) -> bool:
        """Step 5 in SYN_RECEIVED: our SYN acknowledged completes the handshake;
        an ACK of anything else is answered with a RST (False then)."""
        if not 0 < ((ack - self.snd_una) & _M) <= ((self.snd_max - self.snd_una) & _M):
            self.host.drop("bad_ack")
            self.host.out.append(self.tpl.build(ack, 0, RST, 0, b"", b""))
            return False
        self.host.synchronized(self)
        self.state = FIN_WAIT_1 if self.fin_queued else ESTABLISHED
        self.snd_wnd = wnd << self.snd_wscale
        self.max_snd_wnd = self.snd_wnd
        self.snd_wl1 = seq
        self.snd_wl2 = ack
        if self.ts_ok:
            self.ts_recent = ts_val if ts_val is not None else self.ts_recent
        if self.snd_buf or self.fin_queued:
            self.host.dirty[self] = None
        ka = self.host.config.keepalive
        if ka is not None:
            self._arm_at(now + ka)
        return True

    def _step5_ack(self, st, seq, ack, flags, wnd, opts, ts_val, n, now):
        """Step 5: the ACK field -- handshake completion, new data acknowledged
        or a duplicate ACK, the send window, our FIN acknowledged.  Returns
        the state to continue with, None when the segment is done with."""
        if st == SYN_RECEIVED:
            if not self._handshake_done(seq, ack, wnd, ts_val, now):
                return None
            st = self.state
        una = self.snd_una
        acked = (ack - una) & _M
        inflight = (self.snd_max - una) & _M
        if acked >= _HALF:
            # an old ACK (RFC 5961 §5.2: far too old ones are dropped with an ACK)
            if ((una - ack) & _M) > self.max_snd_wnd + 65536:
                self.host.drop("old_ack")
                self._owe_ack()
                return None
        elif acked > inflight:
            self.host.drop("ack_unsent")
            self._owe_ack()
            return None
        # RFC 7323 §4.3: remember the timestamp to echo
        if ts_val is not None and self.ts_ok and ((self.last_ack_sent - seq) & _M) < _HALF:
            self.ts_recent = ts_val
        if self.sack_ok and opts is not None and opts.sack and inflight:
            new_sack = self._sack_update(opts.sack)
        else:
            new_sack = False
        swnd = wnd << self.snd_wscale
        if 0 < acked < _HALF:
            self._new_ack(ack, acked, opts, now)
        elif (acked == 0 and n == 0 and not flags & FIN and inflight
              and (swnd == self.snd_wnd or new_sack)):
            self._dupack(now)
        # window update (SND.WL1 < SEG.SEQ or (SND.WL1 = SEG.SEQ and SND.WL2 =< SEG.ACK))
        w1 = (seq - self.snd_wl1) & _M
        if acked < _HALF and (0 < w1 < _HALF or (w1 == 0 and ((ack - self.snd_wl2) & _M) < _HALF)):
            old = self.snd_wnd
            self.snd_wnd = swnd
            self.snd_wl1 = seq
            self.snd_wl2 = ack
            if swnd > self.max_snd_wnd:
                self.max_snd_wnd = swnd
            if swnd > old:
                self.persist_at = None
                self._persist_n = 0
                if self.snd_buf or self.fin_queued:
                    self.host.dirty[self] = None
        # our FIN acknowledged?
        if self.fin_queued and self.snd_una == ((self._buf_seq + len(self.snd_buf) + 1) & _M):
            if st == FIN_WAIT_1:
                self.state = st = FIN_WAIT_2
            elif st == CLOSING:
                self._enter_time_wait(now)
                st = TIME_WAIT
            elif st == LAST_ACK:
                self._remove("closed")
                return None
        return st

    def _step7_text(self, st, d, payload, n, now):
        """Step 7: segment text, in order or held out of order."""
        if st in RECV_STATES:
            if d == 0:
                self._deliver(payload, n, now)
            else:
                self._out_of_order(d, payload, n, now)
        else:
            self.host.drop("data_after_fin")
            self._owe_ack()

    def _step8_fin(self, st, fin_off, now):
        """Step 8: FIN (taken once every byte before it has arrived)."""
        if st == TIME_WAIT:
            self._owe_ack()
            self._tw_restart(now)
        elif self.fin_rcvd:
            self._owe_ack()
        elif fin_off == self._rcv_off:
            self._on_fin(now)
        else:
            self._fin_off = fin_off      # arrives before data still missing
            self._owe_ack()

    # ------------------------------------------------------- LISTEN (SYN)

    def _listen_syn(self, seq, wnd, opts, payload, now):
        cfg = self.host.config
        self.irs = seq
        self.rcv_nxt = (seq + 1) & _M
        self.rcv_adv = self.rcv_nxt
        peer_mss = None
        if opts is not None:
            peer_mss = opts.mss
            if opts.wscale is not None:
                self._ws_ok = True
                self.snd_wscale = opts.wscale
                cap = self._rcv_cap
                self.rcv_wscale = 0 if cap <= 65535 else _wscale_for(cap)
            self.sack_ok = opts.sack_perm
            if opts.ts_val is not None:
                self.ts_ok = True
                self.ts_recent = opts.ts_val
        if not peer_mss:
            peer_mss = DEFAULT_MSS[self.family]
        elif peer_mss < MIN_MSS:
            peer_mss = MIN_MSS                # tiny MSS: many tiny segments (cf. CVE-2019-11479)
        mss = self.rcv_mss if self.rcv_mss < peer_mss else peer_mss
        self.snd_mss = mss
        self._seg = mss - (12 if self.ts_ok else 0)
        g = cfg.gso_max
        self._gso = min(g, 65535 - 120) if g > self._seg else 0
        self.cwnd = 10 * self._seg                    # RFC 6928 initial window
        self.snd_wnd = self.max_snd_wnd = wnd          # a SYN's window is never scaled
        self.snd_wl1 = seq
        self.snd_wl2 = self.iss
        self.last_ack_sent = self.rcv_nxt
        if payload:
            self.host.drop("syn_data_ignored")
        self.host.request(self)
        # the connect timeout waits in the stack's request queue (every
        # request's is as long), not in the timer heap
        at = self.conn_at = now + cfg.connect_timeout
        q = self.host.request_queue
        if q and at < q[-1][0]:
            self._queue(q, at)
        else:
            q.append((at, self.id, self))     # as _queue does, without the call

    def _do_pending_close(self):
        reason, how = self._pending_close
        if self.state == LISTEN:
            if how == "rst":
                self._send_rst_to_syn()
            elif how != "drop":
                self.host.icmp_unreachable(self.syn_quote, REJECT_KINDS[how])
        elif self.state != TIME_WAIT:
            self._send_rst()
        self._remove(reason)

    def _remove(self, reason):
        if self.closed:
            return
        if self.state == LISTEN:
            self.host.answered(self)
        elif self.state == SYN_RECEIVED:
            self.host.synchronized(self)
        self.closed = True
        self.state = CLOSED
        self.poll_at = None
        self.rto_at = self.persist_at = self.delack_at = self.tw_at = self.conn_at = None
        self.syn_quote = None
        # every byte still held goes back to the budget; bytes read after
        # this are not subtracted again (read() checks closed)
        self._mem.used -= len(self.rcv_buf) + len(self.snd_buf) + self.ooo.nbytes
        if self.ooo is not NO_RUNS:
            self.ooo.clear()
        self.host.closed(self, reason)
