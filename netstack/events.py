"""Flow events the Stack hands to its host (drained with Stack.take_events()).

Events are edge-triggered notices; the data itself is read from / written
to the handle (TcpConnection, UdpFlow) that each event carries.
"""

from __future__ import annotations


class Event:
    __slots__ = ()

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"{type(self).__name__}({fields})"


class TcpConnectRequest(Event):
    """A SYN for a new flow.  The host answers with conn.accept() (a SYN-ACK
    is sent) or conn.reject(how).  Nothing is sent to the client before."""
    __slots__ = ("conn",)

    def __init__(self, conn):
        self.conn = conn


class TcpReadable(Event):
    """New in-order bytes (or the peer's FIN: conn.eof) are ready for conn.read().
    Raised once until the host reads again."""
    __slots__ = ("conn",)

    def __init__(self, conn):
        self.conn = conn


class TcpWritable(Event):
    """Send-buffer space opened after a conn.write() that was cut short."""
    __slots__ = ("conn",)

    def __init__(self, conn):
        self.conn = conn


class TcpClosed(Event):
    """The connection is gone from the stack; the handle is dead.
    reason: "closed" (orderly both ways), "reset" (peer RST), "timeout"
    (retransmissions/keepalive/connect), "aborted" (host abort()),
    "rejected" (host reject())."""
    __slots__ = ("conn", "reason")

    def __init__(self, conn, reason: str):
        self.conn = conn
        self.reason = reason


class UdpDatagram(Event):
    """A datagram from the client; new is True for the first one of a flow."""
    __slots__ = ("flow", "data", "new")

    def __init__(self, flow, data: bytes, new: bool):
        self.flow = flow
        self.data = data
        self.new = new


class UdpClosed(Event):
    """The UDP flow is gone: reason "idle", "closed" (host) or "rejected"."""
    __slots__ = ("flow", "reason")

    def __init__(self, flow, reason: str):
        self.flow = flow
        self.reason = reason
