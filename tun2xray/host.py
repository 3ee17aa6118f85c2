"""The host shell: what every way of running an engine shares.

A run (`tun2xray run`, one process or a supervisor of workers) wraps an
*engine-like backend* in the same sequence, owned here by `Host.serve`:

    lifecycle "connecting" -> SIGINT/SIGTERM handlers -> control socket
    -> backend.start() -> Xray session attach -> upstream/core watch
    -> backend.run() ... -> exit summary -> session detach
    -> backend.finish() -> control socket removed -> "disconnected" | "error"

A backend is an `engine.Engine` (one process) or a `workers.Supervisor`
(the workers' engines behind one status).  It has ``run()`` (a coroutine
that serves until ``stop()``), ``stop()``, ``status()`` (a dict, or an
awaitable of one: the supervisor asks its workers without blocking the
loop), ``error`` (why it ended on its own, else None) and
``on_upstream_failed`` (set here: a failed dial wakes the proxy watch);
optionally ``start()`` (raises `HostError` when it cannot serve) and
``finish()`` (a coroutine, after the exit summary).

Settings flow one way: the profile (tun2xray.profile) fills the flags,
cli.RunSettings (or `EngineSettings.from_profile` for the bridge) holds
them, and `stack_config` / `make_engine` build the stack and the engine
from them.  `run` is the one event-loop runner (uvloop where importable,
else asyncio) and `new_loop` the bridge's, which may insist on asyncio.
`set_pdeathsig` asks the kernel for a signal when the parent dies, and
`routes_up` puts the profile's routes on a TUN tun2xray opened.

Who uses it: cli (one process), workers (the supervisor's shell, the
workers' engines and runner, the pdeathsig), bridge (settings, engine,
loop, watch), frozen (pdeathsig).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import sys
import time

log = logging.getLogger("tun2xray")

PR_SET_PDEATHSIG = 1


class HostError(Exception):
    """The shell could not start (a control socket in use, a backend that
    cannot serve): one line, exit status 2 from the CLI."""


# ------------------------------------------------------------ event loops

def run(coro):
    """Run *coro* to completion on a new loop: uvloop where importable, else
    asyncio (iOS and Android have no uvloop)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def import_loop() -> None:
    """Import what run() runs on (uvloop where importable) now, so a
    process that forks workers shares it with them."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        pass


def new_loop(kind: str = "auto"):
    """(loop, "uvloop" | "asyncio") for a host that runs its own loop in a
    thread. *kind*: "auto" (uvloop where importable), "uvloop" (must be) or
    "asyncio" (never uvloop). Raises ValueError for anything else."""
    if kind not in ("auto", "uvloop", "asyncio"):
        raise ValueError(f'loop "{kind}": expected "auto", "uvloop" or "asyncio"')
    if kind != "asyncio":
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise ValueError("loop \"uvloop\": uvloop is not installed") from None
        else:
            return uvloop.new_event_loop(), "uvloop"
    return asyncio.new_event_loop(), "asyncio"


def finish_loop(loop) -> None:
    """What asyncio.run does after its main coroutine: cancel what is left,
    let transports deliver connection_lost, stop executor threads (for a
    host that ran *loop* in its own thread, before closing it)."""
    for _ in range(3):
        tasks = asyncio.all_tasks(loop)
        if not tasks:
            break
        for t in tasks:
            t.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for _ in range(3):
        loop.run_until_complete(asyncio.sleep(0))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.run_until_complete(loop.shutdown_default_executor())


def await_thread_exit(native_id, timeout: float = 1.0) -> None:
    """Thread.join() returns once the thread's Python state is gone; the OS
    thread ends a moment later.  Where /proc shows it, wait for that too (a
    host that promises "no thread left" when stop returns)."""
    path = f"/proc/self/task/{native_id}"
    deadline = time.monotonic() + timeout
    while native_id is not None and os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.0002)


# -------------------------------------------------------------- processes

def set_pdeathsig(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel for *sig* when our parent dies (Linux prctl
    PR_SET_PDEATHSIG); False where that is not available."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        return False
    return True


# --------------------------------------------------------------- settings

class EngineSettings:
    """What an engine takes from the settings. cli.RunSettings has the same
    attributes; the bridge builds this from a profile, and the supervisor
    hands it to each worker."""

    __slots__ = ("connect_timeout", "dns", "icmp_echo", "limits", "max_flows", "refusal_window", "router",
                 "udp_timeout")

    def __init__(self, router, *, udp_timeout: float = 60.0, connect_timeout: float = 10.0,
                 max_flows: int = 65536, icmp_echo: str = "reply", refusal_window: float = 1.5, dns=None,
                 limits: dict | None = None):
        self.router = router
        self.dns = dns                  # tun2xray.dns.settings.DnsSettings, or None (off)
        self.limits = limits if limits is not None else stack_limits(None)
        self.udp_timeout = udp_timeout
        self.connect_timeout = connect_timeout
        self.max_flows = max_flows
        self.icmp_echo = icmp_echo
        self.refusal_window = refusal_window

    @classmethod
    def of(cls, s) -> EngineSettings:
        """The engine's part of RunSettings (or any object with these attributes)."""
        return cls(s.router, udp_timeout=s.udp_timeout, connect_timeout=s.connect_timeout,
                   max_flows=s.max_flows, icmp_echo=s.icmp_echo, refusal_window=s.refusal_window,
                   dns=getattr(s, "dns", None), limits=getattr(s, "limits", None))

    @classmethod
    def from_profile(cls, profile) -> EngineSettings:
        """For hosts that start from a profile alone (the bridge); raises
        ProfileError when its proxy is not a socks5:// inbound."""
        from .profile import ProfileError
        from .rules import Router
        from .upstream.url import DokodemoUpstream, parse_upstream

        up = parse_upstream(profile.proxy)
        if isinstance(up, DokodemoUpstream):
            raise ProfileError(f'proxy: "{profile.proxy}": the default route must be a socks5:// inbound')
        router = Router(default=up, default_url=profile.proxy, rules=list(profile.rules))
        from .dns.settings import DnsSettings, DnsSettingsError, check_upstream
        try:
            dns = DnsSettings.from_run(None, profile, [profile.ipv4.address, profile.ipv6.address])
            check_upstream(dns, router)
        except DnsSettingsError as e:
            raise ProfileError(str(e)) from None
        return cls(router, udp_timeout=profile.udp_timeout, connect_timeout=profile.tcp_connect_timeout,
                   max_flows=profile.max_flows, icmp_echo=profile.icmp_echo,
                   refusal_window=profile.tcp_refusal_window, dns=dns if dns.on else None,
                   limits=stack_limits(profile))

    def __getstate__(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state):
        for k, v in state.items():
            setattr(self, k, v)


