"""The host shell (tun2xray.host) and the supervisor's status gathering.

The supervisor's status asks every worker over its channel; the workers
here are real processes running the real worker channel
(workers.WorkerChannel) over a stand-in engine, so a worker can be stopped
with SIGSTOP while a status request waits on it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import types

import pytest

from tun2xray.control import query
from tun2xray.host import EngineSettings, Host, HostError, make_engine, stack_config
from tun2xray.tunroutes import Network
from tun2xray.workers import Supervisor, WorkerHandle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# one worker: the real channel code on a loop, an engine that only reports
WORKER = """
import asyncio, os, socket, sys
from tun2xray.workers import WorkerChannel

class Engine:
    router = None
    def status(self):
        return {"engine": {"tcp_opened": 1}, "flows": [], "device": {"rx_packets": 2}}
    def reset_flows(self):
        return 0
    def stop(self):
        loop.stop()

loop = asyncio.new_event_loop()
WorkerChannel(socket.socket(fileno=int(sys.argv[1])), Engine(), loop)
loop.run_forever()
"""


def _settings(control=None):
    return types.SimpleNamespace(control=control, instance=None, router=None,
                                 net=Network(None, "tun://hs0", ["198.18.0.1/15"]))


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def _wait(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"no {what} within {timeout:g}s"
        time.sleep(0.01)


async def _await(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"no {what} within {timeout:g}s"
        await asyncio.sleep(0.01)


@pytest.fixture
def supervisor(tmp_path):
    """A Supervisor (of the loopback interface: no TUN needed) with two
    worker processes on socketpair channels."""
    import socket

    sup = Supervisor(types.SimpleNamespace(name="lo", url="tun://lo", mtu=65536), settings=_settings(), n=2)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for w in sup.workers:
        ours, theirs = socket.socketpair()
        w.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(theirs.fileno())],
                                  pass_fds=(theirs.fileno(),), env=env)
        theirs.close()
        w.chan = ours
    try:
        yield sup
    finally:
        for w in sup.workers:
            if w.proc.poll() is None:
                os.kill(w.proc.pid, signal.SIGCONT)
                w.proc.kill()
            w.proc.wait(10)
            w.close_channel()
        sup.close_poke()


def _responding(st) -> list:
    return [row["responding"] for row in st["workers"]]


def test_status_waiting_on_a_stopped_worker_leaves_the_loop_serving(supervisor, tmp_path):
    """While a status request waits on a worker stopped with SIGSTOP, the
    supervisor's loop serves a second control request and its timers; the
    waiting request completes once the worker runs again."""
    sup = supervisor
    url = f"unix://{tmp_path}/ctl.sock"
    stuck = sup.workers[1]
    os.kill(stuck.proc.pid, signal.SIGSTOP)
    _wait(lambda: _stopped(stuck.proc.pid), what="stopped worker")
    sup.request_timeout = 120.0           # the first request can only end by the worker's answer

    async def scenario():
        from tun2xray.control import serve_control

        loop = asyncio.get_running_loop()
        server = await serve_control(url, Host(sup, _settings(url)).status)
        try:
            first = loop.run_in_executor(None, lambda: query(url, timeout=150))
            await _await(lambda: stuck.asking == 1, what="request to the stopped worker")
            ticked = asyncio.Event()
            loop.call_soon(ticked.set)      # a timer callback runs ...
            second = await loop.run_in_executor(None, lambda: query(url, "ping", timeout=10))
            await ticked.wait()
            assert second == {"error": "unknown command 'ping'"}   # ... and another client is answered
            assert not first.done() and stuck.asking == 1           # while the first still waits
            os.kill(stuck.proc.pid, signal.SIGCONT)
            return await first
        finally:
            server.close()

    st = asyncio.run(scenario())
    assert _responding(st) == [True, True]
    assert st["engine"]["tcp_opened"] == 2 and st["device"]["rx_packets"] == 4


def test_workers_are_asked_at_once_and_a_silent_one_is_not_responding(supervisor):
    """Every worker's request is out before any answers (not one after
    another); a worker that does not answer within the timeout has
    "responding": false, the others their counters."""
    sup = supervisor
    for w in sup.workers:
        os.kill(w.proc.pid, signal.SIGSTOP)
        _wait(lambda pid=w.proc.pid: _stopped(pid), what="stopped worker")
    sup.request_timeout = 120.0

    async def both_waiting():
        task = asyncio.ensure_future(sup.status())
        await _await(lambda: all(w.asking == 1 for w in sup.workers), what="both requests in flight")
        for w in sup.workers:
            os.kill(w.proc.pid, signal.SIGCONT)
        return await task

    assert _responding(asyncio.run(both_waiting())) == [True, True]

    os.kill(sup.workers[0].proc.pid, signal.SIGSTOP)
    _wait(lambda: _stopped(sup.workers[0].proc.pid), what="stopped worker")
    sup.request_timeout = 0.5
    st = asyncio.run(sup.status())
    assert _responding(st) == [False, True]
    assert st["workers"][0]["alive"] is True and st["engine"]["tcp_opened"] == 1
    # the late answer is skipped: the next request gets its own reply
    os.kill(sup.workers[0].proc.pid, signal.SIGCONT)
    sup.request_timeout = 30.0
    assert _responding(asyncio.run(sup.status())) == [True, True]


def test_a_dead_worker_is_not_asked():
    w = WorkerHandle(0)
    assert asyncio.run(w.request_async({"cmd": "status"}, 1.0)) is None


# --- the shell around an engine-like backend -----------------------------------

class Backend:
    """An engine-like backend whose status is a coroutine."""

    def __init__(self, fail_start=None, error=None):
        self.fail_start = fail_start
        self.error = None
        self.end_error = error
        self.on_upstream_failed = None
        self.stopped = None
        self.finished = False

    def start(self):
        if self.fail_start:
            raise HostError(self.fail_start)

    async def run(self):
        self.stopped = asyncio.Event()
        await self.stopped.wait()
        self.error = self.end_error

    def stop(self):
        if self.stopped is not None:
            self.stopped.set()

    async def status(self):
        await asyncio.sleep(0)
        return {"uptime": 1.0, "device": {"name": "hs0", "mtu": 1500}, "engine": {"tcp_opened": 3}}

    async def finish(self):
        self.finished = True


def _router(port=1):
    from tun2xray.rules import Router
    from tun2xray.upstream.url import parse_upstream
    url = f"socks5://127.0.0.1:{port}"
    return Router(default=parse_upstream(url), default_url=url, rules=[])


def test_host_serves_control_until_a_signal_and_cleans_up(tmp_path):
    url = f"unix://{tmp_path}/ctl.sock"
    settings = _settings(url)
    settings.router = _router()
    backend = Backend()
    host = Host(backend, settings)

    async def scenario():
        loop = asyncio.get_running_loop()
        serving = loop.create_task(host.serve("running on hs0"))
        await _await(lambda: backend.stopped is not None, what="backend running")
        st = await loop.run_in_executor(None, query, url)
        assert st["engine"] == {"tcp_opened": 3} and st["network"]["owner"] == "tun2xray"
        assert st["state"] == "connecting" and callable(backend.on_upstream_failed)
        os.kill(os.getpid(), signal.SIGTERM)
        return await serving

    assert asyncio.run(scenario()) == 0
    assert host.ended == "SIGTERM" and host.lifecycle.state == "disconnected" and backend.finished
    assert not os.path.exists(f"{tmp_path}/ctl.sock")


def test_host_reports_a_backend_that_cannot_start_or_ends_on_its_own(tmp_path, capsys):
    settings = _settings()
    settings.router = _router()
    host = Host(Backend(fail_start="worker 0: exited with 1"), settings)
    assert asyncio.run(host.serve("x")) == 1
    assert host.lifecycle.state == "error" and host.lifecycle.reason == "worker 0: exited with 1"
    assert "tun2xray: error: worker 0: exited with 1" in capsys.readouterr().err

    backend = Backend(error="device hs0: gone")
    host = Host(backend, settings)

    async def ends():
        task = asyncio.ensure_future(host.serve("x"))
        await _await(lambda: backend.stopped is not None, what="backend running")
        backend.stop()
        return await task
    assert asyncio.run(ends()) == 1
    assert host.lifecycle.reason == "device hs0: gone" and backend.finished


def test_host_refuses_a_control_socket_in_use(tmp_path):
    url = f"unix://{tmp_path}/ctl.sock"
    (tmp_path / "ctl.sock").write_text("not a socket")
    settings = _settings(url)
    settings.router = _router()
    with pytest.raises(HostError, match="--control: .* exists and is not a socket"):
        asyncio.run(Host(Backend(), settings).serve("x"))


def test_settings_build_the_stack_and_engine_once():
    """Profile -> EngineSettings -> StackConfig/Engine, as run builds them."""
    from tun2xray.profile import load_profile
    p = load_profile('{"proxy": "socks5://127.0.0.1:1080", "mtu": 1400, "udp_timeout": 7, '
                     '"tcp_connect_timeout": 2, "max_flows": 9, "icmp_echo": "drop"}', bridge=True)
    s = EngineSettings.from_profile(p)
    cfg = stack_config(s, 1400)
    assert (cfg.mtu, cfg.udp_timeout, cfg.max_flows, cfg.icmp_echo, cfg.connect_timeout) == \
        (1400, 7.0, 9, "drop", 7.0)
    import pickle
    t = pickle.loads(pickle.dumps(s))      # what a worker's spec carries
    assert (t.udp_timeout, t.max_flows, t.router.default_url) == (7.0, 9, "socks5://127.0.0.1:1080")
    dev = types.SimpleNamespace(name="hs0", mtu=1400, url="test://", pollable=False)
    eng = make_engine(dev, t)
    assert eng.router is t.router
    with pytest.raises(ValueError, match="must be a socks5"):
        EngineSettings.from_profile(load_profile('{"proxy": "dokodemo://127.0.0.1:53"}', bridge=True))


def test_one_event_loop_runner():
    """uvloop is chosen in one place (host.run / host.new_loop)."""
    import pathlib
    users = sorted(str(p.relative_to(REPO)) for p in pathlib.Path(REPO, "tun2xray").rglob("*.py")
                   if "import uvloop" in p.read_text(encoding="utf-8"))
    assert users == ["tun2xray/host.py"]
