"""tun2xray.upstream against a real v2ray/xray on loopback.

Inbounds (see upstream_fixtures.V2ray): socks noauth with UDP, socks with
a password, dokodemo-door (tcp,udp) whose fixed target is our echo server.
Echo servers listen on 127.0.0.1 and ::1; UDP echoes are tagged with the
address and port that answered.  Every test runs on asyncio and uvloop.
"""

import asyncio
import socket

import pytest

from upstream_fixtures import *  # noqa: F401,F403
from upstream_fixtures import count_fds

from tun2xray.upstream import (
    DokodemoUdp,
    DokodemoUpstream,
    SocksError,
    SocksUdpAssociation,
    SocksUpstream,
    dokodemo_connect,
    open_stream,
    parse_upstream,
    socks5_connect,
)


async def echo_roundtrip(sock, payload: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, payload)
    got = b""
    while len(got) < len(payload):
        chunk = await loop.sock_recv(sock, 65536)
        if not chunk:
            break
        got += chunk
    return got


@pytest.mark.parametrize("target", ["127.0.0.1", "::1", "localhost", "packed4", "packed6"])
def test_connect_echo(run, v2ray, echo, target):
    host = {
        "packed4": socket.inet_pton(socket.AF_INET, "127.0.0.1"),
        "packed6": socket.inet_pton(socket.AF_INET6, "::1"),
    }.get(target, target)
    up = parse_upstream(f"socks5://127.0.0.1:{v2ray.socks_port}")

    async def main():
        sock = await socks5_connect(up, host, echo.port, timeout=5)
        try:
            payload = bytes(range(256)) * 400  # 100 KiB, several segments
            assert await echo_roundtrip(sock, payload) == payload
        finally:
            sock.close()

    run(main())


def test_connect_with_password(run, v2ray, echo):
    up = SocksUpstream("127.0.0.1", v2ray.auth_port, v2ray.USER, v2ray.PASSWORD)

    async def main():
        sock = await socks5_connect(up, "127.0.0.1", echo.port, timeout=5)
        try:
            assert await echo_roundtrip(sock, b"authenticated hello") == b"authenticated hello"
        finally:
            sock.close()

    run(main())


@pytest.mark.parametrize("creds", [("alice", "wrong"), ("mallory", "s3cret pass"), (None, None)])
def test_auth_rejected(run, v2ray, echo, creds):
    up = SocksUpstream("127.0.0.1", v2ray.auth_port, *creds)

    async def main():
        before = count_fds()
        with pytest.raises(SocksError) as info:
            await socks5_connect(up, "127.0.0.1", echo.port, timeout=5)
        assert count_fds() == before
        return info.value

    exc = run(main())
    if creds[0] is None:
        assert "requires authentication" in str(exc)
    else:
        # v2ray answers a bad password with a failure status or just hangs up
        assert "authentication failed" in str(exc) or "closed the connection" in str(exc)


def test_udp_associate_two_destinations(run, v2ray, echo):
    up = SocksUpstream("127.0.0.1", v2ray.socks_port)

    async def main():
        got = asyncio.Queue()
        closed = asyncio.Queue()
        assoc = await SocksUdpAssociation.open(
            up, timeout=5, on_datagram=lambda h, p, d: got.put_nowait((h, p, d)), on_closed=closed.put_nowait
        )
        try:
            assert assoc.relay == ("127.0.0.1", v2ray.socks_port)
            dests = [("127.0.0.1", echo.port), ("::1", echo.port2), ("127.0.0.1", echo.port2)]
            for i, (h, p) in enumerate(dests):
                assoc.sendto(b"ping %d" % i, h, p)
            replies = set()
            for _ in dests:
                replies.add(await asyncio.wait_for(got.get(), 5))
            assert replies == {
                (h, p, f"{h} {p} ping {i}".encode()) for i, (h, p) in enumerate(dests)
            }
            # packed destination and an MTU-sized datagram (v2ray 4.34 cuts
            # SOCKS UDP datagrams at a 2048-byte buffer, header included)
            big = b"u" * 1400
            assoc.sendto(big, socket.inet_pton(socket.AF_INET6, "::1"), echo.port)
            h, p, d = await asyncio.wait_for(got.get(), 5)
            assert (h, p, d) == ("::1", echo.port, f"::1 {echo.port} ".encode() + big)
            st = assoc.stats
            assert st["datagrams_out"] == 4 and st["datagrams_in"] == 4
            assert st["malformed"] == 0 and st["frag_dropped"] == 0
        finally:
            assoc.close()
        assert await asyncio.wait_for(closed.get(), 2) is None

    run(main())


