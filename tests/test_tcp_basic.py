"""TCP conversations: handshake, accept/reject, data both ways, orderly close."""

import pytest

from helpers import RST, Client, M
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


# ------------------------------------------------------------------ handshake

def _rec_stack(**cfg):
    """A Stack subclass recording icmp_unreachable calls (the stack owner builds the packet)."""
    import random
    from netstack import Stack, StackConfig

    class _S(Stack):
        __slots__ = ("icmp_calls",)

        def icmp_unreachable(self, quote, kind):
            self.icmp_calls.append((bytes(quote), kind))

    s = _S(StackConfig(**cfg), rng=random.Random(3))
    s.icmp_calls = []
    return s


@pytest.mark.parametrize("how,kind", [("icmp-port", "port"), ("icmp-host", "host"),
                                      ("icmp-net", "net"), ("icmp-admin", "admin")])
@pytest.mark.parametrize("family", [4, 6])
def test_reject_icmp_quotes_the_syn(how, kind, family):
    st = _rec_stack()
    c = Client(st, family=family)
    syn = c.packet("S")
    c.seq = c.isn
    c.inject(syn)
    conn = c.take(events.TcpConnectRequest)[0].conn
    conn.reject(how)
    c.recv_none()
    hl = 20 if family == 4 else 40
    assert st.icmp_calls == [(syn[:hl + 8], kind)]
    assert c.closed_reasons() == ["rejected"] and st.pending == 0


def test_reject_drop_is_silent_and_bad_kind_is_an_error():
    st = _rec_stack()
    c = Client(st)
    conn = c.request()
    with pytest.raises(ValueError):
        conn.reject("bogus")
    conn.reject("drop")
    c.recv_none()
    assert st.icmp_calls == [] and c.closed_reasons() == ["rejected"]


def test_mss_clamped_to_mtu_and_defaults():
    # client offers a bigger MSS than our MTU allows: we send at most mtu-40
    c = Client(mss=9000, mtu=1400)
    conn = c.handshake()
    assert conn.snd_mss == 1360
    conn.write(b"z" * 3000)
    c.recv("A", length=1360)
    c.recv("A", length=1360)
    c.recv("A", length=280)
    # no MSS option: 536 (IPv4) / 1220 (IPv6); no wscale, no sack, no ts in the SYN-ACK
    for fam, dflt in ((4, 536), (6, 1220)):
        c = Client(family=fam, mss=None)
        conn = c.request()
        conn.accept()
        s = c.recv("SA", wscale=False, sack_perm=False, ts=False)
        assert s.opts.mss == (1460 if fam == 4 else 1440)
        assert conn.snd_mss == dflt
        assert s.wnd == 65535


def test_window_scale_fits_rcv_buf():
    for rcv_buf, shift in ((65535, 0), (1 << 20, 5), (1 << 30, 14), (100000, 1)):
        c = Client(ws=2, rcv_buf=rcv_buf)
        conn = c.request()
        conn.accept()
        c.recv("SA", wscale=shift)
        c.send()
        assert conn.rcv_wscale == shift and conn.snd_wscale == 2
        conn.write(b"a")
        s = c.recv("A")
        assert s.wnd == min(65535, rcv_buf >> shift)


def test_duplicate_syn_while_pending_is_absorbed_and_after_accept_resends_synack():
    c = Client()
    conn = c.request()
    c.seq = c.isn
    c.syn()
    c.seq = c.isn
    c.syn()
    assert c.take() == [] and c.stack.tcp_drops["dup_syn"] == 2 and c.stack.pending == 1
    c.recv_none()
    conn.accept()
    first = c.recv("SA")
    c.seq = c.isn
    c.syn()                                    # the SYN-ACK was lost: answer again at once
    again = c.recv("SA")
    assert again.seq == first.seq
    c.send()
    assert conn.state == "ESTABLISHED"


def test_connect_timeout_resets_the_client():
    c = Client(connect_timeout=5.0)
    conn = c.request()
    c.poll(4.9)
    c.recv_none()
    c.poll(0.2)
    c.recv("RA", seq=0, ack=c.isn + 1)
    assert c.closed_reasons() == ["timeout"] and c.stack.pending == 0 and conn.closed


def test_client_rst_while_pending():
    c = Client()
    conn = c.request()
    c.send(flags="R", seq=c.isn + 1, ack=0)
    assert c.closed_reasons() == ["reset"] and c.stack.pending == 0 and conn.closed
    c.recv_none()


def test_max_pending_bounds_requests():
    c = Client(max_pending=2)
    c.request()
    c2 = Client(c.stack, client=("10.0.0.3", 1))
    c2.request()
    c3 = Client(c.stack, client=("10.0.0.4", 1))
    c3.syn()
    assert c3.take() == [] and c.stack.drops["tcp_backlog_full"] == 1 and c.stack.pending == 2


