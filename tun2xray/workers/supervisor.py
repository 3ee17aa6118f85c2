"""The supervisor: starts the workers on their queues, restarts them with
backoff, answers status with their aggregate, and stops them (run_supervised
is the `tun2xray run --workers N` entry)."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import time

from .channel import READY_TIMEOUT, REQUEST_TIMEOUT, WorkerError, WorkerHandle, frame, unframe
from .count import _ifindex, detach_queue, multiqueue_url

STOP_GRACE = 5.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 30.0             # a worker that ran this long restarts at the first delay
CLOSED_HISTORY = 128            # closed flows in the aggregate (engine.CLOSED_HISTORY per worker)
DEVICE_GONE_WAIT = 2.0          # how long a lost device waits for a worker to say why


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
    resources: dict = {}
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
            _sum_into(resources, st.get("resources", {}))
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
        "resources": resources,
        "workers": summary,
        "worker_restarts": sum(r["restarts"] for r in summary),
    }


def next_backoff(delay: float, ran_for: float) -> float:
    """The wait before the next restart: doubled after a short life, reset
    after a stable one."""
    if ran_for >= STABLE_AFTER or delay <= 0:
        return BACKOFF_FIRST
    return min(delay * 2, BACKOFF_MAX)


def run_supervised(args, settings, xs, n: int, zygote=None) -> int:
    """`tun2xray run --workers N` (N > 1): open the multi-queue TUN, serve
    with N workers until SIGINT/SIGTERM. Exit status as cmd_run's; bad
    setup raises WorkerError. ``zygote``: the template the workers are
    forked from (tun2xray.workers.zygote), else they are exec'd."""
    from ..device import DeviceError, open_device

    url = multiqueue_url(args.device)
    try:
        keeper = open_device(url, mtu=settings.mtu, addresses=[settings.address, settings.address6])
    except DeviceError as e:
        raise WorkerError(f"--device {args.device}: {e}") from None
    sup = None
    rec = getattr(settings, "record", None)
    try:
        detach_queue(keeper.fileno())
        from ..host import routes_up
        routes_up(settings, keeper.name)
        if rec is not None:
            from .. import record
            try:
                record.start_parts(rec)
            except OSError as e:
                raise WorkerError(f"--record {rec.path}: {e.strerror or e}") from None
            record.notice(rec, keeper.capabilities.offload, n)
        if xs is not None:
            xs.route_up(keeper.name)
        sup = Supervisor(keeper, settings, n, log_level=args.log_level,
                         log_format=getattr(args, "log_format", "text"), url=args.device, zygote=zygote)
        from ..host import Host, run
        return run(Host(sup, settings, xs).serve(
            f"running on {keeper.name} (mtu {keeper.mtu}) with {n} workers, proxy "
            f"{settings.router.default_url}"))
    finally:
        if sup is not None:
            sup.kill_all()
            sup.close_poke()
            if rec is not None:
                from .. import record
                record.merge_parts(rec, n)
        settings.net.down()
        keeper.close()


class Supervisor:
    def __init__(self, keeper, settings, n: int, *, log_level: str = "info", log_format: str = "text",
                 url: str | None = None, zygote=None):
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
        self.zygote = zygote            # forks the workers (None: exec python -m tun2xray.workers)

    @property
    def error(self):
        """Why the run ended on its own (the host shell's backend interface)."""
        return self.fatal

    # -- workers

    def spec(self, w: WorkerHandle, dev_fd: int) -> dict:
        s = self.settings
        k = self.keeper
        from ..host import EngineSettings
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
        from ..record import part_cap, part_path
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
        from ..device import DeviceError

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
            w.proc = self._start_process(q.fileno(), theirs.fileno())
        finally:
            theirs.close()      # the far end lives in the child only
        w.chan = ours
        w.buf.clear()
        w.started = time.monotonic()
        w.restart_at = None
        try:
            ours.settimeout(5)
            ours.sendall(frame(self.spec(w, q.fileno())))
        except OSError:
            pass    # it died at once: the monitor sees it

    def _start_process(self, dev_fd: int, ch_fd: int):
        """A worker process on these fds: forked from the zygote (sharing
        its pages), or exec'd when there is none or it is gone."""
        if self.zygote is not None:
            try:
                return self.zygote.spawn(dev_fd, ch_fd, self.poke_w)
            except OSError as e:
                self.log.warning("worker zygote: %s; starting workers as new programs", e)
                self.zygote = None
        import subprocess

        # python -m tun2xray.workers on this same tree, or the frozen binary's hidden entry
        from ..frozen import worker_command
        argv, env = worker_command(["--channel", str(ch_fd), "--parent", str(os.getpid())])
        return subprocess.Popen(argv, pass_fds=(dev_fd, ch_fd, self.poke_w), stdin=subprocess.DEVNULL, env=env)

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

        from ..host import HostError

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
