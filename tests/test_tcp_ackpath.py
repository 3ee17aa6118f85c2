"""The download's ACK path: whatever shortcut a segment takes (the header
prediction in segment_arrives, the demux's one-read parse of a pure ACK,
the batch input), the connection must end up exactly where RFC 9293's
step-by-step processing (`_slow`) puts it.

Two stacks with the same seed play the same conversation: the same host
writes, the same client segments, the same clock.  Stack A takes every
shortcut; stack B has segment_arrives replaced by the slow path and its
batches fed packet by packet.  After every step the two connections'
slots, buffers, drop counters, events and the bytes of every packet they
sent must be equal.  The client's segments are drawn at random around
the sender's state: ACKs of new data (whole segments, odd amounts, all of
it), duplicate ACKs (three and more: fast retransmit, recovery), old
ACKs, ACKs of unsent data, window updates, zero windows (persist probes),
SACK blocks, old timestamps (PAWS), data from the client, and time steps
that fire the retransmission and persist timers.
"""

from __future__ import annotations

import random

import pytest

from helpers import M, Client, tcp_options
from netstack import events
from netstack.tcp.connection import TcpConnection

_SKIP_SLOTS = {"host", "tpl", "_mem", "ooo", "user", "snd_buf", "rcv_buf", "key", "src", "dst"}


def _slow_only(self, seq, ack, flags, wnd, opts, payload, now):
    return self._slow(self.state, seq, ack, flags, wnd, opts, payload, now)


def _state(conn) -> dict:
    d = {name: getattr(conn, name) for name in TcpConnection.__slots__ if name not in _SKIP_SLOTS}
    d["snd_buf"] = bytes(conn.snd_buf)
    d["rcv_buf"] = bytes(conn.rcv_buf)
    d["ooo"] = list(conn.ooo.runs) if conn.ooo.runs else []
    return d


