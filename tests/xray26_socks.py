"""A strict SOCKS5 UDP server that behaves as Xray's socks inbound does
since v26 (asyncio, for tests; the CI core is v2ray 4.34, which is laxer).

What it enforces, per UDP ASSOCIATE:
- a fresh UDP relay port for each association (never a shared one);
- datagrams are taken only from the client address the request declared
  (DST.ADDR/DST.PORT); an unspecified address (0.0.0.0 / ::) means the TCP
  peer's address, port 0 any port; anything else is dropped and counted;
- the association ends with its TCP control connection, or after ``idle``
  seconds without a datagram either way (the relay port is closed then,
  and so is the control connection);
- the destination is per datagram (one association carries many flows);
  names are resolved from ``hosts`` (a name it does not know is dropped).

Replies carry the source address of the answer (``reply_with="source"``:
the resolved address, which a client that sent by name never saw) or the
address as the client's datagram gave it (``"request"``, as v2ray 4.x does).
Only no-auth and UDP ASSOCIATE are spoken; CONNECT gets reply 7.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct


def _parse_addr(buf: bytes, off: int):
    """(host, port, end): host is an ip_address or a str name."""
    atyp = buf[off]
    if atyp == 1:
        return ipaddress.ip_address(buf[off + 1:off + 5]), struct.unpack_from("!H", buf, off + 5)[0], off + 7
    if atyp == 4:
        return ipaddress.ip_address(buf[off + 1:off + 17]), struct.unpack_from("!H", buf, off + 17)[0], off + 19
    if atyp == 3:
        n = buf[off + 1]
        name = buf[off + 2:off + 2 + n].decode()
        return name, struct.unpack_from("!H", buf, off + 2 + n)[0], off + 4 + n
    raise ValueError(f"bad ATYP {atyp}")


def _encode(host, port: int) -> bytes:
    if isinstance(host, str):
        raw = host.encode()
        return b"\x03" + bytes((len(raw),)) + raw + struct.pack("!H", port)
    ip = ipaddress.ip_address(host)
    return (b"\x01" if ip.version == 4 else b"\x04") + ip.packed + struct.pack("!H", port)


class Association:
    """One UDP ASSOCIATE: what the client declared and what happened."""

    def __init__(self, server, writer, declared, allowed):
        self.server = server
        self.writer = writer
        self.declared = declared          # (host text, port) as the request said
        self.allowed = allowed            # (ip text, port or 0 for any)
        self.relay = None                 # our transport facing the client
        self.out = None                   # our transport facing the destinations
        self.relay_port = None
        self.client = None                # where replies go (the last good source)
        self.asked = {}                   # (ip, port) -> the address the client used
        self.seen = []                    # payloads taken (destination host, port, payload)
        self.foreign = 0                  # datagrams from another address: dropped
        self.unresolved = 0
        self.closed = None                # why it ended
        self.last = server.loop.time()
        self.timer = None

    # client -> destination
    def from_client(self, data: bytes, addr) -> None:
        ip, port = addr[0], addr[1]
        if ip != self.allowed[0] or (self.allowed[1] and port != self.allowed[1]):
            self.foreign += 1
            return
        if len(data) < 4 or data[:3] != b"\x00\x00\x00":
            return
        host, dport, off = _parse_addr(data, 3)
        if isinstance(host, str):
            target = self.server.hosts.get(host)
            if target is None:
                self.unresolved += 1
                return
        else:
            target = str(host)
        self.client = addr
        self.asked[(target, dport)] = host
        self.seen.append((host, dport, data[off:]))
        self.touch()
        self.out.sendto(data[off:], (target, dport))

    # destination -> client
    def from_target(self, data: bytes, addr) -> None:
        if self.client is None or self.closed:
            return
        src = (addr[0], addr[1])
        host = ipaddress.ip_address(addr[0])
        if self.server.reply_with == "request":
            host = self.asked.get(src, host)
        self.touch()
        self.relay.sendto(b"\x00\x00\x00" + _encode(host, addr[1]) + data, self.client)

    def touch(self) -> None:
        self.last = self.server.loop.time()

    def check_idle(self) -> None:
        self.timer = None
        if self.closed:
            return
        left = self.last + self.server.idle - self.server.loop.time()
        if left <= 0:
            self.close("idle")
            return
        self.timer = self.server.loop.call_later(left, self.check_idle)

    def close(self, why: str) -> None:
        if self.closed:
            return
        self.closed = why
        if self.timer is not None:
            self.timer.cancel()
        for t in (self.relay, self.out):
            if t is not None:
                t.close()
        self.writer.close()


class _Side(asyncio.DatagramProtocol):
    def __init__(self, handler):
        self.handler = handler

    def datagram_received(self, data, addr):
        self.handler(data, addr)


class Xray26Socks:
    def __init__(self, hosts: dict | None = None, idle: float = 300.0, reply_with: str = "source"):
        self.hosts = dict(hosts or {})
        self.idle = idle
        self.reply_with = reply_with
        self.associations: list[Association] = []
        self.requests: list[tuple[int, bytes]] = []
        self.loop = None
        self.port = None
        self._server = None
        self._tasks: set = set()

    async def start(self, host: str = "127.0.0.1"):
        self.loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._serve, host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def live(self) -> list:
        return [a for a in self.associations if a.closed is None]

    async def stop(self):
        for a in self.associations:
            a.close("server stopped")
        self._server.close()
        await self._server.wait_closed()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _serve(self, reader, writer):
        task = asyncio.current_task()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        a = None
        try:
            a = await self._session(reader, writer)
            if a is not None:
                await reader.read()          # until the client closes the control connection
                a.close("control connection closed")
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            if a is not None:
                a.close("control connection closed")
        finally:
            writer.close()

    async def _session(self, reader, writer):
        ver, n = await reader.readexactly(2)
        methods = await reader.readexactly(n)
        if ver != 5 or 0 not in methods:
            writer.write(b"\x05\xff")
            return None
        writer.write(b"\x05\x00")
        ver, cmd, _rsv, atyp = await reader.readexactly(4)
        if atyp == 1:
            rest = await reader.readexactly(6)
        elif atyp == 4:
            rest = await reader.readexactly(18)
        elif atyp == 3:
            ln = await reader.readexactly(1)
            rest = ln + await reader.readexactly(ln[0] + 2)
        else:
            raise ValueError("bad ATYP")
        self.requests.append((cmd, bytes((atyp,)) + rest))
        if cmd != 3:
            writer.write(b"\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00")
            return None
        host, port, _ = _parse_addr(bytes((atyp,)) + rest, 0)
        peer = writer.get_extra_info("peername")[0]
        if isinstance(host, str):
            allowed_ip = host
        elif host.is_unspecified:
            allowed_ip = peer
        else:
            allowed_ip = str(host)
        a = Association(self, writer, (str(host), port), (allowed_ip, port))
        local_ip = writer.get_extra_info("sockname")[0]
        fam = socket.AF_INET6 if ":" in local_ip else socket.AF_INET
        a.relay, _ = await self.loop.create_datagram_endpoint(lambda: _Side(a.from_client), local_addr=(local_ip, 0))
        a.out, _ = await self.loop.create_datagram_endpoint(lambda: _Side(a.from_target), family=fam,
                                                            local_addr=(local_ip, 0))
        a.relay_port = a.relay.get_extra_info("sockname")[1]
        self.associations.append(a)
        a.timer = self.loop.call_later(self.idle, a.check_idle)
        writer.write(b"\x05\x00\x00" + _encode(ipaddress.ip_address(local_ip), a.relay_port))
        await writer.drain()
        return a
