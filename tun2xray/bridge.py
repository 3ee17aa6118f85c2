"""The bridge API for packet-flow hosts (NEPacketTunnelProvider, VpnService, ...).

The host holds integer handles, never Python objects (the handle style of
wireguard-go's mobile bridge)::

    handle = bridge.start(config_json, on_outbound=None)   # protect=fd -> bool: VpnService.protect
    bridge.submit_inbound(handle, packet, protocol)
    bridge.submit_inbound_batch(handle, packets, protocols)
    bridge.poll_outbound(handle, max_packets=64, timeout=0.0) -> [(packet, protocol), ...]
    bridge.status(handle) -> dict            # same shape as the CLI's control socket
    bridge.stop(handle)
    bridge.set_log_level("debug")            # tun2xray's loggers only; no handler added

Threads: each handle owns one engine thread running its own event loop
(uvloop when importable, else asyncio; `start(..., loop="asyncio")` forces
one).  Any number of host threads may call any function at once.

Inbound: `submit_*` checks each packet's family against its IP version on the
caller's thread, appends it to a bounded queue under one short lock and wakes
the engine's loop once per burst (call_soon_threadsafe only when the queue
was empty).  What does not fit is counted (`rx_queue_full`), never waited for.
The C ABI keeps its queues in C (tun2xray.abi.queues): the inbound one
leaves what does not fit with the host and tells it when there is room
again (`rx_resumed`).

Outbound: packets the stack emits are given to `on_outbound(packets,
protocols)` on the engine thread, or queued (bounded, tail drop counted in
`tx_queue_full`) for `poll_outbound`.  `protocol` uses the numbering the
host used: AF_INET is 2 everywhere; an IPv6 packet is answered with the
AF_INET6 number the host last submitted (10 as on Linux, 30 as on Darwin;
before any IPv6 packet, this platform's own number).

Accounting, in `status(handle)["device"]` (all packets, never only some)::

    rx_packets == rx_delivered + rx_queued + rx_dropped
    rx_dropped == rx_family_mismatch + rx_bad_protocol + rx_bad_type
                  + rx_oversize + rx_queue_full + rx_engine_down
    rx_delivered == status["stack"]["rx_packets"]      (the stack's own sum)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import sys
import threading
from collections import deque

from . import state as st
from .device import Capabilities
from .host import (EngineSettings, await_thread_exit, finish_loop, make_engine, new_loop, queue_share,
                   stack_config, watch_upstream)
from .profile import Profile, ProfileError, load_profile
from .tunroutes import Network
from .upstream._net import set_thread_protect

log = logging.getLogger("tun2xray.bridge")

AF_INET = 2
AF_INET6_LINUX = 10
AF_INET6_DARWIN = 30
AF_INET6_NATIVE = AF_INET6_DARWIN if sys.platform == "darwin" else AF_INET6_LINUX
_AF6 = frozenset({AF_INET6_LINUX, AF_INET6_DARWIN})

MAX_PACKET = 65535 + 40          # largest IPv4 / non-jumbo IPv6 packet
INBOUND_PACKETS = 4096           # inbound queue bound (packets) ...
INBOUND_BYTES = 8 << 20          # ... and bytes
OUTBOUND_PACKETS = 4096          # poll-mode outbound queue bounds
OUTBOUND_BYTES = 8 << 20
FEED_CHUNK = 256                 # packets per engine.feed() (one service pass each)
START_TIMEOUT = 10.0
STOP_TIMEOUT = 30.0
STATUS_TIMEOUT = 5.0

_RX_DROPS = ("rx_family_mismatch", "rx_bad_protocol", "rx_bad_type", "rx_oversize",
             "rx_queue_full", "rx_engine_down")


class BridgeError(ValueError):
    """Misuse of the bridge: an unknown or stale handle, a bad argument, a
    call that cannot be made from where it was made."""


class InvalidHandle(BridgeError):
    pass


# ------------------------------------------------------------------ settings

def engine_settings(profile: Profile):
    """(router, stack_config, connect_timeout) for an engine serving *profile*
    (built by tun2xray.host, as for `run`)."""
    s = EngineSettings.from_profile(profile)
    return s.router, stack_config(s, profile.mtu), s.connect_timeout


def _new_loop(kind: str):
    try:
        return new_loop(kind)
    except ValueError as e:
        raise BridgeError(str(e)) from None


# ------------------------------------------------------------------- device

class _BridgeDevice:
    """What the engine sees: a device without an fd (packets are pushed with
    engine.feed) whose writes go to the tunnel's outbound side."""

    # packets are pushed (engine.feed), checksums unchecked by any kernel
    capabilities = Capabilities(pollable=False, framing="callback")
    __slots__ = ("name", "mtu", "url", "stats", "write_batch")

    def __init__(self, name, mtu, write_batch):
        self.name = name
        self.mtu = mtu
        self.url = f"bridge://{name}"
        self.write_batch = write_batch
        self.stats = {
            "rx_packets": 0, "rx_bytes": 0, "rx_delivered": 0, "rx_queued": 0, "rx_dropped": 0,
            **{k: 0 for k in _RX_DROPS},
            "tx_packets": 0, "tx_bytes": 0, "tx_dropped": 0, "tx_queue_full": 0,
            "tx_callback_errors": 0, "tx_queued": 0, "engine_errors": 0, "rx_wakeups": 0,
            "rx_resumed": 0, "protect_calls": 0, "protect_failed": 0,
        }

    def fileno(self):
        raise OSError("a bridge device has no file descriptor")

    def close(self):
        pass


