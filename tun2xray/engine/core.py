"""The engine: one Stack, one device, the upstream dialers, on one event loop.

Per wake-up it drains the device in a batch, feeds the stack, answers the
stack's events (dial upstream, move bytes), polls the stack once and writes
its output in a batch.  Upstream callbacks do not poll the stack themselves:
they ask for one service pass (`kick`), so many callbacks in one loop
iteration cost one poll.

Backpressure, both ways, with bounded memory per flow:
- client -> upstream: bytes are read from the connection only while the
  upstream transport is not paused; unread bytes close the advertised window.
- upstream -> client: what the connection's send buffer does not take is held
  (one chunk at most) and the upstream transport stops reading until
  TcpWritable.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import ipaddress
import logging
import socket
import time

from netstack import Stack, StackConfig
from netstack import events as ev
from netstack.wire import ip as _ip

from . import logs
from .device import DeviceError
from .upstream.dokodemo import DokodemoUdp
from .upstream.socks5 import SocksUdpAssociation, socks_client
from .upstream.socks5_proto import (CMD_CONNECT, NEED_DATA, Connected, SocksProtocolError, address_text,
                                    reply_text)
from .upstream.url import DokodemoUpstream, SocksUpstream

log = logging.getLogger("tun2xray.engine")

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
                 "up_at")

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
        self.hs_timer = None
        self.fin_from = None      # who ended the byte stream first: "client" or "upstream"
        self.up_at = None         # loop time the upstream said yes (CONNECT reply / connected)

    # asyncio.Protocol
    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if self.hs is not None:
            # without a login, greeting and CONNECT in one segment: one round trip
            transport.write(self.hs.initial_bytes())
            self.hs_timer = self.engine.loop.call_later(self.engine.connect_timeout, self._hs_failed,
                                                        "no SOCKS reply in time")

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
            self.pending += data
        else:
            n = conn.write(data)
            if n < len(data):
                self.pending = data[n:]
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
            if t.can_write_eof():
                t.write_eof()

    def pump_down(self):
        """The connection's send buffer has room again: hand it what was held."""
        conn = self.conn
        if conn.closed or not self.pending:
            return
        n = conn.write(self.pending)
        self.pending = self.pending[n:]
        if not self.pending:
            if self.up_eof:
                conn.shutdown()
            elif self.transport is not None:
                self.transport.resume_reading()

    def close(self):
        self.hs = None
        if self.hs_timer is not None:
            self.hs_timer.cancel()
            self.hs_timer = None
        t = self.transport
        if t is not None:
            self.transport = None
            t.abort()


class UdpRelay:
    """Upstream side of one UDP flow (a dokodemo socket, or a share of a
    SOCKS association for its client address)."""

    __slots__ = ("flow", "url", "queue", "dok", "assoc", "dst_host", "dropped")

    def __init__(self, flow, url):
        self.flow = flow
        self.url = url
        self.queue = []           # datagrams waiting for the upstream to open
        self.dok = None
        self.assoc = None
        self.dst_host = flow.dst
        self.dropped = 0


class SocksAssoc:
    """One SOCKS UDP association per client source address and port (full
    cone: one app socket reaches many destinations through it)."""

    __slots__ = ("key", "up", "assoc", "flows", "opening", "closed")

    def __init__(self, key, up):
        self.key = key
        self.up = up
        self.assoc = None
        self.flows = set()
        self.opening = True
        self.closed = False


def _device_stack_config(given: StackConfig | None, device, caps, recording: bool):
    """The stack's settings for this device: a copy of ``given`` (the
    caller's object is left as it was) adjusted to what the device declares.
    Returns (config, whether recorded copies of read packets need their
    checksums completed)."""
    cfg = dataclasses.replace(given) if given is not None else StackConfig(mtu=device.mtu)
    if caps.vouches_for_checksums:
        cfg.verify_checksums = False
    if not caps.offload:
        return cfg, False
    # the device takes TCP super-segments and segments/checksums them
    cfg.gso_max = caps.gso_max
    if recording:
        # a capture must replay (tun2xray replay verifies checksums):
        # complete ours, and the kernel's partial ones in the copy recorded
        return cfg, True
    if caps.checksum_offload and device.use_checksum_offload():
        # ... and completes every TCP/UDP checksum (no sum in Python)
        cfg.checksum_offload = True
    return cfg, False


