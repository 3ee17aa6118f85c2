"""Real queries to the upstream: a dokodemo-door DNS inbound (its target is
fixed in the Xray config) or a SOCKS5 inbound's UDP ASSOCIATE (datagrams to
a DNS server's address through it).

One socket (or association) for every query; each query gets a fresh
16-bit ID of ours so replies find their query, and the client's ID is put
back before the reply goes on. A query without a reply within ``timeout``
is answered None (the server then says SERVFAIL). The socket opens on the
first query and again after it closes.

A query that came over TCP and gets a truncated (TC) answer over UDP is
asked again over TCP: a connection to the dokodemo inbound (its network
must include tcp), or a SOCKS5 CONNECT to the DNS server, with the 2-byte
length framing, one connection per such query.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import struct

from ..upstream._net import open_tcp
from ..upstream.dokodemo import DokodemoUdp
from ..upstream.socks5 import SocksError, SocksUdpAssociation, socks5_connect
from ..upstream.url import DokodemoUpstream

log = logging.getLogger("tun2xray.dns")

MAX_PENDING = 1024
QUEUE_MAX = 256                 # queries held while the socket opens
_ID = struct.Struct("!H")


class Forwarder:
    """``query(wire, reply)``: send *wire* upstream; ``reply(bytes | None)`` later."""

    def __init__(self, up, url: str, *, server=("1.1.1.1", 53), timeout: float = 5.0, open_timeout: float = 5.0,
                 rng=None):
        self.up = up
        self.url = url
        host, port = server
        try:
            self.server = (ipaddress.ip_address(host).packed, port)
        except ValueError:
            self.server = (host, port)
        self.timeout = timeout
        self.open_timeout = open_timeout
        self._rng = rng or random.Random()
        self._ep = None
        self._opening = None
        self._queue = []
        self._pending = {}      # our id -> (client id bytes, reply, timer)
        self._tcp = set()       # TCP retries under way
        self.closed = False
        self.counters = {"forward_sent": 0, "forward_replies": 0, "forward_timeouts": 0, "forward_unmatched": 0,
                         "forward_open_failed": 0, "forward_busy": 0, "forward_tcp": 0, "forward_tcp_failed": 0}

    # -- queries

    def query(self, wire: bytes, reply, tcp: bool = False) -> None:
        if tcp:
            reply = self._tcp_fallback(wire, reply)
        if self.closed or len(self._pending) >= MAX_PENDING:
            self.counters["forward_busy"] += 1
            reply(None)
            return
        loop = asyncio.get_running_loop()
        qid = self._rng.getrandbits(16)
        while qid in self._pending:
            qid = self._rng.getrandbits(16)
        timer = loop.call_later(self.timeout, self._expire, qid)
        self._pending[qid] = (wire[:2], reply, timer)
        out = _ID.pack(qid) + wire[2:]
        if self._ep is not None and not self._ep.closed:
            self._send(out)
        elif len(self._queue) < QUEUE_MAX:
            self._queue.append(out)
            if self._opening is None:
                self._opening = loop.create_task(self._open())
        else:
            self._finish(qid, None)
            self.counters["forward_busy"] += 1

    def _tcp_fallback(self, wire, reply):
        def answered(data):
            if data is None or not data[2] & 0x02 or self.closed:      # TC clear: the whole answer
                reply(data)
                return
            task = asyncio.get_running_loop().create_task(self._tcp_query(wire, reply))
            self._tcp.add(task)
            task.add_done_callback(self._tcp.discard)
        return answered

    async def _tcp_query(self, wire: bytes, reply) -> None:
        self.counters["forward_tcp"] += 1
        loop = asyncio.get_running_loop()
        sock = None
        data = None
        try:
            async with asyncio.timeout(self.timeout):
                if isinstance(self.up, DokodemoUpstream):
                    sock = await open_tcp(self.up.host, self.up.port)
                else:
                    sock = await socks5_connect(self.up, self.server[0], self.server[1], timeout=self.timeout)
                await loop.sock_sendall(sock, len(wire).to_bytes(2, "big") + wire)
                n = int.from_bytes(await _recv_exact(loop, sock, 2), "big")
                data = await _recv_exact(loop, sock, n)
        except asyncio.CancelledError:
            raise
        except (OSError, TimeoutError, asyncio.TimeoutError, SocksError, EOFError) as e:
            self.counters["forward_tcp_failed"] += 1
            log.debug("dns upstream %s over TCP: %s", self.url, str(e) or type(e).__name__)
        finally:
            if sock is not None:
                sock.close()
        reply(data if data is not None and len(data) >= 12 else None)

    def _send(self, out: bytes) -> None:
        self.counters["forward_sent"] += 1
        if isinstance(self.up, DokodemoUpstream):
            self._ep.send(out)
        else:
            self._ep.sendto(out, *self.server)

    def _expire(self, qid: int) -> None:
        if qid in self._pending:
            self.counters["forward_timeouts"] += 1
            self._finish(qid, None, cancel=False)

    def _finish(self, qid: int, data, cancel: bool = True) -> None:
        cid, reply, timer = self._pending.pop(qid)
        if cancel:
            timer.cancel()
        reply(None if data is None else cid + data[2:])

    def _datagram(self, data: bytes) -> None:
        if len(data) < 12 or not data[2] & 0x80:
            self.counters["forward_unmatched"] += 1
            return
        qid = _ID.unpack_from(data)[0]
        if qid not in self._pending:
            self.counters["forward_unmatched"] += 1
            return
        self.counters["forward_replies"] += 1
        self._finish(qid, data)

    # -- the socket

    async def _open(self) -> None:
        try:
            if isinstance(self.up, DokodemoUpstream):
                ep = await DokodemoUdp.open(self.up, on_datagram=self._datagram, on_closed=self._lost)
            else:
                ep = await SocksUdpAssociation.open(self.up, timeout=self.open_timeout, on_closed=self._lost,
                                                    on_datagram=lambda h, p, d: self._datagram(d), packed=True)
        except asyncio.CancelledError:
            raise
        except (OSError, TimeoutError, asyncio.TimeoutError) as e:
            self.counters["forward_open_failed"] += 1
            log.warning("dns upstream %s: %s", self.url, str(e) or type(e).__name__)
            self._opening = None
            queued, self._queue = self._queue, []
            for out in queued:
                qid = _ID.unpack_from(out)[0]
                if qid in self._pending:
                    self._finish(qid, None)
            return
        self._opening = None
        if self.closed:
            ep.close()
            return
        self._ep = ep
        queued, self._queue = self._queue, []
        for out in queued:
            if _ID.unpack_from(out)[0] in self._pending:
                self._send(out)

    def _lost(self, exc) -> None:
        if self._ep is not None and self._ep.closed:
            self._ep = None             # the next query opens another

    def close(self) -> None:
        self.closed = True
        for t in list(self._tcp):
            t.cancel()
        if self._opening is not None:
            self._opening.cancel()
            self._opening = None
        if self._ep is not None:
            self._ep.close()
            self._ep = None
        for qid in list(self._pending):
            self._finish(qid, None)
        self._queue.clear()


async def _recv_exact(loop, sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise EOFError("the upstream closed the connection mid-answer")
        buf += chunk
    return bytes(buf)
