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

The Engine is assembled from mixins over the one object, each owning one
kind of state: tun2xray.engine.tcp (connect requests, dials, established
and closed connections, the refusal window), tun2xray.engine.udp (datagrams,
SOCKS UDP associations, dokodemo) and tun2xray.engine.history (drop summary,
rates, closed flows, status, counters).  This module holds the Engine itself:
its state, the device and stack glue, run/stop/kick and the service loop.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import gc
import logging
import threading
import time

from netstack import Stack, StackConfig
from netstack import events as ev
from netstack.wire import ip as _ip

from .. import logs
from ..device import DeviceError
from .dnshook import EngineDns
from .history import EngineHistory
from .relay import CLOSED_HISTORY, DEVICE_BATCH, RATE_PERIOD, REFUSAL_WINDOW, TcpRelay, _Counter
from .tcp import EngineTcp
from .udp import EngineUdp

log = logging.getLogger("tun2xray.engine")


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


# The collector's youngest generation is examined every GC_GEN0 container
# allocations (net of frees) instead of CPython's 700 while an engine runs.
# Under wrk's short connections 700 filled up every ~60 new connections,
# and what was still alive then (connections, relays, dial tasks, history
# entries) was promoted and walked again by the older generations: 10.5 µs
# of collector per connection, 2.7 µs at 7000 (docs/performance.md).  Only
# cyclic garbage waits longer; the previous thresholds come back when the
# last engine of the process stops.
GC_GEN0 = 7000
_gc_state = {"engines": 0, "saved": None}
_gc_lock = threading.Lock()       # the bridge starts and stops engines on several threads


def _gc_hold() -> None:
    with _gc_lock:
        st = _gc_state
        if st["engines"] == 0:
            saved = gc.get_threshold()
            st["saved"] = saved
            if 0 < saved[0] < GC_GEN0:
                gc.set_threshold(GC_GEN0, *saved[1:])
        st["engines"] += 1


def _gc_release() -> None:
    with _gc_lock:
        st = _gc_state
        st["engines"] -= 1
        if st["engines"] == 0 and st["saved"] is not None:
            if gc.get_threshold()[0] == GC_GEN0:      # unless someone else has set it since
                gc.set_threshold(*st["saved"])
            st["saved"] = None


class Engine(EngineTcp, EngineUdp, EngineHistory, EngineDns):
    def __init__(self, device, router, *, stack_config: StackConfig | None = None,
                 connect_timeout: float = 10.0, recorder=None, reject_with: str = "rst",
                 log_clock=None, refusal_window: float = REFUSAL_WINDOW, names=None, dns=None):
        self.device = device
        self.router = router
        caps = device.capabilities
        self.capabilities = caps
        self._batch = caps.batch_size or DEVICE_BATCH   # packets per read_batch
        cfg, self._rec_fix = _device_stack_config(stack_config, device, caps, recorder is not None)
        self.stack = Stack(cfg)
        self.budget = self.stack.budget   # held chunks and UDP queues count in the stack's budget
        self.connect_timeout = connect_timeout
        # an upstream that closes having sent nothing within this many seconds
        # of saying yes refused the destination (RST); later it is a FIN
        self.refusal_window = refusal_window
        self.recorder = recorder
        self.reject_with = reject_with
        # DNS (tun2xray.dns): the server that answers hijacked port-53 flows,
        # and the name book the dial paths read (lookup, is_fake, unmapped_hit;
        # None: DNS handling is off and flows are dialled by address)
        self.dns = dns
        self.names = names if names is not None else (dns.book if dns is not None else None)
        self.loop = None
        self.counters = _Counter()
        self.started = time.time()
        self._kicked = False
        self._timer = None
        self._timer_at = None
        self._stopping = None
        self._assocs = {}          # (client addr, client port) -> SocksAssoc
        self._tasks = set()
        self._dials = {}           # conn -> (dial task, relay) until the upstream answers
        self._exhausted_log_at = float("-inf")   # next warning about a local resource running out
        self._pollable = True
        self.asleep = False        # the host sleeps (engine.paths.sleep): no timers armed
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
        _gc_hold()
        try:
            await self._run()
        finally:
            _gc_release()

    async def _run(self) -> None:
        self._stopping = self.loop.create_future()
        self._pollable = self.capabilities.pollable
        self.refresh_log_level()
        if self._pollable:
            self.loop.add_reader(self.device.fileno(), self._on_device)
        self._sample_at = self.loop.time()
        self._sampler = self.loop.call_later(RATE_PERIOD, self._sample)
        if self.dns is not None:
            self.dns.start(self.loop)
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
        if self.dns is not None:
            self.dns.close()              # writes the fake-IP cache file
        for _task, relay in self._dials.values():
            relay.close()
        self._dials.clear()
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
        if at is None or self.asleep:
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

    def _spawn(self, coro):
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
