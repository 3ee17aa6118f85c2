"""The per-flow relay objects and the engine's limits.

TcpRelay carries one TCP flow's bytes between the stack connection and its
upstream transport (running the SOCKS5 handshake when there is one), UdpRelay
holds one UDP flow's upstream and queue, SocksAssoc one client's UDP
ASSOCIATE; the small routing and formatting helpers the engine's sides share
live here too.
"""

from __future__ import annotations

import asyncio
import ipaddress

from ..upstream.socks5_proto import NEED_DATA, Connected, SocksProtocolError, address_text

UDP_QUEUE = 64                # datagrams held per flow while its upstream opens
DEVICE_BATCH = 256
RATE_PERIOD = 1.0             # seconds between byte-counter samples (flow and total rates)
CLOSED_HISTORY = 128          # recently closed flows kept for status()
REFUSAL_WINDOW = 1.5          # profile tcp_refusal_window: see Engine._refused


def _addr(b: bytes) -> str:
    return str(ipaddress.ip_address(b))


def _fmt(addr: bytes, port: int) -> str:
    return f"[{_addr(addr)}]:{port}" if len(addr) == 16 else f"{_addr(addr)}:{port}"


class TcpRelay(asyncio.Protocol):
    """Carries one TCP connection's bytes between the stack and an upstream socket."""

    __slots__ = ("engine", "conn", "url", "transport", "pending", "up_paused",
                 "up_eof", "eof_sent", "bytes_up", "bytes_down", "hs", "hs_timer", "fin_from",
                 "up_at", "dialing", "expired", "name", "sampled_in", "sampled_out")

    def __init__(self, engine, conn, url, hs=None):
        self.engine = engine
        self.conn = conn
        self.url = url
        self.transport = None
        self.pending = b""        # upstream bytes the connection's send buffer did not take
        self.up_paused = False    # upstream write side full: stop reading the connection
        self.up_eof = False
        self.eof_sent = False
        self.bytes_up = 0
        self.bytes_down = 0
        # the SOCKS5 client machine (upstream.socks5_proto.SocksClient) while
        # its handshake runs on this transport; None for a raw (dokodemo) dial
        # and once the proxy has answered
        self.hs = hs
        # one timer per connection: connect and handshake together within
        # tcp_connect_timeout (armed by the engine when it dials)
        self.hs_timer = None
        self.dialing = None       # the dial's task while the connect is under way
        self.expired = False      # the timer cancelled the dial
        self.fin_from = None      # who ended the byte stream first: "client" or "upstream"
        self.up_at = None         # loop time the upstream said yes (CONNECT reply / connected)
        self.name = None          # the domain name the flow was dialled by (None: by address)
        # the flow's byte counters at the rate sampler's last look (Engine._sample)
        self.sampled_in = self.sampled_out = 0

    # asyncio.Protocol (TCP_NODELAY: uvloop's and asyncio's TCP transports
    # set it themselves, so no socket object and no syscalls here)
    def connection_made(self, transport):
        self.transport = transport
        if self.hs is not None:
            # without a login, greeting and CONNECT in one segment: one round trip
            transport.write(self.hs.initial_bytes())

    def timed_out(self):
        """tcp_connect_timeout passed: stop the connect, or the handshake."""
        self.hs_timer = None
        if self.transport is None and self.dialing is not None:
            self.expired = True
            self.dialing.cancel()
        else:
            self._hs_failed("no SOCKS reply in time")

    def _hs_data(self, data):
        """Feed the proxy's bytes to the SOCKS5 machine; send what it says
        is due (login, request); once it has an answer, accept or refuse
        the client.  Bytes after the reply are stream data."""
        hs = self.hs
        try:
            e = hs.receive_data(data)
        except SocksProtocolError as exc:
            self._hs_failed(exc)
            return
        out = hs.data_to_send()
        if out:
            self.transport.write(out)
        if e is NEED_DATA:
            return
        if e.__class__ is not Connected:
            if self.engine._debug and e.reply_code is not None:
                self.engine._log_socks_reply(self.conn, e.reply_code, None)
            self._hs_failed(e.error())
            return
        self.hs = None
        if self.hs_timer is not None:
            self.hs_timer.cancel()
            self.hs_timer = None
        if self.engine._debug:
            self.engine._log_socks_reply(self.conn, 0, (address_text(e.bound_host), e.bound_port))
        self.engine._tcp_established(self.conn, self)
        if e.rest:
            self.data_received(e.rest)

    def _hs_failed(self, why):
        if self.hs is None:
            return
        self.hs = None
        self.up_eof = True              # connection_lost has nothing left to report
        if self.hs_timer is not None:
            self.hs_timer.cancel()
            self.hs_timer = None
        t = self.transport
        self.transport = None
        if t is not None:
            t.abort()
        self.engine._tcp_dial_failed(self.conn, self.url, why)

    def data_received(self, data):
        if self.hs is not None:
            self._hs_data(data)
            return
        conn = self.conn
        if conn.closed:
            return
        self.bytes_down += len(data)
        if self.pending:
            self.pending = bytes(self.pending) + data       # rare: a chunk already read when paused
            self.engine.budget.used += len(data)
        else:
            n = conn.write(data)
            if n < len(data):
                self.pending = memoryview(data)[n:]         # no copy of the rest
                self.engine.budget.used += len(data) - n
        if self.pending and self.transport is not None:
            self.transport.pause_reading()
        self.engine.kick()

    def eof_received(self):
        if self.hs is not None:
            self._hs_failed(self.hs.connection_closed())
            return False
        self.up_eof = True
        if self.fin_from is None:
            self.fin_from = "upstream"
        self._upstream_done()
        return True   # keep our write side open: half-close

    def connection_lost(self, exc):
        if self.hs is not None:
            self._hs_failed(self.hs.connection_closed(exc))
            return
        self.transport = None
        if not self.up_eof or exc is not None:
            self.up_eof = True
            conn = self.conn
            if not conn.closed:
                if exc is not None:
                    self.engine.counters["upstream_reset"] += 1
                    self.engine.close_why(conn, "upstream reset", str(exc))
                    conn.abort()
                else:
                    if self.fin_from is None:
                        self.fin_from = "upstream"
                    self._upstream_done()
        self.engine.kick()

    def pause_writing(self):
        self.up_paused = True

    def resume_writing(self):
        self.up_paused = False
        self.pump_up()
        self.engine.kick()

    # engine side
    def _upstream_done(self):
        conn = self.conn
        if conn.closed:
            return
        if self.bytes_down == 0 and self.engine._refused(self):
            # A SOCKS core that answered CONNECT before dialing closes at once
            # when the destination refuses: tell the client with a RST. Later
            # (tcp_refusal_window), an empty clean close is just a close: FIN.
            self.engine.counters["upstream_closed_empty"] += 1
            self.engine.close_why(conn, "upstream refused", "closed before sending any data")
            conn.abort()
        elif not self.pending:
            conn.shutdown()
        self.engine.kick()

    def pump_up(self):
        """Move bytes the client sent to the upstream while it takes them."""
        conn = self.conn
        t = self.transport
        if t is None or conn.closed:
            return
        if not self.up_paused and conn.readable:
            # the whole receive buffer, no copy (bounded by the window)
            data = conn.read_buffer()
            self.bytes_up += len(data)
            t.write(data)
        if conn.eof and not conn.readable and not self.eof_sent:
            self.eof_sent = True
            if self.fin_from is None:
                self.fin_from = "client"
            if self.up_eof:
                # both ways ended (the upstream's EOF was read, so nothing is
                # left unread): closing sends the FIN that shutdown() would,
                # and saves that syscall per connection
                self.transport = None
                t.close()
            elif t.can_write_eof():
                t.write_eof()

    def pump_down(self):
        """The connection's send buffer has room again: hand it what was held."""
        conn = self.conn
        if conn.closed or not self.pending:
            return
        n = conn.write(self.pending)
        # a view, not a copy: under a tight window or memory budget the
        # connection takes a little per ACK, and copying the rest each time
        # would cost more than sending it
        self.pending = memoryview(self.pending)[n:] if n < len(self.pending) else b""
        self.engine.budget.used -= n
        if not self.pending:
            if self.up_eof:
                conn.shutdown()
            elif self.transport is not None:
                self.transport.resume_reading()

    def release(self):
        """The flow is gone: what it held goes back to the budget."""
        if self.pending:
            self.engine.budget.used -= len(self.pending)
            self.pending = b""

    def close_timer(self):
        if self.hs_timer is not None:
            self.hs_timer.cancel()
            self.hs_timer = None

    def close(self):
        self.hs = None
        self.close_timer()
        t = self.transport
        if t is not None:
            self.transport = None
            t.abort()


