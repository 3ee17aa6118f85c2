"""Admission of connect requests (netstack.admission): a flood of SYNs towards
one place never blocks a SYN towards another, and every flood SYN is
accounted for (admitted, dropped by reason, or shed with a RST)."""

import random

from helpers import Client, addr, build_packet, parse_packet

from netstack import Stack, StackConfig, events

FLOOD = addr("203.0.113.9")          # a blackholed destination: never answered
CLIENT = addr("10.0.0.2")


def flood(stack, n, *, dst=FLOOD, dport=443, src=CLIENT, first_port=10000, now=1.0):
    rnd = random.Random(n)
    for i in range(n):
        stack.input(build_packet(4, src, dst, first_port + i, dport, rnd.getrandbits(32), 0, 0x02, 65535,
                                 b"", b""), now)


def requests(stack):
    return [e.conn for e in stack.take_events() if isinstance(e, events.TcpConnectRequest)]


def test_flood_to_one_destination_leaves_room_for_another():
    st = Stack(StackConfig(), rng=random.Random(1))
    flood(st, 5000)
    held = requests(st)
    cfg = st.config
    assert len(held) == cfg.max_pending_per_dst == st.pending
    assert st.drops["tcp_pending_per_destination"] == 5000 - cfg.max_pending_per_dst
    assert st.rx_packets == 5000 == len(held) + st.drops["tcp_pending_per_destination"]
    # a normal connection elsewhere: answered at once, and it carries data
    c = Client(st, client=("10.0.0.2", 40000), server=("198.51.100.7", 80))
    c.now = 1.0
    conn = c.handshake()
    c.send(b"GET / HTTP/1.0\r\n\r\n")
    assert conn.read() == b"GET / HTTP/1.0\r\n\r\n"
    conn.write(b"HTTP/1.0 200 OK\r\n\r\n")
    c.poll(0)
    assert c.recv("A", data=b"HTTP/1.0 200 OK\r\n\r\n")


def test_full_table_sheds_the_oldest_request_of_the_biggest_destination():
    st = Stack(StackConfig(max_pending=100, max_pending_per_dst=80), rng=random.Random(2))
    flood(st, 80)                                        # X holds 80
    flood(st, 20, dst=addr("203.0.113.10"), first_port=20000)   # Z holds 20: the table is full
    held = requests(st)
    assert st.pending == 100 and len(held) == 100
    oldest = held[0]
    st.take_output()
    c = Client(st, client=("10.0.0.3", 40000), server=("198.51.100.7", 80))
    c.now = 1.0
    conn = c.request()                                   # admitted: X's oldest gave way
    assert conn.state == "LISTEN" and st.pending == 100
    assert oldest.closed and st.admission.shed == 1 and st.status()["pending_shed"] == 1
    closed = [e for e in c.events if isinstance(e, events.TcpClosed)]
    assert [(e.conn, e.reason) for e in closed] == [(oldest, "shed")]
    rst = [parse_packet(p) for p in st.take_output()]
    assert len(rst) == 1 and rst[0].flags & 0x04 and rst[0].dport == oldest.sport
    # one more SYN to X, the biggest holder, while the table is full: dropped, nobody shed
    flood(st, 1, first_port=30000)
    assert st.drops["tcp_backlog_full"] == 1 and st.admission.shed == 1 and st.pending == 100
    # an accept frees a slot for anyone again
    conn.accept()
    flood(st, 1, first_port=30001)
    assert st.pending == 100 and st.admission.shed == 1


def test_many_destinations_full_table_still_admits_a_new_one():
    st = Stack(StackConfig(max_pending=64), rng=random.Random(3))
    for i in range(200):                                 # 200 destinations, one request each
        flood(st, 1, dst=bytes([203, 0, 113, i % 250]), dport=1000 + i, first_port=10000 + i)
    assert st.pending == 64 and st.admission.shed == 200 - 64
    assert len(requests(st)) == 200
    rsts = [parse_packet(p) for p in st.take_output()]
    assert len(rsts) == 200 - 64 and all(r.flags & 0x04 for r in rsts)     # each shed one was told
    c = Client(st, client=("10.0.0.4", 40000), server=("198.51.100.8", 80))
    c.now = 1.0
    conn = c.request()                                   # never blocked: one more request gave way
    conn.accept()
    out = c.drain()
    rst = [x for x in out if x.flags & 0x04]
    synack = [x for x in out if x.flags & 0x02]
    assert len(out) == 2 and len(rst) == 1 and rst[0].dport != 40000
    assert len(synack) == 1 and synack[0].dport == 40000 and synack[0].flags & 0x10
    assert st.admission.shed == 200 - 64 + 1


