"""TCP flow control both ways, delayed ACKs, zero window and persist probes, SWS, GSO."""

import pytest

from helpers import Client
from netstack import events
from netstack.tcp import GsoSegment


def small(**kw):
    # rcv_mss 1000 (mtu 1040), 8000-byte receive buffer, no window scaling
    kw.setdefault("mtu", 1040)
    kw.setdefault("rcv_buf", 8000)
    kw.setdefault("mss", 1000)
    return Client(**kw)


def test_window_shrinks_with_unread_data_and_opens_on_read():
    c = small()
    conn = c.request()
    conn.accept()
    c.recv("SA", wnd=8000)
    c.send()
    c.send(b"a" * 1000)
    c.send(b"b" * 1000)
    c.recv("A", wnd=6000)                     # two full segments: ACK at the next poll
    for i in range(6):
        c.send(b"c" * 1000)
    c.recv("A", wnd=0)
    assert conn.readable == 8000
    # beyond the (zero) window: dropped, answered with an ACK
    c.send(b"d", advance=False)
    c.recv("A", wnd=0)
    assert c.stack.tcp_drops["out_of_window"] == 1 and conn.readable == 8000
    # reading 1000 opens it by less than min(2*MSS, buf/2): no update (SWS avoidance)
    assert conn.read(1000) == b"a" * 1000
    c.recv_none()
    conn.read(1000)
    c.recv("A", wnd=2000)                     # opened by 2*MSS: window update
    c.send(b"e" * 2000)
    assert conn.readable == 8000
    assert conn.read() == b"c" * 6000 + b"e" * 2000


def test_window_never_shrinks_right_edge():
    c = small()
    c.handshake()
    c.send(b"x" * 500)
    c.poll(0.05)
    s = c.recv("A")
    assert s.wnd == 7500                      # right edge unchanged: 500 in, 500 less window


def test_lone_segment_delayed_ack_and_piggyback():
    c = small()
    conn = c.handshake()
    c.send(b"hi")
    c.recv_none()                             # no flush owed for a lone small segment
    assert conn.read() == b"hi"
    c.recv_none()
    c.poll(0.039)
    c.recv_none()
    c.poll(0.002)
    c.recv("A")                               # the 40 ms delayed-ACK timer
    c.send(b"again")
    conn.write(b"reply")                       # the reply carries the ACK
    c.recv("A", data=b"reply")
    c.poll(0.1)
    c.recv_none()


def test_batch_gets_one_ack():
    c = small(rcv_buf=1 << 20, ws=0)
    conn = c.handshake()
    for i in range(10):
        c.send(b"z" * 1000)
    c.recv("A")
    c.recv_none()
    assert conn.readable == 10000


def test_we_respect_the_client_window():
    c = small(wnd=3000)
    conn = c.handshake()
    conn.write(b"q" * 10000)
    for _ in range(3):
        c.recv("A", length=1000)
    c.recv_none()
    c.send()                                   # acks all three, window 3000 again
    for _ in range(3):
        c.recv("A", length=1000)
    c.recv_none()


def test_sender_sws_avoidance_no_tiny_segments():
    c = small(wnd=1500)
    conn = c.handshake()
    conn.write(b"q" * 5000)
    c.recv("A", length=1000)
    c.recv_none()                              # 500 usable < MSS and < max window/2
    c.send()
    c.recv("A", length=1000)
    c.recv_none()


def test_zero_window_persist_probes_back_off_then_data_flows():
    c = small(wnd=0, min_rto=0.2)
    conn = c.handshake()
    assert conn.write(b"p" * 3000) == 3000
    c.recv_none()
    c.poll(0.21)
    c.recv("A", length=0, seq=c.rcv - 1)       # zero-window probe: one below snd_una
    c.send()                                   # still zero
    c.poll(0.21)
    c.recv_none()                              # backed off
    c.poll(0.3)
    c.recv("A", length=0, seq=c.rcv - 1)
    c.send(wnd=2000)                          # window opens
    c.recv("A", length=1000)
    c.recv("A", length=1000)
    c.recv_none()
    assert conn.snd_nxt == c.rcv and (conn.snd_nxt - conn.snd_una) & 0xFFFFFFFF == 2000
    assert conn.send_queued == 3000            # 1000 still waits for window


