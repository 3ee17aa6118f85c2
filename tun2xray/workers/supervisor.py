"""Many cores: one worker process per queue of a multi-queue TUN (``--workers N``).

The supervisor is the ``tun2xray run`` process. It creates the TUN with
``IFF_MULTI_QUEUE`` (MTU, addresses and link up once), keeps the first queue
as a *keeper* that it detaches at once (``TUNSETQUEUE`` / ``IFF_DETACH_QUEUE``:
the interface stays while a detached queue is open, but the kernel steers no
packets to it), and starts N workers::

    tun2xray run (supervisor)            keeper fd (detached queue)
      ├── python -m tun2xray.workers     queue fd 0, its own Stack + Engine + upstreams
      └── python -m tun2xray.workers     queue fd 1, ...

Each worker slot gets a queue fd (``keeper.open_queue()`` in the supervisor,
inherited through ``pass_fds``) and one end of a socketpair, the *channel*.
The kernel keeps each flow on one queue (by the queue that last wrote the
flow's packets, else by hash over the number of queues), so each flow lives
in one worker's stack. The supervisor keeps its copy of every queue fd and
hands the same queue to a restarted worker: a queue that closed would change
the number of queues and the kernel would move the survivors' idle flows to
a worker that does not know them (it answers them with a RST). While a
worker is down, packets for its queue wait in the queue (the kernel drops
what does not fit); the replacement resets the dead worker's flows and
answers the new ones.

Channel messages are length-prefixed pickles of small dicts, between a
parent and its own child only: the first one carries the worker's spec
(device fd, router, stack settings), the worker answers ``{"ready": pid}``
(or ``{"error": reason}``), then requests ``{"id": n, "cmd": "status"}`` or
``{"id": n, "cmd": "router", "router": ...}`` (node switch: new router,
reset every flow) get one reply each carrying the same ``id``.

How many: ``--workers N``; without it the TUN2XRAY_WORKERS environment
variable, else one per core (``sched_getaffinity``) when the device can be a
multi-queue TUN (`multiqueue_possible`), else 1. ``--workers 1`` (and every
fd:// or unix:// run) is the single-process path of cli.py: no
supervisor, no extra process.

``--record``: each worker records its own packets to a part file and the
supervisor merges the parts into the one capture when it ends (see
tun2xray.record).

The supervisor is a backend of the host shell (tun2xray.host.Host: signals,
control socket, proxy/core watch, Xray session, exit summary): `start()`
starts the workers, `run()` restarts them until `stop()`, `finish()` stops
them, and `status()` asks every worker at once on the loop, each within
REQUEST_TIMEOUT, so a slow or stopped worker never blocks the loop.

The supervisor's ``--control`` socket answers with `aggregate()`: counters
summed over the workers, flows concatenated with a ``worker`` id, and a
``workers`` list (pid, alive, restarts), rates summed, and the newest closed
flows of all workers. A worker that dies is restarted with backoff (and
counted); its counters restart from zero with it.

A deleted TUN ends the run: the supervisor watches the interface's index,
and when it is gone (or a new interface has its name) it stops the workers
and exits with status 1 and the one-line error a worker reports (the
single-process run's words). A restart never re-creates the TUN: opening a
queue by name would make a bare one (down, no addresses, no routes).

Shutdown: SIGINT/SIGTERM to the supervisor -> SIGTERM to every worker, wait
(SIGKILL after a grace), close the keeper: the kernel deletes the TUN with
its last queue. Workers ask for SIGTERM when the supervisor dies
(``PR_SET_PDEATHSIG``) and also stop when the channel reaches EOF, so no
worker outlives it. Workers ignore SIGINT (a Ctrl-C reaches the whole
process group; the supervisor decides).

This module's top level imports little: a worker's RSS is what it imports
plus its flows (no argparse, no pyroute2 in workers).
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import struct
import sys
import time

TUNSETQUEUE = 0x400454D9        # _IOW('T', 217, int)
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400

MAX_WORKERS = 64
MAX_MESSAGE = 64 << 20          # a status with many flows is far below this
READY_TIMEOUT = 20.0
REQUEST_TIMEOUT = 3.0
STOP_GRACE = 5.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 30.0             # a worker that ran this long restarts at the first delay
CLOSED_HISTORY = 128            # closed flows in the aggregate (engine.CLOSED_HISTORY per worker)
DEVICE_GONE_WAIT = 2.0          # how long a lost device waits for a worker to say why

_LEN = struct.Struct("!I")


class WorkerError(Exception):
    """A bad --workers setup or a worker that could not start: one line,
    which the CLI prints as its error (exit status 2)."""


# --------------------------------------------------------------------------
# framing on the channel (blocking side: the supervisor; non-blocking: workers)

def frame(msg: dict) -> bytes:
    body = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(body)) + body


def unframe(buf: bytearray) -> list:
    """Take every complete message off the front of buf."""
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


def detach_queue(fd: int) -> None:
    """Stop the kernel from steering packets to this queue; the fd (and with
    it the interface) stays."""
    import fcntl

    fcntl.ioctl(fd, TUNSETQUEUE, struct.pack("16sH22x", b"", IFF_DETACH_QUEUE))


# --------------------------------------------------------------------------
# aggregation (pure: unit-tested)

def _sum_into(acc: dict, d: dict) -> None:
    """Add d's numbers into acc, recursing into dicts; other values: the
    first one seen wins (names, MTUs)."""
    for k, v in d.items():
        if isinstance(v, bool):
            acc.setdefault(k, v)
        elif isinstance(v, (int, float)):
            cur = acc.get(k)
            if isinstance(cur, (int, float)) and not isinstance(cur, bool):
                acc[k] = cur + v
            elif cur is None:
                acc[k] = v
        elif isinstance(v, dict):
            sub = acc.get(k)
            if not isinstance(sub, dict):
                sub = acc[k] = {}
            _sum_into(sub, v)
        else:
            acc.setdefault(k, v)


_FIXED = ("name", "mtu")   # device keys that are the same in every worker, not summed


def aggregate(workers: list, *, uptime: float = 0.0, device_name: str = "", mtu: int = 0) -> dict:
    """One engine-shaped status from the workers' statuses.

    ``workers``: list of dicts ``{"id", "pid", "alive", "restarts",
    "status"}`` where status is the worker's ``Engine.status()`` or None
    (dead or unresponsive). Counters are summed, flows concatenated with
    their worker id, and a ``workers`` list tells each worker's share."""
    device = {"name": device_name, "mtu": mtu}
    stack: dict = {}
    engine: dict = {}
    flows = []
    closed = []
    rate = {"up": 0.0, "down": 0.0}
    assocs = 0
    summary = []
    for w in workers:
        st = w.get("status")
        row = {"id": w["id"], "pid": w.get("pid"), "alive": bool(w.get("alive")),
               "restarts": w.get("restarts", 0), "responding": st is not None}
        if st is not None:
            for k, v in st.get("device", {}).items():
                if k in _FIXED:
                    continue
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    device[k] = device.get(k, 0) + v
            _sum_into(stack, st.get("stack", {}))
            _sum_into(engine, st.get("engine", {}))
            assocs += st.get("udp_associations", 0)
            wf = st.get("flows", [])
            for f in wf:
                f = dict(f)
                f["worker"] = w["id"]
                flows.append(f)
            for k, v in st.get("rate", {}).items():
                rate[k] = round(rate.get(k, 0.0) + v, 1)
            for f in st.get("closed_flows", []):
                f = dict(f)
                f["worker"] = w["id"]
                closed.append(f)
            e = st.get("engine", {})
            row.update(uptime=st.get("uptime", 0.0), flows=len(wf),
                       tcp_opened=e.get("tcp_opened", 0), udp_opened=e.get("udp_opened", 0),
                       rx_packets=st.get("device", {}).get("rx_packets", 0),
                       rate=dict(st.get("rate", {})))
        summary.append(row)
    return {
        "uptime": round(uptime, 3),
        "device": device,
        "stack": stack,
        "engine": engine,
        "udp_associations": assocs,
        "rate": rate,
        "flows": flows,
        # the newest closed flows of all workers, as many as one engine keeps
        "closed_flows": sorted(closed, key=lambda f: f.get("ended_epoch", 0))[-CLOSED_HISTORY:],
        "workers": summary,
        "worker_restarts": sum(r["restarts"] for r in summary),
    }


