"""tun2xray.upstream.socks5 against a strict in-test SOCKS5 server.

Every test runs on plain asyncio and on uvloop (the ``run`` fixture).
Error paths check the exception, that it comes quickly, and that the
client leaked no file descriptor.
"""

import asyncio
import errno
import gc
import socket
import struct

import pytest

from upstream_fixtures import *  # noqa: F401,F403
from upstream_fixtures import StrictSocks, count_fds

from tun2xray.upstream.socks5 import (
    REPLY_MESSAGES,
    SocksError,
    SocksUdpAssociation,
    decode_address,
    encode_address,
    socks5_connect,
)
from tun2xray.upstream.url import SocksUpstream

# ---------------------------------------------------------------- addresses (no loop)


@pytest.mark.parametrize(
    "host, raw",
    [
        ("127.0.0.1", b"\x01\x7f\x00\x00\x01"),
        (b"\x0a\x00\x00\x01", b"\x01\x0a\x00\x00\x01"),
        ("::1", b"\x04" + b"\x00" * 15 + b"\x01"),
        ("[::1]", b"\x04" + b"\x00" * 15 + b"\x01"),
        (socket.inet_pton(socket.AF_INET6, "2001:db8::1"), b"\x04" + socket.inet_pton(socket.AF_INET6, "2001:db8::1")),
        ("example.com", b"\x03\x0bexample.com"),
        ("bücher.de", b"\x03\x10xn--bcher-kva.de"),
        ("1.2.3", b"\x03\x051.2.3"),  # not a strict IPv4 literal: a name
    ],
)
def test_encode_address(host, raw):
    assert encode_address(host) == raw


@pytest.mark.parametrize("host", [b"\x01\x02\x03", "", "a" * 256, b"\x00" * 17])
def test_encode_address_rejects(host):
    with pytest.raises(ValueError):
        encode_address(host)


def test_decode_address_all_types():
    assert decode_address(b"\x01\x7f\x00\x00\x01\x00\x50rest", 0) == ("127.0.0.1", 80, 7)
    assert decode_address(b"xx\x04" + b"\x00" * 15 + b"\x01\x01\xbb", 2) == ("::1", 443, 21)
    assert decode_address(b"\x03\x09localhost\xff\xff", 0) == ("localhost", 65535, 13)


@pytest.mark.parametrize(
    "raw", [b"", b"\x01\x7f\x00\x00\x01\x00", b"\x04" + b"\x00" * 17, b"\x03", b"\x03\x05abc\x00\x01", b"\x05\x00"]
)
def test_decode_address_rejects(raw):
    with pytest.raises(Exception) as info:
        decode_address(raw, 0)
    assert not isinstance(info.value, (IndexError, struct.error))


# ---------------------------------------------------------------- CONNECT


def up_for(server, user=None, password=None):
    return SocksUpstream("127.0.0.1", server.port, user, password)


async def expect_failure(server, exc_type, coro_fn):
    """Run coro_fn(); it must raise exc_type and leak no fd.  No clock is
    read: a failure the client noticed only when its timeout ran out would
    raise TimeoutError, not the SocksError these cases expect, and a client
    that never gives up is stopped by run()'s bound."""
    gc.collect()          # an earlier test's socket closed by the collector mid-case would skew the count
    before = count_fds()
    with pytest.raises(exc_type) as info:
        await coro_fn()
    await server.idle()
    assert count_fds() == before
    return info.value


def test_connect_ipv4_success_and_data_phase(run):
    async def main():
        srv = await StrictSocks().start()
        srv.bnd = b"\x01\x0a\x01\x02\x03\x1f\x90"
        srv.after_reply = b"server speaks first"
        sock = await socks5_connect(up_for(srv), "10.0.0.7", 8080, timeout=2)
        try:
            assert sock.getblocking() is False
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert srv.requests == [(1, b"\x01\x0a\x00\x00\x07\x1f\x90")]
            # data sent right after the reply was not swallowed by the handshake
            loop = asyncio.get_running_loop()
            data = await loop.sock_recv(sock, 100)
            assert data == b"server speaks first"
        finally:
            sock.close()
        await srv.stop()

    run(main())


