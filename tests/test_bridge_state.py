"""tun2xray.state: the life-cycle model and status shape the bridge and the
CLI's control socket share."""

from __future__ import annotations

import asyncio
import socket
import threading

import tun2xray
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
    assert list(out) == ["state", "reason", "since", "since_epoch", "version", "uptime", "device", "stack",
                         "engine", "udp_associations", "rate", "flows", "closed_flows", "resources"]
    assert out["version"] == tun2xray.__version__
    # an engine that reports its own state never overrides the host's lifecycle
    out = st.compose(lc, {"state": "connected", "reason": None, "uptime": 1.0, "flows": [1]})
    assert out["state"] == st.CONNECTING and out["reason"] == "why" and out["flows"] == [1]


class _Greeter:
    """Enough of a SOCKS5 server for the probe: the method choice (or, as
    *reply*, whatever a broken server says), the RFC 1929 login when it has
    *login*, and a success reply to UDP ASSOCIATE."""

    def __init__(self, reply=None, login=None):
        self.reply = reply
        self.login = login
        self.associates = 0
        self.server = None

    async def _client(self, r, w):
        try:
            ver, n = await r.readexactly(2)
            methods = await r.readexactly(n)
            if self.reply is not None:
                w.write(self.reply)
            elif self.login is not None:
                assert 2 in methods
                w.write(b"\x05\x02")
                _, ulen = await r.readexactly(2)
                user = await r.readexactly(ulen)
                pw = await r.readexactly((await r.readexactly(1))[0])
                ok = (user.decode(), pw.decode()) == self.login
                w.write(b"\x01\x00" if ok else b"\x01\x01")
                if not ok:
                    raise ConnectionResetError
            else:
                w.write(b"\x05\x00")
            if self.reply is None:
                req = await r.readexactly(10)
                if req[:4] == b"\x05\x03\x00\x01":
                    self.associates += 1
                w.write(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x30\x39")
                await r.read()                   # the association lives until the client closes
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
        assert g.associates >= 1 and lc.reason is None
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
        g.reply = None
        await _until(lambda: lc.state == st.CONNECTED, "connected")
        task.cancel()
        await g.stop()

    asyncio.run(main())


def test_watch_logs_in_and_follows_the_router():
    """With a username the probe logs in (a wrong password is the reason);
    with a router it follows router.default (a node switch moves it)."""
    from tun2xray.rules import Router
    from tun2xray.upstream.url import parse_upstream

    lc = st.Lifecycle()
    lc.set(st.CONNECTING)

    async def main():
        g = _Greeter(login=("u", "right"))
        port = await g.start()
        url = f"socks5://u:wrong@127.0.0.1:{port}"
        router = Router(default=parse_upstream(url), default_url=url, rules=[])
        task = asyncio.ensure_future(st.UpstreamWatch(lc, router=router, period=0.05, retry=0.02).run())
        await _until(lambda: lc.reason and "username/password" in lc.reason, "a refused login")
        url = f"socks5://u:right@127.0.0.1:{port}"
        router.default = parse_upstream(url)
        await _until(lambda: lc.state == st.CONNECTED, "connected with the right password")
        assert g.associates >= 1
        g2 = _Greeter()
        port2 = await g2.start()
        await g.stop()
        router.default = parse_upstream(f"socks5://127.0.0.1:{port2}")
        n = g2.associates
        await _until(lambda: g2.associates > n and lc.state == st.CONNECTED, "connected through the new inbound")
        task.cancel()
        await g2.stop()

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
