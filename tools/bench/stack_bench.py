#!/usr/bin/env python3
"""Drive the sans-I/O Stack in-process with a synthetic TCP client.

Runs, on one core:
  - bulk transfer client -> host ("in") and host -> client ("out") with
    1460-byte segments (MTU 1500) and with 64 KB segments (TUN offload style:
    GSO super-segments in, gso_max out);
  - a connection-rate run: handshake, one request, one response, close;
  - `--only down`: host -> client against a client that behaves like
    Linux's receiver (timestamps and SACK-permitted in its SYN, a window
    scaled by 7, an ACK for every second segment, a read batch of ACKs fed
    in at once): the path of a download through a plain TUN.

The synthetic client is deliberately thin (precomputed headers, no checksum
work): what is measured is the stack.  Checksums: the stack is configured as
for a local TUN (inbound verified by the kernel, outbound left to the device
when offload is on); `--verify` turns inbound verification on and
`--no-offload` computes outbound checksums in Python.

  - with --rate R, the connection run on a clock that moves 1/R s per
    connection, polled after each one, with the default TIME_WAIT and
    connect timeout: the timers of ~10 s of connections live at once, as
    under a steady load (the plain run's clock barely moves).

--repo DIR imports netstack from another checkout (before/after with the
same bench).

Final line:
  stack_bench: mss1460_in_MBps=… mss1460_out_MBps=… seg64k_in_MBps=… seg64k_out_MBps=… conns_per_s=…
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import sys
import time

def _repo_arg(argv) -> str:
    """--repo DIR, read before netstack is imported."""
    for i, a in enumerate(argv):
        if a == "--repo" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--repo="):
            return a.split("=", 1)[1]
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


sys.path.insert(0, _repo_arg(sys.argv[1:]))

from netstack import Stack, StackConfig  # noqa: E402
from netstack import events as ev  # noqa: E402
from netstack.wire import checksum as ck  # noqa: E402

IP4 = struct.Struct("!BBHHHBBH4s4s")
TCP = struct.Struct("!HHIIBBHHH")
FIN, SYN, RST, PSH, ACK = 1, 2, 4, 8, 16
CLIENT = bytes([10, 0, 0, 2])
SERVER = bytes([93, 184, 216, 34])
M32 = 0xFFFFFFFF


class Client:
    """A minimal client TCP endpoint: builds segments, reads the stack's replies."""

    def __init__(self, sport, dport=80, mss=1460, wscale=7, verify=False):
        self.sport, self.dport = sport, dport
        self.iss = random.getrandbits(32)
        self.snd_nxt = self.iss
        self.rcv_nxt = 0
        self.mss = mss
        self.wscale = wscale
        self.wnd = 65535
        self.verify = verify
        self.peer_ack = self.iss
        self.peer_wnd = 0
        self.peer_wscale = 0
        self.fin_seen = False
        self.rst_seen = False
        self.received = 0

    def seg(self, flags, payload=b"", seq=None, options=b""):
        seq = self.snd_nxt if seq is None else seq
        hl = 20 + len(options)
        tl = hl + len(payload)
        tcph = TCP.pack(self.sport, self.dport, seq, self.rcv_nxt if flags & ACK else 0, hl << 2, flags,
                        self.wnd, 0, 0)
        if self.verify:
            s = ck.sum16(options, ck.sum16(tcph, ck.pseudo4(CLIENT, SERVER, 6, tl)))
            s = ck.sum16(payload, s)
            tcph = tcph[:16] + struct.pack("!H", ~s & 0xFFFF) + tcph[18:]
        total = 20 + tl
        iph = IP4.pack(0x45, 0, total & 0xFFFF, 0, 0x4000, 64, 6, 0, CLIENT, SERVER)
        if self.verify:
            iph = iph[:10] + struct.pack("!H", ck.checksum(iph)) + iph[12:]
        return b"".join((iph, tcph, options, payload))

    def syn(self):
        # MSS, NOP WS, NOP NOP SACK-permitted: 4 + 4 + 4 = 12 bytes
        opts = struct.pack("!BBHBBBB", 2, 4, self.mss, 1, 3, 3, self.wscale) + b"\x01\x01\x04\x02"
        p = self.seg(SYN, options=opts)
        self.snd_nxt = (self.snd_nxt + 1) & M32
        return p

    def take(self, pkt):
        """Consume one packet from the stack; returns payload length."""
        ihl = (pkt[0] & 15) << 2
        sport, dport, seq, ack, off, flags, wnd, _c, _u = TCP.unpack_from(pkt, ihl)
        doff = (off >> 4) << 2
        n = len(pkt) - ihl - doff
        if flags & RST:
            self.rst_seen = True
            return 0
        if flags & SYN:
            self.rcv_nxt = (seq + 1) & M32
            # window scale option of the SYN-ACK
            o = ihl + 20
            end = ihl + doff
            while o < end:
                k = pkt[o]
                if k == 1:
                    o += 1
                    continue
                if k == 0:
                    break
                if k == 3:
                    self.peer_wscale = pkt[o + 2]
                o += pkt[o + 1]
        elif n:
            if seq == self.rcv_nxt:
                self.rcv_nxt = (self.rcv_nxt + n) & M32
                self.received += n
        if flags & FIN and ((seq + n) & M32) == self.rcv_nxt:
            self.rcv_nxt = (self.rcv_nxt + 1) & M32
            self.fin_seen = True
        if flags & ACK:
            self.peer_ack = ack
            self.peer_wnd = wnd << (0 if flags & SYN else self.peer_wscale)
        return n