def stack_config(s, mtu: int):
    """The netstack StackConfig for settings *s* (RunSettings or
    EngineSettings) on a device of this MTU: the one place it is built. The
    stack gives a pending connection 5 s more than the engine's dial."""
    from netstack import StackConfig

    return StackConfig(mtu=mtu, udp_timeout=s.udp_timeout, max_flows=s.max_flows, icmp_echo=s.icmp_echo,
                       connect_timeout=s.connect_timeout + 5, **(getattr(s, "limits", None) or {}))


def queue_share(s, most: int) -> int | None:
    """With a memory budget, a host's two packet queues (the bridge's inbound
    and outbound) each take an eighth of it, at most *most* bytes, and the
    engine's buffers the rest: *s*.limits is changed to match.  Returns the
    queues' byte bound, None without a budget."""
    limits = s.limits
    budget = limits.get("memory_budget", 0)
    if not budget:
        return None
    q = min(budget // 8, most)
    limits["memory_budget"] = budget - 2 * q
    return q


def stack_limits(profile) -> dict:
    """The StackConfig fields set by the profile's memory keys (max_udp_flows,
    udp_port_timeouts, tcp_buffer_kb, memory_budget_mb), tcp_synack_retries and
    trust_checksums;
    their defaults when *profile* is None."""
    from .profile import KEY_BY_PATH

    def get(path):
        return profile.get(path) if profile is not None else KEY_BY_PATH[path].default

    buf = get("tcp_buffer_kb") * 1024
    return {"max_udp_flows": get("max_udp_flows"),
            "udp_port_timeouts": {int(p): float(t) for p, t in get("udp_port_timeouts").items()},
            "rcv_buf": buf, "snd_buf": buf, "memory_budget": int(get("memory_budget_mb") * (1 << 20)),
            "synack_retries": get("tcp_synack_retries"),
            **({"verify_checksums": False} if get("trust_checksums") else {})}


def make_engine(device, s, recorder=None):
    """An Engine serving *device* with settings *s*; with DNS handling on
    (``s.dns``), its DNS server and name book (tun2xray.dns, which loads
    dnspython only then)."""
    from .engine import Engine

    dns = None
    ds = getattr(s, "dns", None)
    if ds is not None and ds.on:
        from .dns.server import build
        dns = build(ds, s.router)
    return Engine(device, s.router, stack_config=stack_config(s, device.mtu),
                  connect_timeout=s.connect_timeout, recorder=recorder, refusal_window=s.refusal_window,
                  dns=dns)


def routes_up(settings, ifname: str) -> None:
    """The profile's routes on the device tun2xray opened (tun2xray.tunroutes;
    settings.net.down() removes them); HostError when one cannot be added."""
    from .tunroutes import RouteError
    try:
        settings.net.up(ifname)
    except RouteError as e:
        raise HostError(str(e)) from None


# ---------------------------------------------------------------- watches

def watch_upstream(lifecycle, backend, router, health=None):
    """Start the proxy/core watch (state.UpstreamWatch) as a task on the
    running loop; the backend's failed dials wake it. Cancel the task on stop."""
    from . import state

    watch = state.UpstreamWatch(lifecycle, router=router, health=health)
    backend.on_upstream_failed = watch.poke
    return asyncio.get_running_loop().create_task(watch.run())


# ------------------------------------------------------------------ shell

class Host:
    """One run's shell around *backend* (see the module text). *settings*:
    cli.RunSettings (router, net, control, instance); *xs*: the Xray session
    (tun2xray.xray) when tun2xray supervises the core."""

    def __init__(self, backend, settings, xs=None):
        from . import state

        self.backend = backend
        self.settings = settings
        self.xs = xs
        self.lifecycle = state.Lifecycle()
        self.ended = None            # the signal that ended the run
        self.server = None

    async def engine_status(self) -> dict:
        """The backend's status with the session's and the network's parts."""
        st = self.backend.status()
        if inspect.isawaitable(st):
            st = await st
        if self.xs is not None:
            st["xray"] = self.xs.status()
        st["network"] = self.settings.net.status()
        return st

    async def status(self) -> dict:
        """What the control socket answers (the bridge's shape, tun2xray.state)."""
        from . import state

        return state.compose(self.lifecycle, await self.engine_status(),
                             getattr(self.settings, "instance", None))

    def stop(self, sig=None) -> None:
        from . import state

        if sig is not None and self.ended is None:
            self.ended = signal.Signals(sig).name
        self.lifecycle.set(state.DISCONNECTING)
        self.backend.stop()

    async def serve(self, banner: str) -> int:
        """Serve until a signal or the backend's own end; *banner* is the
        "running on ..." line. Returns the exit status (0, or 1 when the
        backend ended with an error)."""
        from . import state

        loop = asyncio.get_running_loop()
        backend = self.backend
        self.lifecycle.set(state.CONNECTING, "starting")
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop, sig)
        # the control socket exists before the backend serves a flow (a
        # status request meanwhile waits for the backend's answer)
        await self._serve_control()
        watcher = None
        served = False
        try:
            start = getattr(backend, "start", None)
            if start is not None:
                try:
                    start()
                except HostError as e:
                    return self._failed(str(e))
            xs = self.xs
            if xs is not None:
                # the session resets flows through the backend on a node switch
                xs.attach(backend, self.settings.router)
            watcher = watch_upstream(self.lifecycle, backend, self.settings.router,
                                     xs.health if xs is not None else None)
            log.info("%s", banner)
            served = True
            try:
                await backend.run()
            finally:
                watcher.cancel()
                await self._exit_summary(backend.error or self.ended or "stopped")
        finally:
            if watcher is not None:
                watcher.cancel()
            if self.xs is not None and served:
                self.xs.detach()
            finish = getattr(backend, "finish", None)
            if finish is not None:
                await finish()
            self._close_control()
        if backend.error:
            return self._failed(backend.error, "stopped: ")
        self.lifecycle.set(state.DISCONNECTED)
        log.info("stopped")
        return 0

    def _failed(self, why: str, prefix: str = "") -> int:
        from . import logs, state

        self.lifecycle.set(state.ERROR, why)
        log.error("%s%s", prefix, why)
        if logs.current_format() == "text":
            print(f"tun2xray: error: {why}", file=sys.stderr)
        return 1

    async def _serve_control(self) -> None:
        url = self.settings.control
        if not url:
            return
        from .control import serve_control
        try:
            self.server = await serve_control(url, self.status)
        except (ValueError, OSError) as e:
            raise HostError(f"--control: {e}") from None

    def _close_control(self) -> None:
        if self.server is None:
            return
        self.server.close()
        self.server = None
        from .control import control_path
        try:
            os.unlink(control_path(self.settings.control))
        except OSError:
            pass

    async def _exit_summary(self, reason: str) -> None:
        """The one info line on exit (uptime, flows, bytes, refusals, drops,
        core restarts, why); a status that fails must not hide the exit."""
        from . import logs
        try:
            st = await self.engine_status()
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            log.warning("no exit summary: %s", e)
            return
        logs.exit_summary(log, st, reason)
