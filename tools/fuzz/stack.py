"""Fuzz target "stack": the whole input path of netstack.Stack.

An input is a small program read by tools.fuzz.common.Provider:

    byte 0      configuration: bit 0 checksums not verified, bit 1 GSO
                super-segments allowed, bit 2 tiny limits (flows, pending
                requests, reassembly) so that the bounds are hit
    bytes 1-4   the seed of the stack's random source
    then steps, each an opcode byte and its operands:
      RAW        a packet (16-bit length + bytes) given to input() as it is
      FIXED      a packet whose IPv4/TCP/UDP/ICMP checksums are made right
                 first, so mutated headers get past checksum verification
      RELATIVE   a client TCP packet whose ACK number counts from the ISS of
                 the connection it belongs to (pcap seeds: the recorded
                 client acknowledges the recorded server, not our stack)
      SERVER     a packet the recorded server sent: the host writes its
                 payload to the connection (FIN: shutdown, RST: abort)
      BATCH      1-8 packets through input_batch()
      FRAGMENTS  a packet, checksums fixed, cut into fragments (size, order,
                 a duplicate, a loss all drawn from the input)
      TIME       the fake clock jumps forward
      HOST       a host action on an open connection or UDP flow
      POLL       only a poll
      POLICY     how the host answers events from now on (bits: reject some
                 requests, leave some pending, echo TCP data, read slowly,
                 random UDP answers, leave every request pending); the choices a policy leaves open come
                 from a random source seeded by bytes 1-4.  Policy 0 accepts
                 every request, reads everything and echoes UDP.

After every step: no exception (the stack never raises on input), the
accounting rule rx_packets == sum(drops) + delivered + frag_held, tables
within their configured bounds, every timer that a flow wants on the heap,
every output packet well formed (checksums, lengths, within the MTU or a TCP
GSO super-segment), TcpClosed/UdpClosed once per flow.  At the end the clock
runs on until every UDP flow has idled out.
"""

from __future__ import annotations

import random
import struct

from netstack import Stack, StackConfig, events
from netstack.stack import _HEAP_SLACK
from netstack.tcp.const import TcpError

from .common import InvariantError, Provider, check, check_output_packet, fix_checksums, put_blob

RAW, FIXED, RELATIVE, SERVER, BATCH, FRAGMENTS, TIME, HOST, POLL, POLICY = range(10)
N_OPS = 10
# host policy bits (POLICY step); 0: accept every request, read everything, echo UDP
P_REJECT, P_PENDING, P_ECHO, P_SLOW_READ, P_UDP, P_HOLD = 1, 2, 4, 8, 16, 32
MAX_STEPS = 400
STEPS = (0.0005, 0.01, 0.2, 1.0, 3.0, 30.0, 120.0)
MAX_PACKET = 0xFFFF
MAX_SEED = 48 * 1024          # libFuzzer's -max_len is 64 KiB
M32 = 0xFFFFFFFF
_TCP_WRITE = ("ESTABLISHED", "CLOSE_WAIT", "SYN_RECEIVED")


def config(flags: int) -> StackConfig:
    cfg = StackConfig(verify_checksums=not flags & 1, gso_max=65535 if flags & 2 else 0, connect_timeout=3.0,
                      time_wait=1.0, udp_timeout=20.0)
    if flags & 4:
        cfg.max_flows, cfg.max_pending, cfg.max_pending_per_dst, cfg.max_pending_per_src = 6, 4, 2, 3
        cfg.max_half_open = 2
        cfg.frag_max_datagrams, cfg.frag_max_bytes, cfg.frag_timeout = 2, 4096, 5.0
    return cfg


