"""UDP flows through the Stack: packet-in / packet-out conversations."""

import os
import random
import struct
import sys

import dpkt
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_stack_pkt import (A4, A6, B4, B6, accounting_ok, assert_valid, frag4, frag6, l4_of,  # noqa: E402
                            reassemble, udp_packet)

from netstack import Stack, StackConfig, events

FAMILIES = [pytest.param(A4, B4, id="v4"), pytest.param(A6, B6, id="v6")]


def mkstack(**kw):
    return Stack(StackConfig(**kw), rng=random.Random(1))


@pytest.mark.parametrize("a,b", FAMILIES)
def test_first_datagram_makes_a_flow_later_ones_reuse_it(a, b):
    st = mkstack()
    st.input(udp_packet(a, b, 40000, 53, b"query-1"), 1.0)
    st.input(udp_packet(a, b, 40000, 53, b"query-2"), 2.0)
    st.input(udp_packet(a, b, 40001, 53, b"other"), 2.5)
    evs = st.take_events()
    assert [type(e) for e in evs] == [events.UdpDatagram] * 3
    assert [(e.data, e.new) for e in evs] == [(b"query-1", True), (b"query-2", False), (b"other", True)]
    f = evs[0].flow
    assert evs[1].flow is f and evs[2].flow is not f
    assert (f.family, f.src, f.sport, f.dst, f.dport) == (4 if len(a) == 4 else 6, a, 40000, b, 53)
    assert f.key == (a, 40000, b, 53)
    assert (f.bytes_in, f.packets_in, f.created, f.last_seen) == (14, 2, 1.0, 2.0)
    assert len(st.udp) == 2 and st.delivered == 3 and accounting_ok(st)
    assert st.take_output() == []


@pytest.mark.parametrize("a,b", FAMILIES)
def test_reply_goes_back_from_dst_to_src(a, b):
    st = mkstack()
    st.input(udp_packet(a, b, 40000, 53, b"q"), 1.0)
    f = st.take_events()[0].flow
    f.user = "mine"
    assert f.send(b"answer") is True
    pkt, = st.take_output()
    assert_valid(pkt)
    src, dst, proto, l4 = l4_of(pkt)
    assert (src, dst, proto) == (b, a, 17)
    assert struct.unpack_from("!HHH", l4) == (53, 40000, 14) and l4[8:] == b"answer"
    assert (f.bytes_out, f.packets_out, f.user) == (6, 1, "mine")


@pytest.mark.parametrize("a,b", FAMILIES)
def test_big_replies_are_fragmented_to_the_mtu(a, b):
    st = mkstack(mtu=1400)
    st.input(udp_packet(a, b, 40000, 9999, b"q"), 1.0)
    f = st.take_events()[0].flow
    payload = os.urandom(5000)
    f.send(payload)
    pkts = st.take_output()
    assert len(pkts) == 4 and all(len(p) <= 1400 for p in pkts)
    src, dst, proto, l4 = reassemble(pkts)
    assert (src, dst, proto) == (b, a, 17) and l4[8:] == payload


@pytest.mark.parametrize("a,b", FAMILIES)
def test_fragmented_datagram_from_the_client_is_reassembled(a, b):
    st = mkstack()
    big = udp_packet(a, b, 40000, 53, bytes(range(256)) * 12)
    frags = frag4(big, 1000) if len(a) == 4 else frag6(big, 1000)
    assert len(frags) == 4
    for p in reversed(frags):
        st.input(p, 1.0)
    ev, = st.take_events()
    assert ev.data == bytes(range(256)) * 12 and ev.new
    assert st.frag_held == 3 and st.delivered == 1 and accounting_ok(st)


@pytest.mark.parametrize("a,b", FAMILIES)
@pytest.mark.parametrize("kind,code4,code6", [("port", 3, 4), ("host", 1, 3), ("net", 0, 0), ("admin", 13, 1)])
def test_reject_sends_unreachable_quoting_the_first_datagram(a, b, kind, code4, code6):
    st = mkstack()
    first = udp_packet(a, b, 40000, 5353, b"hello there")
    st.input(first, 1.0)
    f = st.take_events()[0].flow
    f.reject(kind)
    pkt, = st.take_output()
    assert_valid(pkt)
    src, dst, proto, l4 = l4_of(pkt)
    assert (src, dst) == (b, a)
    if len(a) == 4:
        assert proto == 1 and l4[0] == 3 and l4[1] == code4
    else:
        assert proto == 58 and l4[0] == 1 and l4[1] == code6
    assert l4[8:] == first        # small: quoted whole
    ev, = st.take_events()
    assert isinstance(ev, events.UdpClosed) and ev.flow is f and ev.reason == "rejected"
    assert f.closed and not st.udp
    assert f.send(b"late") is False and st.take_output() == []
    # the next datagram of that 5-tuple is a new flow
    st.input(udp_packet(a, b, 40000, 5353, b"again"), 2.0)
    ev, = st.take_events()
    assert ev.new and ev.flow is not f


