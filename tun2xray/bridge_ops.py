"""What a native host asks of the bridge beyond tun2xray.bridge's calls
(the C ABI, tun2xray.abi, is built on these):

    bridge_ops.message(handle, request) -> dict
        NEPacketTunnelProvider.handleAppMessage: {"op": "status" | "reset_flows"
        | "network_changed" | "sleep" | "wake" | "set_log_level", ...}
    bridge_ops.set_protect(handle, protect)
        protect(fd) -> bool for every engine socket toward a non-loopback
        address, before it connects (VpnService.protect); False fails that dial

Errors are bridge.BridgeError (a ValueError) with a one-line message.
"""

from __future__ import annotations

import json

from . import bridge
from .engine import paths
from .upstream._net import set_thread_protect

__all__ = ["OPS", "BadRequest", "message", "set_protect"]


class BadRequest(bridge.BridgeError):
    """An app message that is not JSON, not an object or names no known op."""


def set_protect(handle: int, protect) -> None:
    """Install protect(fd) -> bool (None removes it) on the handle's engine
    thread; dials that start after this returns see it."""
    if protect is not None and not callable(protect):
        raise bridge.BridgeError("protect: must be callable or None")
    t = bridge._get(handle)
    t.call_on_loop(lambda: set_thread_protect(protect, t.stats))


def _on_engine(handle: int, fn):
    t = bridge._get(handle)
    return t.call_on_loop(lambda: fn(t.engine))


def _status(handle, req):
    return {"ok": True, "status": bridge.status(handle)}


def _reset_flows(handle, req):
    return {"ok": True, "reset": bridge.reset_flows(handle)}


def _network_changed(handle, req):
    return {"ok": True, "reset": _on_engine(handle, paths.reset_stale)}


def _sleep(handle, req):
    _on_engine(handle, paths.sleep)
    return {"ok": True}


def _wake(handle, req):
    return {"ok": True, "reset": _on_engine(handle, paths.wake)}


def _set_log_level(handle, req):
    level = req.get("level")
    if not isinstance(level, str):
        raise BadRequest('set_log_level: "level" must be one of debug, info, warning, error')
    bridge._get(handle)
    try:
        bridge.set_log_level(level)
    except bridge.BridgeError as e:
        raise BadRequest(f"set_log_level: {e}") from None
    return {"ok": True, "level": level}


OPS = {"status": _status, "reset_flows": _reset_flows, "network_changed": _network_changed,
       "sleep": _sleep, "wake": _wake, "set_log_level": _set_log_level}


def message(handle: int, request) -> dict:
    """Answer one app message (a JSON text or a dict); raises BridgeError
    for an unknown op, bad JSON or a stale handle."""
    if isinstance(request, (str, bytes, bytearray)):
        try:
            request = json.loads(request)
        except ValueError as e:
            raise BadRequest(f"request: not JSON ({e})") from None
    if not isinstance(request, dict):
        raise BadRequest("request: expected a JSON object with an \"op\"")
    op = request.get("op")
    fn = OPS.get(op) if isinstance(op, str) else None
    if fn is None:
        raise BadRequest(f"request: unknown op {op!r} (one of {', '.join(OPS)})")
    return fn(handle, request)
