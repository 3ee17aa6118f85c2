"""ICMP / ICMPv6 through the Stack: echo, unreachable builders, PTB, ND."""

import os
import random
import struct
import sys

import dpkt
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_stack_pkt import (A4, A6, B4, B6, accounting_ok, assert_valid, frag4, icmp_packet,  # noqa: E402
                            l4_of, tcp_packet, udp_packet)

from netstack import Stack, StackConfig
from netstack.wire.templates import TcpTemplate

FAMILIES = [pytest.param(A4, B4, id="v4"), pytest.param(A6, B6, id="v6")]


def mkstack(**kw):
    return Stack(StackConfig(**kw), rng=random.Random(1))


def echo_types(a):
    return (8, 0) if len(a) == 4 else (128, 129)


@pytest.mark.parametrize("a,b", FAMILIES)
def test_echo_request_to_any_address_is_answered(a, b):
    st = mkstack()
    req_t, rep_t = echo_types(a)
    st.input(icmp_packet(a, b, req_t, 0, 0xBEEF0007, b"payload-123"), 1.0)
    pkt, = st.take_output()
    assert_valid(pkt)
    src, dst, proto, l4 = l4_of(pkt)
    assert (src, dst) == (b, a)
    assert l4[0] == rep_t and l4[1] == 0
    assert struct.unpack_from("!I", l4, 4)[0] == 0xBEEF0007 and l4[8:] == b"payload-123"
    assert st.delivered == 1 and accounting_ok(st)
    assert st.take_events() == []


@pytest.mark.parametrize("a,b", FAMILIES)
def test_echo_drop_profile(a, b):
    st = mkstack(icmp_echo="drop")
    st.input(icmp_packet(a, b, echo_types(a)[0], 0, 1, b"x"), 1.0)
    assert st.take_output() == [] and st.drops["icmp_echo_off"] == 1 and accounting_ok(st)


def test_echo_to_multicast_or_broadcast_is_not_answered():
    st = mkstack()
    st.input(icmp_packet(A4, b"\xff\xff\xff\xff", 8, 0, 1, b"x"), 1.0)
    st.input(icmp_packet(A4, bytes([224, 0, 0, 1]), 8, 0, 1, b"x"), 1.0)
    st.input(icmp_packet(A6, bytes([0xFF, 2]) + bytes(13) + b"\x01", 128, 0, 1, b"x"), 1.0)
    assert st.take_output() == [] and st.drops["icmp_echo_multicast"] == 3


def test_big_fragmented_echo_is_answered_in_fragments():
    st = mkstack()
    req = icmp_packet(A4, B4, 8, 0, 5, bytes(range(256)) * 16)
    for f in frag4(req, 1480):
        st.input(f, 1.0)
    out = st.take_output()
    assert len(out) == 3 and all(len(p) <= 1500 for p in out)
    from test_stack_pkt import reassemble
    src, dst, proto, l4 = reassemble(out)
    assert proto == 1 and l4[0] == 0 and l4[8:] == bytes(range(256)) * 16
    assert accounting_ok(st)


@pytest.mark.parametrize("a,b", FAMILIES)
def test_bad_icmp_checksum_and_truncation(a, b):
    st = mkstack()
    p = bytearray(icmp_packet(a, b, echo_types(a)[0], 0, 1, b"abcd"))
    p[-1] ^= 0x40
    st.input(bytes(p), 1.0)
    assert st.drops["bad_icmp_checksum"] == 1 and st.take_output() == []
    # an ICMP message shorter than its 8-byte header
    short = icmp_packet(a, b, echo_types(a)[0], 0, 1, b"")[:-4]
    if len(a) == 4:
        short = bytearray(short)
        struct.pack_into("!H", short, 2, len(short))
        struct.pack_into("!H", short, 10, 0)
        from test_stack_pkt import csum
        struct.pack_into("!H", short, 10, csum(bytes(short[:20])))
    else:
        short = bytearray(short)
        struct.pack_into("!H", short, 4, len(short) - 40)
    st.input(bytes(short), 1.0)
    assert st.drops["truncated"] == 1 and accounting_ok(st)


@pytest.mark.parametrize("kind", ["port", "host", "net", "admin"])
def test_unreachable_builders(kind):
    st = mkstack()
    syn4 = tcp_packet(A4, B4, 40000, 443, 1000, 0, 0x02)
    syn6 = tcp_packet(A6, B6, 40000, 443, 1000, 0, 0x02)
    st.icmp_unreachable(syn4[:28], kind)
    st.icmp_unreachable(syn6, kind)
    p4, p6 = st.take_output()
    assert_valid(p4)
    assert_valid(p6)
    ip = dpkt.ip.IP(p4)
    assert ip.src == B4 and ip.dst == A4 and ip.p == 1
    assert (ip.icmp.type, ip.icmp.code) == (3, {"port": 3, "host": 1, "net": 0, "admin": 13}[kind])
    assert bytes(ip.icmp.data)[4:] == syn4[:28]
    ip6 = dpkt.ip6.IP6(p6)
    assert ip6.src == B6 and ip6.dst == A6 and ip6.nxt == 58
    assert (ip6.data.type, ip6.data.code) == (1, {"port": 4, "host": 3, "net": 0, "admin": 1}[kind])
    assert p6[48:] == syn6


