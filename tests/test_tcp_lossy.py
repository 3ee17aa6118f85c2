"""Bulk transfers both ways through a lossy, reordering channel: every byte
arrives exactly once, in order, and the connection closes cleanly."""

import random

import pytest

from helpers import ACK, FIN, Client, M


class Peer:
    """A small but real TCP peer on top of the Client DSL: cumulative ACKs,
    SACK blocks, go-back-N retransmission of its own data."""

    def __init__(self, c, data, sack, mss=1000, wnd=30000):
        self.c = c
        self.data = data
        self.sack = sack
        self.mss = mss
        self.wnd = wnd
        self.got = bytearray()
        self.ooo = {}                  # seq -> bytes beyond c.rcv
        self.base = c.seq              # our first data byte
        self.una = 0                   # offset of our first unacknowledged byte
        self.nxt = 0                   # offset of our next new byte
        self.last_progress = 0.0
        self.fin_got = False
        self.fin_sent = None

    def take(self, segs):
        c = self.c
        ack_needed = False
        for s in segs:
            if s.flags & ACK:
                off = (s.ack - self.base) & M
                if self.una < off <= len(self.data) + 1:
                    self.una = off
                    self.last_progress = c.now
                    if self.nxt < self.una:
                        self.nxt = self.una
            if s.payload or s.flags & FIN:
                ack_needed = True
                if s.payload:
                    self.ooo.setdefault(s.seq, s.payload)
                if s.flags & FIN:
                    self.ooo.setdefault((s.seq + len(s.payload)) & M, b"FIN")
        # drain in order
        while True:
            progressed = False
            for sq in list(self.ooo):
                d = (c.rcv - sq) & M
                pl = self.ooo[sq]
                if pl == b"FIN" and sq == c.rcv:
                    del self.ooo[sq]
                    self.fin_got = True
                    c.rcv = (c.rcv + 1) & M
                    progressed = True
                elif pl != b"FIN" and d < len(pl):
                    self.got += pl[d:]
                    c.rcv = (c.rcv + len(pl) - d) & M
                    del self.ooo[sq]
                    progressed = True
                elif pl != b"FIN" and d < 2**31:
                    del self.ooo[sq]          # old duplicate
            if not progressed:
                break
        return ack_needed

    def sack_blocks(self):
        if not self.sack or not self.ooo:
            return None
        blocks = sorted(((sq - self.c.rcv) & M, len(p)) for sq, p in self.ooo.items() if p != b"FIN")
        return [((self.c.rcv + a) & M, (self.c.rcv + a + n) & M) for a, n in blocks[:3]] or None

    def segments(self, now, rto=0.5):
        """Data segments to send now (new ones within the window, or a go-back-N burst)."""
        if self.una < len(self.data) and now - self.last_progress > rto:
            self.nxt = self.una
            self.last_progress = now
        out = []
        while self.nxt < len(self.data) and self.nxt - self.una < self.wnd:
            n = min(self.mss, len(self.data) - self.nxt)
            out.append((self.nxt, self.data[self.nxt:self.nxt + n]))
            self.nxt += n
        return out


def run_transfer(seed, sack, ts, loss=0.1, size=120000, wrap=False):
    rnd = random.Random(seed)
    isn = 2**32 - 30000 if wrap else rnd.getrandbits(32)
    c = Client(mtu=1040, mss=1000, ws=4, sack=sack, ts=ts, isn=isn, seed=seed, rcv_buf=64000, snd_buf=64000,
               min_rto=0.05, max_retries=40)
    conn = c.handshake()
    up = bytes(rnd.randrange(256) for _ in range(size))
    down = bytes(rnd.randrange(256) for _ in range(size))
    p = Peer(c, up, sack)
    written = 0
    received = bytearray()
    closed = []
    for step in range(20000):
        # the peer sends data and/or an ACK (some lost, some reordered)
        pkts = []
        for off, chunk in p.segments(c.now):
            pkts.append(c.packet("PA", seq=(p.base + off) & M, data=chunk, advance=False,
                                 sack_blocks=p.sack_blocks()))
        if p.una == len(up) and p.fin_got and (not p.fin_sent or c.now - p.fin_sent > 0.3):
            pkts.append(c.packet("FA", seq=(p.base + len(up)) & M, advance=False))
            p.fin_sent = c.now      # (re)sent until acknowledged
        rnd.shuffle(pkts)
        for pkt in pkts:
            if rnd.random() >= loss:
                c.inject(pkt)
        # the host: read everything, write as much as fits, close when done
        if not conn.closed:
            received += conn.read()
            if written < len(down):
                written += conn.write(down[written:written + 20000])
            elif conn.state in ("ESTABLISHED", "CLOSE_WAIT"):
                conn.shutdown()
        c.poll(0.01)
        segs = [s for s in c.drain() if rnd.random() >= loss]
        rnd.shuffle(segs)
        if p.take(segs):
            ack = c.packet("A", seq=(p.base + p.nxt + (1 if p.fin_sent is not None else 0)) & M, advance=False,
                           sack_blocks=p.sack_blocks())
            if rnd.random() >= loss:
                c.inject(ack)
        closed += c.closed_reasons()
        if closed:
            break
    c.run_until(c.now + 10)
    closed += c.closed_reasons()
    return c, conn, up, down, p, bytes(received), closed


@pytest.mark.parametrize("seed,sack,ts,wrap", [(1, False, False, False), (2, True, True, False),
                                               (3, True, False, True), (4, False, True, True),
                                               (5, True, True, True)])
def test_lossy_bulk_both_ways(seed, sack, ts, wrap):
    c, conn, up, down, p, received, closed = run_transfer(seed, sack, ts, wrap=wrap)
    assert received == up, (len(received), len(up))
    assert bytes(p.got) == down, (len(p.got), len(down))
    assert closed == ["closed"], closed
    assert c.stack.tcp == {}


def test_lossless_reordering_only():
    c, conn, up, down, p, received, closed = run_transfer(9, True, True, loss=0.0)
    assert received == up and bytes(p.got) == down and closed == ["closed"]
