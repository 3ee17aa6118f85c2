"""TCP: the passive side of RFC 9293 for any address and port.

The parts, each in its own module:

  const       flags, RFC state names, timer constants, TcpError (and GsoSegment,
              from netstack.wire.templates, where the stack's packets are built)
  connection  TcpConnection: host API, stack contract, header prediction and
              the §3.10.7.4 state machine (one method per step), closing
  receiver    rcv_*, receive buffer, out-of-order runs, SACK option, window
  sender      snd_*, send buffer, cwnd/ssthresh/recovery, scoreboard, RTT, bursts
  timers      RTO, persist, delayed ACK, keepalive, TIME_WAIT, connect timeout
  demux       Stack._tcp_in: parse, verify, look up / open, answer no-flow segments

CONTRACT between the Stack and a TcpConnection:

  TcpConnection(host, key, family, syn_quote, now)
      host: the narrow flow-host interface of netstack.host (the stack's
      `tcp_host`); key = (src, sport, dst, dport): the client's address/port
      first (addresses are bytes, 4 or 16 long); syn_quote is the SYN's IP
      header + 8 bytes of TCP header, kept until the request is answered so
      that a reject can quote it in an ICMP error.
  conn.segment_arrives(seq, ack, flags, wnd, opts, payload, now)
      called by the demux (opts: netstack.wire.tcp.TcpOptions or None;
      payload: memoryview).  The first call on a new connection is its SYN:
      it records IRS/options and calls host.request(conn), which counts the
      request and raises events.TcpConnectRequest(conn).
  conn.flush(now)      send what is owed: data within windows, a deferred
                       ACK / window update, FIN.  Called by Stack.poll for
                       connections that called host.dirty[conn] = None.
  conn.on_timer(now)   called by Stack.poll when now >= conn.poll_at.
  conn.poll_at         earliest deadline (float) or None; read by the stack
                       after every call above.
  conn.on_pmtu(mtu, now)  an ICMP packet-too-big / fragmentation-needed
                       quoted one of this connection's segments.
  conn.closed          True once the connection left the table (it calls
                       host.closed(conn, reason) exactly once).
  conn.id, conn._sched_at   timer-heap bookkeeping (id from host.next_id()).
  TCP-internal discards (out of window, PAWS, ...) are host.drop(reason),
  counted in stack.tcp_drops.

Host-facing handle API (the engine and tests use only this):
  accept(), reject(how="rst"|"icmp-port"|"icmp-host"|"icmp-net"|"icmp-admin"|"drop")
  read(n=-1) -> bytes, read_buffer() -> bytearray (all, no copy),
  readable (int), eof (bool: FIN received and all read)
  write(data) -> int accepted, send_space (int), send_queued (int)
  shutdown()  FIN after queued data;   abort()  RST now
  family, src, sport, dst, dport, key, state (RFC name), user (host slot),
  bytes_in, bytes_out, created
Host calls never send directly: they touch the connection, and the next
stack.poll(now) flushes (so one batch yields one ACK).

Sequence arithmetic is modulo 2**32 everywhere: netstack.seq, written inline
(`(a - b) & MASK < HALF`) on the per-segment paths.  Timers: one deadline per
connection (`poll_at`), except the two every connection has and every
connection has equally long: an unanswered request's connect timeout
(`conn_at`) and TIME_WAIT (`tw_at`) wait in the stack's FIFO queues
(host.request_queue, host.tw_queue), whose deadlines arrive in order, so no
heap entry is made for them and poll() calls on_timer when they are due.
Arming a timer only ever lowers poll_at; a timer pushed later (the RTO
restarted by every ACK) is noticed when poll_at fires early and is
recomputed exactly (`_arm`), so the stack's heap sees one entry per
connection, not one per ACK.  Receive buffer: a bytearray (read() = bytes
+ del); the window we accept is what we advertised or the free buffer,
whichever is larger, so memory stays bounded by config.rcv_buf.  Send buffer:
a bytearray trimmed on ACK, segments sliced out of one memoryview per burst.
"""

from .connection import TcpConnection
from .const import (
    ACK, CLOSE_WAIT, CLOSED, CLOSING, ESTABLISHED, FIN, FIN_WAIT_1, FIN_WAIT_2, LAST_ACK, LISTEN, PSH, RST,
    SYN, SYN_RECEIVED, TIME_WAIT, URG, GsoSegment, TcpError,
)
from .demux import tcp_input

__all__ = [
    "ACK", "CLOSE_WAIT", "CLOSED", "CLOSING", "ESTABLISHED", "FIN", "FIN_WAIT_1", "FIN_WAIT_2", "LAST_ACK",
    "LISTEN", "PSH", "RST", "SYN", "SYN_RECEIVED", "TIME_WAIT", "URG", "GsoSegment", "TcpConnection",
    "TcpError", "tcp_input",
]
