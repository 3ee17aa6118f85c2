"""Performance-motivated TCP behaviour: zero-copy reads, no needless window
updates, one ACK per batch of in-order data."""

from helpers import Client
from netstack import events


def small(**kw):
    kw.setdefault("mtu", 1040)
    kw.setdefault("rcv_buf", 8000)
    kw.setdefault("mss", 1000)
    return Client(**kw)


def test_read_buffer_hands_over_the_buffer_and_opens_the_window_like_read():
    c = small()
    conn = c.request()
    conn.accept()
    c.recv("SA", wnd=8000)
    c.send()
    for ch in b"abcdefgh":
        c.send(bytes([ch]) * 1000)
    c.recv("A", wnd=0)
    old = conn.rcv_buf
    data = conn.read_buffer()
    assert data is old and isinstance(data, bytearray)          # no copy
    assert data == b"".join(bytes([ch]) * 1000 for ch in b"abcdefgh")
    assert conn.readable == 0 and conn.read_buffer() == bytearray()
    c.recv("A", wnd=8000)                    # window reopened: update, as read() sends
    data[:3] = b"xyz"                        # the caller owns it: the stack is unaffected
    c.send(b"i" * 10)
    assert c.take(events.TcpReadable)        # events re-armed by the read
    assert conn.read() == b"i" * 10


def test_no_pure_window_update_while_the_peer_holds_a_large_window():
    # 64 KB is all a SYN-ACK can offer; a read after a small request must not
    # cost a packet just to announce the larger buffer (the reply carries it)
    c = Client(mtu=1500, rcv_buf=1 << 20, mss=1460, ws=7)
    conn = c.request()
    conn.accept()
    c.recv("SA", wnd=65535)
    c.send()
    c.send(b"GET / HTTP/1.1\r\n\r\n")
    c.recv_none()
    assert conn.read() == b"GET / HTTP/1.1\r\n\r\n"
    c.recv_none()                            # no window update
    conn.write(b"HTTP/1.1 200 OK\r\n\r\n")
    s = c.recv("A", data=b"HTTP/1.1 200 OK\r\n\r\n")
    assert s.wnd << conn.rcv_wscale > 65535  # the reply raises the window


def test_one_ack_for_a_batch_of_in_order_segments():
    c = Client(mtu=1500, rcv_buf=1 << 20, mss=1460)
    conn = c.request()
    conn.accept()
    c.recv("SA")
    c.send()
    for i in range(40):                      # one device batch, no poll in between
        c.send(b"x" * 1460)
    c.recv("A")
    c.recv_none()
    assert conn.readable == 40 * 1460