def check_packets(packets, protocols):
    """Per packet, on the caller's thread: (packet, n, drop counter or
    None); the last IPv6 family number seen."""
    out = []
    af6 = None
    for p, proto in zip(packets, protocols):
        if type(p) is not bytes:
            if not isinstance(p, (bytearray, memoryview)):
                out.append((p, 0, "rx_bad_type"))
                continue
            p = bytes(p)             # the host may reuse its buffer
        n = len(p)
        if n > MAX_PACKET:
            out.append((p, n, "rx_oversize"))
        elif type(proto) is not int:
            out.append((p, n, "rx_bad_protocol"))
        elif proto == AF_INET:
            out.append((p, n, "rx_family_mismatch" if n and p[0] >> 4 != 4 else None))
        elif proto in _AF6:
            af6 = proto
            out.append((p, n, "rx_family_mismatch" if n and p[0] >> 4 != 6 else None))
        else:
            out.append((p, n, "rx_bad_protocol"))
    return out, af6


# ------------------------------------------------------------------- tunnel

class _Tunnel:
    """One handle: its engine thread, loop, queues and counters."""

    def __init__(self, handle: int, profile: Profile, on_outbound, loop_kind: str, protect=None,
                 outbound_af6: bool = False):
        self.handle = handle
        self.settings = EngineSettings.from_profile(profile)
        # byte bound of each queue with a memory budget (None: the defaults)
        self._qcap = queue_share(self.settings, min(INBOUND_BYTES, OUTBOUND_BYTES))
        self.router = self.settings.router
        self.proxy = self.router.default
        self.on_outbound = on_outbound
        # on_outbound(packets, af6): each packet's family is left to the callback (the C ABI reads it in C)
        self._out_af6 = outbound_af6
        self.protect = protect                  # protect(fd) -> bool (bridge_ops.set_protect)
        self.lifecycle = st.Lifecycle()
        self.device = _BridgeDevice(f"bridge{handle}", profile.mtu, self._outbound)
        # the addresses, routes and DNS servers the host applies (status["network"])
        self.network = Network(profile, "bridge://", [profile.ipv4.address, profile.ipv6.address],
                               mtu=profile.mtu)
        ds = self.settings.dns
        if ds is not None and ds.mode == "fake-ip":
            self.network.fake = [p for p in (ds.fake_ipv4, ds.fake_ipv6) if p]    # the host routes them too
        self.stats = self.device.stats
        self._lock = threading.Lock()           # inbound queue + rx counters + flags
        self._inq: list = []
        self._inq_bytes = 0
        self._wake = False                      # a _drain is scheduled on the loop
        self._resume_poll = False               # room again: end the waiting poll early
        self._closed = False                    # stop() began: take nothing more
        self._down = False                      # the engine thread has ended
        self._af6 = AF_INET6_NATIVE
        self.queues = None                      # the C ABI's packet queues (tun2xray.abi.queues)
        self._out_cv = threading.Condition(threading.Lock())
        self._outq: deque = deque()
        self._out_bytes = 0
        self.engine = None
        self._serving = False
        self._stop_requested = False
        self._probe_task = None
        self._started = threading.Event()
        self.loop, self.loop_kind = _new_loop(loop_kind)
        self.thread_id = None
        self.native_id = None
        self.thread = threading.Thread(target=self._thread_main, name=f"tun2xray-bridge-{handle}",
                                       daemon=True)

    # ----------------------------------------------------------- engine thread

    def _thread_main(self) -> None:
        self.thread_id = threading.get_ident()
        self.native_id = threading.get_native_id()
        if self.protect is not None:        # before the first dial and probe
            set_thread_protect(self.protect, self.stats)
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:       # the engine died: say why, keep the host alive
            log.exception("bridge %d: engine failed", self.handle)
            self.lifecycle.set(st.ERROR, f"engine failed: {e!r}")
        finally:
            self._serving = False
            try:
                finish_loop(loop)
            except BaseException:
                log.exception("bridge %d: loop cleanup failed", self.handle)
            finally:
                asyncio.set_event_loop(None)
                loop.close()
                with self._lock:
                    self._down = True
                    self._drop_inbound_locked()
                if self.queues is not None:
                    self.queues.down()
                with self._out_cv:
                    self._out_cv.notify_all()
                self._started.set()

    async def _serve(self) -> None:
        self.lifecycle.set(st.CONNECTING, "starting")
        engine = make_engine(self.device, self.settings)
        engine._started_cb = self._on_started
        self.engine = engine
        await engine.run()
        if not self._stop_requested:
            # the engine ended without stop(): the handle stays, in "error", until stop()
            why = getattr(engine, "error", None) or "the engine stopped on its own"
            self.lifecycle.set(st.ERROR, why)

    def _on_started(self, engine) -> None:
        self._serving = True
        self._started.set()
        if self._stop_requested:
            engine.stop()
            return
        self._probe_task = watch_upstream(self.lifecycle, engine, self.router)
        with self._lock:
            pending = bool(self._inq) and not self._wake
            if pending:
                self._wake = True
        if pending:
            self.loop.call_soon(self._drain)

    def _stop_on_loop(self) -> None:
        self._stop_requested = True
        if self._probe_task is not None:
            self._probe_task.cancel()
        if self.engine is not None:
            self.engine.stop()

    def _drain(self) -> None:
        with self._lock:
            batch = self._inq
            self._inq = []
            self._inq_bytes = 0
            self._wake = False
            stats = self.stats
            n = len(batch)
            stats["rx_queued"] -= n
            engine = self.engine
            if not self._serving or self._stop_requested or engine is None:
                stats["rx_engine_down"] += n
                stats["rx_dropped"] += n
                return
            stats["rx_delivered"] += n
        self.feed(batch)

    def feed(self, batch) -> None:
        """Packets to the engine, on its loop, one service pass per chunk."""
        engine = self.engine
        for i in range(0, len(batch), FEED_CHUNK):
            try:
                engine.feed(batch[i:i + FEED_CHUNK])
            except Exception:        # a stack/engine bug must not kill the loop: count it
                self.stats["engine_errors"] += 1
                log.exception("bridge %d: engine.feed failed", self.handle)

    def _outbound(self, packets) -> int:
        """device.write_batch, on the engine thread."""
        af6 = self._af6
        stats = self.stats
        n = len(packets)
        cb = self.on_outbound
        if cb is not None:
            try:
                cb(packets, af6 if self._out_af6 else [af6 if p[0] >> 4 == 6 else AF_INET for p in packets])
            except Exception:
                stats["tx_callback_errors"] += 1
                stats["tx_dropped"] += n
                log.exception("bridge %d: on_outbound raised", self.handle)
                return n
            stats["tx_packets"] += n
            stats["tx_bytes"] += sum(map(len, packets))
            return n
        protos = [af6 if p[0] >> 4 == 6 else AF_INET for p in packets]
        with self._out_cv:
            q = self._outq
            room = OUTBOUND_PACKETS - len(q)
            qbytes = self._out_bytes
            taken = nbytes = 0
            for p, proto in zip(packets, protos):
                ln = len(p)
                if taken >= room or qbytes + ln > (self._qcap or OUTBOUND_BYTES):
                    continue
                q.append((p, proto))
                qbytes += ln
                taken += 1
                nbytes += ln
            self._out_bytes = qbytes
            stats["tx_packets"] += taken
            stats["tx_bytes"] += nbytes
            stats["tx_queued"] = len(q)
            if taken < n:
                stats["tx_queue_full"] += n - taken
                stats["tx_dropped"] += n - taken
            if taken:
                self._out_cv.notify()
        return n

    # ------------------------------------------------------------- host side

    def submit(self, packets, protocols) -> None:
        """Queue the packets for the engine; what does not fit is dropped
        (rx_queue_full)."""
        checked, af6 = check_packets(packets, protocols)
        wake = False
        with self._lock:
            stats = self.stats
            if af6 is not None:
                self._af6 = af6
            down = self._closed or self._down
            q = self._inq
            qb = self._inq_bytes
            cap = self._qcap or INBOUND_BYTES     # a share of memory_budget_mb, when set
            taken = nbytes = queued = 0
            for p, n, drop in checked:
                if drop is None:
                    if down:
                        drop = "rx_engine_down"
                    elif len(q) >= INBOUND_PACKETS or qb + n > cap:
                        drop = "rx_queue_full"
                    else:
                        q.append(p)
                        qb += n
                        queued += 1
                if drop is not None:
                    stats[drop] += 1
                    stats["rx_dropped"] += 1
                taken += 1
                nbytes += n
            self._inq_bytes = qb
            stats["rx_packets"] += taken
            stats["rx_bytes"] += nbytes
            stats["rx_queued"] += queued
            if queued and not self._wake and self._serving:
                self._wake = wake = True
                stats["rx_wakeups"] += 1
        if wake:
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:     # the loop closed under us (engine ended): count it
                with self._lock:
                    self._wake = False
                    self._drop_inbound_locked()

    def _resume(self) -> None:
        """There is room again after a held submit (the C ABI's queue,
        tun2xray.abi.queues): tell the host, on the
        engine thread: on_outbound with an empty batch, or an early return
        of a waiting poll_outbound."""
        self.stats["rx_resumed"] += 1
        cb = self.on_outbound
        if cb is not None:
            try:
                cb([], self._af6 if self._out_af6 else [])
            except Exception:
                self.stats["tx_callback_errors"] += 1
                log.exception("bridge %d: on_outbound (resume) raised", self.handle)
            return
        with self._out_cv:
            self._resume_poll = True
            self._out_cv.notify_all()

    def _drop_inbound_locked(self) -> None:
        n = len(self._inq)
        if n:
            stats = self.stats
            stats["rx_queued"] -= n
            stats["rx_engine_down"] += n
            stats["rx_dropped"] += n
            self._inq = []
            self._inq_bytes = 0

    def poll(self, max_packets: int, timeout: float) -> list:
        cv = self._out_cv
        with cv:
            q = self._outq
            if not q and timeout > 0:
                cv.wait_for(lambda: q or self._closed or self._down or self._resume_poll, timeout)
            n = min(max_packets, len(q))
            if not n:
                self._resume_poll = False       # the resume signal is this empty return
                return []
            out = [q.popleft() for _ in range(n)]
            self._out_bytes -= sum(len(p) for p, _ in out)
            self.stats["tx_queued"] = len(q)
        return out

    def call_on_loop(self, fn, timeout: float = STATUS_TIMEOUT):
        """fn() on the engine thread (directly when already there); raises
        BridgeError when the engine is not serving or does not answer."""
        if self.engine is None or not self._serving:
            raise BridgeError(f"handle {self.handle}: the engine is not running "
                              f"({self.lifecycle.state})")
        if threading.get_ident() == self.thread_id:
            return fn()
        fut = concurrent.futures.Future()

        def job():
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except Exception as e:
                    fut.set_exception(e)
        try:
            self.loop.call_soon_threadsafe(job)
            return fut.result(timeout)
        except RuntimeError:
            raise BridgeError(f"handle {self.handle}: the engine is not running") from None
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise BridgeError(f"handle {self.handle}: the engine did not answer "
                              f"within {timeout:g} s") from None

    def status(self) -> dict:
        engine = self.engine
        queues = self.queues

        def on_loop():
            if queues is not None:
                queues.sync(self.stats)
            return engine.status()
        try:
            eng = self.call_on_loop(on_loop) if engine is not None else None
        except BridgeError:
            eng = None
        if eng is None:
            if queues is not None:
                queues.sync(self.stats)
            eng = st.empty_engine_status(self.device.name, self.device.mtu, dict(self.stats))
        out = st.compose(self.lifecycle, eng)
        out["network"] = self.network.status()
        return out

    def close(self) -> None:
        self.lifecycle.set(st.DISCONNECTING)
        with self._lock:
            self._closed = True
            self._drop_inbound_locked()
        if self.queues is not None:
            self.queues.down()
        with self._out_cv:
            self._out_cv.notify_all()
        try:
            self.loop.call_soon_threadsafe(self._stop_on_loop)
        except RuntimeError:
            pass                     # the loop is closed already: the thread is ending
        self.thread.join(STOP_TIMEOUT)
        if self.thread.is_alive():
            self.lifecycle.set(st.ERROR, f"engine thread did not stop within {STOP_TIMEOUT:.0f} s")
            raise BridgeError(f"handle {self.handle}: the engine thread did not stop "
                              f"within {STOP_TIMEOUT:.0f} s")
        await_thread_exit(self.native_id)
        self.lifecycle.set(st.DISCONNECTED)


