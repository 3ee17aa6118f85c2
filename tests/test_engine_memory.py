"""The engine's relay, backpressure and dial failures on the in-memory device.

A real Engine reads and writes packets through ``memory_pair()``; the
upstream is an in-process SOCKS5 server on real loopback sockets that, after
CONNECT, plays the destination (echo, or a bulk sender). Engine, server and
test share one loop on a virtual clock (tests/vclock.py): no threads, no
sleeps, and "nothing happened for 3 s" means 3 s of the engine's own timers
firing, counted, not a wall-clock wait that a slow machine could pass.
"""

from __future__ import annotations

import asyncio
import socket

from netstack import StackConfig
from helpers import addr, build_packet, tcp_options
from vclock import EngineHarness, run_virtual

SRC, DST = addr("10.0.0.2"), addr("93.184.216.34")


class SocksDest:
    """SOCKS5 (no auth, CONNECT) whose data phase is ``behave(reader, writer)``."""

    def __init__(self, behave):
        self.behave = behave
        self.server = None
        self.port = None
        self.received = bytearray()

    async def start(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self):
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader, writer):
        try:
            _ver, n = await reader.readexactly(2)
            await reader.readexactly(n)
            writer.write(b"\x05\x00")
            head = await reader.readexactly(4)
            await reader.readexactly({1: 6, 4: 18}[head[3]])
            writer.write(b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00")
            await self.behave(self, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def echo(dest, reader, writer):
    while True:
        data = await reader.read(65536)
        if not data:
            return
        dest.received += data
        writer.write(data)
        await writer.drain()


def bulk(payload):
    async def send(dest, reader, writer):
        writer.write(payload)
        await writer.drain()
        await reader.read()          # until the client side closes
    return send


def with_engine(behave, body, **harness):
    async def main(loop):
        dest = await SocksDest(behave).start()
        host = await EngineHarness(f"socks5://127.0.0.1:{dest.port}", **harness).start()
        try:
            return await body(dest, host, loop)
        finally:
            await host.stop()
            await dest.stop()
    return run_virtual(main)


async def handshake(host, sport, wnd=65535, opts=None):
    host.send(build_packet(4, SRC, DST, sport, 80, 1000, 0, "S", wnd,
                           tcp_options(mss=1400) if opts is None else opts))
    s = await host.expect(lambda x: x.dport == sport and x.flags & 0x06)
    assert s.flags & 0x12 == 0x12, s
    host.send(build_packet(4, SRC, DST, sport, 80, 1001, s.seq + 1, "A", wnd))
    return s.seq + 1


async def run_for(seconds):
    """Let the virtual clock move on by ``seconds`` (the engine's timers fire)."""
    await asyncio.sleep(seconds)


def test_relay_carries_bytes_both_ways_and_a_client_fin_closes_the_flow():
    async def body(dest, host, loop):
        rcv = await handshake(host, 42000)
        host.send(build_packet(4, SRC, DST, 42000, 80, 1001, rcv, "PA", 65535, payload=b"hello"))
        d = await host.expect(lambda x: x.dport == 42000 and x.payload)
        assert d.payload == b"hello" and d.seq == rcv and d.ack == 1006
        assert dest.received == b"hello"
        # client FIN: the upstream sees EOF, the echo ends, the engine FINs back
        host.send(build_packet(4, SRC, DST, 42000, 80, 1006, rcv + 5, "FA", 65535))
        f = await host.expect(lambda x: x.dport == 42000 and x.flags & 0x01)
        assert f.seq == rcv + 5 and f.ack == 1007
        host.send(build_packet(4, SRC, DST, 42000, 80, 1007, rcv + 6, "A", 65535))
        await run_for(1)
        st = host.status()
        assert st["engine"]["tcp_opened"] == 1
        [flow] = st["closed_flows"]
        assert (flow["reason"], flow["bytes_up"], flow["bytes_down"]) == ("client FIN", 5, 5), flow

    with_engine(echo, body)


def test_backpressure_holds_upstream_bytes_until_the_client_window_opens():
    payload = bytes(range(256)) * 800          # 204,800 bytes, sent at once by the destination
    window = 4096                              # no window scaling: exactly this many bytes

    async def body(dest, host, loop):
        rcv = await handshake(host, 42001, wnd=window, opts=tcp_options(mss=1400))
        # whatever the engine sends over 3 virtual seconds (first sends and
        # retransmissions), nothing lies beyond the offered window ...
        await run_for(3)
        segs = [s for s in map(_parse_tcp, host.host.read()) if s is not None and s.payload]
        assert segs, "the engine sent nothing"
        # (two full segments: the last 1,296 bytes wait, sender-side SWS avoidance)
        assert max(s.seq - rcv + len(s.payload) for s in segs) == 2 * 1400 <= window
        # ... and the relay holds the rest with the upstream paused
        relay = next(iter(host.engine.stack.tcp.values())).user
        assert relay.pending and not relay.transport.is_reading()
        # acknowledge as data arrives, window open: everything arrives, in order
        got = bytearray()
        nxt = rcv
        for s in sorted(segs, key=lambda s: s.seq):
            if s.seq == nxt:
                got += s.payload
                nxt += len(s.payload)
        host.send(build_packet(4, SRC, DST, 42001, 80, 1001, nxt, "A", 65535))
        while len(got) < len(payload):
            s = await host.expect(lambda x: x.dport == 42001 and x.payload, timeout=10)
            if s.seq == nxt:
                got += s.payload
                nxt += len(s.payload)
            host.send(build_packet(4, SRC, DST, 42001, 80, 1001, nxt, "A", 65535))
        assert bytes(got) == payload
        assert host.status()["engine"].get("upstream_connect_failed", 0) == 0

    # a 64 KB send buffer per connection: the rest must wait in the relay
    with_engine(bulk(payload), body, stack_config=StackConfig(snd_buf=1 << 16))


def test_a_full_device_counts_its_drops_and_tcp_recovers():
    payload = b"x" * 20000

    async def body(dest, host, loop):
        rcv = await handshake(host, 42002)
        got = bytearray()
        nxt = rcv
        while len(got) < len(payload):
            s = await host.expect(lambda x: x.dport == 42002 and x.payload, timeout=30)
            if s.seq == nxt:
                got += s.payload
                nxt += len(s.payload)
            host.send(build_packet(4, SRC, DST, 42002, 80, 1001, nxt, "A", 65535))
        assert bytes(got) == payload
        # the device took two packets per batch; the rest were counted, not lost silently
        assert host.dev.stats["tx_dropped"] > 0
        assert host.dev.stats["tx_errors"] == 0

    with_engine(bulk(payload), body, capacity=2)


def test_refused_dial_resets_the_client_and_is_in_the_history():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()                      # nothing listens there now

    async def main(loop):
        host = await EngineHarness(f"socks5://127.0.0.1:{port}").start()
        try:
            t0 = loop.time()
            host.send(build_packet(4, SRC, DST, 42003, 80, 1000, 0, "S", 65535, tcp_options(mss=1400)))
            s = await host.expect(lambda x: x.dport == 42003)
            assert s.flags & 0x04 and s.ack == 1001                  # RST: refused
            assert loop.time() == t0                                  # no timer had to fire first
            st = host.status()
            [f] = st["closed_flows"]
            assert f["reason"] == "upstream refused" and f["bytes_up"] == f["bytes_down"] == 0, f
            assert f["detail"].startswith(f"socks5://127.0.0.1:{port}: "), f
            assert st["engine"]["upstream_connect_failed"] == 1
        finally:
            await host.stop()

    run_virtual(main)


def test_the_host_hanging_up_stops_the_engine_with_the_reason():
    async def main(loop):
        host = await EngineHarness("socks5://127.0.0.1:9").start()
        host.host.close()
        await asyncio.wait_for(host.task, 5)
        assert host.engine.error == "device mem0: memory://mem0: end of file (the host closed its end)"
        host.dev.close()

    run_virtual(main)


def _parse_tcp(p):
    from helpers import parse_packet

    if p[0] >> 4 == 4 and p[9] == 6:
        return parse_packet(p)
    return None


def test_resources_count_held_bytes_and_return_to_zero_after_the_close():
    """status()["resources"]: what a stalled client makes the engine hold
    (the connection's send buffer and the relay's pending bytes) is counted,
    and nothing stays held, queued or tracked once the flow is reset."""
    payload = b"y" * 200_000

    async def body(dest, host, loop):
        before = host.status()["resources"]
        assert before["buffered_bytes"] == 0 and before["close_reasons_held"] == 0
        rcv = await handshake(host, 42010, wnd=4096)
        await run_for(3)
        conn = next(iter(host.engine.stack.tcp.values()))
        relay = conn.user
        held = len(conn.snd_buf) + len(relay.pending) + relay.transport.get_write_buffer_size()
        res = host.status()["resources"]
        assert relay.pending and res["buffered_bytes"] == held > 65536, (res, held)
        host.send(build_packet(4, SRC, DST, 42010, 80, 1001, rcv, "R", 0))
        await run_for(2)
        res = host.status()["resources"]
        assert not host.engine.stack.tcp
        assert res["buffered_bytes"] == 0 and res["close_reasons_held"] == 0, res
        assert res["engine_tasks"] == before["engine_tasks"], (res, before)

    with_engine(bulk(payload), body, stack_config=StackConfig(snd_buf=1 << 16))