def test_synack_retransmitted_with_backoff_then_timeout():
    c = Client(max_retries=2)
    conn = c.request()
    conn.accept()
    a = c.recv("SA")
    c.poll(0.99)
    c.recv_none()
    c.poll(0.02)                               # initial RTO 1 s
    assert c.recv("SA").seq == a.seq
    c.poll(1.9)
    c.recv_none()
    c.poll(0.11)                               # backed off to 2 s
    c.recv("SA")
    c.poll(4.01)                               # third expiry > max_retries: reset
    c.recv("RA", seq=a.seq + 1)
    assert c.closed_reasons() == ["timeout"]


def test_bad_ack_in_syn_received_gets_rst():
    c = Client()
    conn = c.request()
    conn.accept()
    sa = c.recv("SA")
    c.send(ack=sa.seq + 100)
    c.recv("R", seq=sa.seq + 100, ack=False)
    assert conn.state == "SYN_RECEIVED" and c.stack.tcp_drops["bad_ack"] == 1
    c.send(ack=sa.seq)                          # acks nothing (not our SYN)
    c.recv("R", seq=sa.seq, ack=False)
    assert conn.state == "SYN_RECEIVED" and c.stack.tcp_drops["bad_ack"] == 2
    c.send()
    assert conn.state == "ESTABLISHED"


def test_data_with_the_third_ack_and_write_before_accept():
    c = Client()
    conn = c.request()
    assert conn.write(b"banner") == 6           # queued, sent after the handshake
    conn.accept()
    c.recv("SA")
    c.recv_none()
    c.send(b"GET /")                            # the handshake ACK is lost; data carries it
    assert conn.state == "ESTABLISHED" and conn.read() == b"GET /"
    c.recv("A", data=b"banner")


# ------------------------------------------------------------------ closing

def test_half_close_client_first_we_keep_sending():
    c = Client()
    conn = c.handshake()
    c.send(b"req", flags="FPA")
    assert conn.state == "CLOSE_WAIT" and conn.read() == b"req" and conn.eof
    c.recv("A")
    for i in range(3):
        conn.write(b"r%d" % i)
        c.recv("A", data=b"r%d" % i)
        c.send()
    conn.shutdown()
    c.recv("FA")
    c.send()
    assert c.closed_reasons() == ["closed"]


def test_half_close_we_first_client_keeps_sending():
    c = Client()
    conn = c.handshake()
    conn.write(b"bye")
    conn.shutdown()
    with pytest.raises(TcpError):
        conn.write(b"more")
    c.recv("FA", data=b"bye")
    c.send()
    assert conn.state == "FIN_WAIT_2"
    for i in range(3):
        c.send(b"x" * 100)
    assert conn.read() == b"x" * 300
    c.poll(0.05)
    c.recv("A")                                 # delayed/batched ACK for the data
    c.send(flags="FA")
    c.recv("A")
    assert conn.state == "TIME_WAIT" and conn.eof


def test_simultaneous_close():
    c = Client()
    conn = c.handshake()
    conn.shutdown()
    fin = c.recv("FA")
    # the client's FIN crosses ours: it does not ack our FIN yet
    c.send(flags="FA", ack=fin.seq)
    assert conn.state == "CLOSING"
    c.recv("A")
    c.send()                                    # now it acks our FIN
    assert conn.state == "TIME_WAIT"
    c.poll(c.stack.config.time_wait + 0.01)
    assert c.closed_reasons() == ["closed"]


def test_fin_in_fin_wait_1_acking_our_fin_goes_to_time_wait():
    c = Client()
    conn = c.handshake()
    conn.shutdown()
    c.recv("FA")
    c.send(flags="FA")
    assert conn.state == "TIME_WAIT"
    c.recv("A")


def test_time_wait_acks_retransmitted_fin_and_new_syn_reuses_the_port():
    c = Client()
    conn = c.handshake()
    conn.shutdown()
    c.recv("FA")
    c.send(flags="FA")
    c.recv("A")
    c.seq = (c.seq - 1) & M
    c.send(flags="FA")                          # our ACK was lost
    c.recv("A")
    assert conn.state == "TIME_WAIT"
    c2 = Client(c.stack, isn=c.seq + 100000)
    c2.syn()
    reqs = c2.take(events.TcpConnectRequest)
    assert len(reqs) == 1 and reqs[0].conn is not conn
    assert conn.closed and c.closed_reasons() + c2.closed_reasons() == ["closed"]


def test_abort_sends_rst():
    c = Client()
    conn = c.handshake()
    c.send(b"abc")
    conn.abort()
    c.recv("RA", seq=conn.snd_nxt, ack=c.seq)
    assert c.closed_reasons() == ["aborted"] and c.stack.tcp == {}
    assert conn.read() == b"abc"               # what arrived can still be read
    with pytest.raises(TcpError):
        conn.write(b"x")


