"""Hypothesis fuzzing of the whole Stack.

A run is a sequence of steps drawn one at a time: packets from the client
(valid ones for TCP/UDP/ICMP over v4/v6, mutated ones, fragments in any
order, random bytes, and segments of a tiny client model that follows the
stack's SYN-ACKs so that TCP connections really open), host actions on the
events (accept/reject/read/write/shutdown/abort for TCP once netstack.tcp
exists, send/reject/close for UDP) and a fake clock that jumps forward.

After every step: nothing raised, the accounting invariant holds, every
output packet is well formed, the flow tables, the reassembler and the
timer heap stay within their bounds, and every flow that wants a timer
has one.  FUZZ_EXAMPLES=2000 runs longer.
"""

import os
import struct
import sys

from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))
from test_stack_pkt import (A4, A6, B4, B6, accounting_ok, assert_valid, frag4, frag6, icmp_packet,  # noqa: E402
                            tcp_packet, udp_packet)

import random  # noqa: E402

from netstack import Stack, StackConfig, events  # noqa: E402
from netstack.stack import _HEAP_SLACK  # noqa: E402
from netstack.wire.tcp import build_options  # noqa: E402

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
CLIENTS = {4: [A4, bytes([10, 7, 0, 3])], 6: [A6, A6[:-1] + b"\x09"]}
SERVERS = {4: [B4, bytes([198, 18, 0, 53])], 6: [B6, B6[:-1] + b"\x35"]}
PORTS = [1000, 1001, 40000, 65535]
SPORTS = [53, 80, 443]
SYN, ACK, FIN, RST, PSH = 0x02, 0x10, 0x01, 0x04, 0x08
OPTS = [b"", build_options(mss=1460, wscale=7, sack_perm=True, ts=(1, 0)),
        build_options(mss=536), build_options(ts=(0xFFFFFFFF, 5)), b"\x02\x04" + b"\x01\x01",
        b"\x08\x0a" + bytes(10), b"\x05\x0a" + bytes(10), b"\x03\x03\x0e\x00", b"\xff" * 40]


def config(verify=True):
    return StackConfig(mtu=1500, max_flows=12, max_pending=6, udp_timeout=20.0, connect_timeout=3.0,
                       frag_max_datagrams=4, frag_max_bytes=16 * 1024, frag_timeout=5.0, time_wait=1.0,
                       verify_checksums=verify)


class Client:
    """Remembers what the stack said on each TCP 4-tuple so that follow-up
    segments carry plausible sequence numbers (the stack's SYN-ACK gives
    its ISS; we track our own next sequence number)."""

    def __init__(self):
        self.conns = {}     # key (client side first) -> [family, snd_nxt, rcv_nxt]
        self.states = set()  # TCP states seen in the stack (for the statistics)

    def seen_output(self, pkt):
        if pkt[0] >> 4 == 4:
            if pkt[9] != 6 or struct.unpack_from("!H", pkt, 6)[0] & 0x3FFF:
                return
            ihl = (pkt[0] & 15) * 4
            src, dst, l4 = pkt[12:16], pkt[16:20], pkt[ihl:]
        else:
            if pkt[6] != 6:
                return
            src, dst, l4 = pkt[8:24], pkt[24:40], pkt[40:]
        if len(l4) < 20:
            return
        sport, dport, seq, _ack, doff, flags = struct.unpack_from("!HHIIBB", l4)
        key = (dst, dport, src, sport)
        c = self.conns.get(key)
        if c is None:
            return
        if flags & RST:
            del self.conns[key]
            return
        seglen = len(l4) - (doff >> 4) * 4 + (1 if flags & (SYN) else 0) + (1 if flags & FIN else 0)
        end = (seq + seglen) & 0xFFFFFFFF
        if flags & SYN or ((end - c[2]) & 0xFFFFFFFF) < 0x80000000:
            c[2] = end