class Twin:
    """Two clients, each with its own stack, fed the same segments."""

    def __init__(self, seed, monkeypatch, *, mss=1000, ts=True, sack=True, ws=7, family=4, verify=False):
        kw = dict(mss=mss, ts=ts, sack=sack, ws=ws, family=family, seed=seed, verify_checksums=verify,
                  rcv_buf=64 * 1024, snd_buf=256 * 1024)
        self.verify = verify
        self.a = Client(**kw)
        self.b = Client(**kw)
        self.mp = monkeypatch
        self.ca = self.a.handshake()
        with self.slow():
            self.cb = self.b.handshake()
        self.rng = random.Random(seed * 7919)
        self.sent = 0          # highest sequence offset the client has seen from the stack
        self.checked = 0

    def slow(self):
        mp = self.mp

        class _Ctx:
            def __enter__(self_):
                mp.setattr(TcpConnection, "segment_arrives", _slow_only)

            def __exit__(self_, *exc):
                mp.undo()
        return _Ctx()

    def feed(self, pkts):
        """The same packets to both stacks: A as one batch, B one by one on the slow path."""
        now = self.a.now
        self.a.stack.input_batch(pkts, now)
        with self.slow():
            for p in pkts:
                self.b.stack.input(p, now)
        self.a.tsval += 1
        self.b.tsval += 1

    def poll(self, dt):
        for c in (self.a, self.b):
            c.now += dt
            with (self.slow() if c is self.b else _Null()):
                c.stack.poll(c.now)
        oa, ob = self.a.stack.take_output(), self.b.stack.take_output()
        assert [bytes(p) for p in oa] == [bytes(p) for p in ob], "the two stacks sent different packets"
        for p in oa:
            self._client_sees(p)
        self._events()

    def _client_sees(self, p):
        from helpers import parse_packet
        s = parse_packet(p)
        if s.opts is not None and s.opts.ts_val is not None:
            self.a.ts_recent = self.b.ts_recent = s.opts.ts_val

    def _events(self):
        ea, eb = self.a.stack.take_events(), self.b.stack.take_events()
        assert [type(e).__name__ for e in ea] == [type(e).__name__ for e in eb]
        for e in ea:
            if isinstance(e, events.TcpReadable):
                assert bytes(self.ca.read()) == bytes(self.cb.read())

    def compare(self, what):
        sa, sb = _state(self.ca), _state(self.cb)
        diff = {k: (sa[k], sb[k]) for k in sa if sa[k] != sb[k]}
        assert not diff, f"after {what}: fast != slow: {diff}"
        assert dict(self.a.stack.tcp_drops) == dict(self.b.stack.tcp_drops), what
        assert dict(self.a.stack.drops) == dict(self.b.stack.drops), what
        assert self.a.stack.delivered == self.b.stack.delivered
        assert self.a.stack.rx_packets == self.b.stack.rx_packets
        self.checked += 1

    # ------------------------------------------------------------ the client

    def write(self, n):
        data = bytes(self.rng.getrandbits(8) for _ in range(16)) * (n // 16 + 1)
        data = data[:n]
        if self.ca.closed or self.ca.fin_queued or self.ca.state not in ("ESTABLISHED", "CLOSE_WAIT"):
            return
        assert self.ca.write(data) == self.cb.write(data)

    def segment(self):
        """One client segment drawn around the sender's state."""
        rng = self.rng
        c = self.ca
        una, mx = c.snd_una, c.snd_max
        inflight = (mx - una) & M
        seg = c._seg
        r = rng.random()
        if inflight and r < 0.6:
            k = rng.choice((seg, 2 * seg, 3 * seg, rng.randint(1, inflight), inflight))
            ack = (una + min(k, inflight)) & M
        elif r < 0.8:
            ack = una                                    # duplicate ACK or window update
        elif r < 0.85:
            ack = (una - rng.randint(1, 3000)) & M       # old
        elif r < 0.88:
            ack = (mx + rng.randint(1, 3000)) & M        # beyond what was sent
        else:
            ack = (una + rng.randint(0, inflight)) & M if inflight else una
        w = rng.random()
        wnd_kept = rng.random() < 0.5
        if w < 0.8 or wnd_kept:
            wnd = self.a.wnd if self.a.wnd else 500
        elif w < 0.87:
            wnd = 0
        elif w < 0.94:
            wnd = rng.randint(1, 40)                     # a few segments (scaled by 7)
        else:
            wnd = rng.randint(0, 65535)
        self.a.wnd = self.b.wnd = wnd
        kw = {}
        if c.sack_ok and inflight > 2 * seg and rng.random() < 0.15:
            blocks = []
            for _ in range(rng.randint(1, 3)):
                lo = rng.randint(1, inflight - 1)
                hi = rng.randint(lo + 1, inflight)
                blocks.append(((una + lo) & M, (una + hi) & M))
            kw["sack_blocks"] = blocks
        if c.ts_ok:
            t = rng.random()
            if t < 0.05:
                kw["ts"] = ((self.a.tsval - rng.randint(1, 1 << 20)) & M, self.a.ts_recent)     # PAWS
            elif t < 0.1:
                kw["ts"] = (self.a.tsval, (self.a.ts_recent - rng.randint(0, 100)) & M)
        data = b""
        flags = "A"
        if rng.random() < 0.1:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 600)))
            flags = "PA"
        odd = rng.random()
        if odd < 0.004:
            flags = "SA"                                 # a SYN in a synchronized state: challenge ACK
        elif odd < 0.008:
            flags = "FA"                                 # the client's FIN: CLOSE_WAIT, then on
        elif odd < 0.01:
            flags = "RA"                                 # a RST, exact or not
        # in order (what the stack expects next: data it dropped is sent
        # again), now and then out of order or old
        seq = c.rcv_nxt
        if rng.random() < 0.04:
            seq = (seq + rng.choice((-1, 1, 500, -500))) & M
        if self.verify and rng.random() < 0.05:
            kw["bad_checksum"] = True                    # counted and dropped, by either route
        pkt = self.a.packet(flags, seq=seq, ack=ack, wnd=wnd, data=data, advance=False, **kw)
        if self.verify and pkt[0] == 0x45 and rng.random() < 0.03:
            pkt = pkt[:10] + bytes([pkt[10] ^ 0x21]) + pkt[11:]      # a bad IPv4 header checksum
        return pkt


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _play(tw, steps):
    rng = tw.rng
    tw.write(20000)
    tw.poll(0.0)
    for i in range(steps):
        r = rng.random()
        if r < 0.2:
            tw.write(rng.randint(1, 30000))
        elif r < 0.205:
            tw.ca.shutdown()                             # our FIN after the data: FIN_WAIT_1, ... TIME_WAIT
            tw.cb.shutdown()
        batch = [tw.segment() for _ in range(rng.choice((1, 1, 2, 3, 5, 8)))]
        tw.feed(batch)
        tw.compare(f"step {i}: {len(batch)} segment(s)")
        dt = rng.choice((0.0, 0.0, 0.001, 0.01, 0.05, 0.3, 1.0))
        tw.poll(dt)
        tw.compare(f"step {i}: poll +{dt}")
        if tw.ca.closed:
            break


