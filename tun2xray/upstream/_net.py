"""Small socket helpers shared by the dialers (asyncio and uvloop alike)."""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import logging
import socket
import threading

__all__ = ["ProtectError", "literal_family", "needs_protect", "open_tcp", "protect", "resolve",
           "set_thread_protect"]

# -------------------------------------------------------------------- protect
# A host that routes all traffic into its own tunnel (Android VpnService) must
# exempt the engine's sockets to non-loopback addresses before they connect
# (VpnService.protect).  The hook is per thread: an engine and everything it
# dials run on one loop thread, so several engines in one process (the
# bridge's handles) each see their own host's hook.

_protect = threading.local()
log = logging.getLogger("tun2xray.upstream")


class ProtectError(OSError):
    """The host's protect hook refused a socket: that dial fails."""


def set_thread_protect(fn, counters: dict | None = None) -> None:
    """fn(fd) -> bool for sockets the calling thread opens toward a
    non-loopback address; None removes it.  ``counters`` (a dict with
    "protect_calls" and "protect_failed") counts the calls and refusals."""
    _protect.fn = fn
    _protect.counters = counters


@functools.lru_cache(maxsize=256)
def _loopback(host: str) -> bool:
    # cached: asked once per dial with a protect hook (the proxy's few addresses)
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def needs_protect(host: str) -> bool:
    """Would a dial to ``host`` (a literal or a name) from this thread go
    through the protect hook?  Literal loopback addresses never do."""
    return getattr(_protect, "fn", None) is not None and not _loopback(host)


def protect(sock: socket.socket, host: str) -> None:
    """Pass ``sock`` to this thread's protect hook before it connects to the
    address literal ``host``; raises ProtectError when the hook refuses it."""
    fn = getattr(_protect, "fn", None)
    if fn is None or _loopback(host):
        return
    counters = _protect.counters
    if counters is not None:
        counters["protect_calls"] += 1
    try:
        ok = bool(fn(sock.fileno()))
    except Exception as e:      # the host's code: its failure refuses the dial
        log.warning("protect(%d) raised %r: the dial to %s fails", sock.fileno(), e, host)
        ok = False
    if not ok:
        if counters is not None:
            counters["protect_failed"] += 1
        raise ProtectError(errno.EACCES, f"the host's protect() refused the socket to {host}")


def literal_family(host: str) -> int | None:
    """AF_INET / AF_INET6 when ``host`` is an IP literal, else None."""
    try:
        socket.inet_pton(socket.AF_INET, host)
        return socket.AF_INET
    except OSError:
        pass
    try:
        socket.inet_pton(socket.AF_INET6, host)
        return socket.AF_INET6
    except OSError:
        return None


async def resolve(host: str, port: int, socktype: int) -> list[tuple[int, tuple]]:
    """(family, sockaddr) candidates; IP literals skip the resolver thread."""
    family = literal_family(host)
    if family == socket.AF_INET:
        return [(family, (host, port))]
    if family == socket.AF_INET6:
        return [(family, (host, port, 0, 0))]
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socktype)
    if not infos:
        raise OSError(f"{host}: no addresses")
    return [(fam, addr) for fam, _t, _p, _c, addr in infos]


async def open_tcp(host: str, port: int) -> socket.socket:
    """A connected, non-blocking TCP socket with TCP_NODELAY.

    Tries each resolved address in turn; the caller bounds the time.
    Never leaks a socket: on any failure (cancellation included) the
    socket being tried is closed before the exception propagates.
    """
    loop = asyncio.get_running_loop()
    last: OSError | None = None
    for family, addr in await resolve(host, port, socket.SOCK_STREAM):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            protect(sock, addr[0])
            await loop.sock_connect(sock, addr)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
        except BaseException:
            sock.close()
            raise
    assert last is not None
    raise last


UDP_MAX_PAYLOAD = 65535 - 8 - 40       # never more than an IPv6 UDP datagram can hold
UDP_WRITE_BUFFER_LIMIT = 256 * 1024    # drop rather than queue beyond this


class DatagramEndpoint(asyncio.DatagramProtocol):
    """The lifetime of one connected UDP socket on the loop, shared by the
    SOCKS relay socket and the dokodemo flows.

    ``open`` takes ownership of the socket (it is closed if opening fails);
    ``send`` drops (returns False) once closed, when the datagram cannot fit
    or when the write buffer is backed up; ``close`` is idempotent.  The
    owner's callbacks: ``on_datagram(data)``, ``on_error(exc)`` (an ICMP
    error on the connected socket: not fatal for UDP) and ``on_lost(exc)``
    (the transport is gone, by ``close`` or otherwise)."""

    __slots__ = ("transport", "closed", "local", "_on_datagram", "_on_error", "_on_lost")

    def __init__(self, on_datagram, on_error, on_lost):
        self.transport = None
        self.local = None
        self.closed = False
        self._on_datagram = on_datagram
        self._on_error = on_error
        self._on_lost = on_lost

    @classmethod
    async def connect(cls, family: int, addr, *, sock: socket.socket | None = None,
                      on_datagram, on_error, on_lost) -> "DatagramEndpoint":
        """Connect ``sock`` (a UDP socket already bound, when its family
        fits) or a new socket of ``family`` to ``addr`` and serve it."""
        if sock is not None and sock.family != family:
            sock.close()
            sock = None
        if sock is None:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            protect(sock, addr[0])
            sock.connect(addr)   # datagrams only from addr
        except BaseException:
            sock.close()
            raise
        return await cls.open(sock, on_datagram=on_datagram, on_error=on_error, on_lost=on_lost)

    @classmethod
    async def open(cls, sock: socket.socket, *, on_datagram, on_error, on_lost) -> "DatagramEndpoint":
        self = cls(on_datagram, on_error, on_lost)
        try:
            self.local = sock.getsockname()[:2]
            await asyncio.get_running_loop().create_datagram_endpoint(lambda: self, sock=sock)
        except BaseException:
            self.closed = True
            sock.close()
            raise
        return self

    # asyncio.DatagramProtocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self._on_datagram(data)

    def error_received(self, exc) -> None:
        self._on_error(exc)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._on_lost(exc)

    # owner side
    def send(self, data) -> bool:
        t = self.transport
        if self.closed or t is None or len(data) > UDP_MAX_PAYLOAD or (
                t.get_write_buffer_size() > UDP_WRITE_BUFFER_LIMIT):
            return False
        t.sendto(data)
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
