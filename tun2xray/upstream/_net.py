"""Small socket helpers shared by the dialers (asyncio and uvloop alike)."""

from __future__ import annotations

import asyncio
import socket

__all__ = ["literal_family", "open_tcp", "resolve"]


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