def connect(stack, client, now):
    stack.input(client.syn(), now)
    for e in stack.take_events():
        if isinstance(e, ev.TcpConnectRequest):
            conn = e.conn
            conn.accept()
    stack.poll(now)
    for p in stack.take_output():
        client.take(p)
    stack.input(client.seg(ACK), now)
    stack.poll(now)
    stack.take_output()
    stack.take_events()
    return conn


def bench_in(total, seg_size, verify):
    """Client sends `total` bytes in seg_size segments; the host reads everything."""
    cfg = StackConfig(mtu=1500, verify_checksums=verify, checksum_offload=True)
    stack = Stack(cfg, rng=random.Random(1))
    client = Client(40000, mss=1460, verify=verify)
    now = 1.0
    conn = connect(stack, client, now)
    payload = os.urandom(seg_size)
    got = 0
    sent = 0
    batch = 32 if seg_size <= 2048 else 4
    inp = stack.input
    t0 = time.perf_counter()
    while got < total:
        # send a batch within the window the stack advertises
        limit = (client.peer_ack + client.peer_wnd - client.snd_nxt) & M32
        if limit > 1 << 31:
            limit = 0
        k = 0
        while k < batch and limit >= seg_size and sent < total:
            inp(client.seg(ACK | PSH, payload), now)
            client.snd_nxt = (client.snd_nxt + seg_size) & M32
            sent += seg_size
            limit -= seg_size
            k += 1
        for e in stack.take_events():
            if type(e) is ev.TcpReadable:
                got += len(e.conn.read())
        while conn.readable:
            got += len(conn.read())
        now += 0.0001
        stack.poll(now)
        for p in stack.take_output():
            client.take(p)
    dt = time.perf_counter() - t0
    return total / dt / 1e6


def _fill(conn, mv, written, total):
    """Write mv's bytes into conn until its send buffer is full or *total*
    bytes have been written in all; returns the new total written."""
    while written < total:
        n = conn.write(mv[: min(len(mv), total - written)])
        if n <= 0:
            break
        written += n
    return written


