"""TCP receiver (RFC 9293 §3.10.7.4 step 7, RFC 2018, RFC 9293 §3.8.6.2.2)."""

from __future__ import annotations

from .. import events as _ev
from ..assembler import Assembler
from ..seq import HALF as _HALF
from ..seq import MASK as _M
from .const import (
    ACK_DELAYED, ACK_NONE, ACK_NOW, CHALLENGE_ACKS_PER_SEC, CLOSE_WAIT, CLOSING, DELACK, ESTABLISHED,
    FIN_WAIT_1, FIN_WAIT_2, RECV_STATES,
)
from .const import SACK_BLOCK as _BLOCK
from .const import SACKHDR as _SACKHDR
from .const import TSOPT as _TSOPT


# the out-of-order runs of every connection that never had any: one shared
# empty Assembler that nothing adds to (_out_of_order gives a connection its
# own first), so a connection costs no Assembler until a segment arrives out
# of order
NO_RUNS = Assembler()


class TcpReceiver:
    """The receiving half of a connection: rcv_* state, the receive buffer, out-of-order runs
    (netstack.assembler) and the SACK option they produce, the advertised window with
    receiver SWS avoidance, and the ACKs owed for it.  A mixin of TcpConnection: it owns the
    receive-side slots declared there."""

    __slots__ = ()

    def read(self, n: int = -1) -> bytes:
        buf = self.rcv_buf
        self._rd_ev = False
        if not buf:
            return b""
        if n < 0 or n >= len(buf):
            data = bytes(buf)
            buf.clear()
        else:
            with memoryview(buf) as mv:
                data = bytes(mv[:n])      # one copy (a bytearray slice would be two)
            del buf[:n]
        if not self.closed:               # a closed connection gave its bytes back in _remove
            self._mem.used -= len(data)
        self._read_done(buf)
        return data

    def read_buffer(self) -> bytearray:
        """Everything readable, without a copy: the receive buffer itself is
        handed over (the caller owns it) and a fresh one takes its place.
        Same window updates and events as read()."""
        buf = self.rcv_buf
        self._rd_ev = False
        if not buf:
            return bytearray()
        self.rcv_buf = bytearray()
        if not self.closed:
            self._mem.used -= len(buf)
        self._read_done(self.rcv_buf)
        return buf

    def _read_done(self, buf) -> None:
        if not self.closed and self.state in RECV_STATES:
            # window update when the window opens by >= 2*MSS or half the buffer
            # (receiver SWS avoidance, RFC 9293 §3.8.6.2.2) -- and only while
            # the window the peer holds may stall it (less than 4 segments).
            # A larger window is raised by the next ACK: no extra packet per
            # request just because the SYN-ACK could not offer more than 64 KB.
            adv = ((self.rcv_adv - self.rcv_nxt + _HALF) & _M) - _HALF     # seq_sub, inline
            mss = self.rcv_mss
            if adv < 4 * mss:
                free = self._rcv_cap - len(buf)
                th = self._rcv_cap >> 1
                if 2 * mss < th:
                    th = 2 * mss
                if free - adv >= th:
                    self._ack_owed = ACK_NOW
                    self.host.dirty[self] = None

    @property
    def readable(self) -> int:
        return len(self.rcv_buf)

    @property
    def eof(self) -> bool:
        return self.fin_rcvd and not self.rcv_buf

    def _deliver(self, payload, n, now):
        """In-order data at rcv_nxt."""
        self.rcv_buf += payload
        self._mem.used += n
        self.rcv_nxt = (self.rcv_nxt + n) & _M
        self._rcv_off += n
        self.bytes_in += n
        if n > self._peer_seg:
            self._peer_seg = n if n <= self.rcv_mss else self.rcv_mss
        ooo = self.ooo
        if ooo.runs:
            held = ooo.nbytes
            more = ooo.take(self._rcv_off)
            while more is not None:
                m = len(more)
                held -= m                   # moved from the runs to the buffer: same budget
                if m:
                    self.rcv_buf += more
                    self.rcv_nxt = (self.rcv_nxt + m) & _M
                    self._rcv_off += m
                    self.bytes_in += m
                more = ooo.take(self._rcv_off)
            self._mem.used -= held - ooo.nbytes     # what take() discarded as already received
            self._ack_owed = ACK_NOW        # a hole was filled: ACK at once (RFC 5681 §4.2)
            self.host.dirty[self] = None
        else:
            self._rcv_unacked += n
            if self._rcv_unacked >= 2 * self._peer_seg:
                self._ack_owed = ACK_NOW
                self.host.dirty[self] = None
            elif not self._ack_owed:
                self._ack_owed = ACK_DELAYED
                if self.delack_at is None:
                    self.delack_at = t = now + DELACK
                    p = self.poll_at
                    if p is None or t < p:
                        self.poll_at = t
        if self._fin_off is not None and self._fin_off == self._rcv_off:
            self._on_fin(now)
        if not self._rd_ev:
            self._rd_ev = True
            self.host.events.append(_ev.TcpReadable(self))

    def _out_of_order(self, d, payload, n, now):
        ooo = self.ooo
        if ooo is NO_RUNS:
            ooo = self.ooo = Assembler()
        held = ooo.nbytes
        if not ooo.add(self._rcv_off + d, payload):
            self.host.drop("ooo_overflow")
        self._mem.used += ooo.nbytes - held
        self._owe_ack()                      # immediate duplicate ACK carrying SACK

    def _on_fin(self, now):
        self._fin_off = None
        self.fin_rcvd = True
        self.rcv_nxt = (self.rcv_nxt + 1) & _M
        self._owe_ack()
        st = self.state
        if st == ESTABLISHED:
            self.state = CLOSE_WAIT
        elif st == FIN_WAIT_1:
            if self.snd_una == ((self._buf_seq + len(self.snd_buf) + 1) & _M):
                self._enter_time_wait(now)
            else:
                self.state = CLOSING
        elif st == FIN_WAIT_2:
            self._enter_time_wait(now)
        # always announced (even if a data event is still unread): a host that
        # reads only on events must learn about the end of the stream
        self._rd_ev = True
        self.host.events.append(_ev.TcpReadable(self))

    def _owe_ack(self):
        self._ack_owed = ACK_NOW
        self.host.dirty[self] = None

    def _challenge_ack(self, now):
        if now - self._chal_t >= 1.0:
            self._chal_t = now
            self._chal_n = 0
        if self._chal_n >= CHALLENGE_ACKS_PER_SEC:
            self.host.drop("challenge_ack_limited")
            return
        self._chal_n += 1
        self._owe_ack()

    def _prep(self, now):
        """Window field and option block for segments sent now (the same for a
        whole burst); records that an ACK for rcv_nxt goes out."""
        # advertised window with receiver SWS avoidance; never shrink the right edge
        rnxt = self.rcv_nxt
        free = self._rcv_cap - len(self.rcv_buf)
        mem = self._mem
        if mem.limit:
            # a memory budget: offer only a share of what is left (the right
            # edge already advertised stays where it is, below)
            free = mem.clamp(free, len(self.rcv_buf) + self.ooo.nbytes, self.rcv_mss)
        adv = (self.rcv_adv - rnxt) & _M
        if adv >= _HALF:
            adv = 0
        if free > adv:
            inc = free - adv
            mss = self.rcv_mss
            if inc >= mss or inc >= (self._rcv_cap >> 1) or adv == 0 and free >= mss:
                adv = free
        ws = self.rcv_wscale
        field = adv >> ws
        if field > 65535:
            field = 65535
        w = field << ws
        if ((rnxt + w - self.rcv_adv) & _M) < _HALF:
            self.rcv_adv = (rnxt + w) & _M
        self.rcv_wnd = w
        if self.ts_ok:
            opt = _TSOPT.pack(1, 1, 8, 10, (int(now * 1000) + self._ts_off) & _M, self.ts_recent)
            if self.sack_ok and self.ooo.runs:
                opt += self._sack_opt(3)
        elif self.sack_ok and self.ooo.runs:
            opt = self._sack_opt(4)
        else:
            opt = b""
        self.last_ack_sent = rnxt
        self._ack_owed = ACK_NONE
        self._rcv_unacked = 0
        self.delack_at = None
        return field, opt

    def _sack_len(self):
        """Bytes the SACK option takes in our segments now."""
        k = len(self.ooo.runs)
        lim = 3 if self.ts_ok else 4
        return 4 + 8 * (k if k < lim else lim)

    def _sack_opt(self, limit):
        base = self._rcv_off
        rn = self.rcv_nxt
        blocks = self.ooo.blocks(limit)
        parts = [_SACKHDR.pack(1, 1, 5, 2 + 8 * len(blocks))]
        for a, b in blocks:
            parts.append(_BLOCK.pack((rn + a - base) & _M, (rn + b - base) & _M))
        return b"".join(parts)
