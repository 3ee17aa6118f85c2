"""netstack.wire.templates: every packet parsed back with dpkt and checked
with an independent word-by-word checksum."""

import os
import struct
import sys

import dpkt
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_stack_pkt import A4, A6, B4, B6, assert_valid, inet_sum, l4_of, parse, pseudo, reassemble  # noqa: E402

from netstack import StackConfig
from netstack.wire.tcp import build_options
from netstack.wire.templates import (TcpTemplate, UdpTemplate, icmp4_packets, icmp6_packets,
                                     ip_packets)

FAMILIES = [pytest.param(4, B4, A4, id="v4"), pytest.param(6, B6, A6, id="v6")]


@pytest.mark.parametrize("family,src,dst", FAMILIES)
@pytest.mark.parametrize("seq,ack", [(0, 0), (1, 2), (0xFFFFFFFF, 0xFFFFFFFE), (0x80000000, 0x7FFFFFFF)])
@pytest.mark.parametrize("opts", [b"", build_options(mss=1460, wscale=7, sack_perm=True, ts=(1, 0xFFFFFFFF))])
@pytest.mark.parametrize("payload", [b"", b"x", b"hello world!" * 100, memoryview(b"odd" * 7)])
def test_tcp_segments_parse_and_checksum(family, src, dst, seq, ack, opts, payload):
    tpl = TcpTemplate(family, src, dst, 443, 50000, StackConfig())
    pkt = tpl.build(seq, ack, 0x18, 12345, opts, payload)
    assert isinstance(pkt, bytes)
    assert_valid(pkt)
    ip = parse(pkt)
    seg = ip.data
    assert isinstance(seg, dpkt.tcp.TCP)
    assert (seg.sport, seg.dport, seg.seq, seg.ack, seg.flags, seg.win) == (443, 50000, seq, ack, 0x18, 12345)
    assert seg.opts == bytes(opts)
    assert seg.data == bytes(payload)
    assert ip.src == src and ip.dst == dst
    if family == 4:
        assert ip.ttl == 64 and ip.df == 1 and ip.p == 6
    else:
        assert ip.hlim == 64 and ip.nxt == 6


def test_tcp_ipv4_ident_advances_and_header_checksum_stays_right():
    tpl = TcpTemplate(4, B4, A4, 80, 1234, StackConfig(ttl=33))
    ids = []
    for i in range(70000):
        pkt = tpl.build(i, 0, 0x10, 1, b"", b"")
        if i % 997 == 0 or i > 65530:
            assert inet_sum(pkt[:20]) == 0xFFFF
            ids.append(struct.unpack_from("!H", pkt, 4)[0])
            assert pkt[8] == 33
    assert len(set(ids[-10:])) == 10


BURST_OPTS = [b"", bytes(build_options(ts=(0xDEADBEEF, 7))), bytes(build_options(sack=[(1, 2), (3, 4)]))]


@pytest.mark.parametrize("family,src,dst", FAMILIES)
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("opts", BURST_OPTS, ids=["none", "ts", "sack"])
@pytest.mark.parametrize("push", [False, True])
@pytest.mark.parametrize("n,seg", [(1, 1448), (1448, 1448), (1449, 1448), (10 * 1448, 1448), (7001, 1000),
                                   (3, 2), (64000, 1380)])
def test_tcp_burst_makes_the_packets_build_makes(family, src, dst, offload, opts, push, n, seg):
    """burst() (the sender's one call per burst of new data) against build()
    one segment at a time: byte for byte the same packets, every one of them
    valid, across a sequence-number wrap, with the IPv4 identification
    carried on to the template's next packet."""
    data = os.urandom(n + 37)
    cfg = StackConfig(checksum_offload=offload)
    one, many = (TcpTemplate(family, src, dst, 443, 50000, cfg) for _ in range(2))
    seq0, ack, wnd = 0xFFFFFFFF - 3000, 0x12345678, 4321
    out = []
    with memoryview(data) as mv:
        end = many.burst(out.append, mv, 37, n, seg, seq0, ack, wnd, opts, push)
    want = []
    seq, off = seq0, 37
    while off < 37 + n:
        k = min(seg, 37 + n - off)
        last = off + k == 37 + n
        want.append(one.build(seq, ack, 0x10 | (0x08 if push and last else 0), wnd, opts, data[off:off + k]))
        seq = (seq + k) & 0xFFFFFFFF
        off += k
    assert out == want
    assert end == seq == (seq0 + n) & 0xFFFFFFFF
    if not offload:
        for pkt in out:
            assert_valid(pkt)
    assert many.build(1, 2, 0x10, 3, b"", b"") == one.build(1, 2, 0x10, 3, b"", b"")