def next_backoff(delay: float, ran_for: float) -> float:
    """The wait before the next restart: doubled after a short life, reset
    after a stable one."""
    if ran_for >= STABLE_AFTER or delay <= 0:
        return BACKOFF_FIRST
    return min(delay * 2, BACKOFF_MAX)


# --------------------------------------------------------------------------
# CLI glue

IFF_MULTI_QUEUE = 0x0100


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _ifindex(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return 0


def _tun_flags(name: str):
    """An existing interface's TUN flags (None: no such interface; -1: not a TUN)."""
    if not os.path.exists(f"/sys/class/net/{name}"):
        return None
    try:
        with open(f"/sys/class/net/{name}/tun_flags") as f:
            return int(f.read().strip(), 16)
    except (OSError, ValueError):
        return -1


def _tun_parts(url: str):
    """(NAME, query) of a tun:// URL, None for other devices."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "tun":
        return None
    name, _, query = rest.partition("?")
    return name, query


def multiqueue_possible(device: str, record=None) -> bool:
    """Can this run be served by workers? Not for fd:// or unix:// devices,
    ``?multiqueue=0``, an existing single-queue TUN (attaching to it as
    multi-queue would fail), or off Linux.  (``record`` is accepted for old
    callers and ignored: workers record too.)"""
    parts = _tun_parts(device)
    if parts is None or not sys.platform.startswith("linux"):
        return False
    name, query = parts
    if "multiqueue=0" in query.split("&"):
        return False
    if name:
        flags = _tun_flags(name)
        if flags is not None and (flags < 0 or not flags & IFF_MULTI_QUEUE):
            return False
    return True


def default_workers(device: str, record=None) -> int:
    """Without --workers: one worker per core where workers are possible,
    else 1 (the single-process path)."""
    if not multiqueue_possible(device, record):
        return 1
    return max(1, min(_cores(), MAX_WORKERS))


def worker_count(args) -> int:
    """--workers from the flags, else the TUN2XRAY_WORKERS environment
    variable, else default_workers(); checked; raises WorkerError."""
    n = getattr(args, "workers", None)
    if n is None:
        env = os.environ.get("TUN2XRAY_WORKERS", "").strip()
        if not env:
            return default_workers(args.device, args.record)
        try:
            n = int(env)
        except ValueError:
            raise WorkerError(f"TUN2XRAY_WORKERS={env!r}: not a number") from None
        if n > 1 and not multiqueue_possible(args.device, args.record):
            return 1        # a default for every run: only where it can apply
    if not 1 <= n <= MAX_WORKERS:
        raise WorkerError(f"--workers {n}: must be between 1 and {MAX_WORKERS}")
    if n > 1:
        parts = _tun_parts(args.device)
        if parts is None:
            raise WorkerError(f"--workers {n}: needs a tun:// device (one queue per worker)")
        if "multiqueue=0" in parts[1].split("&"):
            raise WorkerError(f"--workers {n}: needs a multi-queue TUN (not ?multiqueue=0)")
    return n


def multiqueue_url(url: str) -> str:
    """tun://NAME[?opts] with multiqueue=1 set."""
    from urllib.parse import parse_qsl, urlencode

    base, _, query = url.partition("?")
    opts = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "multiqueue"]
    opts.append(("multiqueue", "1"))
    return base + "?" + urlencode(opts)


