"""The Python half of libtun2xray: each exported C function's body, over
tun2xray.bridge and tun2xray.bridge_ops.

``install(ffi, lib)`` runs once, in the library's init code, when the host
first calls into it.  Every body catches everything: an exception never
crosses into the host; it becomes a return code and this thread's
t2x_last_error() (lib._t2x_set_error).
"""

from __future__ import annotations

import json
import threading

from .. import bridge, bridge_ops
from ..profile import ProfileError
from . import header as h
from .queues import Queues, poll_output

__all__ = ["install"]


class _Native:
    """What a handle holds of the host's C side: the callbacks and their ctx
    (kept alive here as long as the handle lives)."""

    __slots__ = ("on_outbound", "ctx", "protect", "protect_ctx")

    def __init__(self, on_outbound, ctx):
        self.on_outbound = on_outbound
        self.ctx = ctx
        self.protect = None
        self.protect_ctx = None


def install(ffi, lib) -> None:
    natives: dict = {}
    natives_lock = threading.Lock()
    default_protect = []        # [(protect, ctx)] from t2x_set_protect(0, ...), for later starts
    null = ffi.NULL

    def protect_fn(cb, ctx):
        return lambda fd: cb(ctx, fd) == 0

    def fail(code: int, message: str) -> int:
        lib._t2x_set_error(message.encode("utf-8", "replace")[:1000])
        return code

    def failure(e: BaseException, default: int = h.E_ARG) -> int:
        if isinstance(e, bridge.InvalidHandle):
            return fail(h.E_HANDLE, str(e))
        if isinstance(e, ProfileError):
            return fail(h.E_JSON, f"profile: {e}")
        if isinstance(e, bridge.BridgeError):
            return fail(default, str(e))
        return fail(h.E_INTERNAL, f"internal error: {type(e).__name__}: {e}")

    def outbound_adapter(native):
        """on_outbound(packets, af6) for bridge.start(outbound_af6=True):
        one join and one C call per burst; C finds each packet's length and
        family in its header (the per-packet cdata of before cost ~0.45 µs
        a packet)."""
        cb, ctx = native.on_outbound, native.ctx
        deliver = lib._t2x_deliver
        join = b"".join

        def one_by_one(packets, af6):
            bufs = [ffi.from_buffer("uint8_t[]", p) for p in packets]
            protos = [af6 if p[0] >> 4 == 6 else bridge.AF_INET for p in packets]
            cb(ctx, ffi.new("const uint8_t *[]", bufs), ffi.new("size_t[]", [len(p) for p in packets]),
               ffi.new("int32_t[]", protos), len(packets))

        def on_outbound(packets, af6):
            n = len(packets)
            if not n:
                cb(ctx, null, null, null, 0)          # the resume signal
                return
            blob = join(packets)
            if deliver(cb, ctx, blob, len(blob), n, af6) < 0:
                one_by_one(packets, af6)              # lengths their headers do not give: never the stack's
        return on_outbound

    def attach_queues(handle, poll_mode):
        """The handle's packet queues in C; its engine's loop watches the
        inbound one."""
        t = bridge._get(handle)
        box = Queues(ffi, lib, t, poll_mode)
        t.call_on_loop(box.attach)

    @ffi.def_extern(name="_t2x_py_ready", error=0)
    def _ready():
        return 1

    @ffi.def_extern(name="_t2x_py_start", error=0)
    def _start(profile_json, on_outbound, ctx):
        try:
            text = ffi.string(profile_json).decode("utf-8")
            native = _Native(on_outbound if on_outbound != null else None, ctx)
            cell = [0]                                # poll mode: the handle, once known
            cb = outbound_adapter(native) if native.on_outbound is not None else poll_output(lib, cell)
            with natives_lock:
                dflt = default_protect[0] if default_protect else None
            if dflt is not None:
                native.protect, native.protect_ctx = dflt
            handle = bridge.start(text, cb, protect=protect_fn(*dflt) if dflt is not None else None,
                                  outbound_af6=True)
            if handle > 0x7FFFFFFF:
                bridge.stop(handle)
                return fail(0, "no more handles in this process")
            cell[0] = handle
            try:
                attach_queues(handle, native.on_outbound is None)
            except BaseException:
                bridge.stop(handle)
                lib._t2x_inbox_free(handle)
                raise
            with natives_lock:
                natives[handle] = native
            return handle
        except UnicodeDecodeError as e:
            return fail(0, f"profile_json: not UTF-8 ({e.reason})")
        except BaseException as e:
            failure(e)
            return 0

    @ffi.def_extern(name="_t2x_py_message", error=h.E_INTERNAL)
    def _message(handle, request_json, reply, capacity):
        try:
            try:
                req = ffi.string(request_json).decode("utf-8")
            except UnicodeDecodeError as e:
                return fail(h.E_JSON, f"request_json: not UTF-8 ({e.reason})")
            try:
                answer = bridge_ops.message(handle, req)
            except bridge_ops.BadRequest as e:
                return fail(h.E_JSON, str(e))
            out = json.dumps(answer, separators=(",", ":")).encode()
            if len(out) > 0x7FFFFFFF:
                return fail(h.E_INTERNAL, "reply larger than 2 GB")
            if capacity:
                n = min(len(out), capacity - 1)
                ffi.memmove(reply, out[:n] + b"\0", n + 1)
            return len(out)
        except BaseException as e:
            return failure(e, h.E_STATE)

    @ffi.def_extern(name="_t2x_py_set_protect", error=h.E_INTERNAL)
    def _set_protect(handle, protect, ctx):
        try:
            if handle == 0:          # the default for handles started from now on
                with natives_lock:
                    default_protect[:] = [] if protect == null else [(protect, ctx)]
                return h.OK
            with natives_lock:
                native = natives.get(handle)
            if native is None:
                bridge._get(handle)           # raises InvalidHandle for an unknown one
                return fail(h.E_HANDLE, f"handle {handle}: unknown or already stopped")
            if protect == null:
                bridge_ops.set_protect(handle, None)
                native.protect = native.protect_ctx = None
                return h.OK
            native.protect, native.protect_ctx = protect, ctx
            bridge_ops.set_protect(handle, protect_fn(protect, ctx))
            return h.OK
        except BaseException as e:
            return failure(e)

    @ffi.def_extern(name="_t2x_py_stop", error=h.E_INTERNAL)
    def _stop(handle):
        try:
            bridge.stop(handle)
            return h.OK
        except BaseException as e:
            return failure(e, h.E_STATE)
        finally:
            if not bridge.is_live(handle):
                with natives_lock:
                    natives.pop(handle, None)
                lib._t2x_inbox_free(handle)           # later submits: T2X_E_HANDLE
