"""Hostile and random input: the stack never raises, never loops, stays bounded."""

import random
import signal
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import Client, M
from netstack import events

FLAGS = st.integers(0, 0x3F)
segment = st.tuples(
    FLAGS,
    st.integers(-70000, 70000),          # seq offset from what the stack expects
    st.integers(-70000, 70000),          # ack offset from the stack's snd_nxt
    st.integers(0, 3000),                # payload length
    st.integers(0, 65535),               # window
    st.sampled_from([b"", b"\x01\x01\x08\x0a" + b"\x00" * 8, b"\x01\x01\x05\x0a" + b"\x00" * 8,
                     b"\x02\x04\x00\x01", b"\x05\x02\x00\x00", b"\x03\x03\x0e\x00", b"\xff" * 4,
                     b"\x01\x01\x05\x12" + b"\x00" * 16]),
    st.floats(0, 3),                     # time step
    st.sampled_from(["none", "read", "write", "shutdown", "abort", "read1", "pmtu"]),
)


class Alarm:
    def __enter__(self):
        def boom(*a):
            raise TimeoutError("stack looped")
        self.old = signal.signal(signal.SIGALRM, boom)
        signal.alarm(5)

    def __exit__(self, *a):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.booleans(), st.integers(1, 9000), st.one_of(st.none(), st.integers(0, 20)),
       st.lists(segment, max_size=40))
def test_random_segments_never_break_the_stack(sack, ts, mss, ws, segs):
    c = Client(mtu=1040, mss=mss, ws=ws, sack=sack, ts=ts, rcv_buf=20000, snd_buf=20000, keepalive=5.0)
    conn = c.handshake()
    rnd = random.Random(len(segs))
    closed = 0
    with Alarm():
        for flags, dseq, dack, n, wnd, opts, dt, op in segs:
            seq = (conn.rcv_nxt + dseq) & M
            ack = (conn.snd_nxt + dack) & M
            pkt = c.packet(flags, seq=seq, ack=ack, wnd=wnd, data=bytes(rnd.randrange(256) for _ in range(n)),
                           opts=opts, advance=False)
            c.inject(pkt)
            if not conn.closed:
                if op == "read":
                    conn.read()
                elif op == "read1":
                    conn.read(1)
                elif op == "write" and conn.state in ("ESTABLISHED", "CLOSE_WAIT"):
                    conn.write(b"w" * 1500)
                elif op == "shutdown":
                    conn.shutdown()
                elif op == "abort":
                    conn.abort()
                elif op == "pmtu":
                    conn.on_pmtu(rnd.choice((0, 68, 576, 1000, 1280)), c.now)
            c.poll(dt)
            c.drain()
            assert len(conn.rcv_buf) <= 20000 and conn.ooo.nbytes <= 20000
            assert len(conn.snd_buf) <= 20000
            assert c.stack.pending >= 0
            closed += sum(e.conn is conn for e in c.take(events.TcpClosed))
            for e in c.take(events.TcpConnectRequest):   # a SYN after our close: a new request
                e.conn.accept()
        c.run_until(c.now + 1000)
    closed += sum(e.conn is conn for e in c.take(events.TcpClosed))
    # exactly one TcpClosed, and everything ends (keepalive / retransmission timeouts)
    assert closed == 1 and conn.closed and c.stack.tcp == {} and c.stack.pending == 0


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=0, max_size=80))
def test_garbage_tcp_headers(tail):
    c = Client()
    c.handshake()
    hdr = struct.pack("!HHII", 40000, 80, c.seq, c.rcv) + tail
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(hdr), 0, 0, 64, 6, 0, c.caddr, c.saddr)
    from netstack.wire import checksum as ck
    ip = ip[:10] + struct.pack("!H", ck.checksum(ip)) + ip[12:]
    with Alarm():
        c.stack.input(ip + hdr, c.now)
        c.poll(0.1)