def run_supervised(args, settings, xs, n: int) -> int:
    """`tun2xray run --workers N` (N > 1): open the multi-queue TUN, serve
    with N workers until SIGINT/SIGTERM. Exit status as cmd_run's; bad
    setup raises WorkerError."""
    from .device import DeviceError, open_device

    url = multiqueue_url(args.device)
    try:
        keeper = open_device(url, mtu=settings.mtu, addresses=[settings.address, settings.address6])
    except DeviceError as e:
        raise WorkerError(f"--device {args.device}: {e}") from None
    sup = None
    rec = getattr(settings, "record", None)
    try:
        detach_queue(keeper.fileno())
        from .host import routes_up
        routes_up(settings, keeper.name)
        if rec is not None:
            from . import record
            try:
                record.start_parts(rec)
            except OSError as e:
                raise WorkerError(f"--record {rec.path}: {e.strerror or e}") from None
            record.notice(rec, keeper.capabilities.offload, n)
        if xs is not None:
            xs.route_up(keeper.name)
        sup = Supervisor(keeper, settings, n, log_level=args.log_level,
                         log_format=getattr(args, "log_format", "text"), url=args.device)
        from .host import Host, run
        return run(Host(sup, settings, xs).serve(
            f"running on {keeper.name} (mtu {keeper.mtu}) with {n} workers, proxy "
            f"{settings.router.default_url}"))
    finally:
        if sup is not None:
            sup.kill_all()
            sup.close_poke()
            if rec is not None:
                from . import record
                record.merge_parts(rec, n)
        settings.net.down()
        keeper.close()