def test_reject_quote_is_bounded():
    st = mkstack()
    st.input(udp_packet(A6, B6, 40000, 5353, bytes(1400)), 1.0)
    st.take_events()[0].flow.reject()
    pkt, = st.take_output()
    assert len(pkt) < 1280
    assert_valid(pkt)
    with pytest.raises(ValueError):
        st2 = mkstack()
        st2.input(udp_packet(A4, B4, 1, 2, b""), 1.0)
        st2.take_events()[0].flow.reject("bogus")


@pytest.mark.parametrize("a,b", FAMILIES)
def test_idle_timeout_with_fake_time(a, b):
    st = mkstack(udp_timeout=30.0)
    st.input(udp_packet(a, b, 40000, 53, b"q"), 100.0)
    f = st.take_events()[0].flow
    assert st.next_deadline() == 130.0
    st.input(udp_packet(a, b, 40000, 53, b"q2"), 110.0)      # keeps it alive
    st.take_events()
    assert len(st._heap) == 1                                 # lazy: no entry per datagram
    st.poll(130.0)
    assert st.take_events() == [] and not f.closed
    assert st.next_deadline() == 140.0
    st.now = 135.0
    f.send(b"reply")                                          # replies count as activity
    st.poll(140.0)
    assert st.take_events() == [] and st.next_deadline() == 165.0
    st.poll(164.9)
    assert not f.closed
    st.poll(165.0)
    ev, = st.take_events()
    assert isinstance(ev, events.UdpClosed) and ev.reason == "idle" and ev.flow is f
    assert f.closed and not st.udp and st.next_deadline() is None


def test_close_by_host():
    st = mkstack()
    st.input(udp_packet(A4, B4, 1, 2, b"x"), 1.0)
    f = st.take_events()[0].flow
    f.close()
    f.close()
    evs = st.take_events()
    assert len(evs) == 1 and evs[0].reason == "closed"
    assert not st.udp and st.next_deadline() is None
    st.poll(1000.0)
    assert st.take_events() == []


def test_max_flows_bounds_the_table_by_evicting_the_least_recently_used():
    # a full table makes room for a new UDP flow by evicting the UDP flow
    # least recently used (a flood of new flows must not lock out a DNS query)
    st = mkstack(max_flows=3)
    for port in range(1000, 1006):
        st.input(udp_packet(A4, B4, port, 53, b"x"), float(port - 999))
    assert len(st.udp) == 3 and st.drops["flow_limit"] == 0 and st.udp_evicted == 3
    assert sorted(k[1] for k in st.udp) == [1003, 1004, 1005]
    # existing flows keep working at the limit
    st.input(udp_packet(A4, B4, 1003, 53, b"y"), 10.0)
    evs = st.take_events()
    closed = [e for e in evs if isinstance(e, events.UdpClosed)]
    assert [e.reason for e in closed] == ["evicted"] * 3
    assert evs[-1].data == b"y" and not evs[-1].new
    st.input(udp_packet(A4, B4, 2000, 53, b"z"), 11.0)
    assert sorted(k[1] for k in st.udp) == [1003, 1005, 2000] and accounting_ok(st)


def test_heap_stays_bounded_when_flows_churn():
    st = mkstack()
    for i in range(20000):
        st.input(udp_packet(A4, B4, 1 + (i % 60000), 53, b"x"), float(i) * 0.001)
        for e in st.take_events():
            if isinstance(e, events.UdpDatagram):
                e.flow.close()
        if i % 100 == 0:
            st.poll(float(i) * 0.001)
    st.poll(20.0)
    assert len(st._heap) <= 4096 + 100
    assert not st.udp


