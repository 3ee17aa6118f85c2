"""The one control-plane model: a tunnel's life-cycle state and its status shape.

Both the bridge (`bridge.status(handle)`) and the CLI's control socket
(`tun2xray status`) answer with the same dictionary, built by `compose()`:

    {
      "state": "connected",          # one of STATES
      "reason": null,                # why, for "degraded", "error" and a "connecting" that waits
      "since": "2026-12-04T22:51:03Z",  # UTC time of the last state change (readable)
      "since_epoch": 1796424663.123, # the same as seconds since the epoch
      "uptime": 12.5,                # seconds since the engine was made (0 before)
      "version": "0.1.0",            # tun2xray's version
      "device": {...},               # the device's name, mtu and counters
      "stack": {...},                # netstack.Stack.status()
      "engine": {...},               # engine counters
      "udp_associations": 0,
      "rate": {"up": 0.0, "down": 0.0},  # bytes/s over the last second, all flows
      "flows": [...],                # live flows, each with its rate_up / rate_down
      "closed_flows": [...],         # the most recently closed flows, with why
      "instance": {...},             # `tun2xray run` only: pid, name, device, control
      "xray": {...},                 # with --xray-config: config link, node, runtime
                                     # config, binary, core
    }

States and transitions (`Lifecycle.set` refuses anything else):

    disconnected -> connecting -> connected -> disconnecting -> disconnected
    connecting -> connecting (new reason: waiting for the proxy or the core)
    connected -> degraded (the proxy stopped answering, the core is down)
    degraded -> degraded (new reason) | connected (it answers again)
    connected | degraded -> connecting (the host restarts the upstream)
    any state -> error (a fatal end, with a reason); error -> disconnecting | disconnected

"degraded" means the tunnel still holds its device and flows but new flows
are likely to fail; `UpstreamWatch` sets it and clears it.
"""

from __future__ import annotations

import threading
import time

DISCONNECTED = "disconnected"
CONNECTING = "connecting"
CONNECTED = "connected"
DEGRADED = "degraded"
DISCONNECTING = "disconnecting"
ERROR = "error"

STATES = (DISCONNECTED, CONNECTING, CONNECTED, DEGRADED, DISCONNECTING, ERROR)

_ALLOWED = {
    DISCONNECTED: {CONNECTING, ERROR},
    CONNECTING: {CONNECTING, CONNECTED, DISCONNECTING, ERROR},
    CONNECTED: {CONNECTING, DEGRADED, DISCONNECTING, ERROR},
    DEGRADED: {DEGRADED, CONNECTED, CONNECTING, DISCONNECTING, ERROR},
    DISCONNECTING: {DISCONNECTED, ERROR},
    ERROR: {DISCONNECTING, DISCONNECTED, ERROR},
}


class Lifecycle:
    """A tunnel's state; safe to read and change from any thread."""

    __slots__ = ("_lock", "_state", "_reason", "_since", "_changed")

    def __init__(self):
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._state = DISCONNECTED
        self._reason = None
        self._since = time.time()

    @property
    def state(self) -> str:
        return self._state

    @property
    def reason(self) -> str | None:
        return self._reason

    def set(self, state: str, reason: str | None = None) -> bool:
        """Move to *state*; False (and no change) when the transition is not
        allowed, e.g. a late "connected" after stop() began.  Staying in the
        same state with a new reason keeps `since`."""
        with self._lock:
            if state not in _ALLOWED[self._state]:
                return False
            if state != self._state:
                self._since = time.time()   # a new reason alone is no state change
            self._state = state
            self._reason = reason
            self._changed.notify_all()
            return True

    def wait_for(self, states, timeout: float | None) -> str:
        """Block until the state is one of *states* (or timeout); return it."""
        with self._lock:
            self._changed.wait_for(lambda: self._state in states, timeout)
            return self._state

    def as_dict(self) -> dict:
        with self._lock:
            return {"state": self._state, "reason": self._reason, "since": utc_text(self._since),
                    "since_epoch": round(self._since, 3)}