@pytest.mark.parametrize("seed", range(1, 13))
def test_fast_paths_decide_as_the_slow_path(seed, monkeypatch):
    tw = Twin(seed, monkeypatch)
    _play(tw, 150)
    assert tw.checked >= 20


@pytest.mark.parametrize("seed", range(1, 5))
def test_fast_paths_decide_as_the_slow_path_verifying_checksums(seed, monkeypatch):
    """A device that does not vouch for checksums (a pcap, an fd from an
    unknown host): the flow cache verifies them too, and one that fails
    goes to input(), which counts the drop."""
    tw = Twin(300 + seed, monkeypatch, verify=True)
    _play(tw, 150)
    assert tw.checked >= 20
    assert tw.a.stack.drops["bad_tcp_checksum"] > 0 and tw.a.stack.drops["bad_ip_checksum"] > 0


@pytest.mark.parametrize("seed", range(1, 5))
def test_fast_paths_decide_as_the_slow_path_without_options(seed, monkeypatch):
    """No timestamps, no SACK, no window scaling: the RTT comes from one
    timed segment (Karn), dupacks from the plain rule."""
    tw = Twin(100 + seed, monkeypatch, ts=False, sack=False, ws=None)
    _play(tw, 150)
    assert tw.checked >= 20


@pytest.mark.parametrize("seed", range(1, 4))
def test_fast_paths_decide_as_the_slow_path_ipv6(seed, monkeypatch):
    tw = Twin(200 + seed, monkeypatch, family=6)
    _play(tw, 100)
    assert tw.checked >= 20


