"""The engine's DNS hijack: flows to port 53 (every address with hijack,
else the DNS servers' addresses) are answered by the engine's DNS server
(tun2xray.dns.server) instead of being dialled. UDP: one reply datagram per
query. TCP: the stack's connection is accepted at once and carries queries
and replies with the 2-byte length framing of RFC 1035 4.2.2. A mixin of
Engine; its state is the Engine's (``self.dns``, the server, or None).
"""

from __future__ import annotations

DNS_URL = "dns"                 # what status shows as a hijacked flow's inbound
TCP_OUTSTANDING = 16            # queries one TCP connection may have open before we stop reading it
TCP_IDLE = 30.0                 # seconds a TCP DNS connection may sit idle before we close it (RFC 7766 6.2.3)
FRAME_MAX = 2 + 65535


class DnsUdp:
    """A hijacked UDP flow (the engine's UdpRelay shape: nothing upstream)."""

    name = None                     # answered here, never dialled by name

    __slots__ = ("flow", "url", "queue", "dok", "assoc", "dst_host", "dropped")

    def __init__(self, flow):
        self.flow = flow
        self.url = DNS_URL
        self.queue = ()
        self.dok = None
        self.assoc = None
        self.dst_host = flow.dst
        self.dropped = 0


class DnsTcp:
    """A hijacked TCP connection: length-framed queries in, replies out."""

    name = None

    __slots__ = ("engine", "conn", "url", "buf", "pending", "outstanding", "bytes_up", "bytes_down", "done",
                 "busy", "idle_at", "timer")

    def __init__(self, engine, conn):
        self.engine = engine
        self.conn = conn
        self.url = DNS_URL
        self.buf = bytearray()
        self.pending = b""          # reply bytes the send buffer did not take
        self.outstanding = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.done = False
        self.busy = False           # inside _queries: replies given at once must not read again
        self.idle_at = engine.loop.time() + TCP_IDLE
        self.timer = engine.loop.call_at(self.idle_at, self._idle)

    def _idle(self) -> None:
        """Close a connection that carried nothing for TCP_IDLE (FIN once
        every reply is out); a busy one looks again later."""
        self.timer = None
        conn = self.conn
        if conn.closed or self.done:
            return
        loop = self.engine.loop
        if loop.time() < self.idle_at or self.outstanding or self.pending:
            self.timer = loop.call_at(max(self.idle_at, loop.time() + 1.0), self._idle)
            return
        self.done = True
        conn.shutdown()
        self.engine.kick()

    def pump_up(self) -> None:
        conn = self.conn
        if conn.closed or self.done:
            return
        if self.outstanding < TCP_OUTSTANDING and conn.readable:
            self.idle_at = self.engine.loop.time() + TCP_IDLE
            data = conn.read_buffer()
            self.bytes_up += len(data)
            self.buf += data
            self._queries()
        self._maybe_end()

    def _queries(self) -> None:
        buf = self.buf
        dns = self.engine.dns
        self.busy = True
        try:
            while len(buf) >= 2 and self.outstanding < TCP_OUTSTANDING:
                n = (buf[0] << 8) | buf[1]
                if len(buf) < 2 + n:
                    break
                wire = bytes(buf[2:2 + n])
                del buf[:2 + n]
                self.outstanding += 1
                if not dns.handle(wire, True, self._reply):
                    self.outstanding -= 1           # dropped (counted): no reply comes
        finally:
            self.busy = False

    def _reply(self, out) -> None:
        self.outstanding -= 1
        conn = self.conn
        if conn.closed or self.done:
            return
        data = len(out).to_bytes(2, "big") + out
        self.bytes_down += len(data)
        if self.pending:
            self.pending += data
        else:
            n = conn.write(data)
            if n < len(data):
                self.pending = data[n:]
        if not self.busy:
            self.pump_up()                  # a later reply: read on, or end after the client's FIN
        self.engine.kick()

    def _maybe_end(self) -> None:
        conn = self.conn
        if conn.eof and not conn.readable and not self.outstanding and not self.pending and not self.done:
            self.close()
            conn.shutdown()

    def pump_down(self) -> None:
        conn = self.conn
        if conn.closed or not self.pending or self.done:
            return
        n = conn.write(self.pending)
        self.pending = self.pending[n:]
        self._maybe_end()

    def close(self) -> None:
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class EngineDns:
    def _dns_udp(self, flow, data, new) -> None:
        if new or flow.user is None:
            flow.user = DnsUdp(flow)
            self.counters["udp_opened"] += 1          # a flow served (udp_closed follows as for any)
            self.counters["dns_udp_flows"] += 1

        def reply(out, flow=flow):
            if not flow.closed:
                flow.send(out)
                self.kick()

        self.dns.handle(bytes(data), False, reply)

    def _dns_tcp(self, conn) -> None:
        conn.user = DnsTcp(self, conn)
        conn.accept()
        self.counters["tcp_opened"] += 1
        self.counters["dns_tcp_flows"] += 1
        self.kick()
