"""tun2xray.state: the life-cycle model and status shape the bridge and the
CLI's control socket share."""

from __future__ import annotations

import asyncio
import socket
import threading

from tun2xray import state as st


def test_transitions():
    lc = st.Lifecycle()
    assert lc.as_dict()["state"] == st.DISCONNECTED and lc.reason is None
    assert not lc.set(st.CONNECTED)              # must go through connecting
    assert not lc.set(st.DEGRADED)               # nothing to degrade yet
    assert lc.set(st.CONNECTING, "starting")
    assert lc.set(st.CONNECTING, "proxy unreachable") and lc.reason == "proxy unreachable"
    assert not lc.set(st.DEGRADED, "x")          # degraded only after connected
    assert lc.set(st.CONNECTED) and lc.reason is None
    assert lc.set(st.DEGRADED, "proxy 127.0.0.1:1 unreachable") and lc.state == st.DEGRADED
    assert lc.set(st.DEGRADED, "core exited (SIGKILL), restarting in 2s")
    assert lc.reason.startswith("core exited")
    assert lc.set(st.CONNECTED) and lc.reason is None
    assert lc.set(st.CONNECTING, "upstream lost")
    assert lc.set(st.CONNECTED)
    assert lc.set(st.DEGRADED, "why")
    assert lc.set(st.DISCONNECTING)
    assert not lc.set(st.CONNECTED)              # a late probe after stop began
    assert not lc.set(st.DEGRADED, "late")
    assert lc.state == st.DISCONNECTING
    assert lc.set(st.DISCONNECTED)
    for s in st.STATES:
        lc2 = st.Lifecycle()
        lc2.set(st.CONNECTING)
        assert lc2.set(st.ERROR, "boom") and lc2.as_dict()["reason"] == "boom"
        assert s == st.ERROR or lc2.set(s) == (s in (st.DISCONNECTING, st.DISCONNECTED))
    # every state can fail; only connected and degraded reach degraded
    for s in st.STATES:
        assert st.ERROR in st._ALLOWED[s]
        assert (st.DEGRADED in st._ALLOWED[s]) == (s in (st.CONNECTED, st.DEGRADED))


def test_since_is_readable_and_kept_for_a_new_reason(monkeypatch):
    clock = [1796424663.25]
    monkeypatch.setattr(st.time, "time", lambda: clock[0])
    lc = st.Lifecycle()
    lc.set(st.CONNECTING, "starting")
    d = lc.as_dict()
    assert d["since"] == "2026-12-04T22:51:03Z" and d["since_epoch"] == 1796424663.25
    clock[0] += 5
    lc.set(st.CONNECTING, "proxy unreachable")   # same state, new reason: since stays
    assert lc.as_dict()["since_epoch"] == 1796424663.25
    lc.set(st.CONNECTED)
    assert lc.as_dict()["since_epoch"] == 1796424668.25
    assert lc.as_dict()["since"] == "2026-12-04T22:51:08Z"


def test_wait_for_from_another_thread():
    lc = st.Lifecycle()
    lc.set(st.CONNECTING)
    threading.Timer(0.05, lambda: lc.set(st.CONNECTED)).start()
    assert lc.wait_for({st.CONNECTED, st.ERROR}, 5) == st.CONNECTED
    assert lc.wait_for({st.ERROR}, 0.01) == st.CONNECTED


def test_compose_shape_and_precedence():
    lc = st.Lifecycle()
    lc.set(st.CONNECTING, "why")
    out = st.compose(lc, None)
    assert list(out) == ["state", "reason", "since", "since_epoch", "uptime", "device", "stack", "engine",
                         "udp_associations", "rate", "flows", "closed_flows"]
    # an engine that reports its own state never overrides the host's lifecycle
    out = st.compose(lc, {"state": "connected", "reason": None, "uptime": 1.0, "flows": [1]})
    assert out["state"] == st.CONNECTING and out["reason"] == "why" and out["flows"] == [1]