def test_udp_associate_with_password(run, v2ray, echo):
    up = SocksUpstream("127.0.0.1", v2ray.auth_port, v2ray.USER, v2ray.PASSWORD)

    async def main():
        got = asyncio.Queue()
        assoc = await SocksUdpAssociation.open(up, timeout=5, on_datagram=lambda *a: got.put_nowait(a))
        try:
            assoc.sendto(b"hi", "127.0.0.1", echo.port)
            assert await asyncio.wait_for(got.get(), 5) == ("127.0.0.1", echo.port, f"127.0.0.1 {echo.port} hi".encode())
        finally:
            assoc.close()

    run(main())


def test_dokodemo_tcp(run, v2ray, echo):
    up = DokodemoUpstream("127.0.0.1", v2ray.doko_port)

    async def main():
        sock = await dokodemo_connect(up, timeout=5)
        try:
            assert sock.getblocking() is False
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            payload = b"dokodemo stream " * 1000
            assert await echo_roundtrip(sock, payload) == payload
        finally:
            sock.close()

    run(main())


def test_dokodemo_udp_flows(run, v2ray, echo):
    up = parse_upstream(f"dokodemo://127.0.0.1:{v2ray.doko_port}")

    async def main():
        q1, q2 = asyncio.Queue(), asyncio.Queue()
        closed = []
        f1 = await DokodemoUdp.open(up, on_datagram=q1.put_nowait, on_closed=closed.append)
        f2 = await DokodemoUdp.open(up, on_datagram=q2.put_nowait)
        try:
            assert f1.local != f2.local
            f1.send(b"flow one")
            f2.send(b"flow two")
            f1.send(b"flow one again")
            tag = f"127.0.0.1 {echo.port} ".encode()
            assert await asyncio.wait_for(q1.get(), 5) == tag + b"flow one"
            assert await asyncio.wait_for(q1.get(), 5) == tag + b"flow one again"
            assert await asyncio.wait_for(q2.get(), 5) == tag + b"flow two"
            assert f1.stats["datagrams_out"] == 2 and f1.stats["datagrams_in"] == 2
        finally:
            f1.close()
            f2.close()
        f1.send(b"late")
        assert f1.stats["send_dropped"] == 1
        await asyncio.sleep(0)
        assert closed == [None]

    run(main())


def test_dokodemo_refused_and_unreachable(run, echo):
    async def main():
        # nothing listens on echo.port2 for TCP
        before = count_fds()
        with pytest.raises(ConnectionRefusedError):
            await dokodemo_connect(DokodemoUpstream("127.0.0.1", echo.port2), timeout=2)
        assert count_fds() == before
        # UDP to a closed port: the ICMP error is counted, the flow stays usable
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        flow = await DokodemoUdp.open(DokodemoUpstream("127.0.0.1", dead), on_datagram=lambda d: None)
        flow.send(b"anyone?")
        for _ in range(100):
            if flow.stats["errors"]:
                break
            await asyncio.sleep(0.01)
        assert flow.stats["errors"] == 1
        assert isinstance(flow.last_error, ConnectionRefusedError)
        assert not flow.closed
        flow.close()

    run(main())


@pytest.mark.parametrize("kind", ["socks", "dokodemo"])
def test_open_stream_dispatch(run, v2ray, echo, kind):
    url = f"socks5://127.0.0.1:{v2ray.socks_port}" if kind == "socks" else f"dokodemo://127.0.0.1:{v2ray.doko_port}"

    async def main():
        sock = await open_stream(parse_upstream(url), "::1", echo.port, timeout=5)
        try:
            assert await echo_roundtrip(sock, b"dispatch") == b"dispatch"
        finally:
            sock.close()

    run(main())