class Host:
    """Plays the application: answers events with choices from the input."""

    def __init__(self, stack: Stack, fdp: Provider, seed: int):
        self.stack = stack
        self.fdp = fdp
        self.rnd = random.Random(seed ^ 0x5EED)
        self.policy = 0
        self.tcp_closed: set = set()
        self.udp_closed: set = set()
        self.conns: list = []        # accepted TCP connections
        self.flows: list = []        # UDP flows
        self.shut: set = set()

    def handle(self, evs) -> None:
        """Answer events as the policy says; the choices it leaves open come
        from a random source seeded by the input (not from the step
        stream, so a seed's steps stay aligned whatever the stack raises)."""
        pol, rnd = self.policy, self.rnd.random
        for e in evs:
            t = type(e)
            if t is events.TcpConnectRequest:
                c = e.conn
                if c.closed or c.state != "LISTEN":
                    continue            # reset or shed in the same batch: its TcpClosed follows
                if pol & P_HOLD:
                    pass                # an upstream that never answers: every request waits
                elif pol & P_REJECT and rnd() < 0.3:
                    c.reject(("rst", "icmp-port", "drop")[int(rnd() * 3)])
                elif pol & P_PENDING and rnd() < 0.3:
                    pass                # left pending: the connect timeout answers it
                else:
                    c.accept()
                    self.conns.append(c)
            elif t is events.TcpReadable:
                c = e.conn
                if not c.closed and not (pol & P_SLOW_READ and rnd() < 0.5):
                    data = bytes(c.read_buffer()) if rnd() < 0.5 else c.read()
                    if data and pol & P_ECHO and self._writable(c):
                        c.write(data)
            elif t is events.TcpWritable:
                pass
            elif t is events.TcpClosed:
                check(e.conn.id not in self.tcp_closed, lambda: f"TcpClosed twice for {e.conn!r}")
                check(e.conn.closed, "TcpClosed for an open connection")
                self.tcp_closed.add(e.conn.id)
            elif t is events.UdpDatagram:
                f = e.flow
                if f.closed:
                    continue
                if e.new:
                    self.flows.append(f)
                if not pol & P_UDP:
                    f.send(e.data[:1200] or b"r")
                    continue
                act = int(rnd() * 5)
                if act == 0:
                    f.send(e.data[:1200] or b"r")
                elif act == 1:
                    f.send(bytes((1473, 3000, 9000, 65000)[int(rnd() * 4)]))
                elif act == 2:
                    f.reject(("port", "host", "net", "admin")[int(rnd() * 4)])
                elif act == 3:
                    f.close()
            elif t is events.UdpClosed:
                check(e.flow.id not in self.udp_closed, lambda: f"UdpClosed twice for {e.flow!r}")
                self.udp_closed.add(e.flow.id)
            else:
                raise InvariantError(f"unknown event {e!r}")

    def _writable(self, c) -> bool:
        return (not c.closed and c.id not in self.shut and c.state in _TCP_WRITE
                and c._pending_close is None and not c.fin_queued)

    def act(self) -> None:
        """A spontaneous host action (HOST step)."""
        fdp = self.fdp
        self.conns = [c for c in self.conns if not c.closed]
        self.flows = [f for f in self.flows if not f.closed]
        if fdp.flag():
            if not self.flows:
                return
            f = fdp.pick(self.flows)
            act = fdp.u8() % 3
            if act == 0:
                f.send(fdp.blob(2000))
            elif act == 1:
                f.close()
            else:
                f.reject("port")
            return
        if not self.conns:
            return
        c = fdp.pick(self.conns)
        act = fdp.u8() % 5
        if act in (0, 1):
            if self._writable(c):
                c.write(fdp.blob(4000) if act == 0 else bytes(fdp.pick((3000, 70000, 1 << 20))))
        elif act == 2:
            c.shutdown()
            self.shut.add(c.id)
        elif act == 3:
            c.abort()
        else:
            c.read()

    def server_packet(self, pkt: bytes) -> None:
        """SERVER step: mirror what a recorded server did on its connection."""
        parsed = _tcp_fields(pkt)
        if parsed is None:
            return
        src, sport, dst, dport, _seq, _ack, flags, payload = parsed
        c = self.stack.tcp.get((dst, dport, src, sport))
        if c is None or c.closed or c.state == "LISTEN":
            return
        if payload and self._writable(c):
            c.write(payload)
        if flags & 0x04:
            c.abort()
        elif flags & 0x01 and c.id not in self.shut:
            c.shutdown()
            self.shut.add(c.id)


