"""Loss and robustness: RTO/Karn, max_retries, fast retransmit + NewReno, SACK
both ways, PAWS, RFC 5961, keepalive, PMTU, sequence wrap across 2**32."""

import random

import pytest

from helpers import Client, M
from netstack import Stack, StackConfig, events


def mk(**kw):
    kw.setdefault("mtu", 1040)          # MSS 1000 both ways
    kw.setdefault("mss", 1000)
    return Client(**kw)


def established(c, rtt=0.1):
    conn = c.request()
    conn.accept()
    c.recv("SA")
    c.poll(rtt)
    c.send()
    assert conn.state == "ESTABLISHED"
    return conn


# ---------------------------------------------------------------- RTO / Karn

def test_rto_backoff_and_karn():
    c = mk()
    conn = established(c, 0.1)
    assert conn.srtt == pytest.approx(0.1) and conn.rto == pytest.approx(0.3)
    conn.write(b"k" * 100)
    first = c.recv("A", length=100)
    c.poll(0.29)
    c.recv_none()
    c.poll(0.02)
    assert c.recv("A", length=100, update=False).seq == first.seq       # RTO 0.3
    assert conn.rto == pytest.approx(0.6)
    c.poll(0.59)
    c.recv_none()
    c.poll(0.02)
    c.recv("A", length=100, update=False)                                # backed off: 0.6
    assert conn.rto == pytest.approx(1.2)
    c.poll(0.05)
    c.send()                                   # ACK after retransmissions: no RTT sample (Karn)
    assert conn.srtt == pytest.approx(0.1) and conn.rto == pytest.approx(1.2)
    conn.write(b"n" * 100)
    c.recv("A", length=100)
    c.poll(0.05)
    c.send()                                   # a clean sample recomputes the RTO
    assert conn.srtt == pytest.approx(0.09375)
    assert conn.rto == pytest.approx(0.09375 + 4 * 0.05)


def test_max_retries_then_reset_and_timeout():
    c = mk(max_retries=3)
    conn = established(c)
    conn.write(b"lost")
    c.recv("A", length=4)
    c.run_until(100)
    segs = c.drain()
    assert [s.f for s in segs] == ["PA", "PA", "PA", "RA"]
    assert c.closed_reasons() == ["timeout"] and c.stack.tcp_drops["retransmit_timeout"] == 1


def test_rto_collapses_cwnd_and_goes_back_n():
    c = mk()
    conn = established(c)
    conn.write(b"d" * 5000)
    segs = [c.recv("A", length=1000, update=False) for _ in range(5)]
    c.poll(conn.rto + 0.001)
    assert conn.cwnd == 1000 and conn.ssthresh == 2500
    r = c.recv("A", length=1000, update=False)
    assert r.seq == segs[0].seq
    c.recv_none()
    c.rcv = (segs[0].seq + 1000) & M
    c.send()                                   # slow start again: two segments now
    c.recv("A", length=1000, update=False)
    c.recv("A", length=1000, update=False)
    c.recv_none()


# -------------------------------------------------------- fast retransmit

def test_fast_retransmit_and_newreno_partial_ack():
    c = mk(wnd=60000)
    conn = established(c)
    conn.write(bytes(range(256)) * 60)   # 15360 bytes
    segs = [c.recv("A", length=1000, update=False) for _ in range(10)]
    base = segs[0].seq
    c.rcv = (base + 1000) & M
    c.send()                                   # seg 0 arrived; segs 1 and 4 are lost
    c.drain()                                  # (new data the ACK released)
    for _ in range(3):
        c.send()                               # dup ACKs as segs 2, 3, 5 arrive
    r = c.recv("A", length=1000, update=False)
    assert r.seq == (base + 1000) & M and conn.in_recovery
    flight = (conn.recover - (base + 1000)) & M          # what was in flight at the third dup ACK
    assert flight == 11000 and conn.ssthresh == flight // 2 and conn.cwnd == conn.ssthresh + 3000
    c.drain()
    c.rcv = (base + 4000) & M                  # partial ACK: up to the second hole
    c.send()
    r = c.recv("A", length=1000, update=False)
    assert r.seq == (base + 4000) & M          # NewReno: retransmit the next hole at once
    assert conn.in_recovery
    c.drain()
    c.rcv = conn.recover
    c.send()                                   # full ACK ends recovery
    assert not conn.in_recovery and conn.cwnd == conn.ssthresh


# -------------------------------------------------------------------- SACK

