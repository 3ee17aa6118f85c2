"""The one control-plane model: a tunnel's life-cycle state and its status shape.

Both the bridge (`bridge.status(handle)`) and the CLI's control socket
(`tun2xray status`) answer with the same dictionary, built by `compose()`:

    {
      "state": "connected",          # one of STATES
      "reason": null,                # why, for "error" (and a "connecting" that waits)
      "since": 1700000000.123,       # wall time of the last state change
      "uptime": 12.5,                # seconds since the engine was made (0 before)
      "version": "0.1.0",            # tun2xray's version
      "device": {...},               # the device's name, mtu and counters
      "stack": {...},                # netstack.Stack.status()
      "engine": {...},               # engine counters
      "udp_associations": 0,
      "flows": [...],
    }

Transitions (anything else is a bug in the caller and raises):

    disconnected -> connecting -> connected -> disconnecting -> disconnected
    connecting -> connecting (new reason), connected -> connecting (upstream lost)
    any state -> error (with a reason); error -> disconnecting | disconnected
"""

from __future__ import annotations

import threading
import time

DISCONNECTED = "disconnected"
CONNECTING = "connecting"
CONNECTED = "connected"
DISCONNECTING = "disconnecting"
ERROR = "error"

STATES = (DISCONNECTED, CONNECTING, CONNECTED, DISCONNECTING, ERROR)

_ALLOWED = {
    DISCONNECTED: {CONNECTING, ERROR},
    CONNECTING: {CONNECTING, CONNECTED, DISCONNECTING, ERROR},
    CONNECTED: {CONNECTING, DISCONNECTING, ERROR},
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
        allowed, e.g. a late "connected" after stop() began."""
        with self._lock:
            if state not in _ALLOWED[self._state]:
                return False
            self._state = state
            self._reason = reason
            self._since = time.time()
            self._changed.notify_all()
            return True

    def wait_for(self, states, timeout: float | None) -> str:
        """Block until the state is one of *states* (or timeout); return it."""
        with self._lock:
            self._changed.wait_for(lambda: self._state in states, timeout)
            return self._state

    def as_dict(self) -> dict:
        with self._lock:
            return {"state": self._state, "reason": self._reason, "since": round(self._since, 3)}


def empty_engine_status(device_name: str = "", mtu: int = 0, device_stats: dict | None = None) -> dict:
    """The engine part of the status when no engine is serving."""
    return {
        "uptime": 0.0,
        "device": {"name": device_name, "mtu": mtu, **(device_stats or {})},
        "stack": {},
        "engine": {},
        "udp_associations": 0,
        "flows": [],
    }


def compose(lifecycle: Lifecycle, engine_status: dict | None) -> dict:
    """The status dictionary: state first, then the engine's own status.
    The lifecycle's keys win over same-named keys in *engine_status*."""
    out = lifecycle.as_dict()
    from . import version
    out["version"] = version()
    for k, v in (engine_status if engine_status is not None else empty_engine_status()).items():
        if k not in out:
            out[k] = v
    return out


async def watch_proxy(lifecycle: Lifecycle, host: str, port: int, *,
                      first_delay: float = 0.2, max_delay: float = 5.0, timeout: float = 3.0) -> None:
    """connecting -> connected once the proxy inbound accepts a TCP connection;
    until then the state stays "connecting" with the reason, retried with
    backoff.  Run it as a task next to the engine; cancel it on stop."""
    import asyncio
    delay = first_delay
    while True:
        try:
            _, w = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except (OSError, asyncio.TimeoutError) as e:
            why = getattr(e, "strerror", None) or type(e).__name__
            lifecycle.set(CONNECTING, f"proxy {host}:{port} unreachable: {why}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
            continue
        w.close()
        lifecycle.set(CONNECTED)
        return
