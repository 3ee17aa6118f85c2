"""Fixtures for the tun2xray.upstream tests: event loops, echo servers, v2ray,
and a tiny strict SOCKS5 server that can misbehave on purpose.

Import the fixtures into a test module with
``from upstream_fixtures import *  # noqa: F401,F403``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import struct
import subprocess
import threading
import time

import pytest

try:
    import uvloop
except ImportError:  # plain asyncio only (iOS-like hosts)
    uvloop = None

__all__ = [
    "EchoServers",
    "StrictSocks",
    "count_fds",
    "echo",
    "free_port",
    "run",
    "v2ray",
]

LOOP_KINDS = ["asyncio"] + (["uvloop"] if uvloop is not None else [])


# ---------------------------------------------------------------- helpers


def count_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _port_free(port: int) -> bool:
    """Free for TCP and UDP on both 127.0.0.1 and ::1."""
    socks = []
    try:
        for fam, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            for typ in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                s = socket.socket(fam, typ)
                socks.append(s)
                s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        for s in socks:
            s.close()


def free_port(exclude=()) -> int:
    """A port free for TCP and UDP on both loopback addresses."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in exclude and _port_free(port):
            return port
    raise RuntimeError("no free port found")


@pytest.fixture(params=LOOP_KINDS)
def run(request):
    """``run(coro)`` runs a coroutine on a fresh loop of the parametrized kind."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def _run(coro, timeout=10.0):
        async def bounded():
            async with asyncio.timeout(timeout):
                return await coro

        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(bounded())

    _run.kind = request.param
    return _run


# ---------------------------------------------------------------- echo servers


class _UdpEcho(asyncio.DatagramProtocol):
    """Answers each datagram with b"<host> <port> " + data (who answered)."""

    def __init__(self, host, port):
        self.tag = f"{host} {port} ".encode()
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(self.tag + data, addr)


class EchoServers:
    """TCP echo and tagged UDP echo on 127.0.0.1 and ::1, in a background loop.

    ``port``: TCP and UDP echo on both addresses; ``port2``: UDP echo only.
    """

    HOSTS = ("127.0.0.1", "::1")

    def __init__(self):
        self.port = free_port()
        self.port2 = free_port(exclude=(self.port,))
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error = None
        self._thread = threading.Thread(target=self._main, name="upstream-echo", daemon=True)

    async def _tcp_echo(self, reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _main(self):
        asyncio.set_event_loop(self.loop)
        try:
            self._closers = []
            for host in self.HOSTS:
                srv = self.loop.run_until_complete(asyncio.start_server(self._tcp_echo, host, self.port))
                self._closers.append(srv)
                for port in (self.port, self.port2):
                    t, _ = self.loop.run_until_complete(
                        self.loop.create_datagram_endpoint(lambda h=host, p=port: _UdpEcho(h, p), local_addr=(host, port))
                    )
                    self._closers.append(t)
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        for c in self._closers:
            c.close()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()

    def start(self):
        self._thread.start()
        self._ready.wait(5)
        if self._error is not None:
            raise self._error

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


@pytest.fixture(scope="module")
def echo():
    servers = EchoServers()
    servers.start()
    try:
        yield servers
    finally:
        servers.stop()


# ---------------------------------------------------------------- v2ray


class V2ray:
    """A real v2ray (or xray) with socks (noauth + udp), socks (password) and
    dokodemo-door (tcp,udp -> the echo servers) inbounds, freedom outbound."""

    USER, PASSWORD = "alice", "s3cret pass"

    def __init__(self, workdir, echo_port):
        self.binary = shutil.which("xray") or shutil.which("v2ray")
        self.socks_port = free_port()
        self.auth_port = free_port(exclude=(self.socks_port,))
        self.doko_port = free_port(exclude=(self.socks_port, self.auth_port))
        self.workdir = workdir
        self.config = {
            "log": {"loglevel": "warning"},
            "inbounds": [
                {
                    "tag": "socks",
                    "listen": "127.0.0.1",
                    "port": self.socks_port,
                    "protocol": "socks",
                    "settings": {"auth": "noauth", "udp": True, "ip": "127.0.0.1"},
                },
                {
                    "tag": "socks-auth",
                    "listen": "127.0.0.1",
                    "port": self.auth_port,
                    "protocol": "socks",
                    "settings": {
                        "auth": "password",
                        "accounts": [{"user": self.USER, "pass": self.PASSWORD}],
                        "udp": True,
                        "ip": "127.0.0.1",
                    },
                },
                {
                    "tag": "doko",
                    "listen": "127.0.0.1",
                    "port": self.doko_port,
                    "protocol": "dokodemo-door",
                    "settings": {"address": "127.0.0.1", "port": echo_port, "network": "tcp,udp"},
                },
            ],
            "outbounds": [{"protocol": "freedom", "settings": {}}],
        }
        self.proc = None

    def start(self):
        path = os.path.join(self.workdir, "v2ray.json")
        with open(path, "w") as f:
            json.dump(self.config, f)
        self.log = open(os.path.join(self.workdir, "v2ray.log"), "wb")
        self.proc = subprocess.Popen([self.binary, "-config", path], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        pending = {self.socks_port, self.auth_port, self.doko_port}
        while pending:
            if self.proc.poll() is not None:
                raise RuntimeError(f"v2ray exited with {self.proc.returncode}: {self.log_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"v2ray did not open its ports: {self.log_text()}")
            for port in list(pending):
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        pending.discard(port)
            if pending:
                time.sleep(0.05)

    def log_text(self) -> str:
        self.log.flush()
        with open(self.log.name, "rb") as f:
            return f.read().decode(errors="replace")[-2000:]

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(3)
        self.log.close()


@pytest.fixture(scope="module")
def v2ray(echo, tmp_path_factory):
    if not (shutil.which("xray") or shutil.which("v2ray")):
        pytest.fail("neither xray nor v2ray on PATH (apt-get install v2ray)")
    core = V2ray(str(tmp_path_factory.mktemp("upstream-v2ray")), echo.port)
    try:
        core.start()
        yield core
    finally:
        core.stop()


# ---------------------------------------------------------------- strict SOCKS5 server


class StrictSocks:
    """A strict, scriptable SOCKS5 server on loopback for error paths.

    Its UDP relay is always on 127.0.0.1, also when the server listens on ::1.

    Behaviour knobs (set before the client connects):
      mode         "ok" | "close_after_greeting" | "close_mid_reply" |
                   "garbage" | "silent" | "no_method" | "bad_method" | "silent_after_auth" |
                   "short_fail" (VER REP only for a failure reply) |
                   "short_fail_open" (the same, then the connection stays open)
      auth         (user, password) to require RFC 1929 auth, else None
      reply        reply code to a request (0 = success)
      bnd          ATYP+ADDR+PORT bytes for a success reply (default 0.0.0.0:0)
      after_reply  bytes sent in the same write right after the reply
      udp_bnd_zero UDP ASSOCIATE reply names 0.0.0.0 (client must use our address)
      udp_script   raw datagrams the relay sends first when it gets a datagram
    Records: ``requests`` (cmd, atyp+addr+port bytes), ``udp_seen`` (raw datagrams),
    ``udp_client`` (address the client said it sends from).
    """

    def __init__(self):
        self.mode = "ok"
        self.auth = None
        self.reply = 0
        self.bnd = b"\x01\x00\x00\x00\x00\x00\x00"
        self.after_reply = b""
        self.udp_bnd_zero = False
        self.udp_script: list[bytes] = []
        self.requests: list[tuple[int, bytes]] = []
        self.udp_seen: list[bytes] = []
        self.udp_client = None
        self.auth_seen = None
        self.port = None
        self._server = None
        self._tasks: set[asyncio.Task] = set()
        self._writers = []
        self.relay = None

    async def start(self, host="127.0.0.1"):
        self._server = await asyncio.start_server(self._serve, host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def drop_connections(self):
        """Close every open control connection (ends UDP associations)."""
        for w in list(self._writers):
            w.close()
        await self.idle()

    async def idle(self):
        """Wait until every connection handler has finished."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def stop(self):
        await self.drop_connections()
        if self.relay is not None:
            self.relay.close()
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader, writer):
        task = asyncio.current_task()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._writers.append(writer)
        try:
            await self._session(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.remove(writer)
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass

    async def _session(self, reader, writer):
        mode = self.mode
        if mode == "garbage":
            await reader.read(10)
            writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            await writer.drain()
            return
        if mode == "silent":
            await reader.read()  # until the client gives up
            return
        ver, n = await reader.readexactly(2)
        methods = await reader.readexactly(n)
        assert ver == 5
        if mode == "close_after_greeting":
            return
        if mode == "no_method":
            writer.write(b"\x05\xff")
            await writer.drain()
            return
        if mode == "bad_method":
            writer.write(b"\x05\x01")  # GSSAPI, never offered
            await writer.drain()
            await reader.read()
            return
        if self.auth is not None:
            if 2 not in methods:
                writer.write(b"\x05\xff")
                await writer.drain()
                return
            writer.write(b"\x05\x02")
            ulen = (await reader.readexactly(2))[1]
            user = await reader.readexactly(ulen)
            plen = (await reader.readexactly(1))[0]
            pw = await reader.readexactly(plen)
            self.auth_seen = (user.decode(), pw.decode())
            ok = self.auth_seen == tuple(self.auth)
            writer.write(b"\x01" + (b"\x00" if ok else b"\x01"))
            await writer.drain()
            if not ok:
                return
        else:
            writer.write(b"\x05\x00")
        await writer.drain()
        if mode == "silent_after_auth":
            await reader.read()
            return
        ver, cmd, rsv, atyp = await reader.readexactly(4)
        if atyp == 1:
            rest = await reader.readexactly(6)
        elif atyp == 4:
            rest = await reader.readexactly(18)
        elif atyp == 3:
            ln = await reader.readexactly(1)
            rest = ln + await reader.readexactly(ln[0] + 2)
        else:
            writer.write(b"\x05\x08\x00\x01\x00\x00\x00\x00\x00\x00")
            return
        self.requests.append((cmd, bytes((atyp,)) + rest))
        if self.reply != 0 and mode == "short_fail":
            writer.write(bytes((5, self.reply)))  # VER REP, then hang up
            await writer.drain()
            return
        if self.reply != 0 and mode == "short_fail_open":
            writer.write(bytes((5, self.reply)))  # VER REP, and wait for the client to leave
            await writer.drain()
            await reader.read()
            return
        if self.reply != 0:
            writer.write(bytes((5, self.reply, 0)) + b"\x01\x00\x00\x00\x00\x00\x00")
            await writer.drain()
            return
        if mode == "close_mid_reply":
            writer.write(b"\x05\x00\x00\x04" + b"\x00" * 5)  # IPv6 reply cut short
            await writer.drain()
            return
        if cmd == 3:
            self.udp_client = bytes((atyp,)) + rest
            await self._udp_associate(reader, writer)
            return
        writer.write(b"\x05\x00\x00" + self.bnd + self.after_reply)
        await writer.drain()
        await reader.read()  # hold the data phase open until the client closes

    async def _udp_associate(self, reader, writer):
        loop = asyncio.get_running_loop()
        server = self

        class Relay(asyncio.DatagramProtocol):
            def connection_made(self, transport):
                self.transport = transport

            def datagram_received(self, data, addr):
                server.udp_seen.append(data)
                for raw in server.udp_script:
                    self.transport.sendto(raw, addr)
                # echo back with the same header (destination becomes source)
                self.transport.sendto(data + b"!", addr)

        transport, _ = await loop.create_datagram_endpoint(Relay, local_addr=("127.0.0.1", 0))
        self.relay = transport
        port = transport.get_extra_info("sockname")[1]
        addr = b"\x00\x00\x00\x00" if self.udp_bnd_zero else socket.inet_aton("127.0.0.1")
        writer.write(b"\x05\x00\x00\x01" + addr + struct.pack("!H", port))
        await writer.drain()
        try:
            await reader.read()  # the association lives as long as this connection
        finally:
            transport.close()