def test_sack_blocks_for_out_of_order_data():
    c = mk(sack=True, ts=True, mss=1000)
    conn = c.handshake()
    s0 = c.seq
    c.send(b"A" * 100, seq=s0)
    c.send(b"C" * 100, seq=s0 + 200, advance=False)
    c.recv("A", ack=s0 + 100, sack=[(s0 + 200, s0 + 300)])
    c.send(b"E" * 100, seq=s0 + 400, advance=False)
    c.recv("A", ack=s0 + 100, sack=[(s0 + 400, s0 + 500), (s0 + 200, s0 + 300)])
    assert conn.readable == 100
    c.send(b"B" * 100, seq=s0 + 100, advance=False)
    c.recv("A", ack=s0 + 300, sack=[(s0 + 400, s0 + 500)])
    c.send(b"D" * 100, seq=s0 + 300, advance=False)
    c.recv("A", ack=s0 + 500, sack=[])
    assert conn.read() == b"A" * 100 + b"B" * 100 + b"C" * 100 + b"D" * 100 + b"E" * 100


def test_out_of_order_bounded_by_window_and_fin_out_of_order():
    c = mk(rcv_buf=4000)
    conn = c.handshake()
    s0 = c.seq
    c.send(b"x" * 1000, seq=s0 + 5000, advance=False)      # beyond the window
    assert c.stack.tcp_drops["out_of_window"] == 1
    c.recv("A")
    c.send(b"z" * 500, seq=s0 + 500, flags="FA", advance=False)
    c.recv("A", ack=s0)
    assert conn.state == "ESTABLISHED" and not conn.eof
    c.send(b"y" * 500, seq=s0, advance=False)
    assert conn.state == "CLOSE_WAIT"
    c.recv("A", ack=s0 + 1001)
    assert conn.read() == b"y" * 500 + b"z" * 500 and conn.eof


def test_sack_based_retransmission_sends_only_holes():
    c = mk(sack=True, wnd=60000)
    conn = established(c)
    conn.write(b"s" * 10000)
    segs = [c.recv("A", length=1000, update=False) for _ in range(10)]
    b = segs[0].seq
    c.rcv = (b + 1000) & M
    c.send()
    # segs 1 and 4 lost; the peer SACKs 2-3 and 5-9
    c.send(sack_blocks=[(b + 2000, b + 4000)])
    c.send(sack_blocks=[(b + 5000, b + 10000), (b + 2000, b + 4000)])
    assert conn.in_recovery and conn.sacked == 7000
    rtx = c.drain()
    assert sorted((s.seq - b) & M for s in rtx) == [1000, 4000]
    c.rcv = (b + 10000) & M
    c.send()
    assert not conn.in_recovery and conn.scoreboard == []


def test_dsack_and_bogus_sack_blocks_ignored():
    c = mk(sack=True, wnd=60000)
    conn = established(c)
    conn.write(b"s" * 3000)
    segs = [c.recv("A", length=1000, update=False) for _ in range(3)]
    b = segs[0].seq
    c.rcv = (b + 1000) & M
    c.send(sack_blocks=[(b, b + 1000), (b + 2500, b + 90000), (b + 2000, b + 1500)])
    assert conn.scoreboard == [] and not conn.in_recovery


# -------------------------------------------------------------------- PAWS

def test_paws_drops_old_timestamps():
    c = mk(ts=True)
    conn = c.handshake()
    c.tsval = 1000
    c.send(b"new")
    assert conn.ts_recent == 1000
    c.send(b"old", ts=(500, c.ts_recent), advance=False)
    assert c.stack.tcp_drops["paws"] == 1 and conn.read() == b"new"
    c.recv("A", ack=c.seq)
    # timestamps that wrapped past 2**32 are newer, not older
    for i, v in enumerate((2**31, 2**32 - 5, 3)):
        c.tsval = v
        c.send(b"abc"[i:i + 1])
        c.poll(0.05)                           # the delayed ACK moves Last.ACK.sent on
    assert conn.read() == b"abc" and c.stack.tcp_drops["paws"] == 1 and conn.ts_recent == 3


def test_timestamp_only_segments_are_read_through_one_reused_options_object():
    """The demux reads a NOP-NOP-TS block into the stack's one TcpOptions
    (no object per segment): the values are this segment's, a SACK block
    in between is parsed in full and leaves nothing behind in it."""
    c = mk(ts=True, sack=True)
    conn = c.handshake()
    reused = c.stack.ts_opts
    c.tsval = 7000
    c.send(b"one")
    assert conn.ts_recent == 7000 and reused.ts_val == 7000 and reused.ts_ecr == c.ts_recent
    conn.write(b"s" * 3000)
    segs = [c.recv("A", update=False) for _ in range(3)]
    b, n = segs[0].seq, len(segs[0].payload)        # MSS less the 12 timestamp bytes
    c.send(sack_blocks=[(b + n, b + 2 * n)])
    assert conn.scoreboard == [(b + n, b + 2 * n)]
    c.send()
    assert reused.sack is None and reused.mss is None and reused.wscale is None
    assert conn.scoreboard == [(b + n, b + 2 * n)] and conn.ts_recent == c.tsval - 1


