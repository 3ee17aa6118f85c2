"""TCP conversations: handshake, accept/reject, data both ways, orderly close."""

import pytest

from helpers import ACK, FIN, RST, SYN, Client, M
from netstack import events
from netstack.tcp import TcpError


@pytest.mark.parametrize("family", [4, 6])
def test_handshake_data_close(family):
    c = Client(family=family, ws=7, sack=True, ts=True)
    conn = c.request()
    assert conn.state == "LISTEN" and c.stack.pending == 1
    assert (conn.family, conn.dport, conn.sport) == (family, 80, 40000)
    c.recv_none()                                # nothing before accept()
    conn.accept()
    assert c.stack.pending == 0
    hdr = 40 if family == 4 else 60
    c.recv("SA", ack=c.isn + 1, mss=1500 - hdr, wscale=5, sack_perm=True, ts=1)
    c.send()
    assert conn.state == "ESTABLISHED"
    c.send(b"hello")
    assert [type(e) for e in c.take()] == [events.TcpReadable]
    assert conn.readable == 5 and conn.read() == b"hello" and conn.bytes_in == 5
    assert conn.write(b"world") == 5
    c.recv("A", data=b"world", psh=True)          # the reply carries the ACK for "hello"
    c.send()
    # client closes first: CLOSE_WAIT, then our FIN, LAST_ACK, CLOSED without TIME_WAIT
    c.send(flags="FA")
    assert conn.state == "CLOSE_WAIT"
    assert [type(e) for e in c.take()] == [events.TcpReadable] and conn.eof
    c.recv("A")
    conn.shutdown()
    assert conn.state == "LAST_ACK"
    c.recv("FA")
    c.send()
    assert conn.state == "CLOSED" and conn.closed
    assert c.closed_reasons() == ["closed"]
    assert c.stack.tcp == {}


def test_we_close_first_time_wait():
    c = Client(time_wait=2.0)
    conn = c.handshake()
    conn.shutdown()
    assert conn.state == "FIN_WAIT_1"
    c.recv("FA")
    c.send()
    assert conn.state == "FIN_WAIT_2"
    c.send(flags="FA")
    assert conn.state == "TIME_WAIT"
    c.recv("A")
    c.poll(1.9)
    assert c.closed_reasons() == []
    c.poll(0.2)
    assert c.closed_reasons() == ["closed"] and c.stack.tcp == {}


def test_reject_rst():
    c = Client()
    conn = c.request()
    conn.reject("rst")
    c.recv("RA", seq=0, ack=c.isn + 1)
    assert c.closed_reasons() == ["rejected"] and c.stack.pending == 0 and c.stack.tcp == {}
    with pytest.raises(TcpError):
        conn.accept()


def test_syn_to_no_flow_with_ack_gets_rst():
    c = Client()
    c.rcv = 5000
    c.send(b"x", seq=1234, ack=777)
    s = c.recv("R", seq=777, ack=False)
    assert s.flags == RST
    assert c.stack.drops["tcp_no_flow"] == 1
