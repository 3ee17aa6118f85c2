"""TCP sender (RFC 9293 §3.8, RFC 5681/6582/6675 congestion control and recovery, RFC 6298 RTT, RFC 7323)."""

from __future__ import annotations

from .. import events as _ev
from ..seq import HALF as _HALF
from ..seq import MASK as _M
from ..seq import seq_sub as _sdiff
from .const import (
    ACK, ACK_NONE, CLOSE_WAIT, ESTABLISHED, FIN, MAX_SACK_BLOCKS, MIN_MSS, PSH, RST, SEND_STATES, SYN,
    WRITE_STATES, TcpError,
)
from .const import MSS_OPT as _MSS_OPT
from .const import TSOPT as _TSOPT
from .const import WS_OPT as _WS_OPT
from .const import SYN_SACK_WS_OPT as _SYN_SACK_WS_OPT
from .const import SYN_TS_OPT as _SYN_TS_OPT


class TcpSender:
    """The sending half of a connection: snd_* state, the send buffer, congestion control, the
    SACK scoreboard, RTT estimation and the output bursts.  A mixin of TcpConnection: it
    owns the send-side slots declared there."""

    __slots__ = ()

    def write(self, data) -> int:
        """Queue bytes for sending; returns how many were accepted (<= send_space)."""
        if self.closed or self._pending_close is not None or self.fin_queued or self.state not in WRITE_STATES:
            raise TcpError(f"write() in state {self.state}" + (" after shutdown" if self.fin_queued else ""))
        space = self._snd_cap - len(self.snd_buf)
        mem = self._mem
        if mem.limit:
            space = mem.clamp(space, len(self.snd_buf), self._seg)
        n = len(data)
        if n > space:
            n = space if space > 0 else 0
            self._wr_blocked = True
            if n == 0:
                return 0
            self.snd_buf += memoryview(data)[:n]
        else:
            self.snd_buf += data
        mem.used += n
        self.bytes_out += n
        self.host.dirty[self] = None
        return n

    @property
    def send_space(self) -> int:
        if self.closed or self.fin_queued:
            return 0
        s = self._snd_cap - len(self.snd_buf)
        mem = self._mem
        if mem.limit:
            s = mem.clamp(s, len(self.snd_buf), self._seg)
        return s if s > 0 else 0

    @property
    def send_queued(self) -> int:
        """Bytes written but not yet acknowledged by the peer."""
        return len(self.snd_buf)

    def _new_ack(self, ack, acked, opts, now):
        """ACK of new data (snd_una < ack <= snd_max)."""
        buf = self.snd_buf
        bseq = self._buf_seq
        nb = (ack - bseq) & _M
        if nb >= _HALF:
            nb = 0                          # only our SYN was acknowledged
        elif nb > len(buf):
            nb = len(buf)                   # ... and our FIN
        if nb:
            # the bytearray drops its head by moving its start (CPython copies
            # the rest only when it falls below half of what is allocated)
            del buf[:nb]
            self._mem.used -= nb
            self._buf_seq = (bseq + nb) & _M
        self.snd_una = ack
        if ((self.snd_nxt - ack) & _M) >= _HALF:
            self.snd_nxt = ack
        self.retries = 0
        self._persist_n = 0
        # RTT sample (RFC 7323 §4 with timestamps; else one timed segment, Karn's rule)
        if self.ts_ok and opts is not None and opts.ts_ecr is not None:
            r = ((int(now * 1000) + self._ts_off) - opts.ts_ecr) & _M
            if r < 600000:
                self._rtt_sample(r / 1000.0)
        elif self._rtt_seq is not None and ((ack - self._rtt_seq) & _M) < _HALF:
            self._rtt_seq = None
            self._rtt_sample(now - self._rtt_time)
        # congestion control
        if self.in_recovery:
            seg = self._seg
            if ((ack - self.recover) & _M) < _HALF:
                # full ACK: leave recovery (RFC 6582 §3.2 step 3)
                self.in_recovery = False
                self.cwnd = self.ssthresh
                self.dupacks = 0
            else:
                # partial ACK: retransmit the next hole, deflate (RFC 6582 step 4)
                self.cwnd -= acked
                if acked >= seg:
                    self.cwnd += seg
                if self.cwnd < seg:
                    self.cwnd = seg
                if ((self._rtx_nxt - ack) & _M) >= _HALF:
                    self._rtx_nxt = ack
                if not self.scoreboard:
                    self._rtx_force = True
                self.host.dirty[self] = None
        else:
            self.dupacks = 0
            if nb:
                cwnd = self.cwnd
                if cwnd < self.ssthresh:
                    self.cwnd = cwnd + nb             # slow start; stretch ACKs count fully
                else:
                    inc = self._seg * nb // cwnd
                    self.cwnd = cwnd + (inc if inc > 1 else 1)
        if self.scoreboard:
            self._sack_prune()
        # timers: restart the RTO (lazily: poll_at is only ever lowered here)
        if ack == self.snd_max:
            self.rto_at = None
        else:
            at = self.rto_at = now + self.rto
            if self.poll_at is None:
                self.poll_at = at
        if buf or self.fin_queued:
            self.host.dirty[self] = None
        if self._wr_blocked and (self._snd_cap - len(buf)) >= (self._snd_cap >> 1):
            self._wr_blocked = False
            self.host.events.append(_ev.TcpWritable(self))

    def _rtt_sample(self, r):
        srtt = self.srtt
        if srtt is None:
            self.srtt = srtt = r
            self.rttvar = var = r / 2
        else:
            d = srtt - r
            self.rttvar = var = 0.75 * self.rttvar + 0.25 * (d if d >= 0 else -d)
            self.srtt = srtt = 0.875 * srtt + 0.125 * r
        var *= 4
        rto = srtt + (var if var > 0.001 else 0.001)
        cfg = self.host.config
        if rto < cfg.min_rto:
            rto = cfg.min_rto
        elif rto > cfg.max_rto:
            rto = cfg.max_rto
        self.rto = rto

    def _dupack(self, now):
        self.dupacks += 1
        seg = self._seg
        if self.in_recovery:
            if not self.scoreboard:
                self.cwnd += seg               # NewReno inflation
            self.host.dirty[self] = None
            return
        if self.dupacks >= 3 or (self.scoreboard and self.sacked >= 3 * seg):
            if 0 < ((self.recover - self.snd_una) & _M) < _HALF:
                # RFC 6582 §3.2 step 2: dup ACKs for data sent before the last
                # recovery (or timeout) do not start another one
                return
            flight = (self.snd_max - self.snd_una) & _M
            self.ssthresh = max(flight >> 1, 2 * seg)
            self.recover = self.snd_max
            self.in_recovery = True
            self.cwnd = self.ssthresh + (0 if self.scoreboard else 3 * seg)
            self._rtx_nxt = self.snd_una
            self._rtx_force = True
            self._rtt_seq = None
            self.host.dirty[self] = None

    def _sack_update(self, blocks) -> bool:
        """Merge the peer's SACK blocks into the scoreboard; True if it grew."""
        una = self.snd_una
        top = (self.snd_max - una) & _M
        offs = [((l - una) & _M, (r - una) & _M) for l, r in self.scoreboard]
        before = self.sacked
        for left, right in blocks:
            a = (left - una) & _M
            b = (right - una) & _M
            if a >= b or b > top:            # D-SACK below snd_una, reversed or beyond: ignore
                continue
            offs.append((a, b))
        offs.sort()
        merged = []
        for a, b in offs:
            if merged and a <= merged[-1][1]:
                if b > merged[-1][1]:
                    merged[-1][1] = b
            else:
                merged.append([a, b])
        if len(merged) > MAX_SACK_BLOCKS:
            merged = merged[-MAX_SACK_BLOCKS:]
        self.scoreboard = [((una + a) & _M, (una + b) & _M) for a, b in merged]
        self.sacked = sum(b - a for a, b in merged)
        return self.sacked > before

    def _sack_prune(self):
        una = self.snd_una
        sb = []
        total = 0
        for l, r in self.scoreboard:
            b = (r - una) & _M
            if b == 0 or b >= _HALF:
                continue
            a = (l - una) & _M
            if a >= _HALF:
                a = 0
                l = una
            sb.append((l, r))
            total += b - a
        self.scoreboard = sb
        self.sacked = total

    def _output(self, now):
        """Send what windows allow: recovery retransmissions, new data, FIN, owed ACK."""
        st = self.state
        buf = self.snd_buf
        blen = len(buf)
        if st in SEND_STATES:
            nxt = self.snd_nxt
            una = self.snd_una
            if self.in_recovery:
                budget = self._recovery_send(now)
                wl = _sdiff((una + self.snd_wnd) & _M, nxt)
                usable = budget if budget < wl else wl
            else:
                w = self.snd_wnd if self.snd_wnd < self.cwnd else self.cwnd
                usable = _sdiff((una + w) & _M, nxt)
            off = (nxt - self._buf_seq) & _M
            if off < blen and usable > 0:
                seg1 = self._seg
                mem = self._mem
                capped = False
                if mem.limit:
                    # the packets built now are copies until the device takes
                    # them: a burst is a share of what the budget has left
                    # (the rest goes out at the next poll, which this touch asks for)
                    room = mem.clamp(usable, 0, seg1)
                    if room < usable:
                        usable = room
                        capped = True
                if self.ooo.runs and self.sack_ok:
                    seg1 -= self._sack_len()     # SACK blocks share the MSS (RFC 6691)
                seg = self._gso or seg1
                tsmax = self.max_snd_wnd >> 1
                snd_max = self.snd_max
                sb = self.scoreboard if (self.scoreboard and nxt != snd_max) else None
                fin_ok = self.fin_queued and st != ESTABLISHED and st != CLOSE_WAIT
                hdr = None
                build = self.tpl.build
                emit = self.host.out.append
                rnxt = self.rcv_nxt
                gso = self._gso
                with memoryview(buf) as mv:
                    if nxt == snd_max and not gso and not fin_ok:
                        # new data only, the common case: one call builds the burst
                        # (the loop below makes the same segments one at a time
                        # and handles retransmission, SACK holes, GSO and our FIN)
                        n = blen - off
                        push = n <= usable
                        if not push:
                            n = usable - usable % seg
                            if usable - n >= tsmax:
                                n = usable      # a tail under one segment (SWS rule below)
                        if n > 0:
                            field, opt = self._prep(now)
                            if self._rtt_seq is None and not self.ts_ok:
                                self._rtt_seq = (nxt + (n if n < seg else seg)) & _M
                                self._rtt_time = now
                            nxt = snd_max = self.tpl.burst(emit, mv, off, n, seg, nxt, rnxt, field, opt, push)
                            off += n
                    else:
                        while off < blen and usable > 0:
                            n = blen - off
                            if n > seg:
                                n = seg
                            if n > usable:
                                # sender SWS avoidance (RFC 9293 §3.8.6.2.1)
                                if usable < seg1 and usable < tsmax:
                                    break
                                n = usable
                            if sb is not None and 0 < ((snd_max - nxt) & _M) < _HALF:
                                skip = self._sacked_at(nxt, sb)
                                if skip:
                                    nxt = (nxt + skip) & _M
                                    off += skip
                                    usable -= skip
                                    continue
                            retx = 0 < ((snd_max - nxt) & _M) < _HALF   # nxt < snd_max
                            if retx and n > seg1:
                                n = seg1
                            if hdr is None:
                                field, opt = hdr = self._prep(now)
                            if off + n == blen:
                                if fin_ok:                 # piggyback our FIN on the last data
                                    emit(build(nxt, rnxt, ACK | PSH | FIN, field, opt, mv[off:off + n]))
                                    nxt = (nxt + n + 1) & _M
                                    off += n
                                    if 0 < ((nxt - snd_max) & _M) < _HALF:
                                        snd_max = nxt
                                    break
                                pkt = build(nxt, rnxt, ACK | PSH, field, opt, mv[off:off + n])
                            else:
                                pkt = build(nxt, rnxt, ACK, field, opt, mv[off:off + n])
                            if gso and n > seg1:
                                pkt = self.tpl.gso(pkt, len(opt), seg1)
                            emit(pkt)
                            if not retx and self._rtt_seq is None and not self.ts_ok:
                                self._rtt_seq = (nxt + n) & _M
                                self._rtt_time = now
                            elif retx:
                                self._rtt_seq = None       # Karn: no sample from a retransmission
                            nxt = (nxt + n) & _M
                            off += n
                            usable -= n
                            if 0 < ((nxt - snd_max) & _M) < _HALF:
                                snd_max = nxt
                if mem.limit:
                    sent = (nxt - self.snd_nxt) & _M
                    mem.used += sent
                    mem.out += sent
                    if capped and off < blen:
                        self.host.dirty[self] = None
                self.snd_nxt = nxt
                self.snd_max = snd_max
            # FIN after all queued data
            if self.fin_queued and off == blen and st != ESTABLISHED and st != CLOSE_WAIT:
                fin_seq = (self._buf_seq + blen) & _M
                if nxt == fin_seq:
                    self._emit(fin_seq, ACK | FIN, b"", now)
                    self.snd_nxt = (fin_seq + 1) & _M
                    if 0 < ((self.snd_nxt - self.snd_max) & _M) < _HALF:
                        self.snd_max = self.snd_nxt
            if self.snd_una != self.snd_max:
                if self.rto_at is None:
                    self._arm_at(now + self.rto, "rto_at")
                self.persist_at = None
            elif blen and ((self.snd_nxt - self._buf_seq) & _M) < blen and self.persist_at is None:
                # window closed (or too small to use): probe later (RFC 9293 §3.8.6.1)
                self._persist_n = 0
                self._arm_at(now + self.rto, "persist_at")
        if self._ack_owed:
            self._emit(self.snd_nxt, ACK, b"", now)

    def _sacked_at(self, s, sb):
        """Bytes from s that the peer already SACKed (0 if s is not in a block)."""
        for l, r in sb:
            if ((s - l) & _M) < ((r - l) & _M):
                return (r - s) & _M
        return 0

    def _recovery_send(self, now) -> int:
        """Retransmit holes while in fast recovery; return the budget left for new data."""
        una = self.snd_una
        seg = self._seg
        if self.ooo.runs and self.sack_ok:
            seg -= self._sack_len()
        flight = (self.snd_max - una) & _M
        sb = self.scoreboard
        if not sb:
            # NewReno: one retransmission of the first unacknowledged segment
            if self._rtx_force:
                self._rtx_force = False
                self._send_old(una, seg, now)
            return _sdiff((una + self.cwnd) & _M, self.snd_nxt)
        # RFC 6675 (simplified IsLost: every hole below the highest SACK is lost)
        holes = []
        prev = 0
        rtx = (self._rtx_nxt - una) & _M
        if rtx >= _HALF:
            rtx = 0
        lost = 0
        for l, r in sb:
            a = (l - una) & _M
            if a > prev:
                s = prev if prev > rtx else rtx
                if a > s:
                    holes.append((s, a))
                    lost += a - s
            prev = (r - una) & _M
        pipe = flight - self.sacked - lost
        budget = self.cwnd - pipe
        if self._rtx_force and holes:
            budget = budget if budget > seg else seg
        self._rtx_force = False
        for a, b in holes:
            while a < b and budget > 0:
                k = b - a
                if k > seg:
                    k = seg
                self._send_old((una + a) & _M, k, now)
                a += k
                budget -= k
                self._rtx_nxt = (una + a) & _M
            if budget <= 0:
                break
        return budget

    def _send_old(self, seq, n, now):
        """Retransmit n bytes (or our FIN) starting at seq."""
        off = (seq - self._buf_seq) & _M
        blen = len(self.snd_buf)
        if off >= _HALF:
            return
        if off < blen:
            if off + n > blen:
                n = blen - off
            self._emit(seq, ACK, bytes(self.snd_buf[off:off + n]), now)
        elif off == blen and self.fin_queued and self.snd_max != seq:
            self._emit(seq, ACK | FIN, b"", now)
        self._rtt_seq = None

    def _send_synack(self, now):
        if self._ws_ok and self.sack_ok:
            # the two usual answers (to a Linux SYN: all four options; to
            # a Windows SYN: no timestamps), one pack each
            if self.ts_ok:
                opts = _SYN_TS_OPT.pack(0x0204, self.rcv_mss, 0x0402080A, (int(now * 1000) + self._ts_off) & _M,
                                        self.ts_recent, 0x01030300 | self.rcv_wscale)
            else:
                opts = _SYN_SACK_WS_OPT.pack(0x0204, self.rcv_mss, 0x01010402, 0x01030300 | self.rcv_wscale)
        else:
            opts = self._synack_options(now)
        wnd = self._rcv_cap - len(self.rcv_buf)
        mem = self._mem
        if mem.limit:
            wnd = mem.clamp(wnd, len(self.rcv_buf), self.rcv_mss)
        if wnd > 65535:
            wnd = 65535
        self.rcv_adv = (self.rcv_nxt + wnd) & _M
        self.rcv_wnd = wnd
        self.host.out.append(self.tpl.build(self.iss, self.rcv_nxt, SYN | ACK, wnd, opts, b""))
        self.last_ack_sent = self.rcv_nxt
        self._ack_owed = ACK_NONE
        self.snd_nxt = (self.iss + 1) & _M
        if self.snd_max == self.iss:
            self.snd_max = self.snd_nxt
            self._rtt_seq = self.snd_nxt
            self._rtt_time = now
        if self.rto_at is None:
            t = self.rto_at = now + self.rto         # _arm_at, without its setattr
            p = self.poll_at
            if p is None or t < p:
                self.poll_at = t

    def _synack_options(self, now):
        """The SYN-ACK's option block: what the client's SYN offered, in the
        order Linux sends them (the same bytes as the packs in _send_synack)."""
        opts = [_MSS_OPT.pack(2, 4, self.rcv_mss)]
        if self.sack_ok and self.ts_ok:
            opts.append(_TSOPT.pack(4, 2, 8, 10, (int(now * 1000) + self._ts_off) & _M, self.ts_recent))
        else:
            if self.ts_ok:
                opts.append(_TSOPT.pack(1, 1, 8, 10, (int(now * 1000) + self._ts_off) & _M, self.ts_recent))
            if self.sack_ok:
                opts.append(b"\x01\x01\x04\x02")
        if self._ws_ok:
            opts.append(_WS_OPT.pack(1, 3, 3, self.rcv_wscale))
        return b"".join(opts)

    def _emit(self, seq, flags, payload, now):
        """Build and queue one segment carrying our current ACK and window."""
        field, opt = self._prep(now)
        pkt = self.tpl.build(seq, self.rcv_nxt, flags, field, opt, payload)
        if self._gso and len(payload) > self._seg:
            pkt = self.tpl.gso(pkt, len(opt), self._seg - len(opt) + (12 if self.ts_ok else 0))
        self.host.out.append(pkt)

    def _send_rst(self):
        """RST for a synchronized connection (abort, timeouts)."""
        self.host.out.append(self.tpl.build(self.snd_nxt, self.rcv_nxt, RST | ACK, 0, b"", b""))

    def _send_rst_to_syn(self):
        """RST answering the SYN of a request (RFC 9293 §3.10.7.1 form)."""
        self.host.out.append(self.tpl.build(0, self.rcv_nxt, RST | ACK, 0, b"", b""))

    def on_pmtu(self, mtu: int, now: float) -> None:
        """ICMP packet-too-big / fragmentation-needed for one of our segments."""
        if self.closed:
            return
        mss = mtu - (40 if self.family == 4 else 60)
        if mss < MIN_MSS:
            mss = MIN_MSS
        if mss >= self.snd_mss:
            return
        self.snd_mss = mss
        self._seg = mss - (12 if self.ts_ok else 0)
        # resend what is in flight in smaller pieces (no congestion signal)
        if self.state in SEND_STATES and self.snd_una != self.snd_max:
            self.snd_nxt = self.snd_una
            self._rtt_seq = None
            self.host.dirty[self] = None
