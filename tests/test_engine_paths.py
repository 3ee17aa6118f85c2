"""tun2xray.engine.paths: a sleeping engine sends nothing timer-driven until
it wakes, and a network change resets exactly the flows whose upstream
socket died.  On the virtual clock (tests/vclock.py), with a real SOCKS5
server on loopback (tests/test_engine_memory.py's)."""

from __future__ import annotations

import socket

from helpers import build_packet
from test_engine_memory import DST, SRC, echo, handshake, run_for, with_engine

from tun2xray.engine import paths


def test_sleep_holds_retransmissions_until_wake():
    async def body(dest, host, loop):
        rcv = await handshake(host, 43000)
        host.send(build_packet(4, SRC, DST, 43000, 80, 1001, rcv, "PA", 65535, payload=b"hello"))
        d = await host.expect(lambda x: x.dport == 43000 and x.payload)
        # the client never ACKs: awake, the engine would resend within its RTO
        paths.sleep(host.engine)
        # a packet while asleep makes the engine serve the stack again: it
        # must still arm no timer (an ACK that acknowledges nothing new)
        host.send(build_packet(4, SRC, DST, 43000, 80, 1006, rcv, "A", 65535))
        await run_for(30)
        assert [p for p in host.host.read() if p[9] == 6] == []          # asleep: nothing sent
        assert paths.wake(host.engine) == 0                              # the flow is alive
        again = await host.expect(lambda x: x.dport == 43000 and x.payload, timeout=0.5)
        assert (again.seq, again.payload) == (d.seq, b"hello")

    with_engine(echo, body)


def test_network_changed_resets_only_flows_with_a_dead_upstream():
    async def body(dest, host, loop):
        await handshake(host, 43001)
        await handshake(host, 43002)
        conns = {c.sport: c for c in host.engine.stack.tcp.values()}
        # the first flow's upstream socket stops being ESTABLISHED (as when the
        # network under it goes away); checked before the loop sees anything
        sock = conns[43001].user.transport.get_extra_info("socket")
        sock.shutdown(socket.SHUT_WR)
        assert paths.reset_stale(host.engine) == 1
        r = await host.expect(lambda x: x.dport == 43001 and x.flags & 0x04)
        assert r.flags & 0x04
        assert not conns[43002].closed and conns[43001].closed
        assert host.status()["engine"]["flows_reset_stale"] == 1

    with_engine(echo, body)