def test_unreachable_quote_limits():
    st = mkstack()
    big4 = udp_packet(A4, B4, 1, 2, bytes(2000))
    big6 = udp_packet(A6, B6, 1, 2, bytes(3000))
    st.icmp_unreachable(big4, "port")
    st.icmp_unreachable(big6, "port")
    p4, p6 = st.take_output()
    assert len(p4) == 576 and len(p6) == 1280
    assert_valid(p4)
    assert_valid(p6)
    st.icmp_unreachable(b"", "port")
    st.icmp_unreachable(b"\x45" + bytes(5), "port")
    assert st.take_output() == []


class FakeConn:
    """Stands in for a TcpConnection in stack.tcp (the PMTU contract only)."""
    closed = False
    poll_at = None
    _sched_at = None
    id = 999

    def __init__(self):
        self.mtus = []

    def on_pmtu(self, mtu, now):
        self.mtus.append((mtu, now))


@pytest.mark.parametrize("a,b", FAMILIES)
def test_packet_too_big_reaches_the_tcp_connection_it_quotes(a, b):
    st = mkstack()
    conn = FakeConn()
    st.tcp[(a, 40000, b, 443)] = conn
    fam = 4 if len(a) == 4 else 6
    ours = TcpTemplate(fam, b, a, 443, 40000, st.config).build(1, 2, 0x10, 100, b"", bytes(1400))
    if fam == 4:
        st.input(icmp_packet(a, b, 3, 4, 1200, ours[:28 + 20]), 5.0)
    else:
        st.input(icmp_packet(a, b, 2, 0, 1300, ours[:1232]), 5.0)
    assert conn.mtus == [(1200 if fam == 4 else 1300, 5.0)]
    assert st.delivered == 1
    # a v6 PTB below 1280 is honoured as 1280 (RFC 8201)
    if fam == 6:
        st.input(icmp_packet(a, b, 2, 0, 600, ours[:600]), 6.0)
        assert conn.mtus[-1] == (1280, 6.0)
    # quoting a connection we do not have
    other = TcpTemplate(fam, b, a, 443, 40001, st.config).build(1, 2, 0x10, 100, b"", b"")
    if fam == 4:
        st.input(icmp_packet(a, b, 3, 4, 1200, other), 7.0)
    else:
        st.input(icmp_packet(a, b, 2, 0, 1300, other), 7.0)
    assert st.drops["icmp_no_flow"] == 1 and accounting_ok(st)


def test_ptb_bad_quotes_and_mtus_are_counted():
    st = mkstack()
    conn = FakeConn()
    st.tcp[(A4, 40000, B4, 443)] = conn
    ours = TcpTemplate(4, B4, A4, 443, 40000, st.config).build(1, 2, 0x10, 100, b"", b"")
    st.input(icmp_packet(A4, B4, 3, 4, 0, ours), 1.0)          # old-style zero MTU
    st.input(icmp_packet(A4, B4, 3, 4, 1000, ours[:10]), 1.0)  # quote too short
    st.input(icmp_packet(A4, B4, 3, 4, 1000, b"\x99" * 40), 1.0)
    assert st.drops["icmp_bad_mtu"] == 1 and st.drops["icmp_bad_quote"] == 2
    assert conn.mtus == [] and accounting_ok(st)


def test_other_errors_nd_and_mld_are_ignored_and_counted():
    st = mkstack()
    st.input(icmp_packet(A4, B4, 3, 3, 0, bytes(28)), 1.0)     # port unreachable from client
    st.input(icmp_packet(A4, B4, 11, 0, 0, bytes(28)), 1.0)    # time exceeded
    st.input(icmp_packet(A4, B4, 13, 0, 0, bytes(12)), 1.0)    # timestamp request
    st.input(icmp_packet(A6, B6, 133, 0, 0, b""), 1.0)         # router solicitation
    st.input(icmp_packet(A6, B6, 135, 0, 0, B6), 1.0)          # neighbour solicitation
    st.input(icmp_packet(A6, B6, 143, 0, 0, b""), 1.0)         # MLDv2 report
    st.input(icmp_packet(A6, B6, 1, 4, 0, bytes(48)), 1.0)
    st.input(icmp_packet(A6, B6, 200, 0, 0, b""), 1.0)
    assert st.drops["icmp_error_in"] == 3 and st.drops["icmp_type"] == 2
    assert st.drops["icmp6_nd"] == 2 and st.drops["icmp6_mld"] == 1
    assert st.take_output() == [] and accounting_ok(st)
