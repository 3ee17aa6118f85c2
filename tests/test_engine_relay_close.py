"""How a TCP relay ends its upstream socket when the client's FIN arrives:
after the upstream's own EOF the socket is closed at once (the close sends
the FIN; no separate shutdown), before it the write side alone is shut."""

from __future__ import annotations

import types

from tun2xray import engine as eng


class _Transport:
    def __init__(self):
        self.calls = []

    def write(self, data):
        self.calls.append(("write", bytes(data)))

    def can_write_eof(self):
        return True

    def write_eof(self):
        self.calls.append(("write_eof",))

    def close(self):
        self.calls.append(("close",))


class _Conn:
    """The stack connection as pump_up reads it: the client sent ``data`` and its FIN."""

    def __init__(self, data=b""):
        self.closed = False
        self.eof = True
        self._data = data

    @property
    def readable(self):
        return bool(self._data)

    def read_buffer(self):
        data, self._data = self._data, b""
        return data

    def shutdown(self):
        pass


def _relay(conn):
    engine = types.SimpleNamespace(kick=lambda: None, _debug=False, _refused=lambda relay: False)
    relay = eng.TcpRelay(engine, conn, "socks5://127.0.0.1:1080")
    relay.transport = _Transport()
    return relay


def test_client_fin_after_upstream_eof_closes_the_socket_without_a_shutdown():
    relay = _relay(_Conn(b"last words"))
    t = relay.transport
    relay.eof_received()                 # the upstream's FIN came first
    relay.pump_up()                      # then the client's data and FIN
    assert t.calls == [("write", b"last words"), ("close",)]
    assert relay.transport is None and relay.eof_sent
    assert relay.fin_from == "upstream"
    relay.pump_up()                      # nothing more to do, nothing done twice
    assert t.calls == [("write", b"last words"), ("close",)]


def test_client_fin_first_half_closes_the_socket():
    relay = _relay(_Conn(b"request"))
    t = relay.transport
    relay.pump_up()
    assert t.calls == [("write", b"request"), ("write_eof",)]
    assert relay.transport is t and relay.fin_from == "client"