@pytest.mark.parametrize("family,src,dst", FAMILIES)
def test_tcp_offload_holds_pseudo_header_sum(family, src, dst):
    tpl = TcpTemplate(family, src, dst, 443, 50000, StackConfig(checksum_offload=True))
    payload = b"abcdefgh" * 30
    pkt = tpl.build(5, 6, 0x10, 100, b"", payload)
    s, d, proto, l4 = l4_of(pkt)
    field = struct.unpack_from("!H", l4, 16)[0]
    assert field == pseudo(s, d, 6, len(l4))          # folded, not inverted
    # what a device does for NEEDS_CSUM: sum from the transport header on, store ~sum
    full = ~inet_sum(l4) & 0xFFFF
    fixed = pkt[:len(pkt) - len(l4)] + l4[:16] + struct.pack("!H", full) + l4[18:]
    assert_valid(fixed)


@pytest.mark.parametrize("family,src,dst", FAMILIES)
@pytest.mark.parametrize("size", [0, 1, 100, 1472, 1452, 1473, 3000, 8000, 65507])
def test_udp_datagrams_and_fragments(family, src, dst, size):
    tpl = UdpTemplate(family, src, dst, 53, 40000, StackConfig(mtu=1500))
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    pkts = tpl.build(payload)
    assert all(len(p) <= 1500 for p in pkts)
    if len(pkts) == 1:
        assert_valid(pkts[0])
        ip = parse(pkts[0])
        assert ip.data.sport == 53 and ip.data.dport == 40000 and ip.data.ulen == 8 + size
        assert ip.data.data == payload
        if family == 4:
            assert not ip.mf and ip.offset == 0
    else:
        assert 20 + 8 + size > 1500 if family == 4 else 48 + size > 1500
        s, d, proto, l4 = reassemble(pkts)
        assert (s, d, proto) == (src, dst, 17)
        assert l4[8:] == payload
        assert struct.unpack_from("!HHH", l4) == (53, 40000, 8 + size)
        assert inet_sum(l4, pseudo(s, d, 17, len(l4))) == 0xFFFF
        if family == 4:
            idents = {struct.unpack_from("!H", p, 4)[0] for p in pkts}
            assert len(idents) == 1


def test_udp_too_big_is_a_clear_error():
    with pytest.raises(ValueError):
        UdpTemplate(4, B4, A4, 1, 2, StackConfig()).build(bytes(65508))
    with pytest.raises(ValueError):
        UdpTemplate(6, B6, A6, 1, 2, StackConfig()).build(bytes(65528))
    assert len(UdpTemplate(6, B6, A6, 1, 2, StackConfig()).build(bytes(65527))) > 1


def test_udp_v4_zero_sum_is_sent_as_ffff():
    # find a payload whose checksum computes to 0: adjust two bytes
    tpl = UdpTemplate(4, B4, A4, 1, 2, StackConfig())
    pkt, = tpl.build(b"\x00\x00")
    field = struct.unpack_from("!H", pkt, 26)[0]
    # payload word w makes the sum 0xFFFF, so the inverted value is 0
    w = (field - 0) & 0xFFFF
    pkt2, = tpl.build(struct.pack("!H", w))
    assert struct.unpack_from("!H", pkt2, 26)[0] == 0xFFFF
    assert_valid(pkt2)