def _tcp_fields(pkt: bytes):
    """(src, sport, dst, dport, seq, ack, flags, payload) of a plain TCP packet, else None."""
    n = len(pkt)
    if n >= 20 and pkt[0] >> 4 == 4:
        ihl = (pkt[0] & 15) * 4
        tot = struct.unpack_from("!H", pkt, 2)[0]
        if pkt[9] != 6 or ihl < 20 or tot > n or tot < ihl + 20:
            return None
        src, dst, off, end = pkt[12:16], pkt[16:20], ihl, tot
    elif n >= 60 and pkt[0] >> 4 == 6:
        plen = struct.unpack_from("!H", pkt, 4)[0]
        if pkt[6] != 6 or plen < 20 or 40 + plen > n:
            return None
        src, dst, off, end = pkt[8:24], pkt[24:40], 40, 40 + plen
    else:
        return None
    sport, dport, seq, ack, doff, flags = struct.unpack_from("!HHIIBB", pkt, off)
    hl = (doff >> 4) * 4
    if hl < 20 or off + hl > end:
        return None
    return bytes(src), sport, bytes(dst), dport, seq, ack, flags, pkt[off + hl:end]


def relative(stack: Stack, pkt: bytes) -> bytes:
    """RELATIVE step: the ACK field counts from the connection's ISS."""
    parsed = _tcp_fields(pkt)
    if parsed is None:
        return fix_checksums(pkt)
    src, sport, dst, dport = parsed[:4]
    c = stack.tcp.get((src, sport, dst, dport))
    if c is not None:
        off = (pkt[0] & 15) * 4 if pkt[0] >> 4 == 4 else 40
        b = bytearray(pkt)
        struct.pack_into("!I", b, off + 8, (c.iss + parsed[5]) & M32)
        pkt = bytes(b)
    return fix_checksums(pkt)


def fragments(fdp: Provider, pkt: bytes) -> list:
    """Cut a packet into fragments (RFC 791 / RFC 8200) in an order from the input."""
    size = fdp.pick((8, 16, 64, 256, 1000))
    n = len(pkt)
    out = []
    if n >= 28 and pkt[0] >> 4 == 4 and (pkt[0] & 15) == 5:
        tot = min(struct.unpack_from("!H", pkt, 2)[0], n)
        hdr, data = bytearray(pkt[:20]), pkt[20:tot]
        for pos in range(0, len(data), size):
            chunk = data[pos:pos + size]
            h = bytearray(hdr)
            more = 0x2000 if pos + size < len(data) else 0
            struct.pack_into("!HHH", h, 2, 20 + len(chunk), struct.unpack_from("!H", hdr, 4)[0], more | (pos >> 3))
            out.append(fix_checksums(bytes(h) + chunk))
    elif n >= 48 and pkt[0] >> 4 == 6:
        plen = min(struct.unpack_from("!H", pkt, 4)[0], n - 40)
        nxt, data, ident = pkt[6], pkt[40:40 + plen], fdp.u32()
        for pos in range(0, len(data), size):
            chunk = data[pos:pos + size]
            more = 1 if pos + size < len(data) else 0
            body = struct.pack("!BBHI", nxt, 0, pos | more, ident) + chunk
            out.append(pkt[:4] + struct.pack("!HBB", len(body), 44, pkt[7]) + pkt[8:40] + body)
    else:
        return [pkt]
    out = out[:64]
    for i in range(len(out) - 1, 0, -1):          # Fisher-Yates driven by the input
        j = fdp.below(i + 1)
        out[i], out[j] = out[j], out[i]
    extra = fdp.u8()
    if extra & 1 and out:
        out.append(out[fdp.below(len(out))])
    if extra & 2 and len(out) > 1:
        out.pop()
    return out