@st.composite
def client_packet(draw, client):
    """One packet from the client."""
    family = draw(st.sampled_from([4, 6]))
    a = draw(st.sampled_from(CLIENTS[family]))
    b = draw(st.sampled_from(SERVERS[family]))
    sport = draw(st.sampled_from(PORTS))
    dport = draw(st.sampled_from(SPORTS))
    kind = draw(st.sampled_from(["udp", "udp", "tcp", "tcp", "follow", "follow", "icmp", "ptb", "random"]))
    if kind == "udp":
        data = draw(st.binary(max_size=40)) if draw(st.booleans()) else bytes(draw(st.integers(0, 4000)))
        pkt = udp_packet(a, b, sport, dport, data)
    elif kind in ("tcp", "follow"):
        key = (a, sport, b, dport)
        c = client.conns.get(key)
        if kind == "follow" and client.conns:
            keys = sorted(client.conns)
            key = keys[draw(st.integers(0, len(keys) - 1))]
            a, sport, b, dport = key
            c = client.conns[key]
            family, snd_nxt, rcv_nxt = c
            flags = draw(st.sampled_from([ACK, ACK | PSH, ACK | FIN, RST, ACK | PSH]))
            data = b"" if flags & RST else draw(st.binary(max_size=300))
            pkt = tcp_packet(a, b, sport, dport, snd_nxt, rcv_nxt, flags, data=data,
                             wnd=draw(st.sampled_from([0, 1, 65535])))
            c[1] = (snd_nxt + len(data) + (1 if flags & FIN else 0)) & 0xFFFFFFFF
        else:
            flags = draw(st.sampled_from([SYN, SYN, ACK, ACK | PSH, FIN | ACK, RST, RST | ACK, SYN | ACK,
                                          SYN | FIN, 0, 0xFF]))
            seq = draw(st.sampled_from([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFFFFF00])) if draw(st.booleans()) \
                else draw(st.integers(0, 0xFFFFFFFF))
            opts = draw(st.sampled_from(OPTS))
            data = draw(st.binary(max_size=64)) if not flags & SYN or draw(st.booleans()) else b""
            pkt = tcp_packet(a, b, sport, dport, seq, draw(st.integers(0, 0xFFFFFFFF)), flags,
                             options=opts, data=data)
            if flags == SYN:
                client.conns[key] = [family, (seq + 1 + len(data)) & 0xFFFFFFFF, 0]
    elif kind == "icmp":
        t = draw(st.sampled_from([8, 0, 3, 11, 13, 99] if family == 4 else [128, 129, 1, 3, 133, 135, 143, 250]))
        pkt = icmp_packet(a, b, t, draw(st.integers(0, 15)), draw(st.integers(0, 0xFFFFFFFF)),
                          draw(st.binary(max_size=64)))
    elif kind == "ptb":
        # a packet-too-big quoting something like our own packet
        proto = draw(st.sampled_from([6, 17]))
        inner = (tcp_packet(b, a, dport, sport, 1, 2, ACK, data=bytes(100)) if proto == 6
                 else udp_packet(b, a, dport, sport, bytes(100)))
        mtu = draw(st.sampled_from([0, 68, 576, 1000, 1280, 1400, 9000, 0xFFFFFFFF if family == 6 else 0xFFFF]))
        cut = draw(st.integers(0, len(inner)))
        if family == 4:
            pkt = icmp_packet(a, b, 3, 4, mtu & 0xFFFF, inner[:cut])
        else:
            pkt = icmp_packet(a, b, 2, 0, mtu, inner[:cut])
    else:
        return draw(st.binary(max_size=120))
    how = draw(st.sampled_from(["plain"] * 6 + ["flip", "cut", "append", "version"]))
    if how == "flip" and pkt:
        i = draw(st.integers(0, len(pkt) - 1))
        pkt = pkt[:i] + bytes([pkt[i] ^ draw(st.integers(1, 255))]) + pkt[i + 1:]
    elif how == "cut":
        pkt = pkt[:draw(st.integers(0, len(pkt)))]
    elif how == "append":
        pkt = pkt + draw(st.binary(min_size=1, max_size=16))
    elif how == "version":
        pkt = bytes([(draw(st.integers(0, 15)) << 4) | (pkt[0] & 15)]) + pkt[1:]
    return pkt