# -------------------------------------------------------------- RFC 5961

def test_rst_exact_in_window_and_outside():
    c = mk()
    conn = c.handshake()
    c.send(flags="R", seq=c.seq + 5000000, advance=False)  # out of window: silent drop
    c.recv_none()
    c.send(flags="R", seq=c.seq + 10, advance=False)       # in window, not exact: challenge ACK
    c.recv("A", ack=c.seq)
    assert conn.state == "ESTABLISHED"
    assert c.stack.tcp_drops["rst_out_of_window"] == 1 and c.stack.tcp_drops["rst_challenge"] == 1
    c.send(flags="R")                                       # exact: reset
    assert c.closed_reasons() == ["reset"]


def test_syn_in_established_gets_challenge_ack_rate_limited():
    c = mk()
    conn = c.handshake()
    c.send(flags="S", seq=c.seq + 77, advance=False)
    c.recv("A", ack=c.seq)
    assert conn.state == "ESTABLISHED" and c.stack.tcp_drops["syn_challenge"] == 1
    for _ in range(12):
        c.send(flags="R", seq=c.seq + 10, advance=False)
    assert c.stack.tcp_drops["challenge_ack_limited"] == 3      # 10 per second (1 used)
    c.drain()
    c.poll(1.0)
    c.send(flags="R", seq=c.seq + 10, advance=False)
    c.recv("A")


def test_ack_for_unsent_data_is_acked_and_dropped():
    c = mk()
    conn = c.handshake()
    c.send(b"data", ack=(c.rcv + 100) & M, advance=False)
    c.recv("A", ack=c.seq)
    assert conn.readable == 0 and c.stack.tcp_drops["ack_unsent"] == 1


def test_segment_without_ack_dropped_and_bad_checksum_counted():
    c = mk()
    conn = c.handshake()
    c.send(b"x", flags="P", advance=False)
    assert c.stack.tcp_drops["no_ack"] == 1 and conn.readable == 0
    c.send(b"x", bad_checksum=True, advance=False)
    assert c.stack.drops["bad_tcp_checksum"] == 1 and conn.readable == 0


# --------------------------------------------------------------- keepalive

def test_keepalive_probes_and_timeout():
    c = mk(keepalive=10.0, keepalive_interval=2.0, keepalive_count=3)
    c.handshake()
    c.poll(9.9)
    c.recv_none()
    c.poll(0.2)
    c.recv("A", seq=c.rcv - 1, length=0)       # probe: one below snd_una
    c.send()                                    # answered: idle again
    c.poll(9.9)
    c.recv_none()
    c.run_until(c.now + 30)
    segs = c.drain()
    assert [s.f for s in segs] == ["A", "A", "A", "RA"]
    assert c.closed_reasons() == ["timeout"]


# -------------------------------------------------------------------- PMTU

def test_pmtu_lowers_the_send_mss_and_resends_smaller():
    c = Client(mss=1460)
    conn = c.handshake()
    conn.write(b"p" * 3000)
    a = c.recv("A", length=1460, update=False)
    c.recv("A", length=1460, update=False)
    c.recv("A", length=80, update=False)
    conn.on_pmtu(1200, c.now)
    assert conn.snd_mss == 1160
    segs = c.drain()
    assert segs[0].seq == a.seq and max(len(s.payload) for s in segs) == 1160
    conn.on_pmtu(1400, c.now)                    # never raised by an ICMP
    assert conn.snd_mss == 1160


# ------------------------------------------------------------ wrap at 2**32

class FixedRng(random.Random):
    def __init__(self, values):
        super().__init__(7)
        self.values = list(values)

    def getrandbits(self, k):
        return self.values.pop(0) if self.values else super().getrandbits(k)


@pytest.mark.parametrize("sack", [False, True])
def test_sequence_numbers_wrap(sack):
    st = Stack(StackConfig(mtu=1040))
    st.rng = FixedRng([2**32 - 1500, 2**32 - 3])     # ISN and timestamp offset
    c = Client(st, isn=2**32 - 2500, mss=1000, sack=sack, ts=True)
    c.tsval = 2**32 - 2
    conn = c.handshake()
    assert conn.iss == 2**32 - 1500
    data_in = bytes(random.Random(1).randrange(256) for _ in range(6000))
    s0 = c.seq
    # out of order across the wrap, then in order
    c.send(data_in[3000:4000], seq=s0 + 3000, advance=False)
    c.send(data_in[1000:2000], seq=s0 + 1000, advance=False)
    c.drain()
    for i in (0, 2000, 4000, 5000):
        c.send(data_in[i:i + 1000], seq=s0 + i, advance=False)
    c.seq = (s0 + 6000) & M
    assert conn.read() == data_in and conn.rcv_nxt == c.seq and c.seq < 10000
    c.drain()
    data_out = bytes(reversed(data_in))
    conn.write(data_out)
    got = b""
    for _ in range(4):
        for s in c.drain():
            if s.seq == c.rcv:
                got += s.payload
                c.rcv = (c.rcv + len(s.payload)) & M
        c.send()
    assert got == data_out and conn.snd_una == c.rcv and conn.snd_una < 10000
    conn.shutdown()
    c.recv("FA")
    c.send(flags="FA")
    c.recv("A")
    assert conn.state == "TIME_WAIT"