def test_runs_of_pure_acks_in_one_batch(monkeypatch):
    """What a read batch from a TUN holds during a download: many pure
    ACKs of the same flow, each a little further, then duplicates."""
    tw = Twin(42, monkeypatch)
    tw.write(200000)
    for rnd in range(40):
        tw.poll(0.0)
        c = tw.ca
        una = c.snd_una
        inflight = (c.snd_max - una) & M
        seg = c._seg
        acks = []
        a = una
        while (a - una) & M < inflight and len(acks) < 30:
            a = (a + min(2 * seg, inflight - ((a - una) & M))) & M
            acks.append(a)
        if rnd % 5 == 4 and acks:
            acks = acks[: len(acks) // 2] + [acks[len(acks) // 2 - 1]] * 4     # then dupacks
        batch = [tw.a.packet("A", ack=x, advance=False) for x in acks]
        tw.feed(batch)
        tw.compare(f"round {rnd}: {len(batch)} ACKs")
        tw.write(30000)
        tw.poll(0.001 if rnd % 7 else 0.3)
        tw.compare(f"round {rnd}: poll")


def test_a_new_syn_after_acks_in_one_batch_reopens_from_time_wait(monkeypatch):
    """TIME_WAIT, then one batch: two ACKs of the old flow and a SYN with a
    newer timestamp.  The SYN must leave the flow cache for the demux's
    TIME_WAIT reuse (RFC 6191) on both routes: a new request, the same
    packets."""
    tw = Twin(7, monkeypatch)
    tw.write(3000)
    tw.poll(0.0)
    tw.ca.shutdown()
    tw.cb.shutdown()
    tw.poll(0.0)
    c = tw.ca
    tw.feed([tw.a.packet("A", seq=c.rcv_nxt, ack=c.snd_max, advance=False)])
    tw.feed([tw.a.packet("FA", seq=c.rcv_nxt, ack=c.snd_max, advance=False)])
    tw.poll(0.0)
    tw.compare("our FIN acknowledged, theirs in")
    assert c.state == "TIME_WAIT"
    rn = c.rcv_nxt
    batch = [tw.a.packet("A", seq=rn, ack=c.snd_max, advance=False) for _ in range(2)]
    tw.a.tsval += 10
    # a SYN with no option but the timestamp: the shape the flow cache reads
    batch.append(tw.a.packet("S", seq=(rn + 100000) & M, ack=0, advance=False,
                             opts=tcp_options(ts=(tw.a.tsval, 0))))
    tw.feed(batch)
    reqs_a = [e for e in tw.a.stack.take_events() if isinstance(e, events.TcpConnectRequest)]
    reqs_b = [e for e in tw.b.stack.take_events() if isinstance(e, events.TcpConnectRequest)]
    assert len(reqs_a) == len(reqs_b) == 1
    assert tw.ca.closed and tw.cb.closed
    assert _state(reqs_a[0].conn) == _state(reqs_b[0].conn)


def _with_ip_options(pkt):
    """The same IPv4 packet with a 4-byte IP option block that repeats the
    TCP ports: bytes 12-24 look like the flow's, only the IHL tells."""
    b = bytearray(pkt[:20]) + pkt[20:24] + pkt[20:]
    b[0] = 0x46
    b[2:4] = (len(b)).to_bytes(2, "big")
    return bytes(b)


def _with_flag(pkt, frag_word):
    b = bytearray(pkt)
    b[6:8] = frag_word.to_bytes(2, "big")
    return bytes(b)


def test_packets_the_flow_cache_must_not_take(monkeypatch):
    """Inside a run of one flow's ACKs: the same flow's segment with link
    padding after the IP datagram, with IP options, as a fragment, without
    a timestamp, with data; and another flow's segment.  Each must be
    handled as input() handles it alone (the padding is not data, the
    fragment waits for reassembly, the stranger gets a RST)."""
    tw = Twin(9, monkeypatch)
    tw.write(60000)
    tw.poll(0.0)
    c = tw.ca
    una, seg = c.snd_una, c._seg

    def ack(k, **kw):
        return tw.a.packet("A", seq=c.rcv_nxt, ack=(una + k * seg) & M, advance=False, **kw)

    stranger = Client(tw.a.stack, client=("10.0.0.9", 41000)).packet("A", seq=5, ack=7, advance=False)
    batch = [ack(1), ack(2), ack(3) + b"\0\0\0\0", _with_ip_options(ack(4)), ack(5),
             _with_flag(ack(6), 0x2000), ack(7), ack(8, opts=b""), stranger, ack(9), ack(10),
             ack(10, opts=b"\x01\x01\x05\x0a" + ((una + 11 * seg) & M).to_bytes(4, "big")
                 + ((una + 12 * seg) & M).to_bytes(4, "big")),
             tw.a.packet("PA", seq=c.rcv_nxt, ack=(una + 10 * seg) & M, data=b"x" * 300, advance=False),
             ack(11)]
    tw.feed(batch)
    tw.compare("a batch of odd packets among one flow's ACKs")
    tw.poll(0.0)
    tw.compare("after the poll")
    assert tw.a.stack.drops == tw.b.stack.drops and tw.a.stack.frag_held == tw.b.stack.frag_held == 1
    assert tw.ca.rcv_nxt == (tw.a.seq + 300) & M
