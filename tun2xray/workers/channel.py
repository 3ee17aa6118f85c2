"""The channel between the supervisor and one worker: length-prefixed
pickles (frame/unframe), the supervisor's end of a worker slot (WorkerHandle)
and the worker's end on its event loop (WorkerChannel)."""

from __future__ import annotations

import socket
import struct
import time

MAX_MESSAGE = 64 << 20          # a status with many flows is far below this
READY_TIMEOUT = 20.0
REQUEST_TIMEOUT = 3.0

_LEN = struct.Struct("!I")


class WorkerError(Exception):
    """A bad --workers setup or a worker that could not start: one line,
    which the CLI prints as its error (exit status 2)."""


# --------------------------------------------------------------------------
# framing on the channel (blocking side: the supervisor; non-blocking: workers)

# pickle is imported where a message is made or read: a one-process run
# imports this module (for WorkerError) and never frames a message, and
# pickle (with _pickle and _compat_pickle) is about 0.27 MB of RSS

def _garbled() -> tuple:
    """What reading a garbled stream raises (an except clause's tuple)."""
    import pickle
    return (ValueError, pickle.UnpicklingError, EOFError)


def frame(msg: dict) -> bytes:
    import pickle
    body = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(body)) + body


def unframe(buf: bytearray) -> list:
    """Take every complete message off the front of buf."""
    import pickle
    out = []
    while len(buf) >= 4:
        (n,) = _LEN.unpack_from(buf)
        if n > MAX_MESSAGE:
            raise ValueError(f"channel message of {n} bytes")
        if len(buf) < 4 + n:
            break
        out.append(pickle.loads(bytes(memoryview(buf)[4:4 + n])))
        del buf[:4 + n]
    return out


class WorkerHandle:
    """The supervisor's view of one worker slot (it survives restarts)."""

    __slots__ = ("id", "proc", "chan", "buf", "req", "restarts", "started", "delay",
                 "restart_at", "last_exit", "lock", "asking", "queue")

    def __init__(self, wid: int):
        self.id = wid
        self.proc = None
        self.chan = None
        self.buf = bytearray()
        self.req = 0
        self.restarts = 0
        self.started = 0.0
        self.delay = 0.0
        self.restart_at = None
        self.last_exit = None
        self.lock = None                # asyncio.Lock: one async request at a time on the channel
        self.asking = 0                 # async requests waiting for their reply
        self.queue = None           # this slot's TUN queue, kept across restarts

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close_queue(self) -> None:
        if self.queue is not None:
            self.queue.close()
            self.queue = None

    def close_channel(self) -> None:
        if self.chan is not None:
            self.chan.close()
            self.chan = None
        self.buf.clear()

    def _read_until(self, want, timeout: float):
        """Blocking read of messages until want(msg); None on EOF/timeout.
        Messages before the wanted one (late replies, a restart's "ready")
        are dropped; those after it stay for the next call."""
        chan = self.chan
        deadline = time.monotonic() + timeout
        while True:
            m = self._take(want)
            if m is not None:
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            chan.settimeout(left)
            try:
                data = chan.recv(1 << 20)
            except (TimeoutError, socket.timeout):
                return None
            if not data:
                return None
            self.buf += data

    def _take(self, want):
        """The first buffered message with want(msg), or None; messages
        before it are dropped, those after it stay."""
        msgs = unframe(self.buf)
        for i, m in enumerate(msgs):
            if want(m):
                self.buf[:0] = b"".join(frame(x) for x in msgs[i + 1:])
                return m
        return None

    async def request_async(self, msg: dict, timeout: float = REQUEST_TIMEOUT):
        """request() on the running loop: waits for the reply without
        blocking the loop (None if the worker is gone or slow)."""
        import asyncio

        if self.lock is None:
            self.lock = asyncio.Lock()
        self.asking += 1
        try:
            async with asyncio.timeout(timeout):
                async with self.lock:
                    return await self._exchange(msg)
        except (TimeoutError, OSError):
            return None
        except _garbled():
            self.buf.clear()            # a garbled stream: start afresh at the next reply
            return None
        finally:
            self.asking -= 1

    async def _exchange(self, msg: dict):
        import asyncio

        chan = self.chan
        if chan is None or not self.alive:
            return None
        loop = asyncio.get_running_loop()
        self.req += 1
        rid = msg["id"] = self.req
        chan.setblocking(False)
        await loop.sock_sendall(chan, frame(msg))
        while True:
            m = self._take(lambda m: m.get("id") == rid)
            if m is not None:
                return m
            data = await loop.sock_recv(chan, 1 << 20)
            if not data:
                return None
            self.buf += data

    def request(self, msg: dict, timeout: float = REQUEST_TIMEOUT):
        """Send msg, return the reply with its id (None if the worker is
        gone or slow; a late reply is skipped by the next request)."""
        if self.chan is None or not self.alive:
            return None
        self.req += 1
        rid = msg["id"] = self.req
        try:
            self.chan.settimeout(timeout)
            self.chan.sendall(frame(msg))
            return self._read_until(lambda m: m.get("id") == rid, timeout)
        except OSError:
            return None
        except _garbled():
            self.buf.clear()            # a garbled stream: start afresh at the next reply
            return None


class WorkerChannel:
    """The worker's end of the channel, on its event loop."""

    def __init__(self, chan: socket.socket, engine, loop, pending: bytes = b""):
        self.chan = chan
        self.engine = engine
        self.loop = loop
        self.buf = bytearray(pending)
        self.out = bytearray()
        chan.setblocking(False)
        loop.add_reader(chan.fileno(), self._readable)
        if pending:
            loop.call_soon(self._dispatch)

    def send(self, msg: dict) -> None:
        self.out += frame(msg)
        self._flush()

    def _flush(self) -> None:
        try:
            while self.out:
                n = self.chan.send(self.out)
                del self.out[:n]
        except BlockingIOError:
            self.loop.add_writer(self.chan.fileno(), self._writable)
            return
        except OSError:
            self.out.clear()
            return

    def _writable(self) -> None:
        self.loop.remove_writer(self.chan.fileno())
        self._flush()

    def _readable(self) -> None:
        try:
            data = self.chan.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            # the supervisor is gone (or closed us): stop
            self.close()
            self.engine.stop()
            return
        self.buf += data
        self._dispatch()

    def _dispatch(self) -> None:
        try:
            msgs = unframe(self.buf)
        except _garbled():
            self.close()
            self.engine.stop()
            return
        for m in msgs:
            self.handle(m)

    def handle(self, m: dict) -> None:
        cmd = m.get("cmd")
        rid = m.get("id")
        if cmd == "status":
            self.send({"id": rid, "status": self.engine.status()})
        elif cmd == "router":
            self.engine.router = m["router"]
            self.send({"id": rid, "reset": self.engine.reset_flows()})
        else:
            self.send({"id": rid, "error": f"unknown command {cmd!r}"})

    def close(self) -> None:
        try:
            self.loop.remove_reader(self.chan.fileno())
            self.loop.remove_writer(self.chan.fileno())
        except (ValueError, OSError):
            pass