def test_persist_gives_up_when_the_peer_is_silent():
    c = small(wnd=0, max_retries=3)
    conn = c.handshake()
    conn.write(b"p")
    c.run_until(200)
    segs = c.drain()
    assert [s.f for s in segs] == ["A", "A", "A", "RA"]
    assert c.closed_reasons() == ["timeout"]


def test_writable_after_short_write():
    c = small(snd_buf=4000)
    conn = c.handshake()
    assert conn.write(b"w" * 10000) == 4000 and conn.send_space == 0
    assert conn.write(b"w") == 0
    segs = c.drain()
    assert sum(len(s.payload) for s in segs) == 4000
    c.rcv += 4000
    c.send()
    assert [type(e) for e in c.take()] == [events.TcpWritable]
    assert conn.send_space == 4000


@pytest.mark.parametrize("family", [4, 6])
def test_gso_super_segments(family):
    c = Client(family=family, gso_max=60000, mss=1460, ws=7, snd_buf=1 << 20, wnd=65535)
    conn = c.handshake()
    c.send(wnd=65535)
    conn.write(b"g" * 50000)
    seg = c.recv("A", length=10 * conn._seg)   # initial cwnd is 10 segments
    raw = seg.raw_obj
    assert isinstance(raw, GsoSegment) and raw.gso_size == conn._seg
    c.send()
    big = c.recv("A")
    assert len(big.payload) > 10 * conn._seg


def test_gso_inbound_super_segment_accepted():
    c = Client(ws=7)
    conn = c.handshake()
    c.send(b"s" * 60000)
    assert conn.read() == b"s" * 60000
    c.recv("A")


def test_mss_segmentation_without_gso():
    c = Client(mss=1000, ts=True)
    conn = c.handshake()
    conn.write(b"m" * 3000)
    for n in (988, 988, 988, 36):              # 1000 - 12 bytes of timestamp option
        c.recv("A", length=n)


@pytest.mark.parametrize("family,ts", [(4, False), (4, True), (6, False), (6, True)])
def test_sack_blocks_never_push_a_segment_over_the_mtu(family, ts):
    c = Client(family=family, mss=9000, sack=True, ts=ts, ws=7)
    conn = c.handshake()
    for k in range(5):                          # five holes: as many SACK blocks as fit
        c.send(b"o" * 10, seq=c.seq + 100 * (k + 1), advance=False)
    c.drain()
    conn.write(b"d" * 20000)
    segs = c.drain()
    assert segs and all(s.opts.sack for s in segs)
    assert all(len(s.raw) <= 1500 for s in segs)
    assert max(len(s.raw) for s in segs) == 1500          # and still full-sized


def test_window_shrunk_to_zero_over_data_in_flight():
    c = small(max_retries=3, wnd=4000)
    conn = c.handshake()
    conn.write(b"f" * 3000)
    segs = c.drain()
    assert len(segs) == 3
    c.rcv = (segs[0].seq + 1000) & 0xFFFFFFFF
    c.send(wnd=0)                               # acks one segment, window closed over the rest
    for _ in range(6):                          # keeps probing as long as the peer answers
        c.run_until(c.now + conn.rto + 0.001)
        probe = c.drain()
        assert [s.seq for s in probe] == [c.rcv] and len(probe[0].payload) == 1000
        c.send(wnd=0)
    assert not conn.closed
    c.send(wnd=4000)                            # opens: the rest flows again
    c.run_until(c.now + conn.rto + 0.001)
    got = c.drain()
    assert got and got[0].seq == c.rcv
    c.rcv = (c.rcv + 2000) & 0xFFFFFFFF
    c.send()
    assert conn.snd_una == conn.snd_max


def test_window_shrunk_peer_silent_gives_up():
    c = small(max_retries=3, wnd=4000)
    conn = c.handshake()
    conn.write(b"f" * 3000)
    segs = c.drain()
    c.rcv = (segs[0].seq + 1000) & 0xFFFFFFFF
    c.send(wnd=0)
    c.run_until(c.now + 1000)
    assert c.closed_reasons() == ["timeout"]
