"""SOCKS5 client: CONNECT and UDP ASSOCIATE (RFC 1928), user/password (RFC 1929).

The handshake runs on a non-blocking socket with ``loop.sock_*`` so the
same code serves plain asyncio and uvloop.  Every read takes exactly the
bytes of the message being parsed, so data the proxy sends right after its
reply stays in the socket for the data phase.

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
import errno
import socket
import struct
from collections.abc import Callable

from ._net import literal_family, open_tcp
from .url import SocksUpstream, format_hostport

__all__ = [
    "SocksError",
    "SocksUdpAssociation",
    "socks5_connect",
    "encode_address",
    "decode_address",
    "REPLY_MESSAGES",
]

VERSION = 5
METHOD_NO_AUTH = 0x00
METHOD_USER_PASS = 0x02
METHOD_NONE_ACCEPTABLE = 0xFF
CMD_CONNECT = 0x01
CMD_UDP_ASSOCIATE = 0x03
ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04

# RFC 1928 section 6.
REPLY_MESSAGES = {
    0x00: "succeeded",
    0x01: "general SOCKS server failure",
    0x02: "connection not allowed by ruleset",
    0x03: "network unreachable",
    0x04: "host unreachable",
    0x05: "connection refused",
    0x06: "TTL expired",
    0x07: "command not supported",
    0x08: "address type not supported",
}
# What a reply code means to the caller, as an errno (e.g. RST vs ICMP).
_REPLY_ERRNO = {
    0x02: errno.EACCES,
    0x03: errno.ENETUNREACH,
    0x04: errno.EHOSTUNREACH,
    0x05: errno.ECONNREFUSED,
    0x06: errno.ETIMEDOUT,
}

_PORT = struct.Struct("!H")
_UDP_MAX_PAYLOAD = 65535 - 8 - 40  # never more than an IPv6 UDP datagram can hold
_UDP_WRITE_BUFFER_LIMIT = 256 * 1024  # drop rather than queue beyond this
_HEADER_CACHE_MAX = 1024


class SocksError(ConnectionError):
    """The proxy refused or broke the SOCKS5 exchange.

    ``reply`` is the RFC 1928 reply code when the proxy sent one, else None
    (auth failure, early close, garbage).  ``errno`` is set for the reply
    codes that have a natural errno (refused, unreachable, ...).
    """

    def __init__(self, message: str, reply: int | None = None):
        super().__init__(message)
        self.reply = reply
        if reply is not None:
            self.errno = _REPLY_ERRNO.get(reply)
        self.strerror = message

    def __str__(self) -> str:
        return self.strerror


def reply_text(code: int) -> str:
    return f"reply {code} ({REPLY_MESSAGES.get(code, 'unassigned reply code')})"


# ---------------------------------------------------------------- addresses


def encode_address(host: str | bytes) -> bytes:
    """ATYP + address for a host: packed bytes (4 or 16), IP literal, or domain."""
    if isinstance(host, (bytes, bytearray, memoryview)):
        raw = bytes(host)
        if len(raw) == 4:
            return b"\x01" + raw
        if len(raw) == 16:
            return b"\x04" + raw
        raise ValueError(f"packed address must be 4 or 16 bytes, not {len(raw)}")
    if not isinstance(host, str):
        raise TypeError(f"host must be str or bytes, not {type(host).__name__}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    family = literal_family(host)
    if family == socket.AF_INET:
        return b"\x01" + socket.inet_pton(socket.AF_INET, host)
    if family == socket.AF_INET6:
        return b"\x04" + socket.inet_pton(socket.AF_INET6, host)
    try:
        name = host.encode("ascii") if host.isascii() else host.encode("idna")
    except UnicodeError:
        raise ValueError(f"host {host!r} is not a valid domain name") from None
    if not 1 <= len(name) <= 255:
        raise ValueError(f"domain name must be 1..255 bytes, not {len(name)}")
    return b"\x03" + bytes((len(name),)) + name


def encode_address_port(host: str | bytes, port: int) -> bytes:
    if not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port!r} out of range 0-65535")
    return encode_address(host) + _PORT.pack(port)


class _Truncated(Exception):
    """More bytes are needed (or, for a datagram, it is malformed)."""


def decode_address(buf, off: int) -> tuple[str, int, int]:
    """(host, port, end) for ATYP + ADDR + PORT at ``buf[off:]``.

    Raises _Truncated if the buffer ends early and ValueError for an
    unknown address type.
    """
    n = len(buf)
    if off >= n:
        raise _Truncated
    atyp = buf[off]
    if atyp == ATYP_IPV4:
        end = off + 7
        if end > n:
            raise _Truncated
        host = socket.inet_ntop(socket.AF_INET, bytes(buf[off + 1 : off + 5]))
    elif atyp == ATYP_IPV6:
        end = off + 19
        if end > n:
            raise _Truncated
        host = socket.inet_ntop(socket.AF_INET6, bytes(buf[off + 1 : off + 17]))
    elif atyp == ATYP_DOMAIN:
        if off + 1 >= n:
            raise _Truncated
        ln = buf[off + 1]
        end = off + 2 + ln + 2
        if end > n:
            raise _Truncated
        host = bytes(buf[off + 2 : off + 2 + ln]).decode("utf-8", "replace")
    else:
        raise ValueError(f"unknown address type {atyp}")
    return host, _PORT.unpack_from(buf, end - 2)[0], end


# ---------------------------------------------------------------- handshake


async def _recv_exact(loop, sock, n: int, label: str, what: str) -> bytes:
    buf = b""
    while len(buf) < n:
        try:
            chunk = await loop.sock_recv(sock, n - len(buf))
        except ConnectionError as exc:
            raise SocksError(f"{label}: connection lost {what} ({exc.strerror or exc})") from None
        if not chunk:
            raise SocksError(f"{label}: proxy closed the connection {what}")
        buf += chunk
    return buf


async def _negotiate(loop, sock, up: SocksUpstream, label: str) -> None:
    """Method selection (RFC 1928 section 3) and, if chosen, RFC 1929 auth."""
    has_creds = up.username is not None and up.password is not None
    if has_creds:
        await loop.sock_sendall(sock, bytes((VERSION, 2, METHOD_NO_AUTH, METHOD_USER_PASS)))
    else:
        await loop.sock_sendall(sock, bytes((VERSION, 1, METHOD_NO_AUTH)))
    ver, method = await _recv_exact(loop, sock, 2, label, "during method selection")
    if ver != VERSION:
        raise SocksError(f"{label}: not a SOCKS5 proxy (answered version {ver})")
    if method == METHOD_NO_AUTH:
        return
    if method == METHOD_NONE_ACCEPTABLE:
        if has_creds:
            raise SocksError(f"{label}: proxy accepts none of the offered methods (no-auth, user/password)")
        raise SocksError(f"{label}: proxy requires authentication (no acceptable method without credentials)")
    if method != METHOD_USER_PASS or not has_creds:
        raise SocksError(f"{label}: proxy chose method {method:#04x}, which was not offered")
    user = up.username.encode()
    pw = up.password.encode()
    if not (1 <= len(user) <= 255 and 1 <= len(pw) <= 255):
        raise ValueError("user name and password must be 1..255 bytes each (RFC 1929)")
    await loop.sock_sendall(sock, b"\x01" + bytes((len(user),)) + user + bytes((len(pw),)) + pw)
    _ver, status = await _recv_exact(loop, sock, 2, label, "during authentication")
    if status != 0:
        exc = SocksError(f"{label}: authentication failed for user {up.username!r} (status {status})")
        exc.errno = errno.EACCES
        raise exc


async def _request(loop, sock, cmd: int, addr_port: bytes, label: str, target: str) -> tuple[str, int]:
    """Send a request; return BND.ADDR, BND.PORT of a success reply."""
    what = "CONNECT" if cmd == CMD_CONNECT else "UDP ASSOCIATE"
    await loop.sock_sendall(sock, bytes((VERSION, cmd, 0)) + addr_port)
    # VER and REP first: some servers send just these two bytes on failure.
    ver, rep = await _recv_exact(loop, sock, 2, label, f"before the {what} reply")
    if ver != VERSION:
        raise SocksError(f"{label}: malformed {what} reply (version {ver})")
    if rep != 0:
        raise SocksError(f"{label}: {what} {target} failed: {reply_text(rep)}", reply=rep)
    head = await _recv_exact(loop, sock, 3, label, f"inside the {what} reply")
    _rsv, atyp, first = head
    if atyp == ATYP_IPV4:
        rest = 4 - 1 + 2
    elif atyp == ATYP_IPV6:
        rest = 16 - 1 + 2
    elif atyp == ATYP_DOMAIN:
        rest = first + 2
    else:
        raise SocksError(f"{label}: malformed {what} reply (address type {atyp})")
    tail = await _recv_exact(loop, sock, rest, label, f"inside the {what} reply")
    host, port, _end = decode_address(head[1:] + tail, 0)
    return host, port


def _label(up) -> str:
    return f"socks5 proxy {format_hostport(up.host, up.port)}"


def _target_text(host, port) -> str:
    if isinstance(host, (bytes, bytearray, memoryview)):
        raw = bytes(host)
        fam = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
        try:
            host = socket.inet_ntop(fam, raw)
        except (ValueError, OSError):
            host = raw.hex()
    return format_hostport(str(host), port)


async def socks5_connect(up: SocksUpstream, host, port: int, *, timeout: float,
                         bound: list | None = None) -> socket.socket:
    """Dial ``host:port`` through the proxy; return the socket for the data phase.

    ``host`` is an IP literal, a domain name (sent to the proxy as is) or a
    packed 4/16-byte address.  Raises SocksError, OSError or TimeoutError;
    the socket is closed on every failure (and on cancellation).  ``bound``,
    when given, receives the reply's (BND.ADDR, BND.PORT).
    """
    addr_port = encode_address_port(host, port)  # ValueError before any I/O
    loop = asyncio.get_running_loop()
    label = _label(up)
    sock = None
    try:
        async with asyncio.timeout(timeout):
            sock = await open_tcp(up.host, up.port)
            await _negotiate(loop, sock, up, label)
            bnd = await _request(loop, sock, CMD_CONNECT, addr_port, label, _target_text(host, port))
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    if bound is not None:
        bound.append(bnd)
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


class _RelayProtocol(asyncio.DatagramProtocol):
    __slots__ = ("assoc",)

    def __init__(self, assoc: "SocksUdpAssociation"):
        self.assoc = assoc

    def datagram_received(self, data: bytes, addr) -> None:
        self.assoc._datagram(data)

    def error_received(self, exc) -> None:
        # ICMP errors on the connected socket (relay gone, ...): counted; the
        # control connection decides when the association ends.
        self.assoc.stats["errors"] += 1
        self.assoc.last_error = exc

    def connection_lost(self, exc) -> None:
        a = self.assoc
        if not a.closed:
            a._shutdown(exc or SocksError(f"{a.label}: UDP relay socket closed"))


class SocksUdpAssociation:
    """One SOCKS5 UDP association: send to any destination, replies by callback."""

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
    )

    def __init__(self, loop, label, on_datagram, on_closed):
        self._loop = loop
        self.label = label
        self._on_datagram = on_datagram
        self._on_closed = on_closed
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
        on_datagram: Callable[[str, int, bytes], None],
        on_closed: Callable[[BaseException | None], None] | None = None,
    ) -> "SocksUdpAssociation":
        loop = asyncio.get_running_loop()
        label = _label(up)
        self = cls(loop, label, on_datagram, on_closed)
        ctrl = udp = None
        try:
            async with asyncio.timeout(timeout):
                ctrl = await open_tcp(up.host, up.port)
                await _negotiate(loop, ctrl, up, label)
                # Tell the proxy where our datagrams will come from (RFC 1928
                # section 7): the control connection's local address and the
                # port of a UDP socket bound to it.
                local_ip = ctrl.getsockname()[0]
                udp = socket.socket(ctrl.family, socket.SOCK_DGRAM)
                udp.setblocking(False)
                udp.bind((local_ip, 0))
                bnd_host, bnd_port = await _request(
                    loop, ctrl, CMD_UDP_ASSOCIATE, encode_address_port(local_ip, udp.getsockname()[1]),
                    label, "relay",
                )
                if bnd_port == 0:
                    raise SocksError(f"{label}: UDP ASSOCIATE reply names port 0 as the relay")
                fam = literal_family(bnd_host)
                if fam is None:  # a domain: resolve it (rare)
                    infos = await loop.getaddrinfo(bnd_host, bnd_port, type=socket.SOCK_DGRAM)
                    fam, relay_ip = infos[0][0], infos[0][4][0]
                else:
                    relay_ip = bnd_host
                    if relay_ip in ("0.0.0.0", "::"):
                        # "use the address you reached me on"
                        relay_ip = ctrl.getpeername()[0]
                        fam = ctrl.family
                if fam != udp.family:
                    udp.close()
                    udp = socket.socket(fam, socket.SOCK_DGRAM)
                    udp.setblocking(False)
                udp.connect((relay_ip, bnd_port))  # replies only from the relay
                self.relay = (relay_ip, bnd_port)
                self.local = udp.getsockname()[:2]
                self._udp, _ = await loop.create_datagram_endpoint(lambda: _RelayProtocol(self), sock=udp)
                udp = None  # owned by the transport now
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

    # -- receive path

    def _datagram(self, data: bytes) -> None:
        st = self.stats
        if len(data) < 4 or data[0] or data[1]:
            st["malformed"] += 1
            return
        if data[2]:
            st["frag_dropped"] += 1
            return
        try:
            host, port, end = decode_address(data, 3)
        except (_Truncated, ValueError):
            st["malformed"] += 1
            return
        payload = data[end:]
        st["datagrams_in"] += 1
        st["bytes_in"] += len(payload)
        self._on_datagram(host, port, payload)

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
            hdr = b"\x00\x00\x00" + encode_address_port(host, port)
            if len(self._headers) >= _HEADER_CACHE_MAX:
                self._headers.clear()
            self._headers[key] = hdr
        st = self.stats
        t = self._udp
        if self.closed or t is None or len(data) + len(hdr) > _UDP_MAX_PAYLOAD or (
            t.get_write_buffer_size() > _UDP_WRITE_BUFFER_LIMIT
        ):
            st["send_dropped"] += 1
            return
        t.sendto(hdr + data)
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
