"""TCP connection: the passive side of RFC 9293 for any address and port.

CONTRACT between Stack and TcpConnection (stack.py relies on it):

  TcpConnection(stack, key, family, syn_quote, now)
      key = (src, sport, dst, dport): the client's address/port first
      (addresses are bytes, 4 or 16 long); syn_quote is the SYN's IP header
      + 8 bytes of TCP header, kept until the request is answered so that a
      reject can quote it in an ICMP error.
  conn.segment_arrives(seq, ack, flags, wnd, opts, payload, now)
      called by tcp_input(stack, family, src, dst, mv, off, now), the demux
      (bound as Stack._tcp_in): parse, verify checksum if
      stack.config.verify_checksums, look up stack.tcp, open on SYN, answer
      segments for no flow per RFC 9293 3.10.7.1.
      opts: netstack.wire.tcp.TcpOptions or None; payload: memoryview.
      The first call on a new connection is its SYN (LISTEN processing):
      it records IRS/options, counts itself in stack.pending and appends
      events.TcpConnectRequest(self) to stack.events.
  conn.flush(now)      send what is owed: data within windows, a deferred
                       ACK / window update, FIN.  Called by Stack.poll for
                       connections that called stack._touch(self).
  conn.on_timer(now)   called by Stack.poll when now >= conn.poll_at.
  conn.poll_at         earliest deadline (float) or None; read by the stack
                       after every call above (stack._reschedule).
  conn.on_pmtu(mtu, now)  an ICMP packet-too-big / fragmentation-needed
                       quoted one of this connection's segments.
  TCP-internal discards (out of window, PAWS, ...) are counted in
  stack.tcp_drops[reason]; ICMP errors for a reject go through
  stack.icmp_unreachable(syn_quote, kind).
  conn.closed          True once the connection left the table
                       (it calls stack._tcp_remove(self, reason) exactly once).
  conn.id, conn._sched_at   heap bookkeeping (id from stack._next_id()).

Host-facing handle API (the engine and tests use only this):
  accept(), reject(how="rst"|"icmp-port"|"icmp-host"|"icmp-net"|"icmp-admin"|"drop")
  read(n=-1) -> bytes, read_buffer() -> bytearray (all, no copy),
  readable (int), eof (bool: FIN received and all read)
  write(data) -> int accepted, send_space (int)
  shutdown()  FIN after queued data;   abort()  RST now
  family, src, sport, dst, dport, key, state (RFC name), user (host slot),
  bytes_in, bytes_out, created
Host calls never send directly: they touch the connection, and the next
stack.poll(now) flushes (so one batch yields one ACK).

HOW IT IS BUILT (one file, in this order):
  host API -> stack contract (flush / on_timer / on_pmtu) -> segment_arrives:
  a header-prediction fast path for ESTABLISHED in-order data and pure ACKs,
  else `_slow`, which follows RFC 9293 §3.10.7.4 step by step (PAWS, sequence
  check, RST and SYN per RFC 5961, ACK, text, FIN) -> receiver (`_deliver`,
  out-of-order runs in netstack.assembler, SACK option, window with SWS
  avoidance in `_prep`) -> sender (`_new_ack`: RTT (RFC 6298 / 7323), cwnd,
  NewReno (RFC 6582) and SACK recovery (RFC 6675, scoreboard) ; `_output`:
  one burst per flush with one window/option block, GSO super-segments,
  FIN piggybacked) -> timers (RTO with backoff and Karn's rule, persist,
  delayed ACK, keepalive, TIME_WAIT, connect timeout) -> closing -> demux.

  Sequence arithmetic is modulo 2**32 everywhere: the helpers of netstack.seq,
  written inline (`(a - b) & _M < _HALF`) on the per-segment paths.
  Timers: one deadline per connection (`poll_at`).  Arming a timer only ever
  lowers poll_at; a timer pushed later (the RTO restarted by every ACK) is
  noticed when poll_at fires early and is recomputed exactly (`_arm`), so the
  stack's heap sees one entry per connection, not one per ACK.
  Receive buffer: a bytearray (read() = bytes + del); the window we accept
  is what we advertised or the free buffer, whichever is larger, so memory
  stays bounded by config.rcv_buf.  Send buffer: a bytearray trimmed on ACK,
  segments sliced out of one memoryview per burst.
"""

from __future__ import annotations

import struct

from . import events as _ev
from .assembler import Assembler
from .seq import HALF as _HALF
from .seq import MASK as _M
from .wire import checksum as _ck
from .wire.errors import WireError
from .wire.tcp import parse_options
from .wire.templates import TcpTemplate

FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_PROTO_TCP = 6
_TCP = struct.Struct("!HHIIBBHHH")
_TSOPT = struct.Struct("!BBBBII")      # NOP NOP TS(8) len 10, tsval, tsecr
_SACKHDR = struct.Struct("!BBBB")      # NOP NOP SACK(5) len
_BLOCK = struct.Struct("!II")
_MSS_OPT = struct.Struct("!BBH")
_WS_OPT = struct.Struct("!BBBB")

LISTEN = "LISTEN"                      # a connect request the host has not answered
SYN_RECEIVED = "SYN_RECEIVED"
ESTABLISHED = "ESTABLISHED"
FIN_WAIT_1 = "FIN_WAIT_1"
FIN_WAIT_2 = "FIN_WAIT_2"
CLOSE_WAIT = "CLOSE_WAIT"
CLOSING = "CLOSING"
LAST_ACK = "LAST_ACK"
TIME_WAIT = "TIME_WAIT"
CLOSED = "CLOSED"

# states in which we may send data / in which the peer may still send data
_SEND_STATES = frozenset((ESTABLISHED, CLOSE_WAIT, FIN_WAIT_1, CLOSING, LAST_ACK))
_RECV_STATES = frozenset((ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2))
_WRITE_STATES = frozenset((LISTEN, SYN_RECEIVED, ESTABLISHED, CLOSE_WAIT))

_REJECT_KINDS = {"rst": None, "drop": None, "icmp-port": "port", "icmp-host": "host",
                 "icmp-net": "net", "icmp-admin": "admin"}

INITIAL_RTO = 1.0          # RFC 6298 §2.1
DELACK = 0.04              # delayed-ACK timer for a lone segment
CHALLENGE_ACKS_PER_SEC = 10  # RFC 5961 §7, per connection (no global side channel)
MAX_SACK_BLOCKS = 16       # scoreboard entries kept
MIN_MSS = 88               # floor for the peer's MSS and PMTU updates (as Linux)
DEFAULT_MSS = {4: 536, 6: 1220}   # RFC 9293 §3.7.1 / RFC 8200 §5 when the SYN has no MSS option


class TcpError(Exception):
    """Host misuse of a connection handle (write after shutdown, accept twice, ...)."""


class GsoSegment(bytes):
    """An emitted packet whose TCP payload is larger than the send MSS: the
    device (TSO/GSO) cuts it into gso_size pieces."""
    gso_size: int = 0


def _sdiff(a, b):
    """Signed a - b modulo 2**32."""
    d = (a - b) & _M
    return d - 0x100000000 if d >= _HALF else d


