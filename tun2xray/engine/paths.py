"""What a mobile host tells the engine about its network and its sleep
(NEPacketTunnelProvider's path updates and sleep()/wake(), Android's
network callbacks): flows whose upstream socket died are reset at once
rather than left to hang, and a sleeping engine arms no timers.

Plain functions over an Engine; call them on the engine's loop.
"""

from __future__ import annotations

import socket
import struct

from .relay import TcpRelay

__all__ = ["reset_stale", "sleep", "wake"]

_TCP_ESTABLISHED = 1           # tcp_info.tcpi_state (linux/tcp_states.h)
_TCP_CLOSE_WAIT = 8
_TCP_INFO = getattr(socket, "TCP_INFO", None)


def _socket_dead(sock, gone: dict) -> bool:
    """Is this upstream socket beyond use: a pending error, a TCP state other
    than ESTABLISHED/CLOSE_WAIT, or a local address no longer on this host
    (the network it was opened on went away)?"""
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            return True
        if _TCP_INFO is not None and sock.type == socket.SOCK_STREAM:
            state = struct.unpack_from("B", sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 8))[0]
            if state not in (_TCP_ESTABLISHED, _TCP_CLOSE_WAIT):
                return True
        local = sock.getsockname()[0]
    except OSError:
        return True
    if local not in gone:
        gone[local] = not _address_present(sock.family, local)
    return gone[local]


def _address_present(family: int, address: str) -> bool:
    """Can a new socket still bind this local address?  EADDRNOTAVAIL says
    the interface that held it is gone."""
    probe = socket.socket(family, socket.SOCK_DGRAM)
    try:
        probe.bind((address, 0))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _transport_dead(transport, gone: dict) -> bool:
    if transport is None:
        return False
    if transport.is_closing():
        return True
    sock = transport.get_extra_info("socket")
    return sock is not None and _socket_dead(sock, gone)


def reset_stale(engine) -> int:
    """Reset the flows whose upstream socket is dead (RST to TCP clients, UDP
    flows dropped with their association); returns how many."""
    gone: dict = {}
    n = 0
    stack = engine.stack
    for conn in list(stack.tcp.values()):
        relay = conn.user
        if isinstance(relay, TcpRelay) and not conn.closed and _transport_dead(relay.transport, gone):
            relay.close()
            engine._why[conn] = ("upstream socket dead after a network change", None)
            conn.abort()
            n += 1
    dead_assocs = [a for a in engine._assocs.values()
                   if a.assoc is not None and _transport_dead(getattr(a.assoc, "_ctrl", None), gone)]
    for a in dead_assocs:
        for flow in list(a.flows):
            engine._udp_release(flow)
            if not flow.closed:
                engine._why[flow] = ("upstream association dead after a network change", None)
                flow.close()
                n += 1
    engine.counters["flows_reset_stale"] += n
    if n:
        engine.kick()
    return n


def sleep(engine) -> None:
    """The device sleeps: cancel the stack's timer and arm no new one (no
    retransmissions, keepalives or timeouts send anything) until wake()."""
    engine.asleep = True
    if engine._timer is not None:
        engine._timer.cancel()
        engine._timer = engine._timer_at = None


def wake(engine) -> int:
    """The device woke: reset the flows that died meanwhile, then let the
    stack's timers run again (overdue ones fire at once); returns how many
    flows were reset."""
    engine.asleep = False
    n = reset_stale(engine)
    engine._service()
    return n