def bench_out(total, seg_size, verify, offload):
    """The host writes `total` bytes; the client ACKs what it gets per batch."""
    cfg = StackConfig(mtu=1500, verify_checksums=verify, checksum_offload=offload)
    if seg_size > 1460:
        cfg.gso_max = seg_size
    cfg.snd_buf = max(cfg.snd_buf, 4 * seg_size)
    stack = Stack(cfg, rng=random.Random(2))
    client = Client(40001, mss=1460, verify=verify)
    client.wnd = 65535
    now = 1.0
    conn = connect(stack, client, now)
    chunk = os.urandom(256 * 1024)
    mv = memoryview(chunk)
    written = 0
    t0 = time.perf_counter()
    while client.received < total:
        written = _fill(conn, mv, written, total)
        stack.take_events()
        now += 0.0001
        stack.poll(now)
        out = stack.take_output()
        for p in out:
            client.take(p)
        if out:
            stack.input(client.seg(ACK), now)
        elif written >= total and client.received < total:
            # nothing in flight we know of: let timers run (should not happen)
            now += 0.3
    dt = time.perf_counter() - t0
    return total / dt / 1e6


class LinuxClient(Client):
    """A client that answers a download as Linux's receiver does on a
    plain TUN: timestamps on every segment (NOP NOP TS), SACK-permitted and
    window scale 7 in its SYN, one ACK for every second full segment."""

    def __init__(self, sport, **kw):
        super().__init__(sport, **kw)
        self.tsval = 1000
        self.ts_echo = 0
        self.wnd = 24000                 # << 7: about 3 MB, what Linux grows to

    def seg(self, flags, payload=b"", seq=None, options=b""):
        if not options:
            options = TS_BLOCK.pack(0x0101080A, self.tsval, self.ts_echo)
        return super().seg(flags, payload, seq, options)

    def syn(self):
        # MSS, SACK-permitted, TS, NOP, WS: Linux's order, 20 bytes
        opts = (struct.pack("!BBH", 2, 4, self.mss) + b"\x04\x02"
                + struct.pack("!BBII", 8, 10, self.tsval, 0) + struct.pack("!BBBB", 1, 3, 3, self.wscale))
        p = Client.seg(self, SYN, options=opts)
        self.snd_nxt = (self.snd_nxt + 1) & M32
        return p

    def take(self, pkt):
        ihl = (pkt[0] & 15) << 2
        if (pkt[ihl + 12] >> 4) << 2 == 32 and pkt[ihl + 20:ihl + 24] == b"\x01\x01\x08\x0a":
            self.ts_echo = int.from_bytes(pkt[ihl + 24:ihl + 28], "big")
        elif pkt[ihl + 13] & SYN:
            o = pkt.find(b"\x08\x0a", ihl + 20)
            if o > 0:
                self.ts_echo = int.from_bytes(pkt[o + 2:o + 6], "big")
        return super().take(pkt)


TS_BLOCK = struct.Struct("!III")


def bench_down(total, verify, offload):
    """The host writes `total` bytes to a LinuxClient; every poll's burst
    is answered with an ACK per two segments (and one for an odd last),
    fed back as one input_batch, as a read batch from a TUN is."""
    cfg = StackConfig(mtu=1500, verify_checksums=verify, checksum_offload=offload)
    stack = Stack(cfg, rng=random.Random(4))
    client = LinuxClient(40002, mss=1460, verify=verify)
    now = 1.0
    conn = connect(stack, client, now)
    chunk = os.urandom(256 * 1024)
    mv = memoryview(chunk)
    written = 0
    acks = 0
    t0 = time.perf_counter()
    while client.received < total:
        written = _fill(conn, mv, written, total)
        stack.take_events()
        now += 0.0001
        stack.poll(now)
        out = stack.take_output()
        batch = []
        k = 0
        for p in out:
            if client.take(p):
                k += 1
                if k == 2:
                    batch.append(client.seg(ACK))
                    k = 0
        if k:
            batch.append(client.seg(ACK))
        client.tsval += 1
        if batch:
            acks += len(batch)
            stack.input_batch(batch, now)
        elif written >= total and client.received < total:
            now += 0.3
    dt = time.perf_counter() - t0
    return total / dt / 1e6