class TcpConnection:
    __slots__ = (
        "stack", "key", "family", "src", "sport", "dst", "dport", "id", "_sched_at", "poll_at",
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
    )

    def __init__(self, stack, key, family, syn_quote, now):
        cfg = stack.config
        self.stack = stack
        self.key = key
        self.family = family
        self.src, self.sport, self.dst, self.dport = key
        self.id = stack._next_id()
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
        iss = self.iss = stack.rng.getrandbits(32)
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
        self.ooo = Assembler()
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
        self._ts_off = stack.rng.getrandbits(32)
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
        self._ack_owed = 0
        self._rd_ev = False
        self._wr_blocked = False
        self._pending_close = None
        self._chal_t = 0.0
        self._chal_n = 0

    def __repr__(self):
        return f"<TcpConnection {self.state} {self.sport}->{self.dport} id={self.id}>"

    # ================================================================ host API

    def accept(self) -> None:
        """Answer the connect request: the SYN-ACK goes out at the next poll."""
        if self.state != LISTEN or self._pending_close is not None or self.closed:
            raise TcpError(f"accept() in state {self.state}")
        self.state = SYN_RECEIVED
        self.stack.pending -= 1
        self.syn_quote = None
        self.conn_at = None
        self.stack._touch(self)

    def reject(self, how: str = "rst") -> None:
        """Refuse the connect request: "rst", "icmp-port|host|net|admin" or "drop"."""
        if how not in _REJECT_KINDS:
            raise ValueError(f"reject(how={how!r}): expected one of {sorted(_REJECT_KINDS)}")
        if self.state != LISTEN or self._pending_close is not None or self.closed:
            raise TcpError(f"reject() in state {self.state}")
        self._pending_close = ("rejected", how)
        self.stack._touch(self)

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
        self._read_done(self.rcv_buf)
        return buf

    def _read_done(self, buf) -> None:
        if not self.closed and self.state in _RECV_STATES:
            # window update when the window opens by >= 2*MSS or half the buffer
            # (receiver SWS avoidance, RFC 9293 §3.8.6.2.2) -- and only while
            # the window the peer holds may stall it (less than 4 segments).
            # A larger window is raised by the next ACK: no extra packet per
            # request just because the SYN-ACK could not offer more than 64 KB.
            adv = _sdiff(self.rcv_adv, self.rcv_nxt)
            mss = self.rcv_mss
            if adv < 4 * mss:
                free = self._rcv_cap - len(buf)
                th = self._rcv_cap >> 1
                if 2 * mss < th:
                    th = 2 * mss
                if free - adv >= th:
                    self._ack_owed = 2
                    self.stack._touch(self)

    @property
    def readable(self) -> int:
        return len(self.rcv_buf)

    @property
    def eof(self) -> bool:
        return self.fin_rcvd and not self.rcv_buf

    def write(self, data) -> int:
        """Queue bytes for sending; returns how many were accepted (<= send_space)."""
        if self.closed or self._pending_close is not None or self.fin_queued or self.state not in _WRITE_STATES:
            raise TcpError(f"write() in state {self.state}" + (" after shutdown" if self.fin_queued else ""))
        space = self._snd_cap - len(self.snd_buf)
        n = len(data)
        if n > space:
            n = space if space > 0 else 0
            self._wr_blocked = True
            if n == 0:
                return 0
            self.snd_buf += memoryview(data)[:n]
        else:
            self.snd_buf += data
        self.bytes_out += n
        self.stack._touch(self)
        return n

    @property
    def send_space(self) -> int:
        if self.closed or self.fin_queued:
            return 0
        s = self._snd_cap - len(self.snd_buf)
        return s if s > 0 else 0

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
        self.stack._touch(self)

    def abort(self) -> None:
        """Reset the connection (RST at the next poll, then TcpClosed "aborted")."""
        if self.closed or self._pending_close is not None:
            return
        self._pending_close = ("aborted", "rst")
        self.stack._touch(self)

    @property
    def send_queued(self) -> int:
        """Bytes written but not yet acknowledged by the peer."""
        return len(self.snd_buf)

    # ======================================================= stack contract

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

    def on_timer(self, now: float) -> None:
        if self.closed:
            return
        t = self.conn_at
        if t is not None and now >= t:
            if self.state == LISTEN and self._pending_close is None:
                self.stack.tcp_drops["connect_timeout"] += 1
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
        ka = self.stack.config.keepalive
        if ka is not None and self.state in _KA_STATES:
            cfg = self.stack.config
            due = self.last_rcv + ka + self._ka_n * cfg.keepalive_interval
            if now >= due and self.snd_una == self.snd_max:
                if self._ka_n >= cfg.keepalive_count:
                    self.stack.tcp_drops["keepalive_timeout"] += 1
                    self._send_rst()
                    self._remove("timeout")
                    return
                self._ka_n += 1
                self._emit((self.snd_una - 1) & _M, ACK, b"", now)
        self._arm()

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
        if self.state in _SEND_STATES and self.snd_una != self.snd_max:
            self.snd_nxt = self.snd_una
            self._rtt_seq = None
            self.stack._touch(self)

    # ====================================================== segment arrives

    def segment_arrives(self, seq, ack, flags, wnd, opts, payload, now):
        st = self.state
        # ---- header prediction: ESTABLISHED, in-order, only ACK(/PSH), nothing special
        if (st is ESTABLISHED and (flags & 0xF7) == ACK and seq == self.rcv_nxt
                and not self.in_recovery and not self.ooo.runs):
            ts_val = None
            if opts is not None:
                if opts.sack is not None or opts.mss is not None:
                    return self._slow(st, seq, ack, flags, wnd, opts, payload, now)
                ts_val = opts.ts_val
                if ts_val is not None and self.ts_ok:
                    d = (ts_val - self.ts_recent) & _M
                    if d >= _HALF:
                        return self._slow(st, seq, ack, flags, wnd, opts, payload, now)
            n = len(payload)
            if n > self._rcv_cap - len(self.rcv_buf):
                room = (self.rcv_adv - seq) & _M
                if room >= _HALF or n > room:
                    return self._slow(st, seq, ack, flags, wnd, opts, payload, now)
            una = self.snd_una
            acked = (ack - una) & _M
            swnd = wnd << self.snd_wscale
            if acked == 0:
                if n == 0:
                    # pure ACK for nothing new: a dup ACK or a window update -> slow path
                    return self._slow(st, seq, ack, flags, wnd, opts, payload, now)
            elif acked > ((self.snd_max - una) & _M):
                return self._slow(st, seq, ack, flags, wnd, opts, payload, now)
            self.last_rcv = now
            self._ka_n = 0
            if ts_val is not None and self.ts_ok and seq == self.last_ack_sent:
                self.ts_recent = ts_val
            if acked:
                self._new_ack(ack, acked, opts, now)
            # window update (RFC 9293 §3.10.7.4 step 5)
            if ((seq - self.snd_wl1) & _M) < _HALF and ((ack - self.snd_wl2) & _M) < _HALF:
                old = self.snd_wnd
                self.snd_wnd = swnd
                self.snd_wl1 = seq
                self.snd_wl2 = ack
                if swnd > self.max_snd_wnd:
                    self.max_snd_wnd = swnd
                if swnd > old and self.snd_buf:
                    self.persist_at = None
                    self._persist_n = 0
                    self.stack._touch(self)
            if n:
                self._deliver(payload, n, now)
            return
        return self._slow(st, seq, ack, flags, wnd, opts, payload, now)

    def _slow(self, st, seq, ack, flags, wnd, opts, payload, now):
        stack = self.stack
        drops = stack.tcp_drops
        if st == LISTEN:
            if self.irs is None:
                self._listen_syn(seq, wnd, opts, payload, now)
                return
            # a request the host has not answered yet
            if flags & RST:
                if seq == self.rcv_nxt and self._pending_close is None:
                    self._remove("reset")      # the client gave up
                else:
                    drops["rst_pending_ignored"] += 1
            elif flags & SYN and seq == self.irs:
                drops["dup_syn"] += 1          # absorbed: the host will answer
            else:
                drops["not_accepted_yet"] += 1
            return
        self.last_rcv = now
        self._ka_n = 0
        n = len(payload)
        if st == SYN_RECEIVED and flags & SYN and not flags & (ACK | RST) and seq == self.irs:
            # the client did not get our SYN-ACK yet: send it again now
            drops["dup_syn"] += 1
            if self.snd_una == self.iss:
                self.snd_nxt = self.iss
                stack._touch(self)
            return
        seglen = n + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
        ts_val = opts.ts_val if opts is not None else None
        # --- PAWS (RFC 7323 §5.3 R1): an old timestamp marks an old duplicate
        if ts_val is not None and self.ts_ok and not flags & RST:
            if ((ts_val - self.ts_recent) & _M) >= _HALF:
                drops["paws"] += 1
                self._owe_ack()
                return
        # --- step 1: sequence number acceptability (RFC 9293 §3.10.7.4).  The
        # window is what we advertised, or the free buffer if larger: bytes we
        # have room for are never thrown away (the buffer still bounds memory).
        rwnd = _sdiff(self.rcv_adv, self.rcv_nxt)
        free = self._rcv_cap - len(self.rcv_buf) - self.ooo.nbytes
        if rwnd < free:
            rwnd = free
        if rwnd < 0:
            rwnd = 0
        d = _sdiff(seq, self.rcv_nxt)
        if seglen == 0:
            # like Linux (tcp_sequence), an ACK exactly at the right edge is
            # accepted: a sender that filled our window sends its ACKs there
            ok = 0 <= d <= rwnd
        else:
            ok = rwnd > 0 and (0 <= d < rwnd or 0 <= d + seglen - 1 < rwnd)
        if not ok:
            if flags & RST:
                drops["rst_out_of_window"] += 1
            elif flags & SYN:
                drops["syn_challenge"] += 1
                self._challenge_ack(now)
            else:
                # one below rcv_nxt with at most one byte: a keepalive or a
                # zero-window probe, answered with an ACK like any stray segment
                if d + seglen <= 0:
                    drops["probe_answered" if d == -1 and seglen <= 1 else "duplicate"] += 1
                else:
                    drops["out_of_window"] += 1
                self._owe_ack()
                if st is TIME_WAIT and flags & FIN:
                    self.tw_at = now + stack.config.time_wait   # a retransmitted FIN restarts 2MSL
            return
        # --- step 2: RST (RFC 5961 §3.2: exact match resets, else challenge ACK)
        if flags & RST:
            if d == 0:
                # in TIME_WAIT both sides were done: it only ends the wait early
                self._remove("closed" if st is TIME_WAIT else "reset")
            else:
                drops["rst_challenge"] += 1
                self._challenge_ack(now)
            return
        # --- step 4: SYN in a synchronized state (RFC 5961 §4): challenge ACK
        if flags & SYN:
            drops["syn_challenge"] += 1
            self._challenge_ack(now)
            return
        # --- step 5: the ACK field
        if not flags & ACK:
            drops["no_ack"] += 1
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
            drops["trimmed_to_window"] += 1
        if st == SYN_RECEIVED:
            if 0 < ((ack - self.snd_una) & _M) <= ((self.snd_max - self.snd_una) & _M):
                # our SYN is acknowledged: the handshake is complete
                self.state = st = FIN_WAIT_1 if self.fin_queued else ESTABLISHED
                self.snd_wnd = wnd << self.snd_wscale
                self.max_snd_wnd = self.snd_wnd
                self.snd_wl1 = seq
                self.snd_wl2 = ack
                if self.ts_ok:
                    self.ts_recent = ts_val if ts_val is not None else self.ts_recent
                if self.snd_buf or self.fin_queued:
                    stack._touch(self)
                ka = stack.config.keepalive
                if ka is not None:
                    self._arm_at(now + ka)
            else:
                drops["bad_ack"] += 1
                stack.output.append(self.tpl.build(ack, 0, RST, 0, b"", b""))
                return
        una = self.snd_una
        acked = (ack - una) & _M
        inflight = (self.snd_max - una) & _M
        if acked >= _HALF:
            # an old ACK (RFC 5961 §5.2: far too old ones are dropped with an ACK)
            if ((una - ack) & _M) > self.max_snd_wnd + 65536:
                drops["old_ack"] += 1
                self._owe_ack()
                return
        elif acked > inflight:
            drops["ack_unsent"] += 1
            self._owe_ack()
            return
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
        # window update (step 5: SND.WL1 < SEG.SEQ or (SND.WL1 = SEG.SEQ and SND.WL2 =< SEG.ACK))
        w1 = _sdiff(seq, self.snd_wl1)
        if acked < _HALF and (w1 > 0 or (w1 == 0 and ((ack - self.snd_wl2) & _M) < _HALF)):
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
                    stack._touch(self)
        # our FIN acknowledged?
        if self.fin_queued and self.snd_una == ((self._buf_seq + len(self.snd_buf) + 1) & _M):
            if st == FIN_WAIT_1:
                self.state = st = FIN_WAIT_2
            elif st == CLOSING:
                self._enter_time_wait(now)
                st = TIME_WAIT
            elif st == LAST_ACK:
                self._remove("closed")
                return
        fin_off = self._rcv_off + d + n      # stream offset of a FIN in this segment
        # --- step 7: segment text
        if n:
            if st in _RECV_STATES:
                if d == 0:
                    self._deliver(payload, n, now)
                else:
                    self._out_of_order(d, payload, n, now)
            else:
                drops["data_after_fin"] += 1
                self._owe_ack()
        # --- step 8: FIN
        if flags & FIN:
            if st == TIME_WAIT:
                self._owe_ack()
                self.tw_at = now + stack.config.time_wait
                self._arm_at(self.tw_at)
            elif self.fin_rcvd:
                self._owe_ack()
            elif fin_off == self._rcv_off:
                self._on_fin(now)
            else:
                self._fin_off = fin_off      # arrives before data still missing
                self._owe_ack()

    # ------------------------------------------------------- LISTEN (SYN)

    def _listen_syn(self, seq, wnd, opts, payload, now):
        stack = self.stack
        cfg = stack.config
        self.irs = seq
        self.rcv_nxt = (seq + 1) & _M
        self.rcv_adv = self.rcv_nxt
        peer_mss = None
        if opts is not None:
            peer_mss = opts.mss
            if opts.wscale is not None:
                self._ws_ok = True
                self.snd_wscale = opts.wscale
                s = 0
                while s < 14 and (65535 << s) < self._rcv_cap:
                    s += 1
                self.rcv_wscale = s
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
        g = getattr(cfg, "gso_max", 0) or 0
        self._gso = min(g, 65535 - 120) if g > self._seg else 0
        self.cwnd = 10 * self._seg                    # RFC 6928 initial window
        self.snd_wnd = self.max_snd_wnd = wnd          # a SYN's window is never scaled
        self.snd_wl1 = seq
        self.snd_wl2 = self.iss
        self.last_ack_sent = self.rcv_nxt
        if payload:
            stack.tcp_drops["syn_data_ignored"] += 1
        stack.pending += 1
        stack.events.append(_ev.TcpConnectRequest(self))
        self.conn_at = now + cfg.connect_timeout
        self._arm_at(self.conn_at)

    # ------------------------------------------------------------ receive

    def _deliver(self, payload, n, now):
        """In-order data at rcv_nxt."""
        self.rcv_buf += payload
        self.rcv_nxt = (self.rcv_nxt + n) & _M
        self._rcv_off += n
        self.bytes_in += n
        if n > self._peer_seg:
            self._peer_seg = n if n <= self.rcv_mss else self.rcv_mss
        ooo = self.ooo
        if ooo.runs:
            more = ooo.take(self._rcv_off)
            while more is not None:
                m = len(more)
                if m:
                    self.rcv_buf += more
                    self.rcv_nxt = (self.rcv_nxt + m) & _M
                    self._rcv_off += m
                    self.bytes_in += m
                more = ooo.take(self._rcv_off)
            self._ack_owed = 2              # a hole was filled: ACK at once (RFC 5681 §4.2)
            self.stack._touch(self)
        else:
            self._rcv_unacked += n
            if self._rcv_unacked >= 2 * self._peer_seg:
                self._ack_owed = 2
                self.stack._touch(self)
            elif not self._ack_owed:
                self._ack_owed = 1
                if self.delack_at is None:
                    self.delack_at = t = now + DELACK
                    p = self.poll_at
                    if p is None or t < p:
                        self.poll_at = t
        if self._fin_off is not None and self._fin_off == self._rcv_off:
            self._on_fin(now)
        if not self._rd_ev:
            self._rd_ev = True
            self.stack.events.append(_ev.TcpReadable(self))

    def _out_of_order(self, d, payload, n, now):
        drops = self.stack.tcp_drops
        if not self.ooo.add(self._rcv_off + d, payload):
            drops["ooo_overflow"] += 1
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
        self.stack.events.append(_ev.TcpReadable(self))

    def _enter_time_wait(self, now):
        self.state = TIME_WAIT
        self.rto_at = self.persist_at = None
        self.tw_at = now + self.stack.config.time_wait
        self._arm_at(self.tw_at)

    def _owe_ack(self):
        self._ack_owed = 2
        self.stack._touch(self)

    def _challenge_ack(self, now):
        if now - self._chal_t >= 1.0:
            self._chal_t = now
            self._chal_n = 0
        if self._chal_n >= CHALLENGE_ACKS_PER_SEC:
            self.stack.tcp_drops["challenge_ack_limited"] += 1
            return
        self._chal_n += 1
        self._owe_ack()

    # --------------------------------------------------------------- send

    def _new_ack(self, ack, acked, opts, now):
        """ACK of new data (snd_una < ack <= snd_max)."""
        buf = self.snd_buf
        nb = (ack - self._buf_seq) & _M
        if nb >= _HALF:
            nb = 0                          # only our SYN was acknowledged
        elif nb > len(buf):
            nb = len(buf)                   # ... and our FIN
        if nb:
            del buf[:nb]
            self._buf_seq = (self._buf_seq + nb) & _M
        self.snd_una = ack
        if ((self.snd_nxt - ack) & _M) >= _HALF:
            self.snd_nxt = ack
        self.retries = 0
        self._persist_n = 0
        # RTT sample (RFC 7323 §4 with timestamps; else one timed segment, Karn's rule)
        r = None
        if self.ts_ok and opts is not None and opts.ts_ecr is not None:
            r = (((int(now * 1000) + self._ts_off) - opts.ts_ecr) & _M)
            r = r / 1000.0 if r < 600000 else None
        elif self._rtt_seq is not None and ((ack - self._rtt_seq) & _M) < _HALF:
            r = now - self._rtt_time
            self._rtt_seq = None
        if r is not None:
            self._rtt_sample(r)
        # congestion control
        seg = self._seg
        if self.in_recovery:
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
                self.stack._touch(self)
        else:
            self.dupacks = 0
            if nb:
                if self.cwnd < self.ssthresh:
                    self.cwnd += nb              # slow start; stretch ACKs count fully
                else:
                    self.cwnd += max(1, seg * nb // self.cwnd)
        if self.scoreboard:
            self._sack_prune()
        # timers: restart the RTO (lazily: poll_at is only ever lowered here)
        if ack == self.snd_max:
            self.rto_at = None
        else:
            self.rto_at = now + self.rto
            p = self.poll_at
            if p is None:
                self.poll_at = self.rto_at
        if buf or self.fin_queued:
            self.stack._touch(self)
        if self._wr_blocked and (self._snd_cap - len(buf)) >= (self._snd_cap >> 1):
            self._wr_blocked = False
            self.stack.events.append(_ev.TcpWritable(self))

    def _rtt_sample(self, r):
        cfg = self.stack.config
        if self.srtt is None:
            self.srtt = r
            self.rttvar = r / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - r)
            self.srtt = 0.875 * self.srtt + 0.125 * r
        rto = self.srtt + max(0.001, 4 * self.rttvar)
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
            self.stack._touch(self)
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
            self.stack._touch(self)

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
        if st in _SEND_STATES:
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
                if self.ooo.runs and self.sack_ok:
                    seg1 -= self._sack_len()     # SACK blocks share the MSS (RFC 6691)
                seg = self._gso or seg1
                tsmax = self.max_snd_wnd >> 1
                snd_max = self.snd_max
                sb = self.scoreboard if (self.scoreboard and nxt != snd_max) else None
                fin_ok = self.fin_queued and st != ESTABLISHED and st != CLOSE_WAIT
                hdr = None
                build = self.tpl.build
                out = self.stack.output
                rnxt = self.rcv_nxt
                gso = self._gso
                with memoryview(buf) as mv:
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
                                out.append(build(nxt, rnxt, ACK | PSH | FIN, field, opt, mv[off:off + n]))
                                nxt = (nxt + n + 1) & _M
                                off += n
                                if 0 < ((nxt - snd_max) & _M) < _HALF:
                                    snd_max = nxt
                                break
                            pkt = build(nxt, rnxt, ACK | PSH, field, opt, mv[off:off + n])
                        else:
                            pkt = build(nxt, rnxt, ACK, field, opt, mv[off:off + n])
                        if gso and n > seg1:
                            pkt = GsoSegment(pkt)
                            pkt.gso_size = seg1
                        out.append(pkt)
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
        wnd = self._rcv_cap - len(self.rcv_buf)
        if wnd > 65535:
            wnd = 65535
        self.rcv_adv = (self.rcv_nxt + wnd) & _M
        self.rcv_wnd = wnd
        self.stack.output.append(self.tpl.build(self.iss, self.rcv_nxt, SYN | ACK, wnd, b"".join(opts), b""))
        self.last_ack_sent = self.rcv_nxt
        self._ack_owed = 0
        self.snd_nxt = (self.iss + 1) & _M
        if self.snd_max == self.iss:
            self.snd_max = self.snd_nxt
            self._rtt_seq = self.snd_nxt
            self._rtt_time = now
        if self.rto_at is None:
            self._arm_at(now + self.rto, "rto_at")

    def _prep(self, now):
        """Window field and option block for segments sent now (the same for a
        whole burst); records that an ACK for rcv_nxt goes out."""
        # advertised window with receiver SWS avoidance; never shrink the right edge
        rnxt = self.rcv_nxt
        free = self._rcv_cap - len(self.rcv_buf)
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
        self._ack_owed = 0
        self._rcv_unacked = 0
        self.delack_at = None
        return field, opt

    def _emit(self, seq, flags, payload, now):
        """Build and queue one segment carrying our current ACK and window."""
        field, opt = self._prep(now)
        pkt = self.tpl.build(seq, self.rcv_nxt, flags, field, opt, payload)
        if self._gso and len(payload) > self._seg:
            pkt = GsoSegment(pkt)
            pkt.gso_size = self._seg - len(opt) + (12 if self.ts_ok else 0)
        self.stack.output.append(pkt)

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

    # ------------------------------------------------------------- timers

    def _on_rto(self, now):
        if self.snd_una == self.snd_max:
            return
        cfg = self.stack.config
        shrunk = self.snd_wnd == 0 and self.state != SYN_RECEIVED
        if shrunk:
            # the receiver closed its window over data in flight: keep probing
            # while it answers (like a persist timer); give up when it is silent
            self._ka_n += 1
            over = self._ka_n > cfg.max_retries
        else:
            self.retries += 1
            over = self.retries > cfg.max_retries
        if over:
            self.stack.tcp_drops["retransmit_timeout"] += 1
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
        if self.state not in _SEND_STATES or not self.snd_buf:
            return
        if ((self.snd_nxt - self._buf_seq) & _M) >= len(self.snd_buf):
            return
        cfg = self.stack.config
        if self.snd_una == self.snd_max and self.snd_wnd == 0:
            # keep probing while the peer answers (RFC 1122 §4.2.2.17); give up
            # after max_retries probes with no segment at all from it
            self._persist_n += 1
            self._ka_n += 1
            if self._ka_n > cfg.max_retries:
                self.stack.tcp_drops["persist_timeout"] += 1
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
        """Recompute poll_at exactly from the armed timers."""
        t = None
        for x in (self.rto_at, self.persist_at, self.delack_at, self.tw_at, self.conn_at):
            if x is not None and (t is None or x < t):
                t = x
        ka = self.stack.config.keepalive
        if ka is not None and self.state in _KA_STATES and self.snd_una == self.snd_max:
            x = self.last_rcv + ka + self._ka_n * self.stack.config.keepalive_interval
            if t is None or x < t:
                t = x
        self.poll_at = t

    # ---------------------------------------------------------- closing

    def _do_pending_close(self):
        reason, how = self._pending_close
        if self.state == LISTEN:
            if how == "rst":
                self._send_rst_to_syn()
            elif how != "drop":
                self.stack.icmp_unreachable(self.syn_quote, _REJECT_KINDS[how])
        elif self.state != TIME_WAIT:
            self._send_rst()
        self._remove(reason)

    def _send_rst(self):
        """RST for a synchronized connection (abort, timeouts)."""
        self.stack.output.append(self.tpl.build(self.snd_nxt, self.rcv_nxt, RST | ACK, 0, b"", b""))

    def _send_rst_to_syn(self):
        """RST answering the SYN of a request (RFC 9293 §3.10.7.1 form)."""
        self.stack.output.append(self.tpl.build(0, self.rcv_nxt, RST | ACK, 0, b"", b""))

    def _remove(self, reason):
        if self.closed:
            return
        if self.state == LISTEN:
            self.stack.pending -= 1
        self.closed = True
        self.state = CLOSED
        self.poll_at = None
        self.rto_at = self.persist_at = self.delack_at = self.tw_at = self.conn_at = None
        self.syn_quote = None
        self.ooo.clear()
        self.stack._tcp_remove(self, reason)