@pytest.mark.parametrize(
    "host, port, wire",
    [
        ("2001:db8::5", 443, b"\x04" + socket.inet_pton(socket.AF_INET6, "2001:db8::5") + b"\x01\xbb"),
        (b"\xc0\x00\x02\x01", 53, b"\x01\xc0\x00\x02\x01\x00\x35"),
        ("www.example.org", 80, b"\x03\x0fwww.example.org\x00\x50"),
    ],
)
def test_connect_request_encoding(run, host, port, wire):
    async def main():
        srv = await StrictSocks().start()
        sock = await socks5_connect(up_for(srv), host, port, timeout=2)
        sock.close()
        await srv.stop()
        assert srv.requests == [(1, wire)]

    run(main())


@pytest.mark.parametrize(
    "bnd, after",
    [
        (b"\x01\x7f\x00\x00\x01\x04\xd2", b"A"),
        (b"\x04" + b"\x00" * 15 + b"\x01\x04\xd2", b"B"),
        (b"\x03\x0bproxy.local\x04\xd2", b"C"),
        (b"\x03\x00\x00\x00", b"D"),  # empty domain, port 0: still parsed exactly
    ],
)
def test_bnd_address_types_are_consumed_exactly(run, bnd, after):
    async def main():
        srv = await StrictSocks().start()
        srv.bnd, srv.after_reply = bnd, after
        sock = await socks5_connect(up_for(srv), "example.com", 1, timeout=2)
        try:
            assert await asyncio.get_running_loop().sock_recv(sock, 10) == after
        finally:
            sock.close()
        await srv.stop()

    run(main())


@pytest.mark.parametrize("short", [False, True], ids=["full", "short"])
@pytest.mark.parametrize("code", list(range(1, 10)) + [0xFF])
def test_every_reply_code(run, code, short):
    async def main():
        srv = await StrictSocks().start()
        srv.reply = code
        if short:
            srv.mode = "short_fail"
        exc = await expect_failure(srv, SocksError, lambda: socks5_connect(up_for(srv), "10.0.0.1", 80, timeout=2))
        await srv.stop()
        return exc

    exc = run(main())
    assert exc.reply == code
    msg = str(exc)
    assert "\n" not in msg
    assert f"reply {code} (" in msg
    assert REPLY_MESSAGES.get(code, "unassigned reply code") in msg
    assert "10.0.0.1:80" in msg and f"127.0.0.1:" in msg
    expected_errno = {2: errno.EACCES, 3: errno.ENETUNREACH, 4: errno.EHOSTUNREACH, 5: errno.ECONNREFUSED, 6: errno.ETIMEDOUT}
    assert exc.errno == expected_errno.get(code)


@pytest.mark.parametrize(
    "mode, fragment",
    [
        ("close_after_greeting", "closed the connection during method selection"),
        ("close_mid_reply", "closed the connection inside the CONNECT reply"),
        ("garbage", "not a SOCKS5 proxy"),
        ("no_method", "requires authentication"),
        ("bad_method", "was not offered"),
    ],
)
def test_broken_servers(run, mode, fragment):
    async def main():
        srv = await StrictSocks().start()
        srv.mode = mode
        exc = await expect_failure(srv, SocksError, lambda: socks5_connect(up_for(srv), "10.0.0.1", 80, timeout=2))
        await srv.stop()
        return exc

    exc = run(main())
    assert fragment in str(exc)
    assert exc.reply is None


@pytest.mark.parametrize("mode", ["silent", "silent_after_auth"])
def test_silent_server_times_out(run, mode):
    async def main():
        srv = await StrictSocks().start()
        srv.mode = mode
        await expect_failure(
            srv, TimeoutError, lambda: socks5_connect(up_for(srv), "10.0.0.1", 80, timeout=0.2)
        )
        await srv.stop()

    run(main())


