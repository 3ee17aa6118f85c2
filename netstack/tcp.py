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


# --- sketch of the demux, moved here from stack.py; the TCP owner rewrites it.
# from .stack import ACK, FIN, PROTO_TCP, RST, SYN, _TCP
# from .wire import checksum as ck
# from .wire.errors import WireError
# from .wire.tcp import parse_options
# from .wire.templates import TcpTemplate
#
#     # ---------------------------------------------------------------- TCP
#
#     def _tcp_in(self, family, src, dst, mv, off, now):
#         seglen = len(mv) - off
#         if seglen < 20:
#             self.drops["truncated"] += 1
#             return
#         sport, dport, seq, ack, doff, flags, wnd, _csum, _urp = _TCP.unpack_from(mv, off)
#         doff = (doff >> 4) << 2
#         if doff < 20 or doff > seglen:
#             self.drops["bad_tcp_offset"] += 1
#             return
#         l4 = mv[off:]
#         if self.config.verify_checksums:
#             ps = ck.pseudo4(src, dst, PROTO_TCP, seglen) if family == 4 else ck.pseudo6(src, dst, PROTO_TCP, seglen)
#             if ck.sum16(l4, ps) != 0xFFFF:
#                 self.drops["bad_tcp_checksum"] += 1
#                 return
#         opts = None
#         if doff > 20:
#             try:
#                 opts = parse_options(l4[20:doff])
#             except WireError:
#                 self.drops["bad_tcp_options"] += 1
#                 return
#         key = (src, sport, dst, dport)
#         conn = self.tcp.get(key)
#         if conn is None:
#             conn = self._tcp_new(family, key, flags, seq, ack, mv, off, seglen - doff, now)
#             if conn is None:
#                 return
#         conn.segment_arrives(seq, ack, flags, wnd, opts, l4[doff:], now)
#         if not conn.closed:
#             self._reschedule(conn)
#
#     def _tcp_new(self, family, key, flags, seq, ack, mv, off, datalen, now):
#         """A segment for no flow: a plain SYN opens one; the rest is answered
#         as RFC 9293 §3.10.7.1 (CLOSED state) says."""
#         if flags & RST:
#             self.drops["tcp_rst_no_flow"] += 1
#             return None
#         if (flags & (SYN | ACK | FIN)) != SYN:
#             self.drops["tcp_no_flow"] += 1
#             self._send_rst_for(family, key, flags, seq, ack, datalen)
#             return None
#         cfg = self.config
#         if self.pending >= cfg.max_pending:
#             self.drops["tcp_backlog_full"] += 1
#             return None
#         if len(self.tcp) + len(self.udp) >= cfg.max_flows:
#             self.drops["flow_limit"] += 1
#             self._send_rst_for(family, key, flags, seq, ack, datalen)
#             return None
#         src, sport, dst, dport = key
#         conn = TcpConnection(self, key, family, bytes(mv[:off + 8]), now)
#         self.tcp[key] = conn
#         return conn
#
#     def _send_rst_for(self, family, key, flags, seq, ack, datalen):
#         src, sport, dst, dport = key
#         tpl = TcpTemplate(family, dst, src, dport, sport, self.config)
#         if flags & ACK:
#             self.output.append(tpl.build(ack, 0, RST, 0, b"", b""))
#         else:
#             seglen = datalen + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
#             self.output.append(tpl.build(0, (seq + seglen) & 0xFFFFFFFF, RST | ACK, 0, b"", b""))
#
#     def _tcp_remove(self, conn, reason: str) -> None:
#         """Called by a connection when it leaves the flow table."""
#         if self.tcp.get(conn.key) is conn:
#             del self.tcp[conn.key]
#         self.events.append(ev.TcpClosed(conn, reason))
#


class TcpConnection:  # placeholder until the implementation lands
    def __init__(self, *a, **k):
        raise NotImplementedError("netstack.tcp is not implemented yet")


def tcp_input(stack, family, src, dst, mv, off, now):
    stack.drops["tcp_unimplemented"] += 1