_KA_STATES = frozenset((ESTABLISHED, CLOSE_WAIT, FIN_WAIT_2))


# ====================================================================== demux

def tcp_input(stack, family, src, dst, mv, off, now):
    """Stack._tcp_in: parse one TCP segment and hand it to its connection."""
    seglen = len(mv) - off
    if seglen < 20:
        stack.drops["truncated"] += 1
        return
    sport, dport, seq, ack, doff, flags, wnd, _csum, _urp = _TCP.unpack_from(mv, off)
    doff = (doff >> 4) << 2
    if doff < 20 or doff > seglen:
        stack.drops["bad_tcp_offset"] += 1
        return
    key = (src, sport, dst, dport)
    conn = stack.tcp.get(key)
    if stack.config.verify_checksums:
        if conn is not None:
            ps = conn._ps + seglen            # the flow's pseudo-header sum, cached
        else:
            ps = (_ck.pseudo4 if family == 4 else _ck.pseudo6)(src, dst, _PROTO_TCP, seglen)
        if _ck.sum16(mv[off:], ps) != 0xFFFF:
            stack.drops["bad_tcp_checksum"] += 1
            return
    opts = None
    if doff > 20:
        try:
            opts = parse_options(mv[off + 20:off + doff])
        except WireError:
            stack.drops["bad_tcp_options"] += 1
            return
    if conn is None:
        conn = _tcp_new(stack, family, key, flags, seq, ack, mv, off, seglen - doff, now)
        if conn is None:
            return
    elif conn.state is TIME_WAIT and (flags & (SYN | ACK | RST | FIN)) == SYN and _tw_reuse(conn, seq, opts):
        # RFC 9293 §3.10.7.4 / RFC 6191: a new incarnation ends TIME_WAIT early
        conn._remove("closed")
        conn = _tcp_new(stack, family, key, flags, seq, ack, mv, off, seglen - doff, now)
        if conn is None:
            return
    stack.delivered += 1
    conn.segment_arrives(seq, ack, flags, wnd, opts, mv[off + doff:], now)
    at = conn.poll_at
    if at is not None and at != conn._sched_at and not conn.closed:
        stack._reschedule(conn)