def bench_conns(count, verify, rate=0.0):
    if rate:
        # real timer lengths, a clock at `rate` connections per second,
        # polled after every connection
        cfg = StackConfig(mtu=1500, verify_checksums=verify, checksum_offload=True)
    else:
        cfg = StackConfig(mtu=1500, verify_checksums=verify, checksum_offload=True, time_wait=0.5)
    step = 1.0 / rate if rate else 0.00005
    stack = Stack(cfg, rng=random.Random(3))
    heap_peak = 0
    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    response = b"HTTP/1.1 204 No Content\r\n\r\n"
    now = 1.0
    done = 0
    t0 = time.perf_counter()
    for i in range(count):
        client = Client(1024 + (i % 60000), verify=verify)
        stack.input(client.syn(), now)
        for e in stack.take_events():
            if type(e) is ev.TcpConnectRequest:
                e.conn.accept()
            elif type(e) is ev.TcpClosed:
                done += 1
        stack.poll(now)
        for p in stack.take_output():
            client.take(p)
        stack.input(client.seg(ACK | PSH, request), now)
        client.snd_nxt = (client.snd_nxt + len(request)) & M32
        for e in stack.take_events():
            if type(e) is ev.TcpReadable:
                c = e.conn
                c.read()
                c.write(response)
                c.shutdown()
            elif type(e) is ev.TcpClosed:
                done += 1
        stack.poll(now)
        for p in stack.take_output():
            client.take(p)
        stack.input(client.seg(ACK | FIN), now)
        client.snd_nxt = (client.snd_nxt + 1) & M32
        stack.poll(now)
        for p in stack.take_output():
            client.take(p)
        for e in stack.take_events():
            if type(e) is ev.TcpClosed:
                done += 1
        now += step
        if rate or i % 1024 == 0:
            stack.poll(now)
            stack.next_deadline()
            if len(stack._heap) > heap_peak:
                heap_peak = len(stack._heap)
    stack.poll(now + 20)
    for e in stack.take_events():
        if type(e) is ev.TcpClosed:
            done += 1
    dt = time.perf_counter() - t0
    if done != count:
        print(f"conns: only {done}/{count} connections closed", file=sys.stderr)
    if rate:
        # the timer heap's size (stale entries included) is what every
        # push and pop pays for, and what a compaction walks
        print(f"conns    : timer heap after each poll: at most {heap_peak} entries", flush=True)
    return done / dt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bytes", type=float, default=1e9, help="bytes per bulk run (default 1e9)")
    ap.add_argument("--conns", type=int, default=50000)
    ap.add_argument("--rate", type=float, default=0.0,
                    help="connection run on a clock of this many connections per second (see above)")
    ap.add_argument("--repo", help="checkout whose netstack is measured (default: this one)")
    ap.add_argument("--verify", action="store_true", help="verify inbound checksums (pcap/unknown host)")
    ap.add_argument("--no-offload", action="store_true", help="compute outbound checksums in Python")
    ap.add_argument("--only", choices=("down",), help="run one phase only")
    a = ap.parse_args(argv)
    total = int(a.bytes)
    r = {}
    if a.only == "down":
        r["down_MBps"] = bench_down(total, a.verify, not a.no_offload)
        print(f"down 1460: {r['down_MBps']:8.1f} MB/s", flush=True)
        print("stack_bench: " + " ".join(f"{k}={v:.1f}" for k, v in r.items()))
        return 0
    r["mss1460_in_MBps"] = bench_in(total, 1460, a.verify)
    print(f"in   1460: {r['mss1460_in_MBps']:8.1f} MB/s", flush=True)
    r["mss1460_out_MBps"] = bench_out(total, 1460, a.verify, not a.no_offload)
    print(f"out  1460: {r['mss1460_out_MBps']:8.1f} MB/s", flush=True)
    r["seg64k_in_MBps"] = bench_in(total, 65000, a.verify)
    print(f"in   64k : {r['seg64k_in_MBps']:8.1f} MB/s", flush=True)
    r["seg64k_out_MBps"] = bench_out(total, 65000, a.verify, not a.no_offload)
    print(f"out  64k : {r['seg64k_out_MBps']:8.1f} MB/s", flush=True)
    r["conns_per_s"] = bench_conns(a.conns, a.verify, a.rate)
    print(f"conns    : {r['conns_per_s']:8.0f} /s", flush=True)
    print("stack_bench: " + " ".join(f"{k}={v:.1f}" if "MBps" in k else f"{k}={v:.0f}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
