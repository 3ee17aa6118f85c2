"""SOCKS5 client: CONNECT and UDP ASSOCIATE (RFC 1928), user/password (RFC 1929).

The awaitable side of the handshake machine in ``socks5_proto``: it runs
on a non-blocking socket with ``loop.sock_*`` so the same code serves
plain asyncio and uvloop.  Reads never take more than the machine needs,
so data the proxy sends right after its reply stays in the socket for the
data phase.

UDP ASSOCIATE: the association is a TCP control connection plus a local
UDP socket connected to the relay the proxy names.  Each datagram carries
the RFC 1928 section 7 header::

    +-----+------+------+----------+----------+----------+
    | RSV | FRAG | ATYP | DST.ADDR | DST.PORT |   DATA   |
    |  2  |  1   |  1   | Variable |    2     | Variable |
    +-----+------+------+----------+----------+----------+

Fragments (FRAG != 0) are dropped and counted (fragmentation is optional
in the RFC and no Xray-family core sends them); malformed headers are
dropped and counted.  The association lives exactly as long as its
control connection.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Callable

from ._net import DatagramEndpoint, open_tcp
from .socks5_proto import (
    CMD_CONNECT,
    CMD_UDP_ASSOCIATE,
    NEED_DATA,
    REPLY_MESSAGES,
    UDP_FRAGMENT,
    UDP_OK,
    Failed,
    SocksClient,
    SocksError,
    address_text,
    build_udp_header,
    encode_address,
    parse_address,
    parse_udp_header,
    reply_text,
)
from .url import SocksUpstream, format_hostport

__all__ = [
    "SocksError",
    "SocksUdpAssociation",
    "socks5_connect",
    "encode_address",
    "decode_address",
    "reply_text",
    "REPLY_MESSAGES",
]

_HEADER_CACHE_MAX = 1024


def decode_address(buf, off: int) -> tuple[str, int, int]:
    """(host text, port, end) for ATYP + ADDR + PORT at ``buf[off:]``
    (``parse_address`` with the host formatted; ValueError when malformed)."""
    got = parse_address(buf, off)
    if got is None:
        raise ValueError("address ends early")
    host, port, end = got
    return address_text(host), port, end


# ---------------------------------------------------------------- handshake


async def _handshake(loop, sock, client: SocksClient):
    """Drive ``client`` over a connected non-blocking socket; return its
    Connected event.  Reads never go past the reply, so data the proxy sends
    right after it stays in the socket for the data phase."""
    await loop.sock_sendall(sock, client.initial_bytes())
    while True:
        try:
            chunk = await loop.sock_recv(sock, client.need)
        except ConnectionError as exc:
            raise client.connection_closed(exc) from None
        if not chunk:
            raise client.connection_closed()
        ev = client.receive_data(chunk)
        out = client.data_to_send()
        if out:
            await loop.sock_sendall(sock, out)
        if ev is NEED_DATA:
            continue
        if ev.__class__ is Failed:
            raise ev.error()
        return ev


@functools.lru_cache(maxsize=64)
def _label_of(host: str, port: int) -> str:
    return f"socks5 proxy {format_hostport(host, port)}"


def _label(up) -> str:
    # formatted once per proxy, not once per connection (the label is only
    # read when a handshake fails)
    return _label_of(up.host, up.port)


def socks_client(up: SocksUpstream, command: int, host, port: int, target: str | None = None) -> SocksClient:
    """The handshake machine for ``up`` (its credentials, its label)."""
    return SocksClient(command, host, port, username=up.username, password=up.password,
                       label=_label(up), target=target)


async def socks5_connect(up: SocksUpstream, host, port: int, *, timeout: float,
                         bound: list | None = None) -> socket.socket:
    """Dial ``host:port`` through the proxy; return the socket for the data phase.

    ``host`` is an IP literal, a domain name (sent to the proxy as is) or a
    packed 4/16-byte address.  Raises SocksError, OSError or TimeoutError;
    the socket is closed on every failure (and on cancellation).  ``bound``,
    when given, receives the reply's (BND.ADDR, BND.PORT) as text.
    """
    client = socks_client(up, CMD_CONNECT, host, port)  # ValueError before any I/O
    loop = asyncio.get_running_loop()
    sock = None
    try:
        async with asyncio.timeout(timeout):
            sock = await open_tcp(up.host, up.port)
            ev = await _handshake(loop, sock, client)
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    if bound is not None:
        bound.append((address_text(ev.bound_host), ev.bound_port))
    return sock


# ---------------------------------------------------------------- UDP ASSOCIATE


class _ControlProtocol(asyncio.Protocol):
    __slots__ = ("assoc", "eof")

    def __init__(self, assoc: "SocksUdpAssociation"):
        self.assoc = assoc
        self.eof = False

    def data_received(self, data: bytes) -> None:
        pass  # nothing is defined after the reply; ignore it

    def eof_received(self) -> bool:
        self.eof = True
        return False  # close the transport: the association is over

    def connection_lost(self, exc) -> None:
        a = self.assoc
        if exc is None and not a.closed:
            exc = SocksError(f"{a.label}: proxy closed the UDP association's control connection")
        a._shutdown(exc)


class SocksUdpAssociation:
    """One SOCKS5 UDP association: send to any destination, replies by callback.

    ``on_datagram(host, port, payload)`` gets the source as text by
    default; with ``packed=True`` it gets the address as the datagram
    carries it (packed bytes for an IP, a str for a domain), so a caller
    that matches replies to flows by packed address formats nothing.
    """

    __slots__ = (
        "label",
        "relay",
        "local",
        "stats",
        "last_error",
        "closed",
        "_loop",
        "_on_datagram",
        "_on_closed",
        "_ctrl",
        "_udp",
        "_headers",
        "_text",
    )

    def __init__(self, loop, label, on_datagram, on_closed, packed: bool = False):
        self._loop = loop
        self.label = label
        self._on_datagram = on_datagram
        self._on_closed = on_closed
        self._text = not packed
        self._ctrl = None
        self._udp = None
        self._headers: dict = {}
        self.relay = None  # (host, port) we send to
        self.local = None  # our UDP socket's address
        self.last_error = None
        self.closed = False
        self.stats = {
            "datagrams_out": 0,
            "bytes_out": 0,
            "datagrams_in": 0,
            "bytes_in": 0,
            "frag_dropped": 0,
            "malformed": 0,
            "send_dropped": 0,
            "errors": 0,
        }

    @classmethod
    async def open(
        cls,
        up: SocksUpstream,
        *,
        timeout: float,
        on_datagram: Callable[[str | bytes, int, bytes], None],
        on_closed: Callable[[BaseException | None], None] | None = None,
        packed: bool = False,
    ) -> "SocksUdpAssociation":
        loop = asyncio.get_running_loop()
        self = cls(loop, _label(up), on_datagram, on_closed, packed)
        ctrl = udp = None
        try:
            async with asyncio.timeout(timeout):
                ctrl = await open_tcp(up.host, up.port)
                # Tell the proxy where our datagrams will come from (RFC 1928
                # section 7): the control connection's local address and the
                # port of a UDP socket bound to it.
                local_ip = ctrl.getsockname()[0]
                udp = socket.socket(ctrl.family, socket.SOCK_DGRAM)
                udp.setblocking(False)
                udp.bind((local_ip, 0))
                client = socks_client(up, CMD_UDP_ASSOCIATE, local_ip, udp.getsockname()[1], target="relay")
                ev = await _handshake(loop, ctrl, client)
                fam, relay_ip, bnd_port = await self._relay_address(loop, ctrl, ev)
                self.relay = (relay_ip, bnd_port)
                sock, udp = udp, None  # the endpoint owns it from here on
                self._udp = await DatagramEndpoint.connect(fam, self.relay, sock=sock, on_datagram=self._datagram,
                                                           on_error=self._udp_error, on_lost=self._udp_lost)
                self.local = self._udp.local
                self._ctrl, _ = await loop.create_connection(lambda: _ControlProtocol(self), sock=ctrl)
                ctrl = None
        except BaseException:
            self.closed = True  # no on_closed for an association that never opened
            for t in (self._udp, self._ctrl):
                if t is not None:
                    t.close()
            for s in (ctrl, udp):
                if s is not None:
                    s.close()
            raise
        return self

    async def _relay_address(self, loop, ctrl, ev) -> tuple[int, str, int]:
        """(family, IP, port) of the relay a UDP ASSOCIATE reply names."""
        host, port = ev.bound_host, ev.bound_port
        if port == 0:
            raise SocksError(f"{self.label}: UDP ASSOCIATE reply names port 0 as the relay")
        if host.__class__ is str:  # a domain: resolve it (rare)
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            return infos[0][0], infos[0][4][0], port
        if not any(host):
            # 0.0.0.0 or ::, "use the address you reached me on"
            return ctrl.family, ctrl.getpeername()[0], port
        return (socket.AF_INET if len(host) == 4 else socket.AF_INET6), address_text(host), port

    # -- receive path

    def _datagram(self, data: bytes) -> None:
        st = self.stats
        verdict, host, port, off = parse_udp_header(data)
        if verdict is not UDP_OK:
            st["frag_dropped" if verdict is UDP_FRAGMENT else "malformed"] += 1
            return
        payload = data[off:]
        st["datagrams_in"] += 1
        st["bytes_in"] += len(payload)
        self._on_datagram(address_text(host) if self._text else host, port, payload)

    def _udp_error(self, exc) -> None:
        # ICMP errors on the connected socket (relay gone, ...): counted; the
        # control connection decides when the association ends.
        self.stats["errors"] += 1
        self.last_error = exc

    def _udp_lost(self, exc) -> None:
        if not self.closed:
            self._shutdown(exc or SocksError(f"{self.label}: UDP relay socket closed"))

    # -- send path

    def sendto(self, data: bytes, host, port: int) -> None:
        """Send one datagram to ``host:port`` through the relay.

        Dropped (and counted in ``send_dropped``) once closed, when too big
        for one datagram, or when the socket's write buffer is full.
        """
        if host.__class__ is not str and host.__class__ is not bytes:
            host = bytes(host)  # bytearray / memoryview: hashable key
        key = (host, port)
        hdr = self._headers.get(key)
        if hdr is None:
            hdr = build_udp_header(host, port)
            if len(self._headers) >= _HEADER_CACHE_MAX:
                self._headers.clear()
            self._headers[key] = hdr
        st = self.stats
        u = self._udp
        if self.closed or u is None or not u.send(hdr + data):
            st["send_dropped"] += 1
            return
        st["datagrams_out"] += 1
        st["bytes_out"] += len(data)

    # -- lifetime

    def close(self) -> None:
        """Close both sockets; ``on_closed(None)`` follows on the loop."""
        self._shutdown(None)

    def _shutdown(self, exc) -> None:
        if self.closed:
            return
        self.closed = True
        for t in (self._udp, self._ctrl):
            if t is not None:
                t.close()
        if self._on_closed is not None:
            self._loop.call_soon(self._on_closed, exc)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<SocksUdpAssociation {self.label} relay={self.relay} {state}>"
