"""Living within a memory budget: the UDP table's LRU eviction, per-port UDP
timeouts, windows that shrink as `memory_budget` fills, new flows refused
(and counted) at it, and every buffered byte given back when flows close.

The stack-level tests run conversations on the stack's fake clock (the
`Client` of tests/helpers.py); the engine-level ones run a real Engine on
the in-memory device on a virtual-clock loop (tests/vclock.py).
"""

from __future__ import annotations

import asyncio
import os
import random
import sys

sys.path.insert(0, os.path.dirname(__file__))
from helpers import Client, addr, build_packet, tcp_options  # noqa: E402
from test_stack_pkt import A4, B4, accounting_ok, udp_packet  # noqa: E402
from vclock import EngineHarness, run_virtual  # noqa: E402

from netstack import Stack, StackConfig, events  # noqa: E402
from netstack.budget import MemoryBudget  # noqa: E402


def mkstack(**kw):
    return Stack(StackConfig(**kw), rng=random.Random(1))


def udp_in(st, sport, dport, now, data=b"x", dst=B4):
    st.input(udp_packet(A4, dst, sport, dport, data), now)
    return st.take_events()


# ------------------------------------------------------------ UDP table


def test_a_full_udp_table_evicts_the_least_recently_used_flow():
    st = mkstack(max_udp_flows=3)
    for i, port in enumerate((1001, 1002, 1003)):
        udp_in(st, port, 5000, 1.0 + i)
    a = st.udp[(A4, 1001, B4, 5000)]
    udp_in(st, 1001, 5000, 4.0)                           # A is used again: B is now the oldest
    c = st.udp[(A4, 1003, B4, 5000)]
    st.now = 4.5
    c.send(b"reply")                                      # a reply counts as use too: C is safe
    evs = udp_in(st, 1004, 5000, 5.0)                     # D: the table is full
    closed = [(e.flow.sport, e.reason) for e in evs if isinstance(e, events.UdpClosed)]
    assert closed == [(1002, "evicted")]
    evs = udp_in(st, 1005, 5000, 6.0)                     # E: now A (4.0) is the oldest
    closed = [(e.flow.sport, e.reason) for e in evs if isinstance(e, events.UdpClosed)]
    assert closed == [(1001, "evicted")] and a.closed
    assert sorted(k[1] for k in st.udp) == [1003, 1004, 1005]
    assert st.udp_evicted == 2 and st.status()["udp_evicted"] == 2
    assert st.drops.get("flow_limit", 0) == 0 and accounting_ok(st)


def test_a_flood_of_udp_flows_leaves_room_for_dns_and_a_new_tcp_flow():
    st = mkstack(max_udp_flows=1000, max_flows=1500)
    for i in range(20000):
        st.input(udp_packet(A4, bytes([10, 1, i >> 8 & 255, i & 255]), 10000 + i % 50000, 4000 + i % 7,
                            b"flood"), i * 0.001)
        if i % 1000 == 999:
            st.take_events()
            assert len(st.udp) <= 1000
    st.take_events()
    assert len(st.udp) == 1000 and st.udp_evicted == 19000
    evs = udp_in(st, 53000, 53, 30.0, b"dns query", dst=bytes([198, 18, 0, 2]))
    new = [e for e in evs if isinstance(e, events.UdpDatagram)]
    assert len(new) == 1 and new[0].new and new[0].data == b"dns query"
    c = Client(st)
    c.now = 30.0
    conn = c.request()                                   # a new TCP flow gets its connect request
    assert conn.state == "LISTEN"
    assert len(st.udp) + len(st.tcp) <= 1500 and accounting_ok(st)
    assert st.drops.get("flow_limit", 0) == 0


def test_a_tcp_syn_at_max_flows_evicts_a_udp_flow_instead_of_being_refused():
    st = mkstack(max_flows=50)
    for port in range(2000, 2050):
        udp_in(st, port, 9999, 1.0)
    c = Client(st)
    c.now = 2.0
    c.request()
    assert st.udp_evicted == 1 and len(st.udp) == 49 and st.drops.get("flow_limit", 0) == 0