class _Greeter:
    """A SOCKS5 server's first step only: answers the greeting 05 01 00
    with 05 00 (or, as *reply*, whatever a broken server says)."""

    def __init__(self, reply=b"\x05\x00"):
        self.reply = reply
        self.greetings = 0
        self.server = None

    async def _client(self, r, w):
        try:
            hello = await r.readexactly(3)
            if hello == b"\x05\x01\x00":
                self.greetings += 1
            w.write(self.reply)
            await w.drain()
        except (asyncio.IncompleteReadError, OSError):
            pass
        w.close()

    async def start(self, port=0):
        self.server = await asyncio.start_server(self._client, "127.0.0.1", port, reuse_address=True)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self):
        self.server.close()
        await self.server.wait_closed()


async def _until(pred, what, timeout=10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.01)


def test_watch_proxy_follows_the_proxy_both_ways():
    """connecting (with the reason) -> connected at the first SOCKS5 answer
    -> degraded when it stops answering -> connected again."""
    lc = st.Lifecycle()
    lc.set(st.CONNECTING)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()

    async def main():
        watch = st.UpstreamWatch(lc, "127.0.0.1", port, period=0.05, retry=0.02)
        task = asyncio.ensure_future(watch.run())
        await _until(lambda: lc.reason and "unreachable" in lc.reason, "a reason while it is down")
        assert lc.state == st.CONNECTING
        g = _Greeter()
        await g.start(port)
        await _until(lambda: lc.state == st.CONNECTED, "connected")
        assert g.greetings >= 1 and lc.reason is None
        await g.stop()
        await _until(lambda: lc.state == st.DEGRADED, "degraded after the proxy went")
        assert f"proxy 127.0.0.1:{port} unreachable" in lc.reason
        await g.start(port)
        await _until(lambda: lc.state == st.CONNECTED, "connected again")
        task.cancel()
        await g.stop()

    asyncio.run(main())


def test_watch_proxy_wants_socks_not_just_a_listener():
    lc = st.Lifecycle()
    lc.set(st.CONNECTING)

    async def main():
        g = _Greeter(reply=b"HTTP/1.1 400 Bad Request\r\n\r\n")
        port = await g.start()
        task = asyncio.ensure_future(st.UpstreamWatch(lc, "127.0.0.1", port, period=0.05, retry=0.02).run())
        await _until(lambda: lc.reason and "not a SOCKS5 server" in lc.reason, "the probe's reason")
        assert lc.state == st.CONNECTING
        g.reply = b"\x05\xff"                  # wants authentication we do not offer
        await _until(lambda: "method" in lc.reason, "a refused method")
        g.reply = b"\x05\x00"
        await _until(lambda: lc.state == st.CONNECTED, "connected")
        task.cancel()
        await g.stop()

    asyncio.run(main())


def test_watch_follows_core_health_and_pokes():
    """A supervised core that is down makes the state degraded with the
    core's reason; up again, connected.  poke() probes at once."""
    lc = st.Lifecycle()
    lc.set(st.CONNECTING)
    health = [(True, None)]

    async def main():
        g = _Greeter()
        port = await g.start()
        watch = st.UpstreamWatch(lc, "127.0.0.1", port, health=lambda: health[0], period=3600, retry=0.02)
        task = asyncio.ensure_future(watch.run())
        await _until(lambda: lc.state == st.CONNECTED, "connected")
        health[0] = (False, "core exited (SIGKILL), restarting in 2s")
        await _until(lambda: lc.state == st.DEGRADED, "degraded by the core")
        assert lc.reason == "core exited (SIGKILL), restarting in 2s"
        health[0] = (True, None)
        await _until(lambda: lc.state == st.CONNECTED, "connected when the core is back")
        # with an hour between probes, only a poke can find the proxy gone
        probes = watch.probes
        await g.stop()
        watch.poke()
        await _until(lambda: watch.probes > probes, "a probe after the poke")
        await _until(lambda: lc.state == st.DEGRADED, "degraded after pokes", timeout=10)
        task.cancel()

    asyncio.run(main())
