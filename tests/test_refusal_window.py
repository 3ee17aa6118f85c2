"""Honest closes (profile tcp_refusal_window): an upstream that accepts and
closes without sending a byte is a refusal (RST to the client) only when it
closes right after its CONNECT reply; later, the clean close reaches the
client as a FIN, and a simultaneous close (FINs crossing) ends without a RST.

Through the bridge with a real SOCKS5 server on loopback that answers
CONNECT with success and then closes after a delay (none, or 3 s), without data (as a
v2ray/Xray socks inbound does when its far dial is refused: at once; as a
server that has nothing to say does: later).
"""

from __future__ import annotations

import json
import socket
import threading

import pytest
from helpers import build_packet, tcp_options
from test_bridge import Host, addrs, wait_for

from tun2xray import bridge

FIN, RST = 0x01, 0x04


class SocksThenClose:
    """SOCKS5 (no auth): success reply to CONNECT, then close after `delay` s
    without sending a byte."""

    def __init__(self, delay: float):
        self.delay = delay
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._one, args=(c,), daemon=True).start()

    def _one(self, c):
        try:
            c.recv(3)
            c.sendall(b"\x05\x00")
            c.recv(262)                          # the request (CONNECT, or a health probe's)
            c.sendall(b"\x05\x00\x00\x01" + bytes(4) + b"\x00\x00")
        except OSError:
            return
        threading.Timer(self.delay, c.close).start()

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def hosts():
    made = []
    yield made
    for h in made:
        h.stop()


def _open(host, sport):
    src, dst = addrs(4)
    host.send(build_packet(4, src, dst, sport, 80, 1000, 0, "S", 65535, tcp_options(mss=1400)), 4)
    synack = host.expect_tcp(lambda s: s.dport == sport and s.flags & 0x12 == 0x12)
    rcv = synack.seq + 1
    host.send(build_packet(4, src, dst, sport, 80, 1001, rcv, "A", 65535), 4)
    return src, dst, rcv


def _closed(host, sport):
    return wait_for(lambda: [f for f in bridge.status(host.handle)["closed_flows"]
                             if f["src"].endswith(f":{sport}")], what=f"flow {sport} in the history")


def test_close_right_after_the_connect_reply_is_a_refusal(hosts):
    srv = SocksThenClose(0.0)
    try:
        host = Host(json.dumps({"proxy": f"socks5://127.0.0.1:{srv.port}", "tcp_refusal_window": 1.5}))
        hosts.append(host)
        _open(host, 47000)
        seg = host.expect_tcp(lambda s: s.dport == 47000 and s.flags & (FIN | RST))
        assert seg.flags & RST, f"flags {seg.flags:#x}: a refused destination must reset the client"
        [f] = _closed(host, 47000)
        assert f["reason"] == "upstream refused", f
    finally:
        srv.close()


def test_clean_close_after_the_window_is_a_fin_and_a_simultaneous_close_has_no_rst(hosts):
    srv = SocksThenClose(3.0)
    try:
        host = Host(json.dumps({"proxy": f"socks5://127.0.0.1:{srv.port}", "tcp_refusal_window": 1.5}))
        hosts.append(host)
        src, dst, rcv = _open(host, 47001)
        fin = host.expect_tcp(lambda s: s.dport == 47001 and s.flags & (FIN | RST))
        assert not fin.flags & RST and fin.flags & FIN, f"flags {fin.flags:#x}: a clean close must be a FIN"
        assert fin.seq == rcv
        # the client's FIN crosses ours: it does not ack our FIN yet ...
        host.send(build_packet(4, src, dst, 47001, 80, 1001, rcv, "FA", 65535), 4)
        # ... then acks it
        host.send(build_packet(4, src, dst, 47001, 80, 1002, rcv + 1, "A", 65535), 4)
        ack = host.expect_tcp(lambda s: s.dport == 47001)
        assert not ack.flags & RST, f"flags {ack.flags:#x}: the crossing close was answered with a RST"
        assert ack.flags & 0x10 and ack.ack == 1002, (ack.flags, ack.ack)
        [f] = _closed(host, 47001)
        assert f["reason"] == "upstream closed" and f["bytes_down"] == 0, f
        with pytest.raises(AssertionError, match="no packet"):
            host.expect_tcp(lambda s: s.dport == 47001 and s.flags & RST, timeout=1.0)
    finally:
        srv.close()