def fragments(draw, pkt):
    """Split a valid packet into fragments, reordered, sometimes duplicated or lost."""
    size = draw(st.sampled_from([8, 64, 512, 1000]))
    if pkt[0] >> 4 == 4:
        if (pkt[0] & 15) != 5:
            return [pkt]
        fr = frag4(pkt, size)
    else:
        fr = frag6(pkt, size, ident=draw(st.integers(0, 0xFFFFFFFF)))
    fr = fr[:64]
    fr = draw(st.permutations(fr))
    if draw(st.booleans()) and fr:
        fr = fr + [fr[draw(st.integers(0, len(fr) - 1))]]
    if draw(st.booleans()) and len(fr) > 1:
        fr = fr[:-1]
    return fr


class Host:
    """Answers events with random, but legitimate, handle calls."""

    def __init__(self, stack, draw):
        self.stack = stack
        self.draw = draw
        self.udp_closed = set()
        self.tcp_closed = set()
        self.conns = []
        self.shut = set()

    def handle(self, evs):
        draw = self.draw
        closed_now = set()
        # a flow evicted (least recently used) to make room for a newer one in
        # this batch: its datagram events come first, its UdpClosed later
        evicted = {e.flow.id for e in evs if isinstance(e, events.UdpClosed) and e.reason == "evicted"}
        for e in evs:
            note(f"event {e!r}")
            if isinstance(e, events.UdpDatagram):
                f = e.flow
                if f.closed:
                    # queued before the host (or an eviction) closed it in this batch
                    assert f.id in closed_now or f.id in evicted, "datagram event for a flow closed earlier"
                    continue
                act = draw(st.sampled_from(["send", "send", "bigsend", "nothing", "reject", "close"]))
                if act == "send":
                    assert f.send(e.data[:100] or b"r")
                elif act == "bigsend":
                    assert f.send(bytes(draw(st.sampled_from([1473, 3000, 9000]))))
                elif act == "reject":
                    f.reject(draw(st.sampled_from(["port", "host", "net", "admin"])))
                    closed_now.add(f.id)
                elif act == "close":
                    f.close()
                    closed_now.add(f.id)
            elif isinstance(e, events.UdpClosed):
                assert e.flow.closed and e.flow.id not in self.udp_closed, "UdpClosed twice"
                self.udp_closed.add(e.flow.id)
            elif isinstance(e, events.TcpConnectRequest):
                if e.conn.closed:
                    continue      # the client reset it in the same batch: its TcpClosed follows
                act = draw(st.sampled_from(["accept", "accept", "accept", "rst", "icmp-port", "drop", "later"]))
                if act == "accept":
                    e.conn.accept()
                    self.conns.append(e.conn)
                elif act != "later":
                    e.conn.reject(act)
                note(f"host {act} {e.conn!r}")
            elif isinstance(e, events.TcpReadable):
                event("tcp data read")
                if not e.conn.closed:
                    data = e.conn.read()
                    if data and e.conn.id not in self.shut and draw(st.booleans()):
                        e.conn.write(data)
            elif isinstance(e, events.TcpClosed):
                assert e.conn.id not in self.tcp_closed, "TcpClosed twice"
                self.tcp_closed.add(e.conn.id)
        # spontaneous actions on open connections
        self.conns = [c for c in self.conns if not c.closed]
        if self.conns and draw(st.integers(0, 3)) == 0:
            c = self.conns[draw(st.integers(0, len(self.conns) - 1))]
            act = draw(st.sampled_from(["write", "bigwrite", "shutdown", "abort"]))
            if c.id in self.shut and act in ("write", "bigwrite"):
                act = "shutdown"          # writing after shutdown is a host error (TcpError)
            note(f"host {act} {c!r}")
            if act == "write":
                c.write(b"hello from the host")
            elif act == "bigwrite":
                c.write(bytes(draw(st.sampled_from([3000, 70000]))))
            elif act == "shutdown":
                c.shutdown()
                self.shut.add(c.id)
            else:
                c.abort()