class Engine:
    def __init__(self, device, router, *, stack_config: StackConfig | None = None,
                 connect_timeout: float = 10.0, recorder=None, reject_with: str = "rst",
                 log_clock=None, refusal_window: float = REFUSAL_WINDOW):
        self.device = device
        self.router = router
        caps = device.capabilities
        self.capabilities = caps
        self._batch = caps.batch_size or DEVICE_BATCH   # packets per read_batch
        cfg, self._rec_fix = _device_stack_config(stack_config, device, caps, recorder is not None)
        self.stack = Stack(cfg)
        self.connect_timeout = connect_timeout
        # an upstream that closes having sent nothing within this many seconds
        # of saying yes refused the destination (RST); later it is a FIN
        self.refusal_window = refusal_window
        self.recorder = recorder
        self.reject_with = reject_with
        self.loop = None
        self.counters = _Counter()
        self.started = time.time()
        self._kicked = False
        self._timer = None
        self._timer_at = None
        self._stopping = None
        self._assocs = {}          # (client addr, client port) -> SocksAssoc
        self._tasks = set()
        self._pollable = True
        self.error = None          # why the engine stopped on its own (device gone)
        self._started_cb = None    # called with the engine once run() is serving
        # debug logging: the flag is read once (refresh_log_level), not per packet
        self._debug = False
        self._drop_log = logs.DropSummary(log, clock=log_clock or time.monotonic)
        self._drop_seen = 0        # drops (all reasons) when the summary last looked
        self._drop_timer = None
        self.on_upstream_failed = None  # called (no arguments) when a dial to an upstream fails
        self.closed_flows = collections.deque(maxlen=CLOSED_HISTORY)
        self._why = {}             # conn/flow -> (reason, detail): why the engine ends it
        self._rates = {}           # conn/flow -> (bytes_in, bytes_out) at the last sample
        self._flow_rate = {}       # conn/flow -> (up, down) bytes/s over the last period
        self._rate = (0.0, 0.0)    # all flows, bytes/s
        self._closed_bytes = [0, 0]  # bytes of flows gone (keeps the total rate exact)
        self._total_at = (0, 0)
        self._sample_at = None
        self._sampler = None

    # ----------------------------------------------------------------- life cycle

    async def run(self) -> None:
        """Serve until stop() is called."""
        self.loop = asyncio.get_running_loop()
        self._stopping = self.loop.create_future()
        self._pollable = self.capabilities.pollable
        self.refresh_log_level()
        if self._pollable:
            self.loop.add_reader(self.device.fileno(), self._on_device)
        self._sample_at = self.loop.time()
        self._sampler = self.loop.call_later(RATE_PERIOD, self._sample)
        if self._started_cb is not None:
            self._started_cb(self)
        try:
            await self._stopping
        finally:
            self._shutdown()

    def stop(self) -> None:
        if self._stopping is not None and not self._stopping.done():
            self._stopping.set_result(None)

    def refresh_log_level(self) -> None:
        """Read the logger's level again (at start, and when a host changes
        it): flow lines and drop summaries are written only at debug."""
        self._debug = log.isEnabledFor(logging.DEBUG)

    def _shutdown(self) -> None:
        loop = self.loop
        if self._pollable:
            try:
                loop.remove_reader(self.device.fileno())
            except (ValueError, OSError):
                pass
        if self._timer is not None:
            self._timer.cancel()
        if self._drop_timer is not None:
            self._drop_timer.cancel()
            self._drop_timer = None
        if self._sampler is not None:
            self._sampler.cancel()
            self._sampler = None
        for t in list(self._tasks):
            t.cancel()
        stack = self.stack
        counters = self.counters
        for conn in list(stack.tcp.values()):
            relay = conn.user
            if isinstance(relay, TcpRelay):
                counters["bytes_up"] += relay.bytes_up
                counters["bytes_down"] += relay.bytes_down
                relay.close()
                conn.user = None          # counted: status() must not add it again
            if not conn.closed:
                conn.abort()
        for flow in list(stack.udp.values()):
            self._udp_release(flow)
        for a in list(self._assocs.values()):
            if a.assoc is not None:
                a.assoc.close()
        self._assocs.clear()
        now = loop.time()
        stack.poll(now)
        stack.take_events()
        self._write(stack.take_output())
        if self._debug:
            self._drop_log.flush(self._drop_counts())

    def reset_flows(self) -> int:
        """Reset every flow (the upstream changed, e.g. another Xray node):
        TCP connections are aborted (RST to the client), UDP flows dropped
        with their associations.  New flows use the router as it is now.
        Call on the engine's loop; returns how many flows were reset."""
        stack = self.stack
        n = 0
        for conn in list(stack.tcp.values()):
            relay = conn.user
            if isinstance(relay, TcpRelay):
                relay.close()
            if not conn.closed:
                self._why[conn] = ("reset by reset_flows", None)
                conn.abort()
                n += 1
        for flow in list(stack.udp.values()):
            self._udp_release(flow)
            if not flow.closed:
                self._why[flow] = ("reset by reset_flows", None)
                flow.close()
                n += 1
        for a in list(self._assocs.values()):
            a.closed = True
            if a.assoc is not None:
                a.assoc.close()
        self._assocs.clear()
        self.counters["flows_reset"] += n
        if self.loop is not None:
            self.kick()
        return n

    # ------------------------------------------------------------------- service

    def kick(self) -> None:
        """Ask for one service pass in this loop iteration."""
        if not self._kicked:
            self._kicked = True
            self.loop.call_soon(self._service)

    def _on_device(self) -> None:
        dev = self.device
        stack = self.stack
        now = self.loop.time()
        rec = self.recorder
        batch = self._batch
        while True:
            try:
                pkts = dev.read_batch(batch)
            except DeviceError as e:
                self._device_failed(e)
                return
            if not pkts:
                break
            if rec is not None:
                self._record(pkts, self._rec_fix)
            stack.input_batch(pkts, now)
            if len(pkts) < batch:
                break
        self._service()

    def feed(self, packets) -> None:
        """Packets from a push-style host (the bridge), on the engine's loop."""
        if self.recorder is not None:
            self._record(packets, False)
        self.stack.input_batch(packets, self.loop.time())
        self._service()

    def _service(self) -> None:
        self._kicked = False
        stack = self.stack
        now = self.loop.time()
        for _ in range(16):
            events = stack.take_events()
            if events:
                self._dispatch(events)
            stack.poll(now)
            out = stack.take_output()
            if out:
                self._write(out)
            if not stack.events:
                break
        self._arm(stack.next_deadline())
        if self._debug:
            self._drops_changed()

    # ---------------------------------------------------------- drop summary

    def _drop_total(self) -> int:
        st = self.stack
        # the stack's accounting: rx_packets == sum(drops) + delivered + frag_held
        return (st.rx_packets - st.delivered - st.frag_held + sum(st.frag_drops.values())
                + self.counters["udp_queue_full"])

    def _drop_counts(self) -> dict:
        st = self.stack
        counts = dict(st.drops)
        for k, v in st.frag_drops.items():
            counts[k] = counts.get(k, 0) + v
        q = self.counters["udp_queue_full"]
        if q:
            counts["udp_queue_full"] = q
        return counts

    def _drops_changed(self) -> None:
        """Debug only: tell DropSummary when drops grew; it logs at most one
        line per interval, and a timer reports what the limit held back."""
        total = self._drop_total()
        if total == self._drop_seen:
            return
        dl = self._drop_log
        if self._drop_timer is not None and dl.clock() < dl.next_at:
            return                    # held back: the timer reports it
        self._drop_seen = total
        again = dl.check(self._drop_counts())
        if self._drop_timer is not None:
            self._drop_timer.cancel()
            self._drop_timer = None
        if again is not None:
            delay = max(0.0, again - dl.clock())
            self._drop_timer = self.loop.call_later(delay, self._drop_timer_fired)

    def _drop_timer_fired(self) -> None:
        self._drop_timer = None
        self._drop_seen = -1          # look again whatever the total
        self._drops_changed()

    def _record(self, packets, fix: bool) -> None:
        """Copy packets crossing the device to the pcap recorder (--record);
        fix: complete the partial checksums an offload TUN hands over."""
        rec = self.recorder
        wall = time.time()
        for p in packets:
            rec.write(_ip.complete(p) if fix else p, wall)

    def _write(self, out) -> None:
        if self.recorder is not None:
            # our own packets carry full checksums whenever we record
            self._record(out, False)
        try:
            self.device.write_batch(out)
        except DeviceError as e:
            self._device_failed(e)

    def _device_failed(self, e) -> None:
        if self.error is None:
            self.error = f"device {self.device.name}: {e}"
            log.error("%s; stopping", self.error)
            try:
                self.loop.remove_reader(self.device.fileno())
            except (ValueError, OSError):
                pass
            self._pollable = False
            self.stop()

    def _arm(self, at) -> None:
        if at is None:
            return
        if self._timer is not None:
            if self._timer_at <= at:
                return
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._service()

    def _dispatch(self, events) -> None:
        for e in events:
            t = type(e)
            if t is ev.TcpReadable:
                relay = e.conn.user
                if relay is not None:
                    relay.pump_up()
            elif t is ev.TcpWritable:
                relay = e.conn.user
                if relay is not None:
                    relay.pump_down()
            elif t is ev.UdpDatagram:
                # a flow can close later in the same batch (host reject, limits)
                if not e.flow.closed:
                    self._udp_datagram(e.flow, e.data, e.new)
            elif t is ev.TcpConnectRequest:
                if not e.conn.closed:
                    self._tcp_request(e.conn)
            elif t is ev.TcpClosed:
                self._tcp_closed(e.conn, e.reason)
            elif t is ev.UdpClosed:
                self._udp_closed(e.flow, e.reason)

    def _spawn(self, coro) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ----------------------------------------------------------------------- TCP

    def _tcp_request(self, conn) -> None:
        if self._debug:
            up, url, rule = _route_rule(self.router, "tcp", conn.dst, conn.dport)
        else:
            up, url = self.router.route("tcp", conn.dst, conn.dport)
        self.counters["tcp_requests"] += 1
        hs = None
        if type(up) is SocksUpstream:
            hs = socks_client(up, CMD_CONNECT, conn.dst, conn.dport)
        if self._debug:
            self._log_dial(conn, "tcp", up, url, rule, hs is not None and hs.pipelined)
        self._spawn(self._tcp_dial(conn, up, url, hs))

    # debug lines of a flow's life (callers check self._debug first)

    def _flow_fields(self, flow, proto: str, **more) -> dict:
        return {"flow": flow.id, "proto": proto, "src": _fmt(flow.src, flow.sport),
                "dst": _fmt(flow.dst, flow.dport), **more}

    def _log_dial(self, flow, proto, up, url, rule, pipelined=False) -> None:
        f = self._flow_fields(flow, proto, rule=rule, upstream=url)
        if isinstance(up, DokodemoUpstream):
            how = f"dokodemo {up.host}:{up.port} (fixed target)"
        elif proto == "tcp":
            how = (f"socks5 {up.host}:{up.port} CONNECT {f['dst']} by address"
                   + (", greeting and request in one write" if pipelined else ""))
        else:
            how = f"socks5 {up.host}:{up.port} UDP ASSOCIATE"
        log.debug("%s flow %d %s -> %s: rule %s -> %s; dialing %s", proto, flow.id, f["src"], f["dst"],
                  rule, url, how, extra=f)

    def _log_socks_reply(self, conn, code: int, bound) -> None:
        f = self._flow_fields(conn, "tcp", socks_reply=code)
        if bound is not None:
            f["bound"] = _hostport(*bound)
        log.debug("tcp flow %d: socks %s%s", conn.id, reply_text(code),
                  f", bound {f['bound']}" if bound is not None else "", extra=f)

    async def _tcp_dial(self, conn, up, url, hs) -> None:
        """Connect to the upstream with the relay as the transport's protocol
        from the start (no socket hand-over).  With ``hs`` (a SOCKS5 machine)
        the relay runs the handshake and accepts or refuses the client when
        the proxy answers; without (dokodemo) the connect is the dial."""
        relay = TcpRelay(self, conn, url, hs=hs)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self.loop.create_connection(lambda: relay, up.host, up.port)
        except asyncio.CancelledError:
            raise
        except (OSError, TimeoutError, asyncio.TimeoutError) as e:
            relay.hs = None
            self._tcp_dial_failed(conn, url, e)
            return
        if conn.closed:
            relay.close()
        elif hs is None:
            self._tcp_established(conn, relay)

    def _tcp_dial_failed(self, conn, url, why) -> None:
        self.counters["upstream_connect_failed"] += 1
        self._upstream_failed()
        if not conn.closed:
            f = self._flow_fields(conn, "tcp", upstream=url, reason=str(why))
            log.info("tcp flow %d %s -> %s via %s refused: %s", conn.id, f["src"], f["dst"], url, why,
                     extra=f)
            timeout = isinstance(why, (TimeoutError, asyncio.TimeoutError)) or why == "no SOCKS reply in time"
            self._why[conn] = ("connect timeout" if timeout else "upstream refused",
                               f"{url}: {str(why) or type(why).__name__}")
            conn.reject(self.reject_with)
            self.kick()

    def _refused(self, relay) -> bool:
        """Is an empty clean close from relay's upstream a refusal? Only
        within refusal_window of the CONNECT reply: a v2ray/Xray socks
        inbound answers CONNECT before it dials, so a refused far port
        shows up as that early close. The clock is the loop's, read when
        the close is handled; a starved loop makes the gap look longer,
        which errs towards the honest FIN."""
        at = relay.up_at
        return at is not None and self.loop.time() - at <= self.refusal_window

    def _upstream_failed(self) -> None:
        cb = self.on_upstream_failed
        if cb is not None:
            cb()

    def _tcp_established(self, conn, relay) -> None:
        """The upstream is connected: answer the connect request (SYN-ACK)."""
        if conn.closed:
            relay.close()
            return
        conn.user = relay
        relay.up_at = self.loop.time()
        conn.accept()
        self.counters["tcp_opened"] += 1
        if self._debug:
            f = self._flow_fields(conn, "tcp", upstream=relay.url)
            log.debug("tcp flow %d accepted (SYN-ACK sent): %s -> %s via %s", conn.id, f["src"], f["dst"],
                      relay.url, extra=f)
        self.kick()

    def _tcp_closed(self, conn, reason) -> None:
        relay = conn.user
        if isinstance(relay, TcpRelay):
            if reason == "closed":
                t = relay.transport
                if t is not None:
                    relay.transport = None
                    t.close()
            else:
                relay.close()
            counters = self.counters
            counters["tcp_closed"] += 1
            counters["bytes_up"] += relay.bytes_up
            counters["bytes_down"] += relay.bytes_down
            if self._debug:
                f = self._flow_fields(conn, "tcp", upstream=relay.url, reason=reason,
                                      bytes_up=relay.bytes_up, bytes_down=relay.bytes_down)
                log.debug("tcp flow %d closed (%s): %s -> %s up=%d down=%d bytes", conn.id, reason,
                          f["src"], f["dst"], relay.bytes_up, relay.bytes_down, extra=f)
        self._remember("tcp", conn, relay, self._tcp_close_reason(conn, relay, reason))
        conn.user = None

    # ----------------------------------------------------------------------- UDP

    def _udp_datagram(self, flow, data, new) -> None:
        relay = flow.user
        if new or relay is None:
            if self._debug:
                up, url, rule = _route_rule(self.router, "udp", flow.dst, flow.dport)
            else:
                up, url = self.router.route("udp", flow.dst, flow.dport)
            relay = flow.user = UdpRelay(flow, url)
            self.counters["udp_opened"] += 1
            if self._debug:
                self._log_dial(flow, "udp", up, url, rule)
            if isinstance(up, DokodemoUpstream):
                relay.queue.append(data)
                self._spawn(self._udp_open_dokodemo(flow, relay, up))
                return
            key = (flow.src, flow.sport)
            a = self._assocs.get(key)
            if a is None or a.closed:
                a = self._assocs[key] = SocksAssoc(key, up)
                self._spawn(self._udp_open_socks(a))
            a.flows.add(flow)
            relay.assoc = a
        if relay.dok is not None:
            relay.dok.send(data)
        elif relay.assoc is not None and relay.assoc.assoc is not None:
            relay.assoc.assoc.sendto(data, flow.dst, flow.dport)
        elif len(relay.queue) < UDP_QUEUE:
            relay.queue.append(data)
        else:
            relay.dropped += 1
            self.counters["udp_queue_full"] += 1

    async def _udp_open_dokodemo(self, flow, relay, up) -> None:
        try:
            dok = await DokodemoUdp.open(up, on_datagram=lambda d: self._udp_reply(flow, d))
        except asyncio.CancelledError:
            raise
        except OSError as e:
            self.counters["upstream_connect_failed"] += 1
            log.info("udp flow %d %s: dokodemo %s failed: %s", flow.id, _fmt(flow.dst, flow.dport), relay.url, e,
                     extra=self._flow_fields(flow, "udp", upstream=relay.url, reason=str(e)))
            self._upstream_failed()
            if not flow.closed:
                self._why[flow] = ("upstream refused", f"{relay.url}: {e}")
                flow.reject("port")
                self.kick()
            return
        if flow.closed:
            dok.close()
            return
        relay.dok = dok
        for d in relay.queue:
            dok.send(d)
        relay.queue.clear()

    async def _udp_open_socks(self, a: SocksAssoc) -> None:
        def on_datagram(host, port, data, a=a):
            self._socks_reply(a, host, port, data)

        def on_closed(exc, a=a):
            self._socks_closed(a, exc)

        try:
            assoc = await SocksUdpAssociation.open(a.up, timeout=self.connect_timeout,
                                                   on_datagram=on_datagram, on_closed=on_closed, packed=True)
        except asyncio.CancelledError:
            raise
        except (OSError, TimeoutError, asyncio.TimeoutError) as e:
            self.counters["upstream_connect_failed"] += 1
            log.info("udp association for %s failed: %s", _fmt(*a.key), e,
                     extra={"src": _fmt(*a.key), "reason": str(e)})
            self._upstream_failed()
            a.closed = True
            if self._assocs.get(a.key) is a:
                del self._assocs[a.key]
            for flow in list(a.flows):
                if not flow.closed:
                    self._why[flow] = ("connect timeout" if isinstance(e, TimeoutError) else "upstream refused",
                                       f"UDP ASSOCIATE: {str(e) or type(e).__name__}")
                    flow.reject("port")
            self.kick()
            return
        a.opening = False
        if a.closed or not a.flows:
            assoc.close()
            return
        a.assoc = assoc
        if self._debug:
            src = _fmt(*a.key)
            log.debug("udp association for %s opened: socks reply 0 (succeeded), relay %s", src,
                      _hostport(*assoc.relay), extra={"src": src, "socks_reply": 0,
                                                      "bound": _hostport(*assoc.relay)})
        for flow in a.flows:
            relay = flow.user
            if relay is not None and relay.queue:
                for d in relay.queue:
                    assoc.sendto(d, flow.dst, flow.dport)
                relay.queue.clear()

    def _socks_reply(self, a: SocksAssoc, host, port, data) -> None:
        """A datagram from the relay: ``host`` is the packed source address
        as the header carries it (a str only for a domain, which no flow has)."""
        src, sport = a.key
        flow = self.stack.udp.get((src, sport, host, port)) if host.__class__ is bytes else None
        if flow is None or flow.closed:
            self.counters["udp_reply_no_flow"] += 1
            return
        flow.send(data)
        self.kick()

    def _socks_closed(self, a: SocksAssoc, exc) -> None:
        if self._debug:
            src = _fmt(*a.key)
            why = str(exc) if exc is not None else "released"
            log.debug("udp association for %s closed: %s (%d flows)", src, why, len(a.flows),
                      extra={"src": src, "reason": why})
        a.closed = True
        if self._assocs.get(a.key) is a:
            del self._assocs[a.key]
        for flow in list(a.flows):
            relay = flow.user
            if relay is not None:
                relay.assoc = None
            if not flow.closed:
                self._why[flow] = ("upstream closed", "the UDP association ended")
                flow.close()
        a.flows.clear()
        self.kick()

    def _udp_reply(self, flow, data) -> None:
        if flow.closed:
            return
        flow.send(data)
        self.kick()

    def _udp_release(self, flow) -> None:
        relay = flow.user
        if relay is None:
            return
        flow.user = None
        counters = self.counters
        counters["bytes_up"] += flow.bytes_in
        counters["bytes_down"] += flow.bytes_out
        if relay.dok is not None:
            relay.dok.close()
            relay.dok = None
        a = relay.assoc
        if a is not None:
            a.flows.discard(flow)
            if not a.flows and not a.opening:
                a.closed = True
                if self._assocs.get(a.key) is a:
                    del self._assocs[a.key]
                if a.assoc is not None:
                    a.assoc.close()

    def _udp_closed(self, flow, reason) -> None:
        relay = flow.user
        if relay is not None:
            self.counters["udp_closed"] += 1
            if self._debug:
                f = self._flow_fields(flow, "udp", upstream=flow.user.url, reason=reason,
                                      bytes_up=flow.bytes_in, bytes_down=flow.bytes_out)
                log.debug("udp flow %d closed (%s): %s -> %s up=%d down=%d bytes", flow.id, reason,
                          f["src"], f["dst"], flow.bytes_in, flow.bytes_out, extra=f)
        why = self._why.pop(flow, None)
        if why is None:
            why = ("idle timeout" if reason == "idle" else reason, None)
        self._remember("udp", flow, relay, why)
        self._udp_release(flow)

    # ------------------------------------------------------- closed flows, rates

    def close_why(self, obj, reason: str, detail: str | None = None) -> None:
        """Say why the engine is about to end a flow (before abort/reject/close)."""
        self._why[obj] = (reason, detail)

    def _tcp_close_reason(self, conn, relay, reason):
        why = self._why.pop(conn, None)
        if why is not None:
            return why
        if reason == "closed":
            fin = relay.fin_from if isinstance(relay, TcpRelay) else None
            return ("upstream closed" if fin == "upstream" else "client FIN", None)
        if reason == "reset":
            return ("client RST", None)
        if reason == "timeout":
            # a connection still waiting for its SYN-ACK timed out in the stack
            return ("timeout" if isinstance(relay, TcpRelay) else "connect timeout", None)
        return (reason, None)

    def _remember(self, proto, f, relay, why) -> None:
        """Add a closed flow to the bounded history; keep the total rate exact."""
        bi, bo = f.bytes_in, f.bytes_out
        self._rates.pop(f, None)
        self._flow_rate.pop(f, None)
        cb = self._closed_bytes
        cb[0] += bi
        cb[1] += bo
        now = self.loop.time() if self.loop is not None else f.created
        self.closed_flows.append((proto, f.src, f.sport, f.dst, f.dport,
                                  getattr(relay, "url", None), why[0], why[1], bi, bo,
                                  now - f.created, time.time()))

    def _sample(self) -> None:
        """Every RATE_PERIOD: bytes/s per flow and in total from the byte
        counters (no per-packet work)."""
        loop = self.loop
        now = loop.time()
        dt = now - self._sample_at
        self._sample_at = now
        self._sampler = loop.call_later(RATE_PERIOD, self._sample)
        if dt <= 0:
            return
        old = self._rates
        rates = {}
        flow_rate = {}
        tot_in, tot_out = self._closed_bytes
        stack = self.stack
        for table in (stack.tcp, stack.udp):
            for f in table.values():
                bi, bo = f.bytes_in, f.bytes_out
                tot_in += bi
                tot_out += bo
                p = old.get(f)
                pi, po = p if p is not None else (0, 0)
                rates[f] = (bi, bo)
                if bi != pi or bo != po:
                    flow_rate[f] = ((bi - pi) / dt, (bo - po) / dt)
        self._rates = rates
        self._flow_rate = flow_rate
        ti, to = self._total_at
        self._total_at = (tot_in, tot_out)
        self._rate = ((tot_in - ti) / dt, (tot_out - to) / dt)

    def _closed_status(self) -> list:
        from .state import utc_text
        out = []
        for (proto, src, sport, dst, dport, url, reason, detail, bi, bo, dur, ended) in self.closed_flows:
            out.append({"proto": proto, "src": _fmt(src, sport), "dst": _fmt(dst, dport), "inbound": url,
                        "reason": reason, "detail": detail, "bytes_up": bi, "bytes_down": bo,
                        "duration": round(dur, 3), "ended": utc_text(ended), "ended_epoch": round(ended, 3)})
        return out

    # -------------------------------------------------------------------- status

    def status(self) -> dict:
        now = self.loop.time() if self.loop is not None else 0.0
        st = self.stack.status()
        flows = []
        rate = self._flow_rate
        still = (0.0, 0.0)
        for conn in list(self.stack.tcp.values()):
            relay = conn.user
            ru, rd = rate.get(conn, still)
            flows.append({
                "proto": "tcp", "src": _fmt(conn.src, conn.sport), "dst": _fmt(conn.dst, conn.dport),
                "inbound": relay.url if relay is not None else None, "state": conn.state,
                "bytes_up": conn.bytes_in, "bytes_down": conn.bytes_out,
                "rate_up": round(ru, 1), "rate_down": round(rd, 1),
                "age": round(now - conn.created, 3),
            })
        for flow in list(self.stack.udp.values()):
            relay = flow.user
            ru, rd = rate.get(flow, still)
            flows.append({
                "proto": "udp", "src": _fmt(flow.src, flow.sport), "dst": _fmt(flow.dst, flow.dport),
                "inbound": relay.url if relay is not None else None, "state": "open",
                "bytes_up": flow.bytes_in, "bytes_down": flow.bytes_out,
                "rate_up": round(ru, 1), "rate_down": round(rd, 1),
                "age": round(now - flow.created, 3),
            })
        return {
            "uptime": round(time.time() - self.started, 3),
            "device": {"name": self.device.name, "mtu": self.device.mtu, **dict(self.device.stats)},
            "stack": st,
            "engine": self._engine_counters(),
            "udp_associations": len(self._assocs),
            "rate": {"up": round(self._rate[0], 1), "down": round(self._rate[1], 1)},
            "flows": flows,
            "closed_flows": self._closed_status(),
        }

    def _engine_counters(self) -> dict:
        """The counters, with bytes_up/bytes_down over every flow carried:
        the closed ones (counted at their close) and the live ones so far."""
        c = dict(self.counters)
        up = c.get("bytes_up", 0)
        down = c.get("bytes_down", 0)
        for conn in self.stack.tcp.values():
            relay = conn.user
            if relay is not None:
                up += relay.bytes_up
                down += relay.bytes_down
        for flow in self.stack.udp.values():
            if flow.user is not None:
                up += flow.bytes_in
                down += flow.bytes_out
        c["bytes_up"] = up
        c["bytes_down"] = down
        return c


def _route_rule(router, network, dst, port):
    """(upstream, url, rule) where rule names the rule that matched (its
    index and what it matches) or "default"."""
    explain = getattr(router, "route_rule", None)
    if explain is not None:
        return explain(network, dst, port)
    up, url = router.route(network, dst, port)
    return up, url, "?"


def _hostport(host, port) -> str:
    host = str(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Counter(dict):
    def __missing__(self, key):
        return 0