def test_udp_idle_timeouts_follow_the_destination_port():
    st = mkstack(udp_timeout=60.0, udp_port_timeouts={53: 10.0, 123: 5.0})
    for dport in (53, 123, 4500):
        udp_in(st, 40000, dport, 100.0)
    flows = {k[3]: f for k, f in st.udp.items()}
    closed = {}

    def run_until(t):
        while True:
            d = st.next_deadline()
            if d is None or d > t:
                return
            st.poll(d)
            for e in st.take_events():
                if isinstance(e, events.UdpClosed):
                    closed[e.flow.dport] = (e.reason, st.now)

    run_until(104.9)
    assert closed == {}
    run_until(105.0)
    assert closed == {123: ("idle", 105.0)}
    udp_in(st, 40000, 53, 108.0)                           # DNS used again at 108: lives to 118
    run_until(117.9)
    assert 53 not in closed
    run_until(118.0)
    assert closed[53] == ("idle", 118.0) and not flows[4500].closed
    run_until(160.0)
    assert closed[4500] == ("idle", 160.0)


# ------------------------------------------------------------ the budget


def ack_all(c, segs=None):
    """Acknowledge every byte the stack sent the client (segs: already drained)."""
    for seg in (c.drain() if segs is None else segs):
        end = (seg.seq + len(seg.payload)) % (1 << 32)
        if seg.payload and (end - c.rcv) % (1 << 32) < (1 << 31):
            c.rcv = end
    c.send(flags="A")


def right_edges(c):
    """(ack, window in bytes) of every segment the stack sent since the last call."""
    return [(s.ack, s.wnd << c.stack_ws) for s in c.drain()]