def test_per_source_bound():
    st = Stack(StackConfig(max_pending_per_src=3), rng=random.Random(4))
    for i in range(5):
        flood(st, 1, dst=bytes([198, 51, 100, 1 + i]), first_port=10000 + i)
    assert st.pending == 3 and st.drops["tcp_pending_per_source"] == 2
    flood(st, 1, src=addr("10.0.0.9"))                  # another client is not bound by it
    assert st.pending == 4
    assert {k: len(v) for k, v in st.admission.by_src.items()} == {CLIENT: 3, addr("10.0.0.9"): 1}
    st.poll(1.0 + st.config.connect_timeout + 0.1)     # timeouts release every slot
    assert st.pending == 0 and st.admission.by_src == {} and st.admission.by_dst == {}


def test_shed_request_is_gone_from_every_table():
    st = Stack(StackConfig(max_pending=2, max_pending_per_dst=2), rng=random.Random(5))
    flood(st, 2)
    flood(st, 1, dst=addr("198.51.100.1"), first_port=20000)
    assert st.admission.shed == 1 and st.pending == 2
    by_dst = {k: len(v) for k, v in st.admission.by_dst.items()}
    assert by_dst == {(FLOOD, 443): 1, (addr("198.51.100.1"), 443): 1}
    assert st.admission.by_src is None          # per_src >= max_pending: that bound cannot bind
    assert len(st.tcp) == 2
    # timeouts release their slots too
    st.poll(1.0 + st.config.connect_timeout + 0.1)
    assert st.pending == 0 and not st.admission.by_dst


def test_half_open_connections_are_bounded():
    # a spoofed SYN flood whose upstream answers: accepted, SYN-ACK sent, no ACK ever
    st = Stack(StackConfig(max_half_open=3), rng=random.Random(6))
    flood(st, 5)
    held = requests(st)
    for conn in held:
        conn.accept()
    assert [c.closed for c in held] == [True, True, False, False, False]
    assert st.admission.shed == 2 and len(st.admission.half_open) == 3
    st.poll(1.0)
    out = [parse_packet(p) for p in st.take_output()]
    rsts = sorted(x.dport for x in out if x.flags & 0x04)
    synacks = sorted(x.dport for x in out if x.flags & 0x02)
    assert rsts == [held[0].sport, held[1].sport] and synacks == [c.sport for c in held[2:]]
    closed = [(e.conn, e.reason) for e in st.take_events() if isinstance(e, events.TcpClosed)]
    assert closed == [(held[0], "shed"), (held[1], "shed")]
    # one more accepted connection sheds the oldest half-open one (held[2]);
    # when it completes its handshake it leaves the set, and so does a closed one
    c = Client(st, client=("10.0.0.5", 40000), server=("198.51.100.9", 80))
    c.now = 1.0
    conn = c.request()
    conn.accept()
    assert held[2].closed and st.admission.shed == 3
    out = c.drain()
    assert sorted((x.dport, x.flags & 0x16) for x in out) == sorted([(held[2].sport, 0x14), (40000, 0x12)])
    c.rcv = [x for x in out if x.dport == 40000][0].seq + 1
    c.send(flags="A")
    assert conn.state == "ESTABLISHED"
    assert conn not in st.admission.half_open and set(st.admission.half_open) == {held[3], held[4]}
    held[3].abort()
    st.poll(1.0)
    assert set(st.admission.half_open) == {held[4]}


def test_synack_retries_bound_a_half_open_connection():
    st = Stack(StackConfig(synack_retries=2, max_retries=10), rng=random.Random(7))
    c = Client(st)
    conn = c.request()
    conn.accept()
    c.recv("SA")
    c.run_until(30.0)
    # RTO 1 s then 2 s: the SYN-ACK twice more, then a RST (not ten retries over minutes)
    assert [x.flags & 0x16 for x in c.drain()] == [0x12, 0x12, 0x14]
    assert conn.closed and c.closed_reasons() == ["timeout"]
    assert st.tcp_drops["retransmit_timeout"] == 1 and not st.admission.half_open
