"""TCP connection: the passive side of RFC 9293 for any address and port.

CONTRACT between Stack and TcpConnection (stack.py relies on it):

  TcpConnection(stack, key, family, syn_quote, now)
      key = (src, sport, dst, dport): the client's address/port first
      (addresses are bytes, 4 or 16 long); syn_quote is the SYN's IP header
      + 8 bytes of TCP header, kept until the request is answered so that a
      reject can quote it in an ICMP error.
  conn.segment_arrives(seq, ack, flags, wnd, opts, payload, now)
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
  conn.closed          True once the connection left the table
                       (it calls stack._tcp_remove(self, reason) exactly once).
  conn.id, conn._sched_at   heap bookkeeping (id from stack._next_id()).

Host-facing handle API (the engine and tests use only this):
  accept(), reject(how="rst"|"icmp-port"|"icmp-host"|"icmp-net"|"icmp-admin"|"drop")
  read(n=-1) -> bytes, readable (int), eof (bool: FIN received and all read)
  write(data) -> int accepted, send_space (int)
  shutdown()  FIN after queued data;   abort()  RST now
  family, src, sport, dst, dport, key, state (RFC name), user (host slot),
  bytes_in, bytes_out, created
Host calls never send directly: they touch the connection, and the next
stack.poll(now) flushes (so one batch yields one ACK).
"""

from __future__ import annotations

# TODO(tcp): implementation


class TcpConnection:  # placeholder until the implementation lands
    def __init__(self, *a, **k):
        raise NotImplementedError("netstack.tcp is not implemented yet")