def utc_text(t: float) -> str:
    """Wall time *t* as readable UTC: 2026-12-04T22:51:03Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def empty_engine_status(device_name: str = "", mtu: int = 0, device_stats: dict | None = None) -> dict:
    """The engine part of the status when no engine is serving."""
    return {
        "uptime": 0.0,
        "device": {"name": device_name, "mtu": mtu, **(device_stats or {})},
        "stack": {},
        "engine": {},
        "udp_associations": 0,
        "rate": {"up": 0.0, "down": 0.0},
        "flows": [],
        "closed_flows": [],
        "resources": {},
    }


def compose(lifecycle: Lifecycle, engine_status: dict | None, instance: dict | None = None) -> dict:
    """The status dictionary: state first, then the engine's own status.
    The lifecycle's keys win over same-named keys in *engine_status*.
    *instance* (a `tun2xray run`'s claim: pid, name, device URL, control
    URL, see instance.py) is added as "instance"."""
    out = lifecycle.as_dict()
    # the running code's own version (the same number the distribution's
    # metadata carries: pyproject.toml reads it from __version__); reading
    # that metadata would import importlib.metadata into a long-running
    # process for one string (about 0.9 MB of RSS)
    from . import __version__
    out["version"] = __version__
    if instance is not None:
        out["instance"] = dict(instance)
    for k, v in (engine_status if engine_status is not None else empty_engine_status()).items():
        if k not in out:
            out[k] = v
    return out


PROBE_PERIOD = 2.0       # seconds between proxy probes while it answers
PROBE_RETRY = 0.5        # ... and while it does not
PROBE_TIMEOUT = 3.0
CORE_CHECK = 0.1         # how often a supervised core's health is read (attributes, a waitpid)
DEGRADED_AFTER = 2       # failed probes in a row before "connected" becomes "degraded"




async def socks_probe(host: str, port: int, *, username: str | None = None, password: str | None = None,
                      timeout: float = PROBE_TIMEOUT) -> str | None:
    """Does a SOCKS5 server answer at host:port?  None when it does, else why not.

    The greeting (05 01 00, or 05 02 00 02 with a username), the RFC 1929
    login when the server picks it, then a UDP ASSOCIATE request: a core
    answers it without dialing anything and without an access-log line (a
    bare greeting followed by a close makes Xray/v2ray log "rejected ...
    failed to read request" every time).  Any SOCKS5 reply to the request,
    even "command not supported" from an inbound with UDP off, means the
    server is there.  The bytes are the SOCKS machine's
    (upstream.socks5_proto); this only carries them."""
    import asyncio

    from .upstream._net import needs_protect, open_tcp
    from .upstream.socks5_proto import (
        CMD_UDP_ASSOCIATE, NEED_DATA, Failed, LocalProtocolError, SocksClient, SocksProtocolError,
    )
    label = "probe"
    try:
        client = SocksClient(CMD_UDP_ASSOCIATE, _ANY4, 0, username=username, password=password,
                             label=label, pipeline=False)
    except LocalProtocolError as e:
        return str(e)
    w = None
    try:
        async with asyncio.timeout(timeout):
            if needs_protect(host):        # the host's protect() sees the probe's socket too
                r, w = await asyncio.open_connection(sock=await open_tcp(host, port))
            else:
                r, w = await asyncio.open_connection(host, port)
            w.write(client.initial_bytes())
            ev = NEED_DATA
            while ev is NEED_DATA:
                chunk = await r.read(client.need)
                if not chunk:
                    return _unlabelled(client.connection_closed(), label)
                ev = client.receive_data(chunk)
                out = client.data_to_send()
                if out:
                    w.write(out)
    except SocksProtocolError as e:
        return "not a SOCKS5 server: " + _unlabelled(e, label)
    except (OSError, TimeoutError) as e:
        return getattr(e, "strerror", None) or ("no answer in %gs" % timeout if isinstance(e, TimeoutError)
                                                else type(e).__name__)
    finally:
        if w is not None:
            w.close()
    if ev.__class__ is Failed and ev.reply_code is None:
        # no acceptable method, or the login refused: the server is there but
        # will not serve us
        if username is not None and ev.errno is not None:
            return "the proxy refused the username/password: " + _unlabelled(ev.reason, label)
        return _unlabelled(ev.reason, label)
    return None           # Connected, or a reply code: a SOCKS5 server answered the request


_ANY4 = bytes(4)          # UDP ASSOCIATE from 0.0.0.0:0


def _unlabelled(what, label: str) -> str:
    return str(what).removeprefix(label + ": ")


class UpstreamWatch:
    """Keeps a Lifecycle true to the upstream for as long as it runs.

    The proxy inbound is probed (`socks_probe`) every PROBE_PERIOD
    (PROBE_RETRY while it fails) and at once after `poke()` (the engine
    calls it when a dial to the upstream fails).  With *router*, the probe
    follows ``router.default`` (a node switch may move the inbound).
    *health*, when given, returns (ok, reason) for a core tun2xray
    supervises; it is read every CORE_CHECK seconds.  Before the first good probe the state is
    "connecting" with the reason; afterwards a core that is down, or
    DEGRADED_AFTER failed probes in a row, make it "degraded" with the
    reason, and the next good probe with a healthy core "connected" again.
    Run `run()` as a task next to the engine; cancel it on stop."""

    def __init__(self, lifecycle: Lifecycle, host: str = "", port: int = 0, *, username=None, password=None,
                 router=None, health=None, period: float = PROBE_PERIOD, retry: float = PROBE_RETRY,
                 timeout: float = PROBE_TIMEOUT):
        self.lifecycle = lifecycle
        self.host = host
        self.port = port
        self.username = username
        self.password = password
        self.router = router
        self.health = health
        self.period = period
        self.retry = retry
        self.timeout = timeout
        self.probes = 0
        self.failures = 0            # failed probes in a row
        self.ever_up = False
        self._wake = None

    def poke(self) -> None:
        """Probe now (call on the watcher's loop)."""
        if self._wake is not None:
            self._wake.set()

    def _core(self):
        if self.health is None:
            return True, None
        return self.health()

    def _show(self, ok: bool, why: str | None) -> None:
        lc = self.lifecycle
        if ok:
            self.ever_up = True
            lc.set(CONNECTED)
        elif lc.reason != why or lc.state not in (CONNECTING, DEGRADED):
            lc.set(DEGRADED if self.ever_up else CONNECTING, why)

    async def run(self) -> None:
        import asyncio
        self._wake = wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        next_probe = loop.time()
        last_probe = None
        while True:
            if self.router is not None:
                up = self.router.default
                self.host, self.port, self.username, self.password = (
                    up.host, up.port, getattr(up, "username", None), getattr(up, "password", None))
            where = f"{self.host}:{self.port}" if ":" not in self.host else f"[{self.host}]:{self.port}"
            if wake.is_set():
                wake.clear()
                # probe now, but not more often than every `retry` however many dials fail
                soon = loop.time() if last_probe is None else last_probe + self.retry
                next_probe = min(next_probe, max(soon, loop.time()))
            if loop.time() >= next_probe:
                why = await socks_probe(self.host, self.port, username=self.username, password=self.password,
                                        timeout=self.timeout)
                last_probe = loop.time()
                self.probes += 1
                self.failures = 0 if why is None else self.failures + 1
                next_probe = last_probe + (self.period if why is None else self.retry)
                wake.clear()            # failures during the probe: this probe answered them
                core_ok, core_why = self._core()
                if why is None:
                    self._show(core_ok, core_why)
                elif not self.ever_up or self.failures >= DEGRADED_AFTER or self.lifecycle.state == DEGRADED:
                    self._show(False, core_why if not core_ok else f"proxy {where} unreachable: {why}")
            else:
                core_ok, core_why = self._core()
                if not core_ok:
                    self._show(False, core_why)
                elif self.lifecycle.state == DEGRADED and self.failures == 0:
                    next_probe = loop.time()      # the core is back: a probe decides
                    continue
            delay = next_probe - loop.time()
            if self.health is not None:
                delay = min(delay, CORE_CHECK)
            delay = max(0.0, delay)
            try:
                await asyncio.wait_for(wake.wait(), delay)
            except (asyncio.TimeoutError, TimeoutError):
                pass


def watch_proxy(lifecycle: Lifecycle, host: str, port: int, **kw):
    """A coroutine that runs an UpstreamWatch (kept for callers that need
    no poke and no core health)."""
    return UpstreamWatch(lifecycle, host, port, **kw).run()