@pytest.mark.parametrize("family,src,dst", FAMILIES)
def test_udp_offload_single_packet_and_computed_when_fragmented(family, src, dst):
    tpl = UdpTemplate(family, src, dst, 53, 40000, StackConfig(checksum_offload=True))
    pkt, = tpl.build(b"q" * 100)
    s, d, _, l4 = l4_of(pkt)
    assert struct.unpack_from("!H", l4, 6)[0] == pseudo(s, d, 17, len(l4))
    pkts = tpl.build(b"q" * 5000)
    s, d, _, l4 = reassemble(pkts)
    assert inet_sum(l4, pseudo(s, d, 17, len(l4))) == 0xFFFF


def test_udp_lower_mtu_fragments_smaller_and_v6_never_below_1280():
    tpl = UdpTemplate(4, B4, A4, 53, 1, StackConfig())
    tpl.mtu = 576
    pkts = tpl.build(bytes(1000))
    assert len(pkts) == 2 and max(map(len, pkts)) <= 576
    assert reassemble(pkts)[3][8:] == bytes(1000)
    t6 = UdpTemplate(6, B6, A6, 53, 1, StackConfig(mtu=1000))
    assert t6.mtu == 1280


def test_icmp_builders():
    p, = icmp4_packets(B4, A4, 0, 0, 0x12340001, b"ping", 64)
    assert_valid(p)
    ip = dpkt.ip.IP(p)
    assert ip.p == 1 and ip.icmp.type == 0 and ip.icmp.data.id == 0x1234 and ip.icmp.data.seq == 1
    assert ip.icmp.data.data == b"ping"
    q, = icmp6_packets(B6, A6, 129, 0, 0x00050006, b"pong", 64)
    assert_valid(q)
    ip6 = dpkt.ip6.IP6(q)
    assert ip6.nxt == 58 and ip6.data.type == 129 and ip6.data.data.data == b"pong"
    # big ICMP messages fragment (an echo reply to a reassembled big request)
    frags = icmp4_packets(B4, A4, 0, 0, 1, bytes(4000), 64, mtu=1500)
    s, d, proto, l4 = reassemble(frags)
    assert proto == 1 and inet_sum(l4) == 0xFFFF and len(l4) == 4008


def test_ip_packets_df_never_fragments():
    pkts = ip_packets(4, B4, A4, 17, bytes(3000), 64, 1500, df=True)
    assert len(pkts) == 1 and dpkt.ip.IP(pkts[0]).df


@pytest.mark.parametrize("family,src,dst", FAMILIES)
def test_tcp_burst_checksum_edge_values(family, src, dst):
    """Payloads whose one's complement sum makes the checksum field 0, 1
    and 0xFFFE, on random and on all-zero payloads: burst() (which sums in the
    byte-swapped domain without calling sum16) against build()."""
    cfg = StackConfig()
    one, many = (TcpTemplate(family, src, dst, 443, 50000, cfg) for _ in range(2))
    seq, ack, wnd = 77, 0x12345678, 4321
    opts = bytes(build_options(ts=(5, 6)))
    for size in (1448, 1001, 2, 300):
        for target in (0, 1, 0xFFFE):
            base = bytearray(os.urandom(size)) if target else bytearray(size)
            # fix the last whole word so the header + payload sum gives the target field
            base[-2 - (size & 1):size - (size & 1)] = b"\0\0"
            pkt = one.build(seq, ack, 0x18, wnd, opts, bytes(base))
            field = struct.unpack_from("!H", pkt, (20 if family == 4 else 40) + 16)[0]
            # the word w added at an even offset lowers the field by w (one's complement)
            w = (field - target) % 0xFFFF
            base[-2 - (size & 1):size - (size & 1)] = w.to_bytes(2, "big")
            data = bytes(base)
            want = one.build(seq, ack, 0x18, wnd, opts, data)
            assert struct.unpack_from("!H", want, (20 if family == 4 else 40) + 16)[0] == target
            out = []
            many._ident = one._ident - 1
            many.burst(out.append, memoryview(data), 0, size, 1448, seq, ack, wnd, opts, True)
            assert out == [want]
            assert_valid(out[0])
