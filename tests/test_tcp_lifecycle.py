"""A connection's life outside the data path: TIME_WAIT in the stack's
queue of waits (no timer per connection), their order, restarts and the
deadline the stack reports for them; what a connection holds from its
start (the shared empty out-of-order runs)."""

import random

from helpers import Client, M
from netstack import Stack, StackConfig


def _to_time_wait(stack, port, now):
    """A connection on *stack* from client port *port*, closed by us first
    and taken to TIME_WAIT at time *now*; returns (client, conn)."""
    c = Client(stack=stack, client=("10.0.0.2", port))
    c.now = now
    conn = c.handshake()
    conn.shutdown()
    c.recv("FA")
    c.send(flags="FA")
    assert conn.state == "TIME_WAIT"
    c.recv("A")
    return c, conn


def test_waits_end_in_deadline_order_and_the_stack_reports_the_next():
    st = Stack(StackConfig(time_wait=2.0), rng=random.Random(3))
    conns = [_to_time_wait(st, 40000 + i, 10.0 + 0.5 * i)[1] for i in range(3)]
    assert conns[0].poll_at is None                 # no timer of its own ...
    assert st.next_deadline() == 12.0               # ... the queue says when
    assert st.status()["timers"] >= 3
    st.poll(12.2)
    assert [c.closed for c in conns] == [True, False, False]
    assert st.next_deadline() == 12.5
    st.poll(13.0)
    assert all(c.closed for c in conns) and st.tcp == {}
    assert st.next_deadline() is None


def test_a_restarted_wait_outlasts_later_ones():
    st = Stack(StackConfig(time_wait=2.0), rng=random.Random(4))
    a, ca = _to_time_wait(st, 40000, 10.0)
    _, cb = _to_time_wait(st, 40001, 10.5)
    # a's FIN again (its ACK was lost): its wait starts over at 11.0
    a.now = 11.0
    a.seq = (a.seq - 1) & M
    a.send(flags="FA")
    a.recv("A")
    st.poll(12.0)                    # a's first deadline: stale now
    assert not ca.closed and not cb.closed
    assert st.next_deadline() == 12.5
    st.poll(12.6)
    assert cb.closed and not ca.closed
    assert st.next_deadline() == 13.0
    st.poll(13.0)
    assert ca.closed and st.tcp == {}


def test_a_clock_that_went_back_keeps_the_queue_sorted():
    st = Stack(StackConfig(time_wait=2.0), rng=random.Random(5))
    _, late = _to_time_wait(st, 40000, 10.0)        # waits until 12
    _, early = _to_time_wait(st, 40001, 5.0)        # the host's clock went back: until 7
    assert st.next_deadline() == 7.0
    st.poll(7.5)
    assert early.closed and not late.closed


def test_rst_in_time_wait_leaves_a_stale_entry_only():
    st = Stack(StackConfig(time_wait=2.0), rng=random.Random(6))
    c, conn = _to_time_wait(st, 40000, 10.0)
    c.send(flags="R")
    assert conn.closed and st.tcp == {}
    assert st.next_deadline() is None               # the queue's entry was stale


def test_out_of_order_runs_are_a_connections_own():
    """Connections share one empty run list until data arrives out of
    order; the one that gets such data takes its own, the others stay empty."""
    from netstack.tcp.receiver import NO_RUNS
    st = Stack(StackConfig(), rng=random.Random(7))
    a = Client(stack=st, client=("10.0.0.2", 40000))
    b = Client(stack=st, client=("10.0.0.2", 40001))
    ca, cb = a.handshake(), b.handshake()
    assert ca.ooo is cb.ooo is NO_RUNS
    s0 = a.seq
    a.send(b"B" * 100, seq=s0 + 100, advance=False)
    assert ca.ooo is not NO_RUNS and ca.ooo.nbytes == 100
    assert cb.ooo is NO_RUNS and NO_RUNS.nbytes == 0 and not NO_RUNS.runs
    a.send(b"A" * 100, seq=s0, advance=False)
    a.seq = (s0 + 200) & M
    assert ca.read() == b"A" * 100 + b"B" * 100
    ca.abort()
    cb.abort()
    st.poll(0.0)
    assert ca.closed and cb.closed and not NO_RUNS.runs and NO_RUNS.nbytes == 0


def test_unanswered_requests_time_out_from_their_queue():
    """The connect timeout of an unanswered request waits in the stack's
    request queue: no heap entry, the stack reports it as its deadline, an
    answered request's entry is stale."""
    st = Stack(StackConfig(connect_timeout=3.0), rng=random.Random(8))
    a = Client(stack=st, client=("10.0.0.2", 40000))
    b = Client(stack=st, client=("10.0.0.2", 40001))
    b.now = 1.0
    ca, cb = a.request(), b.request()
    assert ca.poll_at is None and not st._heap
    assert st.next_deadline() == 3.0
    ca.accept()                      # answered: its timeout no longer counts
    a.recv("SA")
    # ... and its entry, stale at the front, left at that poll (the
    # connection is not held until the deadline)
    assert [e[2] for e in st._requests] == [cb]
    a.send()
    assert ca.state == "ESTABLISHED"
    st.poll(3.5)
    assert not ca.closed and not cb.closed
    st.poll(4.0)
    assert cb.closed and not ca.closed
    assert [(s.flags & 0x14, s.dport) for s in map(_parsed, st.take_output())] == [(0x14, 40001)]   # RST|ACK
    assert st.tcp_drops["connect_timeout"] == 1


def _parsed(pkt):
    from helpers import parse_packet
    return parse_packet(pkt)