# ----------------------------------------------------------------- registry

_registry: dict = {}
_registry_lock = threading.Lock()
_handles = itertools.count(1)       # never reused: a stale handle stays invalid


def _get(handle) -> _Tunnel:
    if type(handle) is not int:
        raise InvalidHandle(f"handle {handle!r}: not an integer handle from bridge.start()")
    t = _registry.get(handle)
    if t is None:
        raise InvalidHandle(f"handle {handle}: unknown or already stopped")
    return t


def start(config_json, on_outbound=None, *, loop: str = "auto", protect=None, outbound_af6=False) -> int:
    """Start an engine for the profile *config_json* (docs/profile.md);
    returns its handle once the engine serves (state "connecting" until the
    proxy inbound answers in SOCKS5, then "connected"; "degraded"
    with the reason while it stops answering later; see tun2xray.state).

    *protect*: fd -> bool, called on the engine thread for every socket it
    opens toward a non-loopback address, from the first dial (and proxy
    probe) on; False fails that dial (VpnService.protect).

    *outbound_af6*: call on_outbound(packets, af6) instead of (packets,
    protocols): af6 is the AF_INET6 number for IPv6 packets, and the caller
    reads each packet's version itself (the C ABI does it in C).

    Raises ProfileError (a ValueError) naming the JSON path of a bad key,
    BridgeError for a bad argument or an engine that could not start."""
    if not isinstance(config_json, (str, bytes, bytearray)):
        raise BridgeError(f"config_json: expected JSON text, got {type(config_json).__name__}")
    if on_outbound is not None and not callable(on_outbound):
        raise BridgeError("on_outbound: must be callable or None")
    if protect is not None and not callable(protect):
        raise BridgeError("protect: must be callable or None")
    profile = load_profile(config_json, bridge=True)
    with _registry_lock:
        handle = next(_handles)
    t = _Tunnel(handle, profile, on_outbound, loop, protect, outbound_af6)
    t.thread.start()
    if not t._started.wait(START_TIMEOUT) or not t._serving:
        reason = t.lifecycle.reason or "timed out"
        try:
            t.close()
        except BridgeError:
            pass
        raise BridgeError(f"the engine did not start: {reason}")
    with _registry_lock:
        _registry[handle] = t
    return handle