def invariants(stack: Stack, host: Host) -> None:
    cfg = stack.config
    check(stack.rx_packets == sum(stack.drops.values()) + stack.delivered + stack.frag_held,
          lambda: f"accounting: rx {stack.rx_packets} != drops {dict(stack.drops)} + delivered "
                  f"{stack.delivered} + frag_held {stack.frag_held}")
    check(len(stack.tcp) + len(stack.udp) <= cfg.max_flows, "flows over max_flows")
    check(0 <= stack.pending <= cfg.max_pending, lambda: f"pending {stack.pending}")
    held = sum(len(c.rcv_buf) + len(c.snd_buf) + c.ooo.nbytes for c in stack.tcp.values())
    check(stack.budget.used - stack.budget.out == held,
          lambda: f"memory budget counts {stack.budget.used} (output {stack.budget.out}), flows hold {held}")
    adm = stack.admission
    check(len(adm.half_open) <= cfg.max_half_open, "half-open over max_half_open")
    for (dst, _), reqs in adm.by_dst.items():
        check(len(reqs) <= cfg.max_pending_per_dst, "pending per destination over the bound")
    for src, reqs in (adm.by_src or {}).items():
        check(len(reqs) <= cfg.max_pending_per_src, "pending per source over the bound")
    fr = stack._frag
    if fr is not None:
        check(len(fr) <= cfg.frag_max_datagrams and fr.bytes_held <= cfg.frag_max_bytes, "reassembly over its bounds")
    gso = bool(cfg.gso_max)
    for pkt in stack.take_output():
        check_output_packet(pkt, cfg.mtu, gso)


def timers(stack: Stack) -> None:
    for flow in list(stack.tcp.values()) + list(stack.udp.values()):
        if flow.poll_at is not None:
            check(flow._sched_at is not None and flow._sched_at <= flow.poll_at,
                  lambda: f"{flow!r} wants a timer at {flow.poll_at} but has {flow._sched_at}")
        elif getattr(flow, "state", None) == "TIME_WAIT":
            check(any(e[2] is flow and e[0] == flow.tw_at for e in stack._tw),
                  lambda: f"{flow!r} in TIME_WAIT has no entry in the queue")
        if getattr(flow, "conn_at", None) is not None:
            check(any(e[2] is flow and e[0] == flow.conn_at for e in stack._requests),
                  lambda: f"{flow!r} waits for an answer with no entry in the request queue")
    d = stack.next_deadline()
    check(d is None or d >= 0, "negative deadline")
    live = len(stack.tcp) + len(stack.udp)
    check(len(stack._heap) <= _HEAP_SLACK + 2 * live + 1, lambda: f"timer heap of {len(stack._heap)} for {live} flows")