def test_abort_pending_request():
    c = Client()
    conn = c.request()
    conn.abort()
    c.recv("RA", seq=0, ack=c.isn + 1)
    assert c.closed_reasons() == ["aborted"] and c.stack.pending == 0


def test_peer_reset_in_window():
    c = Client()
    conn = c.handshake()
    c.send(flags="R", ack=0)
    assert c.closed_reasons() == ["reset"] and conn.state == "CLOSED"
    c.recv_none()


def test_closed_event_exactly_once_and_status_counts_states():
    c = Client()
    conn = c.handshake()
    assert c.stack.status()["tcp_states"] == {"ESTABLISHED": 1}
    conn.abort()
    conn.abort()
    c.poll()
    c.send(flags="R")
    assert c.closed_reasons() == ["aborted"]


def test_readable_is_edge_triggered_and_fin_always_announced():
    c = Client()
    conn = c.handshake()
    c.send(b"a")
    c.send(b"b")
    assert len(c.take(events.TcpReadable)) == 1          # once until the host reads
    assert conn.read(1) == b"a"
    c.send(b"c")
    assert len(c.take(events.TcpReadable)) == 1
    c.send(flags="FA")                                     # unread data and then the FIN
    assert len(c.take(events.TcpReadable)) == 1
    assert conn.read() == b"bc" and conn.eof and conn.read() == b""


def test_retransmitted_fin_restarts_time_wait():
    c = Client(time_wait=2.0)
    conn = c.handshake()
    conn.shutdown()
    c.recv("FA")
    c.send(flags="FA")
    c.recv("A")
    c.poll(1.5)
    c.seq = (c.seq - 1) & M
    c.send(flags="FA")
    c.recv("A")
    c.poll(1.0)
    assert conn.state == "TIME_WAIT"
    c.poll(1.1)
    assert c.closed_reasons() == ["closed"]


def test_shutdown_before_accept_sends_fin_after_handshake():
    c = Client()
    conn = c.request()
    conn.write(b"421 busy\r\n")
    conn.shutdown()
    conn.accept()
    c.recv("SA")
    c.recv_none()
    c.send()
    assert conn.state == "FIN_WAIT_1"
    c.recv("FA", data=b"421 busy\r\n")
    c.send()
    assert conn.state == "FIN_WAIT_2"


def test_host_misuse_raises_clear_errors():
    c = Client()
    conn = c.handshake()
    with pytest.raises(TcpError):
        conn.accept()
    with pytest.raises(TcpError):
        conn.reject()
    conn.shutdown()
    conn.shutdown()                             # idempotent
    with pytest.raises(TcpError):
        conn.write(b"x")
    assert conn.send_space == 0


@pytest.mark.parametrize("mss", [1, 40, 87])
def test_tiny_peer_mss_is_floored(mss):
    c = Client(mss=mss, sack=True, ts=True)
    conn = c.handshake()
    assert conn.snd_mss == 88
    c.send(b"x", seq=c.seq + 10, advance=False)       # out of order: SACK blocks in our segments
    c.drain()
    conn.write(b"y" * 1000)
    segs = c.drain()
    assert segs and all(len(s.payload) == 88 - 12 - 12 for s in segs)   # minus TS and one SACK block
    assert 10 * conn._seg - 64 < sum(len(s.payload) for s in segs) <= 10 * conn._seg   # initial cwnd


def test_rst_in_time_wait_ends_it_as_closed():
    c = Client()
    conn = c.handshake()
    conn.shutdown()
    c.recv("FA")
    c.send(flags="FA")
    c.recv("A")
    c.send(flags="R", ack=0)
    assert c.closed_reasons() == ["closed"] and c.stack.tcp == {}


@pytest.mark.parametrize("ws", [None, 7])
@pytest.mark.parametrize("sack", [False, True])
@pytest.mark.parametrize("ts", [False, True])
@pytest.mark.parametrize("mss", [None, 1460])
def test_synack_option_block_for_every_syn(mss, ts, sack, ws):
    """The SYN-ACK answers each option the SYN offered, in one of the
    layouts the general builder makes (the usual ones are packed in one go)."""
    from netstack.wire import tcp as wt
    c = Client(mss=mss, ws=ws, sack=sack, ts=ts)
    conn = c.request()
    conn.accept()
    s = c.recv("SA")
    opts = s.raw[40:20 + ((s.raw[20 + 12] >> 4) << 2)]       # IPv4: the TCP header at 20
    o = s.opts
    assert (o.wscale is not None, o.sack_perm, o.ts_val is not None) == (ws is not None, sack, ts)
    assert opts == wt.build_options(mss=1460, wscale=5 if ws is not None else None, sack_perm=sack,
                                    ts=(o.ts_val, 1) if ts else None)    # echoes the SYN's tsval
    assert conn.rcv_wscale == (5 if ws is not None else 0)