@pytest.mark.parametrize("a,b", FAMILIES)
def test_checksums(a, b):
    st = mkstack()
    bad = bytearray(udp_packet(a, b, 1, 2, b"data"))
    bad[-1] ^= 1
    st.input(bytes(bad), 1.0)
    assert st.drops["bad_udp_checksum"] == 1
    st.input(udp_packet(a, b, 1, 2, b"data", zero_csum=True), 1.0)
    if len(a) == 4:
        assert st.delivered == 1                  # v4: zero means none
    else:
        assert st.drops["bad_udp_checksum"] == 2  # v6: mandatory
    st2 = mkstack(verify_checksums=False)
    st2.input(bytes(bad), 1.0)
    assert st2.delivered == 1
    assert accounting_ok(st) and accounting_ok(st2)


@pytest.mark.parametrize("a,b", FAMILIES)
def test_bad_lengths_and_ports(a, b):
    st = mkstack()
    good = udp_packet(a, b, 1, 2, b"data")
    off = 20 if len(a) == 4 else 40
    for ulen in (0, 7, 13):
        p = bytearray(good)
        struct.pack_into("!H", p, off + 4, ulen)
        st.input(bytes(p), 1.0)
    assert st.drops["bad_udp_length"] == 3
    st.input(good[:off + 5] if len(a) == 6 else good, 1.0)
    st.input(udp_packet(a, b, 0, 2, b"x"), 1.0)
    st.input(udp_packet(a, b, 2, 0, b"x"), 1.0)
    assert st.drops["bad_udp_port"] == 2
    assert accounting_ok(st)


def test_shorter_length_field_trims_padding():
    st = mkstack(verify_checksums=False)
    p = bytearray(udp_packet(A4, B4, 1, 2, b"abcdef"))
    struct.pack_into("!H", p, 24, 8 + 3)
    st.input(bytes(p), 1.0)
    assert st.take_events()[0].data == b"abc"


def test_pmtu_lowers_fragment_size_of_the_flow():
    from test_stack_pkt import icmp_packet
    st = mkstack()
    st.input(udp_packet(A4, B4, 40000, 53, b"q"), 1.0)
    f = st.take_events()[0].flow
    f.send(bytes(1400))
    reply, = st.take_output()
    # the client says: fragmentation needed, next-hop MTU 1000
    st.input(icmp_packet(A4, B4, 3, 4, 1000, reply[:28]), 2.0)
    assert f.mtu == 1000 and st.delivered == 2
    f.send(bytes(1400))
    pkts = st.take_output()
    assert len(pkts) == 2 and max(map(len, pkts)) <= 1000
    assert dpkt.ip.IP(pkts[0]).mf
    assert accounting_ok(st)


def test_fragments_of_different_flows_never_share_an_ident():
    st = mkstack()
    st.input(udp_packet(A4, B4, 40000, 53, b"q"), 1.0)
    st.input(udp_packet(A4, B4, 40001, 53, b"q"), 1.0)
    f1, f2 = (e.flow for e in st.take_events())
    f1.send(bytes(3000))
    f2.send(bytes(3000))
    f1.send(bytes(3000))
    ids = [struct.unpack_from("!H", p, 4)[0] for p in st.take_output()]
    assert len(ids) == 9 and len(set(ids)) == 3
    # and the stack's output does not depend on what other stacks did (seeded rng)
    outs = []
    for _ in range(2):
        s = mkstack()
        s.input(udp_packet(A6, B6, 40000, 53, b"q"), 1.0)
        s.take_events()[0].flow.send(bytes(3000))
        outs.append(s.take_output())
    assert outs[0] == outs[1]


def test_multicast_and_broadcast_destinations_are_dropped():
    st = mkstack()
    st.input(udp_packet(A4, bytes([224, 0, 0, 251]), 5353, 5353, b"mdns"), 1.0)
    st.input(udp_packet(A4, bytes([239, 255, 255, 250]), 1900, 1900, b"ssdp"), 1.0)
    st.input(udp_packet(A4, b"\xff\xff\xff\xff", 68, 67, b"dhcp"), 1.0)
    st.input(udp_packet(A6, bytes([0xFF, 0x02]) + bytes(13) + b"\xfb", 5353, 5353, b"mdns"), 1.0)
    assert st.drops["udp_multicast"] == 4 and not st.udp and st.take_events() == []
    assert accounting_ok(st)