def test_refused_proxy_is_oserror(run):
    async def main():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # nobody listens once closed
        before = count_fds()
        with pytest.raises(ConnectionRefusedError):
            await socks5_connect(SocksUpstream("127.0.0.1", port), "10.0.0.1", 80, timeout=2)
        assert count_fds() == before

    run(main())


def test_cancellation_closes_socket(run):
    async def main():
        srv = await StrictSocks().start()
        srv.mode = "silent"
        before = count_fds()
        task = asyncio.ensure_future(socks5_connect(up_for(srv), "10.0.0.1", 80, timeout=5))
        while not srv._tasks:  # the server has accepted: the client socket exists
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await srv.idle()
        assert count_fds() == before
        await srv.stop()

    run(main())


def test_auth_success_and_failure(run):
    async def main():
        srv = await StrictSocks().start()
        srv.auth = ("alice", "pässword")
        sock = await socks5_connect(up_for(srv, "alice", "pässword"), "10.0.0.1", 80, timeout=2)
        sock.close()
        await srv.idle()
        assert srv.auth_seen == ("alice", "pässword")
        assert srv.requests == [(1, b"\x01\x0a\x00\x00\x01\x00\x50")]

        exc = await expect_failure(
            srv, SocksError, lambda: socks5_connect(up_for(srv, "alice", "wrong"), "10.0.0.1", 80, timeout=2)
        )
        assert "authentication failed" in str(exc) and "'alice'" in str(exc) and "wrong" not in str(exc)
        assert exc.errno == errno.EACCES

        exc = await expect_failure(srv, SocksError, lambda: socks5_connect(up_for(srv), "10.0.0.1", 80, timeout=2))
        assert "requires authentication" in str(exc)
        await srv.stop()

    run(main())


def test_bad_target_rejected_before_io(run):
    async def main():
        before = count_fds()
        with pytest.raises(ValueError):
            await socks5_connect(SocksUpstream("127.0.0.1", 9), "a" * 300, 80, timeout=1)
        with pytest.raises(ValueError):
            await socks5_connect(SocksUpstream("127.0.0.1", 9), "10.0.0.1", 70000, timeout=1)
        assert count_fds() == before

    run(main())


# ---------------------------------------------------------------- UDP ASSOCIATE


def udp_header(atyp_addr_port: bytes, frag=0) -> bytes:
    return b"\x00\x00" + bytes((frag,)) + atyp_addr_port