def _tw_reuse(conn, seq, opts):
    if conn.ts_ok and opts is not None and opts.ts_val is not None:
        return 0 < ((opts.ts_val - conn.ts_recent) & _M) < _HALF
    return 0 < ((seq - conn.rcv_nxt) & _M) < _HALF


def _tcp_new(stack, family, key, flags, seq, ack, mv, off, datalen, now):
    """A segment for no flow: a plain SYN opens one; the rest is answered
    as RFC 9293 §3.10.7.1 (CLOSED state) says."""
    if flags & RST:
        stack.drops["tcp_rst_no_flow"] += 1
        return None
    if (flags & (SYN | ACK | FIN)) != SYN:
        stack.drops["tcp_no_flow"] += 1
        _send_rst_for(stack, family, key, flags, seq, ack, datalen)
        return None
    cfg = stack.config
    if stack.pending >= cfg.max_pending:
        stack.drops["tcp_backlog_full"] += 1
        return None
    if len(stack.tcp) + len(stack.udp) >= cfg.max_flows:
        stack.drops["flow_limit"] += 1
        _send_rst_for(stack, family, key, flags, seq, ack, datalen)
        return None
    conn = TcpConnection(stack, key, family, bytes(mv[:off + 8]), now)
    stack.tcp[key] = conn
    return conn


def _send_rst_for(stack, family, key, flags, seq, ack, datalen):
    src, sport, dst, dport = key
    tpl = TcpTemplate(family, dst, src, dport, sport, stack.config)
    if flags & ACK:
        stack.output.append(tpl.build(ack, 0, RST, 0, b"", b""))
    else:
        n = datalen + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
        stack.output.append(tpl.build(0, (seq + n) & _M, RST | ACK, 0, b"", b""))