def TestOneInput(data: bytes) -> None:
    fdp = Provider(data)
    flags = fdp.u8()
    seed = fdp.u32()
    stack = Stack(config(flags), rng=random.Random(seed))
    host = Host(stack, fdp, seed)
    now = 1000.0
    steps = 0
    try:
        while fdp.remaining() and steps < MAX_STEPS:
            steps += 1
            op = fdp.u8() % N_OPS
            if op == RAW:
                stack.input(fdp.blob(MAX_PACKET), now)
            elif op == FIXED:
                stack.input(fix_checksums(fdp.blob(MAX_PACKET)), now)
            elif op == RELATIVE:
                stack.input(relative(stack, fdp.blob(MAX_PACKET)), now)
            elif op == SERVER:
                host.server_packet(fdp.blob(MAX_PACKET))
            elif op == BATCH:
                stack.input_batch([fix_checksums(fdp.blob(4000)) for _ in range(1 + fdp.u8() % 8)], now)
            elif op == FRAGMENTS:
                for f in fragments(fdp, fix_checksums(fdp.blob(MAX_PACKET))):
                    stack.input(f, now)
            elif op == TIME:
                now += fdp.pick(STEPS)
            elif op == HOST:
                host.act()
            elif op == POLICY:
                host.policy = fdp.u8()
            invariants(stack, host)
            host.handle(stack.take_events())
            stack.poll(now)
            invariants(stack, host)
            timers(stack)
        # let the timers run out: UDP flows idle out, TCP times out or closes
        for _ in range(500):
            d = stack.next_deadline()
            if d is None:
                break
            now = max(now, d)
            stack.poll(now)
            host.handle(stack.take_events())
            invariants(stack, host)
        check(not stack.udp, lambda: f"{len(stack.udp)} UDP flows left after their timeouts")
    except TcpError as e:
        # the host above only makes legitimate calls: a TcpError is a stack bug
        raise InvariantError(f"TcpError on a legitimate host call: {e}") from e


# ---------------------------------------------------------------- seeds

def _nearest_step(dt: float) -> int:
    best = 0
    for i, s in enumerate(STEPS):
        if abs(s - dt) < abs(STEPS[best] - dt):
            best = i
    return best


def seeds_from_packets(packets) -> bytes:
    """A program replaying a capture's client side (and its server's data as
    host writes): [(ts, ip_packet)] -> input bytes."""
    out = bytearray([0]) + bytes(4)
    client = {}        # (src, sport, dst, dport) of TCP/UDP flows -> True when src is the client
    server_isn = {}    # client-first key -> the recorded server's ISN
    last = packets[0][0] if packets else 0.0
    for ts, pkt in packets:
        if ts - last >= 0.0005:
            out += bytes([TIME, _nearest_step(ts - last)])
            last = ts
        pkt = bytes(pkt)
        f = _tcp_fields(pkt)
        if f is None:
            out += bytes([RAW]) + put_blob(pkt[:MAX_PACKET])
            continue
        src, sport, dst, dport, seq, ack, flags, _ = f
        key, rkey = (src, sport, dst, dport), (dst, dport, src, sport)
        if flags & 0x12 == 0x02:
            client[key] = True
        elif flags & 0x12 == 0x12 and rkey in client:
            server_isn[rkey] = seq
        if key in client:
            if flags & 0x10 and key in server_isn:
                b = bytearray(pkt)
                off = (pkt[0] & 15) * 4 if pkt[0] >> 4 == 4 else 40
                struct.pack_into("!I", b, off + 8, (ack - server_isn[key]) & M32)
                out += bytes([RELATIVE]) + put_blob(bytes(b))
            else:
                out += bytes([RAW]) + put_blob(pkt)
        elif rkey in client:
            out += bytes([SERVER]) + put_blob(pkt)
        else:
            out += bytes([RAW]) + put_blob(pkt)
        out += bytes([POLL])
    return bytes(out)


def _tcp(family, src, dst, sport, dport, seq, ack, flags, data=b"") -> bytes:
    """A TCP packet with right checksums (for synthetic seeds)."""
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq & M32, ack & M32, 5 << 4, flags, 65535, 0, 0) + data
    if family == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(seg), 1, 0x4000, 64, 6, 0, src, dst)
    else:
        ip = struct.pack("!IHBB16s16s", 0x60000000, len(seg), 6, 64, src, dst)
    return fix_checksums(ip + seg)