@pytest.mark.parametrize("bnd_zero", [False, True])
def test_udp_associate_headers_both_ways(run, bnd_zero):
    async def main():
        srv = await StrictSocks().start()
        srv.udp_bnd_zero = bnd_zero
        v4 = b"\x01\x0a\x00\x00\x01\x00\x35"
        srv.udp_script = [
            udp_header(v4) + b"good-v4",
            udp_header(b"\x04" + socket.inet_pton(socket.AF_INET6, "2001:db8::2") + b"\x01\xbb") + b"good-v6",
            udp_header(b"\x03\x07a.local\x00\x07") + b"good-name",
            udp_header(v4, frag=1) + b"fragment",
            udp_header(v4, frag=0x81) + b"last fragment",
            b"\x00\x00",  # too short
            b"\x01\x00\x00" + v4 + b"bad rsv",
            udp_header(b"\x05\x00") + b"bad atyp",
            udp_header(b"\x01\x0a\x00"),  # truncated address
            udp_header(b"\x03\x10short"),  # domain longer than the datagram
        ]
        got = asyncio.Queue()
        closed = []
        before = count_fds()
        assoc = await SocksUdpAssociation.open(
            up_for(srv), timeout=2, on_datagram=lambda h, p, d: got.put_nowait((h, p, d)), on_closed=closed.append
        )
        assert srv.requests[0][0] == 3
        # the client told the proxy where its datagrams come from
        assert srv.udp_client == b"\x01\x7f\x00\x00\x01" + struct.pack("!H", assoc.local[1])
        assert assoc.relay[0] == "127.0.0.1"  # 0.0.0.0 in the reply means the proxy's own address

        assoc.sendto(b"query", "10.0.0.1", 53)
        replies = [await got.get() for _ in range(4)]
        assert srv.udp_seen == [udp_header(v4) + b"query"]
        assert replies == [
            ("10.0.0.1", 53, b"good-v4"),
            ("2001:db8::2", 443, b"good-v6"),
            ("a.local", 7, b"good-name"),
            ("10.0.0.1", 53, b"query!"),  # the relay's echo of our own datagram
        ]
        assoc.sendto(b"x" * 1000, socket.inet_pton(socket.AF_INET6, "2001:db8::9"), 9)
        assoc.sendto(b"", "example.com", 65535)
        for _ in range(2 + 2 * len(srv.udp_script)):
            await asyncio.sleep(0.01)
            if len(srv.udp_seen) == 3 and got.qsize() == 8:
                break
        assert srv.udp_seen[1] == udp_header(b"\x04" + socket.inet_pton(socket.AF_INET6, "2001:db8::9") + b"\x00\x09") + b"x" * 1000
        assert srv.udp_seen[2] == udp_header(b"\x03\x0bexample.com\xff\xff")
        st = assoc.stats
        assert st["frag_dropped"] == 2 * 3
        assert st["malformed"] == 5 * 3
        assert st["datagrams_out"] == 3 and st["bytes_out"] == 5 + 1000
        assert st["datagrams_in"] == 4 * 3 and st["bytes_in"] == (7 + 7 + 9) * 3 + 6 + 1001 + 1

        assoc.close()
        assoc.close()  # idempotent
        assoc.sendto(b"late", "10.0.0.1", 53)
        assert assoc.stats["send_dropped"] == 1
        await srv.idle()  # the proxy saw the control connection close
        await asyncio.sleep(0)
        assert closed == [None]
        assert count_fds() == before
        await srv.stop()

    run(main())


def test_udp_association_dies_with_control_connection(run):
    async def main():
        srv = await StrictSocks().start()
        closed = asyncio.Queue()
        before = count_fds()
        assoc = await SocksUdpAssociation.open(
            up_for(srv), timeout=2, on_datagram=lambda *a: None, on_closed=closed.put_nowait
        )
        await srv.drop_connections()
        exc = await asyncio.wait_for(closed.get(), 2)
        assert isinstance(exc, ConnectionError)
        assert "control connection" in str(exc)
        assert assoc.closed
        assoc.sendto(b"x", "10.0.0.1", 1)
        assert assoc.stats["send_dropped"] == 1
        assoc.close()  # no second on_closed
        await asyncio.sleep(0)   # on_closed comes by call_soon: one loop turn shows it, no wait needed
        assert closed.empty()
        assert count_fds() == before
        await srv.stop()

    run(main())


@pytest.mark.parametrize("mode, exc_type", [("silent", TimeoutError), ("no_method", SocksError), ("close_mid_reply", SocksError)])
def test_udp_associate_failures_leak_nothing(run, mode, exc_type):
    async def main():
        srv = await StrictSocks().start()
        srv.mode = mode
        closed = []
        await expect_failure(
            srv,
            exc_type,
            lambda: SocksUdpAssociation.open(up_for(srv), timeout=0.3, on_datagram=None, on_closed=closed.append),
        )
        await asyncio.sleep(0)
        assert closed == []  # never opened, so never "closed"
        await srv.stop()

    run(main())