class UdpRelay:
    """Upstream side of one UDP flow (a dokodemo socket, or a share of a
    SOCKS association for its client address)."""

    __slots__ = ("flow", "url", "queue", "dok", "assoc", "dst_host", "dropped", "name", "sampled_in",
                 "sampled_out")

    def __init__(self, flow, url):
        self.flow = flow
        self.url = url
        self.queue = []           # datagrams waiting for the upstream to open
        self.dok = None
        self.assoc = None
        self.dst_host = flow.dst  # what the SOCKS datagrams address: the packed address, or the name
        self.dropped = 0
        self.name = None          # the domain name the flow is dialled by (None: by address)
        self.sampled_in = self.sampled_out = 0    # as TcpRelay's


class SocksAssoc:
    """One SOCKS UDP association per client source address and port (full
    cone: one app socket reaches many destinations through it)."""

    __slots__ = ("key", "up", "assoc", "flows", "opening", "closed", "named")

    def __init__(self, key, up):
        self.key = key
        self.up = up
        self.assoc = None
        self.flows = set()
        self.opening = True
        self.closed = False
        self.named = {}           # (name, port) -> flow, for the flows addressed by name


def _route_rule(router, network, dst, port, name=None):
    """(upstream, url, rule) where rule names the rule that matched (its
    index and what it matches) or "default"."""
    explain = getattr(router, "route_rule", None)
    if explain is not None:
        return explain(network, dst, port, name)
    up, url = router.route(network, dst, port, name)
    return up, url, "?"


def _hostport(host, port) -> str:
    host = str(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Counter(dict):
    def __missing__(self, key):
        return 0