# ------------------------------------------------------- more edge cases

def test_data_beyond_the_window_is_trimmed():
    c = mk(rcv_buf=3000)
    conn = c.handshake()
    c.send(b"t" * 5000, advance=False)
    assert conn.readable == 3000 and c.stack.tcp_drops["trimmed_to_window"] == 1
    c.seq = (c.seq + 3000) & M
    c.recv("A", wnd=0)


def test_old_ack_far_below_snd_una_dropped():
    c = mk()
    conn = c.handshake()
    c.send(b"x", ack=(c.rcv - 3_000_000) & M, advance=False)
    assert c.stack.tcp_drops["old_ack"] == 1 and conn.readable == 0
    c.recv("A")
    c.send(b"y", ack=(c.rcv - 10) & M)      # slightly old: the data is still taken
    assert conn.read() == b"y"


def test_data_after_their_fin_is_dropped():
    c = mk()
    conn = c.handshake()
    c.send(flags="FA")
    c.recv("A")
    c.send(b"late", seq=c.seq, advance=False)
    assert c.stack.tcp_drops["data_after_fin"] == 1 and conn.read() == b""
    c.recv("A")


def test_newreno_dupacks_inflate_and_release_new_data():
    c = mk(wnd=60000)
    conn = established(c)
    conn.write(b"n" * 20000)
    segs = [c.recv("A", length=1000, update=False) for _ in range(10)]
    base = segs[0].seq
    for _ in range(3):
        c.send()                                 # seg 0 lost: dup ACKs of the handshake ACK
    assert conn.in_recovery and conn.cwnd == conn.ssthresh + 3000
    assert c.recv("A", length=1000, update=False).seq == base
    c.recv_none()
    for _ in range(3):
        c.send()                                 # more dup ACKs: cwnd inflates past the flight
    new = c.drain()
    assert new and all(s.seq == (base + 10000 + 1000 * i) & M for i, s in enumerate(new))


def test_persist_fills_a_small_window_the_sws_rule_held_back():
    c = mk(wnd=1500)
    conn = established(c)
    conn.write(b"s" * 3000)
    c.recv("A", length=1000)
    c.send(wnd=400)                              # acks it; 400 < MSS and < max window / 2
    c.recv_none()
    c.poll(conn.rto + 0.001)
    c.recv("A", length=400)                      # the persist timer overrides SWS avoidance


def _time_wait(c):
    conn = c.handshake()
    conn.shutdown()
    c.recv("FA")
    c.send(flags="FA")
    c.recv("A")
    assert conn.state == "TIME_WAIT"
    return conn


def test_time_wait_reuse_with_timestamps():
    c = mk(ts=True)
    conn = _time_wait(c)
    new = Client(c.stack, isn=c.seq - 5000, mss=1000, ts=True)    # older ISN, but a newer timestamp
    new.tsval = c.tsval + 100
    new.syn()
    assert len(new.take(events.TcpConnectRequest)) == 1 and conn.closed


def test_time_wait_no_reuse_for_an_old_timestamp():
    c = mk(ts=True)
    c.tsval = 1000
    conn = _time_wait(c)
    old = Client(c.stack, isn=c.seq + 5000, mss=1000, ts=True)
    old.tsval = 10                                # older than what TIME_WAIT remembers
    old.syn()
    assert old.take() == [] and conn.state == "TIME_WAIT"
    assert c.stack.tcp_drops["paws"] + c.stack.tcp_drops["syn_challenge"] == 1


def test_flow_limit_resets_new_syns():
    c = mk(max_flows=1)
    c.handshake()
    c2 = Client(c.stack, client=("10.0.0.9", 5555))
    c2.syn()
    assert c2.take() == [] and c.stack.drops["flow_limit"] == 1
    c2.recv("RA", seq=0, ack=c2.isn + 1)


def test_gso_retransmissions_are_mss_sized():
    c = Client(gso_max=30000, mss=1000, mtu=1040, ws=7)
    conn = c.handshake()
    conn.write(b"g" * 10000)
    big = c.recv("A", length=10000, update=False)       # one super-segment (initial cwnd)
    assert big.raw_obj.gso_size == 1000
    c.poll(conn.rto + 0.001)
    r = c.recv("A", update=False)
    assert len(r.payload) == 1000 and r.seq == big.seq  # retransmitted as one plain segment