def check(stack, client):
    cfg = stack.config
    assert accounting_ok(stack), (stack.rx_packets, dict(stack.drops), stack.delivered, stack.frag_held)
    assert len(stack.tcp) + len(stack.udp) <= cfg.max_flows
    assert 0 <= stack.pending <= cfg.max_pending
    # the memory budget counts exactly the bytes the connections in the table hold
    assert stack.budget.used - stack.budget.out == sum(len(c.rcv_buf) + len(c.snd_buf) + c.ooo.nbytes
                                                       for c in stack.tcp.values())
    fr = stack._frag
    if fr is not None:
        assert len(fr) <= cfg.frag_max_datagrams and fr.bytes_held <= cfg.frag_max_bytes
    for c in stack.tcp.values():
        client.states.add(str(c.state))
    for pkt in stack.take_output():
        assert len(pkt) <= 65535
        frag = (pkt[0] >> 4 == 4 and struct.unpack_from("!H", pkt, 6)[0] & 0x3FFF) or \
               (pkt[0] >> 4 == 6 and pkt[6] == 44)
        if not frag:
            assert len(pkt) <= cfg.mtu or (pkt[0] >> 4 == 4 and pkt[9] == 6 and getattr(cfg, "gso_max", 0))
            assert_valid(pkt)
        else:
            assert len(pkt) <= cfg.mtu
        client.seen_output(pkt)


def check_timers(stack):
    """After a poll: every flow that wants a timer has a live heap entry no
    later than its deadline, and the heap holds few stale entries."""
    for flow in list(stack.tcp.values()) + list(stack.udp.values()):
        if flow.poll_at is not None:
            assert flow._sched_at is not None and flow._sched_at <= flow.poll_at, flow
            assert any(e[2] is flow and e[0] == flow._sched_at for e in stack._heap)
        elif getattr(flow, "state", None) == "TIME_WAIT":
            # TIME_WAIT waits in the stack's queue instead
            assert any(e[2] is flow and e[0] == flow.tw_at for e in stack._tw), flow
        if getattr(flow, "conn_at", None) is not None:
            # and so does an unanswered request's connect timeout
            assert any(e[2] is flow and e[0] == flow.conn_at for e in stack._requests), flow
    assert len(stack._heap) <= _HEAP_SLACK + 2 * (len(stack.tcp) + len(stack.udp)) + 1


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.data_too_large])
@given(st.data())
def test_fuzz_whole_stack(data):
    draw = data.draw
    # checksums trusted (a TUN) or verified: both routes of the demux's flow cache
    stack = Stack(config(verify=draw(st.booleans())), rng=random.Random(draw(st.integers(0, 2**32))))
    client = Client()
    host = Host(stack, draw)
    now = draw(st.sampled_from([0.0, 1e6]))
    for _ in range(draw(st.integers(1, 60))):
        step = draw(st.sampled_from(["packet"] * 6 + ["fragments", "time", "batch"]))
        if step == "packet":
            stack.input(draw(client_packet(client)), now)
        elif step == "batch":
            stack.input_batch([draw(client_packet(client)) for _ in range(draw(st.integers(1, 8)))], now)
        elif step == "fragments":
            pkt = draw(client_packet(client))
            if len(pkt) >= 40 and pkt[0] >> 4 in (4, 6):
                for f in fragments(draw, pkt):
                    stack.input(f, now)
        else:
            now += draw(st.sampled_from([0.001, 0.2, 1.0, 4.0, 30.0]))
        check(stack, client)
        host.handle(stack.take_events())
        stack.poll(now)
        check(stack, client)
        check_timers(stack)
        d = stack.next_deadline()
        assert d is None or d >= 0
    # let every timer run out: flows must drain (UDP idles out, TCP times out)
    for _ in range(200):
        d = stack.next_deadline()
        if d is None:
            break
        now = max(now, d)
        stack.poll(now)
        host.handle(stack.take_events())
        check(stack, client)
    for name in sorted(client.states):
        event(f"tcp reached {name}")
    if stack.frag_held and stack.delivered:
        event("fragments")
    if host.udp_closed:
        event("udp flow closed")
    assert not stack.udp
    assert stack.next_deadline() is None or stack.tcp
