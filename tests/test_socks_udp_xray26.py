"""Our SOCKS5 UDP client against a server as strict as Xray's socks inbound
since v26 (tests/xray26_socks.py): a fresh relay port per association,
datagrams taken only from the address the request declared, the
association gone with its control connection or after inactivity.

Everything runs on one virtual-clock loop (tests/vclock.py): "idle for 40 s"
is the loop's timers firing, not a wait.
"""

from __future__ import annotations

import asyncio
import socket

from test_names import NAMED, SRC, Book, packet, udp_from, until
from test_stack_pkt import l4_of, udp_packet
from vclock import EngineHarness, run_virtual
from xray26_socks import Xray26Socks

from tun2xray.upstream.socks5 import SocksUdpAssociation
from tun2xray.upstream.url import SocksUpstream

LOOPBACK = socket.inet_aton("127.0.0.1")


class _Echo(asyncio.DatagramProtocol):
    def __init__(self):
        self.got = []

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.got.append(data)
        self.transport.sendto(data, addr)


async def udp_echo():
    loop = asyncio.get_running_loop()
    t, p = await loop.create_datagram_endpoint(_Echo, local_addr=("127.0.0.1", 0))
    return t, p, t.get_extra_info("sockname")[1]


def strict(body, **server):
    async def main(loop):
        t, echo, port = await udp_echo()
        srv = await Xray26Socks(hosts={"echo.test": "127.0.0.1"}, **server).start()
        try:
            return await body(srv, echo, port)
        finally:
            await srv.stop()
            t.close()
    return run_virtual(main)


async def open_assoc(srv, got, closed=None):
    return await SocksUdpAssociation.open(
        SocksUpstream("127.0.0.1", srv.port), timeout=5,
        on_datagram=lambda h, p, d: got.append((h, p, d)),
        on_closed=(lambda exc: closed.append(exc)) if closed is not None else None, packed=True)


def test_udp_echo_by_address_and_by_domain_and_the_request_declares_what_the_server_filters_by():
    async def body(srv, echo, port):
        got = []
        a = await open_assoc(srv, got)
        try:
            a.sendto(b"by-address", LOOPBACK, port)
            a.sendto(b"by-name", "echo.test", port)
            await until(lambda: len(got) == 2)
            # replies name the source the server saw: the resolved address
            assert sorted(got) == [(LOOPBACK, port, b"by-address"), (LOOPBACK, port, b"by-name")]
            [assoc] = srv.associations
            assert assoc.declared == a.local               # our UDP socket, declared in the request
            assert [s[0] for s in assoc.seen] == [assoc.seen[0][0], "echo.test"]
            assert assoc.foreign == 0
            # the filter is real: a datagram from another socket is dropped
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
                other.bind(("127.0.0.1", 0))
                other.sendto(b"\x00\x00\x00\x01" + LOOPBACK + port.to_bytes(2, "big") + b"intruder",
                             ("127.0.0.1", assoc.relay_port))
                await until(lambda: assoc.foreign == 1)
            assert b"intruder" not in echo.got
        finally:
            a.close()

    strict(body)


def test_each_association_gets_its_own_relay_port_and_ends_with_its_control_connection():
    async def body(srv, echo, port):
        got = []
        closed = []
        a = await open_assoc(srv, got, closed)
        b = await open_assoc(srv, got)
        first, second = srv.associations
        assert first.relay_port != second.relay_port and a.relay[1] != b.relay[1]
        a.close()
        await until(lambda: first.closed is not None)
        assert first.closed == "control connection closed" and second.closed is None
        assert closed == [None]                        # our close: no error
        b.sendto(b"still", LOOPBACK, port)
        await until(lambda: got)
        b.close()

    strict(body)


def test_inactivity_ends_the_association_and_our_side_learns_it():
    async def body(srv, echo, port):
        got, closed = [], []
        a = await open_assoc(srv, got, closed)
        a.sendto(b"one", LOOPBACK, port)
        await until(lambda: got)
        await until(lambda: closed, timeout=60)        # the server's idle timer (30 s virtual)
        assert srv.associations[0].closed == "idle"
        assert a.closed and "closed the UDP association" in str(closed[0])

    strict(body, idle=30)


def _engine_case(body, **server):
    async def main(loop):
        t, echo, port = await udp_echo()
        srv = await Xray26Socks(hosts={"echo.test": "127.0.0.1"}, **server).start()
        h = EngineHarness(f"socks5://127.0.0.1:{srv.port}")
        h.engine.names = Book({NAMED: "echo.test"})
        await h.start()
        try:
            return await body(h, srv, echo, port)
        finally:
            await h.stop()
            await srv.stop()
            t.close()
    return run_virtual(main)


def test_engine_flow_by_name_keeps_one_association_alive_for_as_long_as_the_flow_lives():
    async def body(h, srv, echo, port):
        for i in range(6):                              # two virtual minutes of traffic
            h.send(udp_packet(SRC, NAMED, 6000, port, b"tick%d" % i))
            p = await packet(h, udp_from(NAMED, 6000))
            assert l4_of(p)[3][8:] == b"tick%d" % i     # the reply, from the named (fake) address
            await asyncio.sleep(20)
        [assoc] = srv.associations                     # one association, still open
        assert assoc.closed is None and assoc.foreign == 0
        assert {s[0] for s in assoc.seen} == {"echo.test"}
        # the flow idles out (the engine's UDP timeout): only then does the control connection go
        await until(lambda: assoc.closed is not None, timeout=120)
        assert assoc.closed == "control connection closed"
        assert not h.status()["flows"]

    _engine_case(body)


def test_engine_recovers_when_the_server_ends_an_idle_association():
    async def body(h, srv, echo, port):
        h.send(udp_packet(SRC, NAMED, 6001, port, b"a"))
        await packet(h, udp_from(NAMED, 6001))
        await until(lambda: srv.associations[0].closed == "idle", timeout=60)
        await until(lambda: not h.status()["flows"])     # the engine ended the flow with it
        h.send(udp_packet(SRC, NAMED, 6001, port, b"b"))
        p = await packet(h, udp_from(NAMED, 6001))
        assert l4_of(p)[3][8:] == b"b"
        assert len(srv.associations) == 2 and srv.associations[1].closed is None

    _engine_case(body, idle=30)


def test_engine_maps_a_reply_by_name_back_when_the_server_echoes_the_name():
    async def body(h, srv, echo, port):
        h.send(udp_packet(SRC, NAMED, 6002, port, b"x"))
        p = await packet(h, udp_from(NAMED, 6002))
        assert l4_of(p)[3][8:] == b"x"
        assert h.status()["engine"].get("udp_reply_no_flow", 0) == 0

    _engine_case(body, reply_with="request")