def is_live(handle) -> bool:
    return handle in _registry


def submit_inbound(handle: int, packet, protocol: int) -> None:
    """One packet from the host (bytes; protocol AF_INET=2 or AF_INET6=10/30)."""
    _get(handle).submit((packet,), (protocol,))


def submit_inbound_batch(handle: int, packets, protocols) -> None:
    """A batch, as packetFlow.readPackets hands it over."""
    t = _get(handle)
    if len(packets) != len(protocols):
        raise BridgeError(f"submit_inbound_batch: {len(packets)} packets but {len(protocols)} protocols")
    t.submit(packets, protocols)


def poll_outbound(handle: int, max_packets: int = 64, timeout: float = 0.0) -> list:
    """Up to *max_packets* (packet, protocol) pairs, waiting up to *timeout*
    seconds for the first one.  Always empty in callback mode."""
    t = _get(handle)
    if type(max_packets) is not int or max_packets < 1:
        raise BridgeError(f"max_packets {max_packets!r}: must be a positive integer")
    if timeout < 0:
        raise BridgeError(f"timeout {timeout!r}: must not be negative")
    return t.poll(max_packets, timeout)


def status(handle: int) -> dict:
    """The tunnel's state and counters (tun2xray.state.compose shape)."""
    return _get(handle).status()