# --------------------------------------------------------------------------
# supervisor

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
        except (ValueError, pickle.UnpicklingError, EOFError):
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
        except (ValueError, pickle.UnpicklingError, EOFError):
            self.buf.clear()            # a garbled stream: start afresh at the next reply
            return None


class Supervisor:
    def __init__(self, keeper, settings, n: int, *, log_level: str = "info", log_format: str = "text",
                 url: str | None = None):
        import logging

        self.log = logging.getLogger("tun2xray.workers")
        self.keeper = keeper
        self.settings = settings
        self.n = n
        self.log_level = log_level
        self.log_format = log_format
        self.ended = None        # why the run ends on its own (see fail())
        self.workers = [WorkerHandle(i) for i in range(n)]
        self.started = time.time()
        self.stopping = False
        self.loop = None
        self._stop = None
        self.fatal = None               # why the run ends on its own (the device is gone)
        # workers write a byte here when a dial to an upstream fails: the
        # proxy watch checks at once (non-blocking both ends; a full pipe
        # already says it)
        self.poke_r, self.poke_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.url = url or keeper.url    # the device as the user named it (in workers' messages)
        self.ifindex = _ifindex(keeper.name)
        self.request_timeout = REQUEST_TIMEOUT      # per worker, for a status request
        self.on_upstream_failed = None  # the host shell's proxy watch (tun2xray.host)

    @property
    def error(self):
        """Why the run ended on its own (the host shell's backend interface)."""
        return self.fatal

    # -- workers

    def spec(self, w: WorkerHandle, dev_fd: int) -> dict:
        s = self.settings
        k = self.keeper
        from .host import EngineSettings
        return {
            "id": w.id, "fd": dev_fd, "name": k.name, "mtu": k.mtu, "url": self.url,
            "flags": k._flags, "offload": k.capabilities.offload,
            "engine": EngineSettings.of(s),
            "log_level": self.log_level, "log_format": self.log_format, "record": self._record_spec(w),
            "poke_fd": self.poke_w,
        }

    def _record_spec(self, w: WorkerHandle):
        rec = getattr(self.settings, "record", None)
        if rec is None:
            return None
        from .record import part_cap, part_path
        return {"path": rec.path, "wire": rec.wire, "part": part_path(rec.path, w.id),
                "cap": part_cap(rec, self.n)}

    def device_gone(self) -> bool:
        """Is our TUN gone (deleted, or replaced by another of the same name)?"""
        return _ifindex(self.keeper.name) != self.ifindex

    def spawn(self, w: WorkerHandle) -> None:
        """Start worker w on a fresh queue (blocking until the spec is sent).
        Never re-creates a deleted TUN: opening a queue by name would make a
        bare one (no addresses, no routes, down), so the queue must belong
        to the interface the run started with."""
        import subprocess

        from .device import DeviceError

        if self.device_gone():
            raise DeviceError(f"tun://{self.keeper.name}: the interface is gone")
        q = w.queue
        if q is None:
            q = self.keeper.open_queue()
            if self.device_gone():
                q.close()       # we just made a new TUN of that name: its only queue closes it
                raise DeviceError(f"tun://{self.keeper.name}: the interface is gone")
            w.queue = q         # kept: the same queue (index) for every worker of this slot
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            dev_fd, ch_fd = q.fileno(), theirs.fileno()
            # python -m tun2xray.workers on this same tree, or the frozen binary's hidden entry
            from .frozen import worker_command
            argv, env = worker_command(["--channel", str(ch_fd), "--parent", str(os.getpid())])
            w.proc = subprocess.Popen(argv, pass_fds=(dev_fd, ch_fd, self.poke_w), stdin=subprocess.DEVNULL, env=env)
        finally:
            theirs.close()      # the far end lives in the child only
        w.chan = ours
        w.buf.clear()
        w.started = time.monotonic()
        w.restart_at = None
        try:
            ours.settimeout(5)
            ours.sendall(frame(self.spec(w, dev_fd)))
        except OSError:
            pass    # it died at once: the monitor sees it

    def start_all(self) -> None:
        """Start every worker and wait until each serves (WorkerError if not)."""
        for w in self.workers:
            try:
                self.spawn(w)
            except Exception as e:            # no queue (DeviceError), no fork (OSError)
                raise WorkerError(f"worker {w.id}: cannot start: {e}") from None
        for w in self.workers:
            m = w._read_until(lambda m: "ready" in m or "error" in m, READY_TIMEOUT) if w.chan else None
            if m is None or "error" in m:
                why = m["error"] if m else (f"exited with {w.proc.poll()}" if not w.alive
                                            else f"not ready within {READY_TIMEOUT:g}s")
                raise WorkerError(f"worker {w.id}: {why}")

    def _on_poke(self, watch) -> None:
        try:
            while os.read(self.poke_r, 4096):
                pass
        except BlockingIOError:
            pass
        watch.poke()

    def poke(self) -> None:
        """A worker's dial failed: wake the host shell's proxy watch."""
        if self.on_upstream_failed is not None:
            self.on_upstream_failed()

    def close_poke(self) -> None:
        for fd in (self.poke_r, self.poke_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self.poke_r = self.poke_w = -1

    def kill_all(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM every worker, wait, SIGKILL stragglers (blocking; idempotent)."""
        live = [w for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for w in live:
            try:
                w.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for w in live:
            try:
                w.proc.wait(max(0.0, deadline - time.monotonic()))
            except Exception:
                w.proc.kill()
                w.proc.wait()
        for w in self.workers:
            w.close_channel()
            w.close_queue()

    def _fatal_from(self, w: WorkerHandle):
        """A worker's last word ({"fatal": why}) if it is on the channel."""
        if w.chan is None:
            return None
        try:
            w.chan.setblocking(False)
            while True:
                data = w.chan.recv(1 << 16)
                if not data:
                    break
                w.buf += data
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            return None
        try:
            msgs = unframe(w.buf)
        except (ValueError, pickle.UnpicklingError, EOFError):
            w.buf.clear()
            return None
        for m in msgs:
            if "fatal" in m:
                return m["fatal"]
        return None

    async def _device_lost(self) -> str:
        """Why the device is gone, in the words of the worker that saw it (the
        single-process run's error line), waiting a little for one to say it."""
        import asyncio

        deadline = time.monotonic() + DEVICE_GONE_WAIT
        while True:
            for w in self.workers:
                why = self._fatal_from(w)
                if why:
                    return why
            if time.monotonic() > deadline:
                name = self.keeper.name
                return f"device {name}: tun://{name}: the interface is gone"
            await asyncio.sleep(0.05)

    def fail(self, why: str) -> None:
        """End the run with an error (exit status 1)."""
        if self.fatal is None:
            self.fatal = why
        if self.ended is None:
            self.ended = why            # the exit summary names it
        self.stop()

    async def _monitor(self) -> None:
        import asyncio

        while not self.stopping:
            if self.device_gone():
                # no restart can help (and must not re-create a bare TUN): end the run
                self.fail(await self._device_lost())
                return
            now = time.monotonic()
            for w in self.workers:
                if self.stopping:
                    break
                if w.proc is not None and w.restart_at is None and w.proc.poll() is not None:
                    ran = now - w.started
                    w.last_exit = w.proc.returncode
                    w.close_channel()
                    w.delay = next_backoff(w.delay, ran)
                    w.restart_at = now + w.delay
                    self.log.warning("worker %d (pid %d) exited with %s after %.1fs; restart in %.1fs",
                                     w.id, w.proc.pid, w.proc.returncode, ran, w.delay)
                elif w.restart_at is not None and now >= w.restart_at:
                    w.restarts += 1
                    try:
                        self.spawn(w)
                    except Exception as e:          # no queue now (interface trouble): retry later
                        w.delay = next_backoff(w.delay, 0.0)
                        w.restart_at = now + w.delay
                        self.log.error("worker %d restart failed: %s; retry in %.1fs", w.id, e, w.delay)
                    else:
                        self.log.info("worker %d restarted (pid %d)", w.id, w.proc.pid)
            await asyncio.sleep(0.2)

    # -- status and control

    async def worker_status(self) -> list:
        """Every worker's status, asked of all at once on the loop (each
        within request_timeout; one that does not answer has none)."""
        import asyncio

        reps = await asyncio.gather(*(w.request_async({"cmd": "status"}, self.request_timeout)
                                      for w in self.workers))
        out = []
        for w, rep in zip(self.workers, reps):
            out.append({"id": w.id, "pid": w.proc.pid if w.proc is not None else None,
                        "alive": w.alive, "restarts": w.restarts,
                        "status": rep.get("status") if rep else None})
        return out

    async def status(self) -> dict:
        st = aggregate(await self.worker_status(), uptime=time.time() - self.started,
                       device_name=self.keeper.name, mtu=self.keeper.mtu)
        return st

    def reset_flows(self) -> int:
        """For XraySession.switch(): every worker takes the router as it is
        now and resets its flows; returns how many flows were reset."""
        total = 0
        for w in self.workers:
            rep = w.request({"cmd": "router", "router": self.settings.router})
            if rep:
                total += rep.get("reset", 0)
        return total

    def stop(self) -> None:
        self.stopping = True
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(None)

    # -- the host shell's backend interface (tun2xray.host.Host)

    def start(self) -> None:
        """Start every worker and wait until each serves (HostError if not)."""
        import asyncio

        from .host import HostError

        self.loop = asyncio.get_running_loop()
        self._stop = self.loop.create_future()
        if self.stopping:
            self._stop.set_result(None)
        try:
            self.start_all()
        except WorkerError as e:
            raise HostError(str(e)) from None

    async def run(self) -> None:
        """Serve (restart workers, watch the device) until stop()."""
        loop = self.loop
        loop.add_reader(self.poke_r, self._on_poke, self)
        monitor = loop.create_task(self._monitor())
        try:
            await self._stop
        finally:
            monitor.cancel()
            loop.remove_reader(self.poke_r)

    async def finish(self) -> None:
        """After the exit summary: stop the workers."""
        import asyncio

        self.stopping = True
        await asyncio.get_running_loop().run_in_executor(None, self.kill_all)


# --------------------------------------------------------------------------
# worker

class _QueueFd:
    """What TunDevice wants from a pytun object: the inherited queue fd."""

    __slots__ = ("fd",)

    def __init__(self, fd: int):
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _pdeathsig(parent: int) -> None:
    """SIGTERM to us when the supervisor dies; gone already: exit now."""
    from .host import set_pdeathsig

    set_pdeathsig(signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)


def _read_spec(chan: socket.socket, timeout: float = 10.0):
    """The first message (the spec), and the bytes that came after it (a
    request the supervisor sent before we were up)."""
    chan.settimeout(timeout)
    buf = bytearray()
    while True:
        if len(buf) >= 4:
            (n,) = _LEN.unpack_from(buf)
            if n > MAX_MESSAGE:
                raise ValueError(f"channel message of {n} bytes")
            if len(buf) >= 4 + n:
                spec = pickle.loads(bytes(memoryview(buf)[4:4 + n]))
                del buf[:4 + n]
                return spec, buf
        data = chan.recv(1 << 16)
        if not data:
            raise EOFError("the supervisor closed the channel")
        buf += data


def worker_device(spec: dict):
    from .device import tun_class

    cls = tun_class(spec["offload"])
    os.set_blocking(spec["fd"], False)
    return cls(_QueueFd(spec["fd"]), name=spec["name"], mtu=spec["mtu"], url=spec["url"],
               created=False, flags=spec["flags"])


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
        except (ValueError, pickle.UnpicklingError, EOFError):
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


def _poker(fd):
    """engine.on_upstream_failed for a worker: one byte to the supervisor's
    proxy watch (a full pipe has said it already)."""
    if fd is None:
        return None

    def poke():
        try:
            os.write(fd, b"!")
        except OSError:
            pass
    return poke


async def _worker_serve(spec: dict, chan: socket.socket, pending: bytes = b"") -> int:
    import asyncio

    from .host import make_engine

    loop = asyncio.get_running_loop()
    try:
        device = worker_device(spec)
    except Exception as e:
        chan.sendall(frame({"error": f"cannot use queue fd {spec.get('fd')}: {e}"}))
        return 1
    try:
        recorder = _worker_recorder(spec, device)
    except OSError as e:
        device.close()
        chan.sendall(frame({"error": f"--record {spec['record']['part']}: {e.strerror or e}"}))
        return 1
    try:
        engine = make_engine(device, spec["engine"], recorder)
        loop.add_signal_handler(signal.SIGTERM, engine.stop)
        engine.on_upstream_failed = _poker(spec.get("poke_fd"))
        ch = WorkerChannel(chan, engine, loop, pending)
        task = loop.create_task(engine.run())
        await asyncio.sleep(0)
        ch.send({"ready": os.getpid()})
        await task
        if engine.error:
            ch.send({"fatal": engine.error})    # the supervisor ends the run with these words
        ch.close()
    finally:
        device.close()
        if recorder is not None:
            recorder.close()
    if engine.error:
        import logging
        logging.getLogger("tun2xray.workers").error("worker %d stopped: %s", spec["id"], engine.error)
        return 1
    return 0


def _worker_recorder(spec: dict, device):
    """This worker's part of the --record capture (appended to after a
    restart), or None."""
    r = spec.get("record")
    if not r:
        return None
    from .record import RecordOptions, recorder

    return recorder(RecordOptions(r["path"], r["wire"], 0), device.mtu, path=r["part"],
                    max_bytes=r["cap"], append=True)


def worker_main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m tun2xray.workers",
                                description="one tun2xray worker (started by `tun2xray run --workers N`)")
    p.add_argument("--channel", type=int, required=True)
    p.add_argument("--parent", type=int, required=True)
    a = p.parse_args(argv)
    del argparse, p
    _pdeathsig(a.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    chan = socket.socket(fileno=a.channel)
    try:
        spec, pending = _read_spec(chan)
    except (OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        print(f"tun2xray worker: no spec from the supervisor: {e}", file=sys.stderr)
        return 1
    from . import logs

    logs.setup(spec.get("log_level", "info"), spec.get("log_format", "text"), worker=spec["id"])
    from .host import run
    return run(_worker_serve(spec, chan, pending))


if __name__ == "__main__":
    sys.exit(worker_main())