def test_windows_shrink_as_the_budget_fills_and_reopen_when_it_drains():
    limit = 256 * 1024
    st = mkstack(memory_budget=limit, rcv_buf=1 << 20)
    c = Client(st, ws=7, mss=1460)
    conn = c.handshake()
    c.stack_ws = conn.rcv_wscale
    edge = c.seq + 65535                                  # the SYN-ACK's window (not scaled)
    sent = 0
    windows = []                                          # (budget used when offered, window)
    while True:
        n = min(1460, edge - c.seq)
        if n <= 0:
            c.poll(0.5)                                   # the delayed ACK: a last offer, if any
            for ack, wnd in right_edges(c):
                if ack + wnd > edge:                      # the right edge moved: a new offer
                    windows.append((st.budget.used, wnd))
                edge = max(edge, ack + wnd)
            if edge - c.seq <= 0:
                break
            continue
        c.send(b"u" * n)
        sent += n
        for ack, wnd in right_edges(c):
            if ack + wnd > edge:
                windows.append((st.budget.used, wnd))
            edge = max(edge, ack + wnd)
        assert st.budget.used == conn.readable == sent     # nothing read: every byte is held
    # the client sent until the stack's window closed: the budget filled and held
    assert limit * 15 // 16 < sent <= limit
    # every new offer was a share of what was left: a quarter, an eighth past half
    ws = 1 << c.stack_ws
    assert all(w <= (limit - u) // 4 + ws for u, w in windows)
    late = [(u, w) for u, w in windows if u >= limit // 2]
    assert len(late) > 10 and all(w <= (limit - u) // 8 + ws for u, w in late)
    # without a budget the same client may send the whole 1 MiB buffer
    free = Client(mkstack(rcv_buf=1 << 20), ws=7, mss=1460)
    fc = free.handshake()
    free.send(b"u" * 1460)
    free.poll(0.5)                                        # its delayed ACK
    [wnd] = [seg.wnd << fc.rcv_wscale for seg in free.drain()]
    assert wnd > 512 * 1024
    # reading gives the bytes back and the window opens again
    assert len(conn.read()) == sent and st.budget.used == 0
    [(_, wnd)] = right_edges(c)
    assert wnd >= limit // 8


def test_send_space_shrinks_as_the_budget_fills():
    st = mkstack(memory_budget=64 * 1024, snd_buf=1 << 20)
    conns = [Client(st, client=("10.0.0.2", 41000 + i)).handshake() for i in range(3)]
    first = conns[0].write(b"d" * (1 << 20))
    assert first == 64 * 1024 // 4                         # a quarter of the empty budget
    assert conns[0].send_space <= (64 * 1024 - first) // 4
    second = conns[1].write(b"d" * (1 << 20))
    assert second == (64 * 1024 - first) // 4
    assert st.budget.used == first + second


def test_a_full_budget_refuses_new_flows_counts_them_and_recovers():
    limit = 16 * 1024
    st = mkstack(memory_budget=limit)
    clients, conns, out = [], [], []
    port = 42000
    while not st.budget.full:
        c = Client(st, client=("10.0.0.2", port))
        conn = c.handshake()
        conn.write(b"d" * 65536)                          # each flow may always hold two segments
        while True:                                       # its data goes out (over several polls
            segs = c.drain()                              # when the budget caps a burst), unacknowledged
            if not segs:
                break
            out += segs
        clients.append(c)
        conns.append(conn)
        port += 1
        assert port < 42100
    used = st.budget.used
    assert limit <= used <= limit + 2 * 1460
    # a new TCP flow: RST, counted; a new UDP flow: ICMP port unreachable, counted
    late = Client(st, client=("10.0.0.3", 50000))
    late.syn()
    late.recv("RA", seq=0, ack=late.isn + 1)
    assert late.take(events.TcpConnectRequest) == [] and not st.tcp.get((late.caddr, 50000, late.saddr, 80))
    st.input(udp_packet(A4, B4, 6000, 53, b"q"), 0.0)
    [icmp] = st.take_output()
    assert icmp[9] == 1 and icmp[20] == 3 and icmp[21] == 3           # ICMPv4 dest unreachable, port
    assert not st.udp and st.take_events() == []
    status = st.status()
    assert status["drops"]["memory_budget"] == 2
    assert status["memory"] == {"budget": limit, "used": used, "peak": st.budget.peak, "refused": 2}
    assert accounting_ok(st)
    # the clients acknowledge: the bytes are freed and new flows are welcome again
    for c in clients:
        ack_all(c, [seg for seg in out if seg.dport == c.cport])
    assert st.budget.used == 0
    again = Client(st, client=("10.0.0.3", 50001))
    again.request()
    assert st.drops["memory_budget"] == 2


def test_every_byte_returns_to_the_budget_when_flows_close():
    st = mkstack(memory_budget=1 << 20)
    b = st.budget
    # 1: data held both ways, then the client resets
    c1 = Client(st, client=("10.0.0.2", 43001), sack=True)
    k1 = c1.handshake()
    c1.send(b"a" * 1000)
    k1.write(b"b" * 3000)
    c1.drain()
    # out-of-order data held in the assembler
    c1.send(b"c" * 500, seq=c1.seq + 2000, advance=False)
    assert k1.ooo.nbytes == 500 and b.used == 1000 + 3000 + 500
    c1.send(flags="R", ack=False)
    assert k1.closed and b.used == 0
    assert k1.read() == b"a" * 1000 and b.used == 0           # a late read gives back nothing twice
    # 2: an orderly close with data read, written and acknowledged
    c2 = Client(st, client=("10.0.0.2", 43002))
    k2 = c2.handshake()
    c2.send(b"x" * 2000)
    assert b.used == 2000
    k2.read(500)
    assert b.used == 1500
    k2.read_buffer()
    assert b.used == 0
    k2.write(b"y" * 4000)
    segs = c2.drain()
    assert b.used == 4000
    ack_all(c2, segs)
    assert b.used == 0
    k2.shutdown()
    c2.recv("FA")
    c2.send(flags="FA")
    c2.run_until(c2.now + 10)
    assert k2.closed
    # 3: the host aborts a flow holding unread and unsent bytes
    c3 = Client(st, client=("10.0.0.2", 43003))
    k3 = c3.handshake()
    c3.send(b"z" * 700)
    k3.write(b"w" * 900)
    k3.abort()
    c3.poll(0)
    assert k3.closed and b.used == 0 and st.tcp == {}


def test_the_clamp_leaves_every_flow_two_segments():
    b = MemoryBudget(10_000)
    b.used = 10_000
    assert b.clamp(1 << 20, 0, 1460) == 2920 and b.clamp(1 << 20, 2000, 1460) == 920
    assert b.clamp(1 << 20, 5000, 1460) == 0
    assert MemoryBudget(0).limit == 0 and not MemoryBudget(0).full


# ------------------------------------------------------------ the engine

SRC, DST = addr("10.0.0.2"), addr("93.184.216.34")


async def _socks_bulk(payload, reader, writer):
    _ver, n = await reader.readexactly(2)
    await reader.readexactly(n)
    writer.write(b"\x05\x00")
    head = await reader.readexactly(4)
    await reader.readexactly({1: 6, 4: 18}[head[3]])
    writer.write(b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00")
    writer.write(payload)
    await writer.drain()
    await reader.read()


def test_engine_held_bytes_count_and_return_when_the_flow_resets():
    payload = bytes(range(256)) * 2000                    # 512,000 bytes at once
    limit = 128 * 1024

    async def main(loop):
        server = await asyncio.start_server(lambda r, w: _socks_bulk(payload, r, w), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        host = await EngineHarness(f"socks5://127.0.0.1:{port}",
                                   stack_config=StackConfig(memory_budget=limit)).start()
        try:
            host.send(build_packet(4, SRC, DST, 44000, 80, 1000, 0, "S", 4096, tcp_options(mss=1400)))
            s = await host.expect(lambda x: x.dport == 44000 and x.flags & 0x12 == 0x12)
            host.send(build_packet(4, SRC, DST, 44000, 80, 1001, s.seq + 1, "A", 4096))
            await asyncio.sleep(3)                        # the client never acknowledges the data
            eng = host.engine
            relay = next(iter(eng.stack.tcp.values())).user
            assert relay.pending and not relay.transport.is_reading()
            conn = relay.conn
            # the budget holds exactly the send buffer and the relay's held chunk
            assert eng.budget.used == conn.send_queued + len(relay.pending) > 0
            assert conn.send_queued <= limit
            st = host.status()["stack"]["memory"]
            assert st["budget"] == limit and st["peak"] >= st["used"] == eng.budget.used
            host.send(build_packet(4, SRC, DST, 44000, 80, 1001, 0, "R", 0))
            await asyncio.sleep(0.5)
            assert not eng.stack.tcp and eng.budget.used == 0
        finally:
            await host.stop()
            server.close()
            await server.wait_closed()

    run_virtual(main)


def test_engine_udp_datagrams_queued_for_an_opening_upstream_count_until_it_fails():
    async def silent(reader, writer):
        await reader.read()                               # accepts, never answers the greeting

    async def main(loop):
        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        host = await EngineHarness(f"socks5://127.0.0.1:{port}", connect_timeout=2.0,
                                   stack_config=StackConfig(memory_budget=1 << 20)).start()
        try:
            for i in range(10):
                host.send(udp_packet(A4, B4, 45000, 4500, b"q" * (100 + i)))
            deadline = loop.time() + 1
            while host.engine.budget.used < sum(100 + i for i in range(10)) and loop.time() < deadline:
                await asyncio.sleep(0.01)
            assert host.engine.budget.used == sum(100 + i for i in range(10))
            await asyncio.sleep(3)                        # the association times out; the flow is rejected
            assert host.engine.budget.used == 0 and not host.engine.stack.udp
            assert host.status()["engine"]["upstream_connect_failed"] >= 1
        finally:
            await host.stop()
            server.close()
            await server.wait_closed()

    run_virtual(main)


def test_a_burst_is_a_share_of_the_budget_and_counted_until_the_device_takes_it():
    st = mkstack(memory_budget=40_000)
    c = Client(st, ws=7, wnd=65535)
    conn = c.handshake()
    assert conn.write(b"d" * 100_000) == 10_000            # a quarter of the empty budget
    st.poll(c.now)
    b = st.budget
    first = b.out                                          # data segments built, not yet taken
    assert 0 < first <= (40_000 - 10_000) // 4 + 1460 and b.used == 10_000 + first
    pkts = st.take_output()
    assert sum(len(p) - 40 for p in pkts) == first and b.used == 10_000 and b.out == 0
    assert b.peak >= 10_000 + first
    st.poll(c.now)                                         # the rest of the burst: the flow asked for it
    rest = sum(len(p) - 40 for p in st.take_output())
    assert rest > 0 and first + rest == 10_000 and b.used == 10_000
