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
    assert lc.set(st.CONNECTING, "starting")
    assert lc.set(st.CONNECTING, "proxy unreachable") and lc.reason == "proxy unreachable"
    assert lc.set(st.CONNECTED) and lc.reason is None
    assert lc.set(st.CONNECTING, "upstream lost")
    assert lc.set(st.CONNECTED)
    assert lc.set(st.DISCONNECTING)
    assert not lc.set(st.CONNECTED)              # a late probe after stop began
    assert lc.state == st.DISCONNECTING
    assert lc.set(st.DISCONNECTED)
    for s in st.STATES:
        lc2 = st.Lifecycle()
        lc2.set(st.CONNECTING)
        assert lc2.set(st.ERROR, "boom") and lc2.as_dict()["reason"] == "boom"
        assert s == st.ERROR or lc2.set(s) == (s in (st.DISCONNECTING, st.DISCONNECTED))


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
    assert list(out) == ["state", "reason", "since", "version", "uptime", "device", "stack", "engine",
                         "udp_associations", "flows"]
    assert out["version"] == tun2xray.__version__
    # an engine that reports its own state never overrides the host's lifecycle
    out = st.compose(lc, {"state": "connected", "reason": None, "uptime": 1.0, "flows": [1]})
    assert out["state"] == st.CONNECTING and out["reason"] == "why" and out["flows"] == [1]


def test_watch_proxy():
    lc = st.Lifecycle()
    lc.set(st.CONNECTING)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]

    async def main():
        task = asyncio.ensure_future(st.watch_proxy(lc, "127.0.0.1", port, first_delay=0.02))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if lc.reason:
                break
        assert lc.state == st.CONNECTING and "unreachable" in lc.reason
        s.listen(4)                              # the proxy comes up
        await asyncio.wait_for(task, 5)
        assert lc.state == st.CONNECTED

    try:
        asyncio.run(main())
    finally:
        s.close()