def conversation(family: int, client_closes_first: bool, simultaneous: bool = False) -> list:
    """[(ts, packet)] of a short request/response with an orderly close both
    ways, as a capture would show it (the pcaps' downloads are too long for
    a seed to reach their FIN)."""
    if family == 4:
        c, s = bytes([10, 7, 0, 2]), bytes([93, 184, 216, 34])
    else:
        c, s = bytes.fromhex("fd007478" + "0" * 22 + "02"), bytes.fromhex("20010db8" + "0" * 22 + "80")
    cp, sp, ci, si = 40000, 80, 5000, 9000
    req, resp = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    up = lambda seq, ack, fl, d=b"": _tcp(family, c, s, cp, sp, seq, ack, fl, d)    # noqa: E731
    down = lambda seq, ack, fl, d=b"": _tcp(family, s, c, sp, cp, seq, ack, fl, d)  # noqa: E731
    c1, s1 = ci + 1 + len(req), si + 1 + len(resp)
    pk = [up(ci, 0, 0x02), down(si, ci + 1, 0x12), up(ci + 1, si + 1, 0x10), up(ci + 1, si + 1, 0x18, req),
          down(si + 1, c1, 0x18, resp), up(c1, s1, 0x10)]
    if simultaneous:
        # both FINs cross: each side's FIN acks only the other's data
        pk += [down(s1, c1, 0x11), up(c1, s1, 0x11), up(c1 + 1, s1 + 1, 0x10), down(s1 + 1, c1 + 1, 0x10)]
    elif client_closes_first:
        pk += [up(c1, s1, 0x11), down(s1, c1 + 1, 0x10), down(s1, c1 + 1, 0x11), up(c1 + 1, s1 + 1, 0x10)]
    else:
        pk += [down(s1, c1, 0x11), up(c1, s1 + 1, 0x10), up(c1, s1 + 1, 0x11), down(s1 + 1, c1 + 1, 0x10)]
    return [(i * 0.001, p) for i, p in enumerate(pk)]


def flood(family: int) -> bytes:
    """A program that fills the tiny tables: SYNs from many ports to one
    destination and to a few others while the host answers none, then UDP
    flows, then the clock runs past the connect timeout."""
    conv = conversation(family, True)
    syn = conv[0][1]
    out = bytearray([4]) + bytes(4) + bytes([POLICY, P_HOLD])
    off = 20 if family == 4 else 40
    for i in range(12):
        b = bytearray(syn)
        struct.pack_into("!H", b, off, 41000 + i)           # another client port
        if i % 3 == 2:
            struct.pack_into("!H", b, off + 2, 81 + i)      # another destination port
        if i % 2:
            b[15 if family == 4 else 23] ^= i               # another client address
        out += bytes([FIXED]) + put_blob(bytes(b)) + bytes([POLL])
    for i in range(8):
        # a UDP datagram: the SYN's IP header turned into UDP
        if family == 4:
            ip = bytearray(syn[:20])
            ip[9] = 17
            struct.pack_into("!H", ip, 2, 20 + 12)
        else:
            ip = bytearray(syn[:40])
            ip[6] = 17
            struct.pack_into("!H", ip, 4, 12)
        out += bytes([FIXED]) + put_blob(bytes(ip) + struct.pack("!HHHH", 5000 + i, 53, 12, 0) + b"dns?")
    out += bytes([TIME, 4, TIME, 4, POLICY, 0]) + bytes([FIXED]) + put_blob(syn)
    return bytes(out)


def seeds() -> list:
    import glob
    import os

    from tun2xray.replay import ReplayError, read_pcap
    root = os.path.join(os.path.dirname(__file__), "..", "..", "pcaps")
    out = []
    for path in sorted(glob.glob(os.path.join(root, "*.pcap"))):
        try:
            packets = read_pcap(path)
        except ReplayError:
            continue
        # long captures: the first packets (handshakes, first data) are what matters
        out.append(seeds_from_packets(packets[:150])[:MAX_SEED])
    for family in (4, 6):
        for first in (True, False):
            out.append(seeds_from_packets(conversation(family, first)))
        out.append(seeds_from_packets(conversation(family, False, simultaneous=True)))
        out.append(flood(family))
    return out