def test_udp_associate_reply_code(run):
    async def main():
        srv = await StrictSocks().start()
        srv.reply = 7
        exc = await expect_failure(
            srv, SocksError, lambda: SocksUdpAssociation.open(up_for(srv), timeout=1, on_datagram=None)
        )
        assert exc.reply == 7 and "UDP ASSOCIATE" in str(exc) and "command not supported" in str(exc)
        await srv.stop()

    run(main())


# ---------------------------------------------------------------- more edges


def test_proxy_given_by_name_tries_each_address(run, monkeypatch):
    # A name resolving to ::1 first while the server listens on 127.0.0.1
    # only: the dialer must fall through to the next address.
    import tun2xray.upstream._net as net

    real_resolve = net.resolve
    asked = []

    async def fake_resolve(host, port, socktype):
        if host != "proxy.test":
            return await real_resolve(host, port, socktype)
        asked.append(host)
        return [(socket.AF_INET6, ("::1", port, 0, 0)), (socket.AF_INET, ("127.0.0.1", port))]

    monkeypatch.setattr(net, "resolve", fake_resolve)

    async def main():
        srv = await StrictSocks().start()
        before = count_fds()
        sock = await socks5_connect(SocksUpstream("proxy.test", srv.port), "10.0.0.1", 80, timeout=2)
        assert sock.getpeername() == ("127.0.0.1", srv.port)
        assert asked == ["proxy.test"]
        assert count_fds() == before + 2  # ours and the server side; the ::1 attempt was closed
        sock.close()
        await srv.stop()

    run(main())


def test_udp_send_edges(run):
    async def main():
        srv = await StrictSocks().start()
        assoc = await SocksUdpAssociation.open(up_for(srv), timeout=2, on_datagram=lambda *a: None)
        assoc.sendto(b"x" * 70000, "10.0.0.1", 53)  # cannot fit in one datagram
        assert assoc.stats["send_dropped"] == 1 and assoc.stats["datagrams_out"] == 0
        assoc.sendto(b"ba", bytearray(b"\x0a\x00\x00\x02"), 53)
        assoc.sendto(b"mv", memoryview(b"\x0a\x00\x00\x02"), 53)
        with pytest.raises(ValueError):
            assoc.sendto(b"x", "10.0.0.1", 65536)
        with pytest.raises(ValueError):
            assoc.sendto(b"x", b"\x01\x02", 1)
        for _ in range(100):
            if len(srv.udp_seen) == 2:
                break
            await asyncio.sleep(0.01)
        assert srv.udp_seen == [b"\x00\x00\x00\x01\x0a\x00\x00\x02\x00\x35" + d for d in (b"ba", b"mv")]
        assoc.close()
        await srv.stop()

    run(main())


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64))
def test_udp_receive_never_raises(data):
    got = []
    assoc = SocksUdpAssociation(None, "fuzz", lambda h, p, d: got.append((h, p, d)), None)
    assoc._datagram(data)
    st_ = assoc.stats
    assert st_["datagrams_in"] + st_["malformed"] + st_["frag_dropped"] == 1
    if got:
        h, p, d = got[0]
        assert 0 <= p <= 0xFFFF and data.endswith(d) and data[2] == 0


def test_ipv6_proxy_with_ipv4_relay(run):
    # Control connection over ::1, relay named as 127.0.0.1: the client must
    # switch its UDP socket to the relay's family.
    async def main():
        srv = await StrictSocks().start("::1")
        got = asyncio.Queue()
        before = count_fds()
        assoc = await SocksUdpAssociation.open(
            SocksUpstream("::1", srv.port), timeout=2, on_datagram=lambda *a: got.put_nowait(a)
        )
        assert srv.udp_client[0] == 4  # we announced our IPv6 source
        assert assoc.relay[0] == "127.0.0.1" and assoc.local[0] == "127.0.0.1"
        assoc.sendto(b"v6 control", "::2", 5353)
        assert await asyncio.wait_for(got.get(), 2) == ("::2", 5353, b"v6 control!")
        assoc.close()
        await srv.idle()
        assert count_fds() == before
        await srv.stop()

    run(main())
