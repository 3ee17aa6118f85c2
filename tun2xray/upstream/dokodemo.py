"""dokodemo-door dialers: a raw TCP stream or raw datagrams to a fixed target.

The inbound's target is set in the Xray config, so there is no handshake:
TCP is a plain connection, UDP is one connected socket per flow (the
inbound tells flows apart by our source port).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from ._net import DatagramEndpoint, open_tcp, resolve
from .url import DokodemoUpstream, format_hostport

__all__ = ["dokodemo_connect", "DokodemoUdp"]

async def dokodemo_connect(up: DokodemoUpstream, *, timeout: float) -> socket.socket:
    """A connected, non-blocking TCP socket (TCP_NODELAY) to the inbound.

    Raises OSError or TimeoutError; never leaks the socket.
    """
    async with asyncio.timeout(timeout):
        return await open_tcp(up.host, up.port)


class DokodemoUdp:
    """One UDP flow to a dokodemo-door inbound."""

    __slots__ = ("label", "stats", "last_error", "closed", "local", "_loop", "_t", "_on_datagram", "_on_closed")

    def __init__(self, loop, label, on_datagram, on_closed):
        self._loop = loop
        self.label = label
        self._on_datagram = on_datagram
        self._on_closed = on_closed
        self._t = None
        self.local = None
        self.last_error = None
        self.closed = False
        self.stats = {
            "datagrams_out": 0,
            "bytes_out": 0,
            "datagrams_in": 0,
            "bytes_in": 0,
            "send_dropped": 0,
            "errors": 0,
        }

    @classmethod
    async def open(
        cls,
        up: DokodemoUpstream,
        *,
        on_datagram: Callable[[bytes], None],
        on_closed: Callable[[BaseException | None], None] | None = None,
    ) -> "DokodemoUdp":
        loop = asyncio.get_running_loop()
        self = cls(loop, f"dokodemo {format_hostport(up.host, up.port)}", on_datagram, on_closed)
        family, addr = (await resolve(up.host, up.port, socket.SOCK_DGRAM))[0]
        try:
            self._t = await DatagramEndpoint.connect(family, addr, on_datagram=self._datagram,
                                                     on_error=self._error, on_lost=self._shutdown)
        except BaseException:
            self.closed = True
            raise
        self.local = self._t.local
        return self

    def _datagram(self, data: bytes) -> None:
        st = self.stats
        st["datagrams_in"] += 1
        st["bytes_in"] += len(data)
        self._on_datagram(data)

    def _error(self, exc) -> None:
        # e.g. ECONNREFUSED when nothing listens: counted, not fatal (UDP).
        self.stats["errors"] += 1
        self.last_error = exc

    def send(self, data: bytes) -> None:
        """Send one datagram; dropped and counted once closed, oversized or backed up."""
        if self.closed or not self._t.send(data):
            self.stats["send_dropped"] += 1
            return
        self.stats["datagrams_out"] += 1
        self.stats["bytes_out"] += len(data)

    def close(self) -> None:
        """Close the socket; ``on_closed(None)`` follows on the loop."""
        self._shutdown(None)

    def _shutdown(self, exc) -> None:
        if self.closed:
            return
        self.closed = True
        if self._t is not None:
            self._t.close()
        if self._on_closed is not None:
            self._loop.call_soon(self._on_closed, exc)

    def __repr__(self) -> str:
        return f"<DokodemoUdp {self.label} local={self.local} {'closed' if self.closed else 'open'}>"
