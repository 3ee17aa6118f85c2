"""Engine rates and closed-flow history, driven by hand: a fake clock and
flows that are only byte counters, so the arithmetic is exact."""

from __future__ import annotations

import types

from tun2xray import engine as eng
from tun2xray.device import Capabilities
from tun2xray.rules import Router
from tun2xray.upstream.url import parse_upstream


class _Loop:
    def __init__(self):
        self.now = 100.0

    def time(self):
        return self.now

    def call_later(self, delay, cb):
        return types.SimpleNamespace(cancel=lambda: None)


def _engine():
    dev = types.SimpleNamespace(name="t0", mtu=1500, stats={}, fileno=lambda: -1, capabilities=Capabilities())
    url = "socks5://127.0.0.1:1080"
    e = eng.Engine(dev, Router(default=parse_upstream(url), default_url=url, rules=[]))
    e.loop = _Loop()
    e._sample_at = e.loop.now
    return e


class _Relay:
    """What the sampler keeps in a flow's relay: the counters at its last look."""

    __slots__ = ("sampled_in", "sampled_out")

    def __init__(self):
        self.sampled_in = self.sampled_out = 0


class _Flow:
    """What the sampler and the history read of a stack flow (hashed by identity, as flows are)."""

    __slots__ = ("src", "sport", "dst", "dport", "bytes_in", "bytes_out", "created", "user")

    def __init__(self, port, created):
        self.src, self.sport, self.dst, self.dport = b"\xc6\x12\x00\x01", port, b"\x0a\x00\x00\x01", 80
        self.bytes_in = self.bytes_out = 0
        self.created = created
        self.user = _Relay()


def _flow(port, created=100.0):
    return _Flow(port, created)


def test_rates_per_flow_and_total_over_the_sample_window():
    e = _engine()
    a, b = _flow(1000), _flow(1001)
    e.stack.tcp[1] = a
    e.stack.udp[2] = b
    a.bytes_in, a.bytes_out = 100, 4000
    b.bytes_in = 50
    e.loop.now += 2.0
    e._sample()
    assert e._flow_rate[a] == (50.0, 2000.0) and e._flow_rate[b] == (25.0, 0.0)
    assert e._rate == (75.0, 2000.0)
    # an idle second: no rate, the counters stay
    e.loop.now += 1.0
    e._sample()
    assert a not in e._flow_rate and e._rate == (0.0, 0.0)
    # a flow that closes inside a window counts with what it moved in it
    a.bytes_out += 1000
    del e.stack.tcp[1]
    e._remember("tcp", a, None, ("client FIN", None))
    b.bytes_in += 10
    e.loop.now += 1.0
    e._sample()
    assert e._rate == (10.0, 1000.0) and e._flow_rate == {b: (10.0, 0.0)}


def test_closed_history_is_bounded_and_readable(monkeypatch):
    e = _engine()
    monkeypatch.setattr(eng.history.time, "time", lambda: 1796424663.5)
    for i in range(eng.CLOSED_HISTORY + 5):
        f = _flow(2000 + i)
        f.bytes_in, f.bytes_out = i, 2 * i
        e.loop.now = 100.0 + i
        e._remember("tcp", f, types.SimpleNamespace(url="socks5://127.0.0.1:1080"), ("upstream closed", None))
    out = e._closed_status()
    assert len(out) == eng.CLOSED_HISTORY
    first = out[0]
    assert first == {"proto": "tcp", "src": "198.18.0.1:2005", "dst": "10.0.0.1:80", "name": None,
                     "inbound": "socks5://127.0.0.1:1080", "reason": "upstream closed", "detail": None,
                     "bytes_up": 5, "bytes_down": 10, "duration": 5.0,
                     "ended": "2026-12-04T22:51:03Z", "ended_epoch": 1796424663.5}


def test_close_reasons_from_the_stack_and_the_engine():
    e = _engine()
    relay = eng.TcpRelay(e, _flow(1), "socks5://x")
    conn = _flow(3000)
    assert e._tcp_close_reason(conn, None, "reset") == ("client RST", None)
    assert e._tcp_close_reason(conn, None, "timeout") == ("connect timeout", None)
    assert e._tcp_close_reason(conn, relay, "timeout") == ("timeout", None)
    relay.fin_from = "upstream"
    assert e._tcp_close_reason(conn, relay, "closed") == ("upstream closed", None)
    relay.fin_from = "client"
    assert e._tcp_close_reason(conn, relay, "closed") == ("client FIN", None)
    e.close_why(conn, "upstream reset", "Connection reset by peer")
    assert e._tcp_close_reason(conn, relay, "aborted") == ("upstream reset", "Connection reset by peer")
    assert conn not in e._why                   # taken once