def stop(handle: int) -> None:
    """Stop the engine; returns when its thread, sockets and timers are gone.
    The handle is invalid afterwards."""
    t = _get(handle)
    if threading.get_ident() == t.thread_id:
        raise BridgeError(f"handle {handle}: stop() cannot be called on the engine thread "
                          "(from on_outbound); call it from a host thread")
    with _registry_lock:
        if _registry.get(handle) is not t:
            raise InvalidHandle(f"handle {handle}: unknown or already stopped")
        del _registry[handle]
    t.close()


def reset_flows(handle: int) -> int:
    """Reset every flow (e.g. after switching Xray nodes or networks): TCP
    clients get a RST, UDP flows are dropped; returns how many were reset."""
    t = _get(handle)
    return t.call_on_loop(lambda: t.engine.reset_flows())


def handles() -> list:
    """The live handles (for hosts that clean up everything at exit)."""
    with _registry_lock:
        return sorted(_registry)


def set_log_level(level) -> None:
    """The level of tun2xray's loggers ("debug", "info", "warning", "error"
    or a logging number) for every handle, live ones included. "debug" adds
    each flow's life (rule, dial, SOCKS reply, close) and rate-limited drop
    summaries. No handler is installed and the root logger is left alone:
    records go wherever the host's logging sends them."""
    from . import logs
    try:
        logs.set_level(level)
    except ValueError as e:
        raise BridgeError(str(e)) from None
    with _registry_lock:
        tunnels = list(_registry.values())
    for t in tunnels:
        engine = t.engine
        if engine is not None and not t._down:
            try:
                t.loop.call_soon_threadsafe(engine.refresh_log_level)
            except RuntimeError:        # its loop closed meanwhile: nothing to refresh
                pass


def loop_kind(handle: int) -> str:
    """"uvloop" or "asyncio": the loop this handle's engine runs on."""
    return _get(handle).loop_kind


__all__ = ["AF_INET", "AF_INET6_DARWIN", "AF_INET6_LINUX", "BridgeError", "InvalidHandle",
           "ProfileError", "engine_settings", "handles", "loop_kind", "poll_outbound", "reset_flows",
           "set_log_level", "start", "status", "stop", "submit_inbound", "submit_inbound_batch"]
