"""Packet builders for the stack's tests, written independently of
netstack.wire (struct + a word-by-word checksum), plus dpkt-based checks.
Other test files import this module (the tests directory is on sys.path)."""

from __future__ import annotations

import socket
import struct

import dpkt

A4 = socket.inet_pton(socket.AF_INET, "10.7.0.2")          # client
B4 = socket.inet_pton(socket.AF_INET, "93.184.216.34")     # where it sends
A6 = socket.inet_pton(socket.AF_INET6, "fd00:7478::2")
B6 = socket.inet_pton(socket.AF_INET6, "2001:db8::80")


def inet_sum(data: bytes, start: int = 0) -> int:
    """One's complement sum, word by word (folded, not inverted)."""
    if len(data) & 1:
        data = data + b"\0"
    s = start + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def csum(data: bytes, start: int = 0) -> int:
    return ~inet_sum(data, start) & 0xFFFF


def pseudo(src: bytes, dst: bytes, proto: int, length: int) -> int:
    if len(src) == 4:
        return inet_sum(src + dst + struct.pack("!BBH", 0, proto, length))
    return inet_sum(src + dst + struct.pack("!IxxxB", length, proto))


def ip4(src, dst, proto, payload, ident=1, frag=0, ttl=64, options=b"") -> bytes:
    ihl = 20 + len(options)
    h = struct.pack("!BBHHHBBH4s4s", 0x40 | (ihl >> 2), 0, ihl + len(payload), ident, frag, ttl, proto, 0, src, dst) + options
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return h + payload


def ip6(src, dst, nxt, payload, hlim=64) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, len(payload), nxt, hlim, src, dst) + payload


def udp(src, dst, sport, dport, data, zero_csum=False) -> bytes:
    h = struct.pack("!HHHH", sport, dport, 8 + len(data), 0)
    if zero_csum:
        return h + data
    c = csum(h + data, pseudo(src, dst, 17, 8 + len(data))) or 0xFFFF
    return h[:6] + struct.pack("!H", c) + data


def udp_packet(src, dst, sport, dport, data, **kw) -> bytes:
    l4 = udp(src, dst, sport, dport, data, kw.pop("zero_csum", False))
    return ip4(src, dst, 17, l4, **kw) if len(src) == 4 else ip6(src, dst, 17, l4, **kw)


def icmp4(type_, code, rest, body) -> bytes:
    h = struct.pack("!BBHI", type_, code, 0, rest) + body
    return h[:2] + struct.pack("!H", csum(h)) + h[4:]


def icmp6(src, dst, type_, code, rest, body) -> bytes:
    h = struct.pack("!BBHI", type_, code, 0, rest) + body
    return h[:2] + struct.pack("!H", csum(h, pseudo(src, dst, 58, len(h)))) + h[4:]


def icmp_packet(src, dst, type_, code, rest, body, **kw) -> bytes:
    if len(src) == 4:
        return ip4(src, dst, 1, icmp4(type_, code, rest, body), **kw)
    return ip6(src, dst, 58, icmp6(src, dst, type_, code, rest, body), **kw)


def tcp(src, dst, sport, dport, seq, ack, flags, wnd=65535, options=b"", data=b"") -> bytes:
    hl = 20 + len(options)
    h = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, hl << 2, flags, wnd, 0, 0) + options + data
    c = csum(h, pseudo(src, dst, 6, len(h)))
    return h[:16] + struct.pack("!H", c) + h[18:]


def tcp_packet(src, dst, sport, dport, seq, ack, flags, **kw) -> bytes:
    l4 = tcp(src, dst, sport, dport, seq, ack, flags, **kw)
    return ip4(src, dst, 6, l4) if len(src) == 4 else ip6(src, dst, 6, l4)


def frag4(packet: bytes, size: int) -> list:
    """Split an IPv4 packet (20-byte header) into fragments of *size* data bytes."""
    hdr, data = packet[:20], packet[20:]
    ident = struct.unpack_from("!H", hdr, 4)[0]
    out = []
    for pos in range(0, len(data), size):
        chunk = data[pos:pos + size]
        more = 0x2000 if pos + size < len(data) else 0
        out.append(ip4(hdr[12:16], hdr[16:20], hdr[9], chunk, ident=ident, frag=more | (pos >> 3)))
    return out


def frag6(packet: bytes, size: int, ident=7) -> list:
    """Split an IPv6 packet without extension headers into fragments."""
    src, dst, nxt = packet[8:24], packet[24:40], packet[6]
    data = packet[40:]
    out = []
    for pos in range(0, len(data), size):
        chunk = data[pos:pos + size]
        more = 1 if pos + size < len(data) else 0
        out.append(ip6(src, dst, 44, struct.pack("!BBHI", nxt, 0, pos | more, ident) + chunk))
    return out


# ------------------------------------------------------------------ checks

def parse(pkt: bytes):
    """dpkt view of an output packet (IPv4 or IPv6)."""
    return dpkt.ip.IP(pkt) if pkt[0] >> 4 == 4 else dpkt.ip6.IP6(pkt)


def l4_of(pkt: bytes) -> tuple:
    """(src, dst, proto, transport bytes) of an unfragmented output packet."""
    if pkt[0] >> 4 == 4:
        ihl = (pkt[0] & 15) * 4
        return pkt[12:16], pkt[16:20], pkt[9], pkt[ihl:struct.unpack_from("!H", pkt, 2)[0]]
    plen = struct.unpack_from("!H", pkt, 4)[0]
    return pkt[8:24], pkt[24:40], pkt[6], pkt[40:40 + plen]


def assert_valid(pkt: bytes) -> None:
    """IP header and transport checksums of an unfragmented packet are right."""
    if pkt[0] >> 4 == 4:
        assert inet_sum(pkt[:20]) == 0xFFFF, "IPv4 header checksum"
        assert struct.unpack_from("!H", pkt, 2)[0] == len(pkt)
    else:
        assert struct.unpack_from("!H", pkt, 4)[0] == len(pkt) - 40
    src, dst, proto, l4 = l4_of(pkt)
    if proto in (6, 17, 58):
        assert inet_sum(l4, pseudo(src, dst, proto, len(l4))) == 0xFFFF, f"proto {proto} checksum"
    elif proto == 1:
        assert inet_sum(l4) == 0xFFFF, "ICMP checksum"


def reassemble(pkts: list) -> tuple:
    """Join output fragments (v4 or v6) with dpkt as parser: (src, dst, proto, l4)."""
    parts = []
    for p in pkts:
        ip = parse(p)
        if p[0] >> 4 == 4:
            assert inet_sum(p[:20]) == 0xFFFF
            offm = struct.unpack_from("!H", p, 6)[0]
            parts.append(((offm & 0x1FFF) << 3, offm & 0x2000, ip.p, ip.src, ip.dst, bytes(p[20:ip.len])))
        else:
            assert p[6] == 44
            nxt, _, offm, ident = struct.unpack_from("!BBHI", p, 40)
            parts.append((offm & 0xFFF8, offm & 1, nxt, ip.src, ip.dst, bytes(p[48:])))
    parts.sort()
    data = b""
    for off, more, proto, src, dst, chunk in parts:
        assert off == len(data)
        data += chunk
    assert parts[-1][1] == 0
    return parts[0][3], parts[0][4], parts[0][2], data


def accounting_ok(stack) -> bool:
    return stack.rx_packets == sum(stack.drops.values()) + stack.delivered + stack.frag_held


def test_builders_agree_with_dpkt():
    p = udp_packet(A4, B4, 1000, 53, b"abc")
    ip = dpkt.ip.IP(p)
    assert ip.udp.sport == 1000 and ip.udp.data == b"abc"
    raw = bytes(ip)
    ip.sum = 0
    ip.udp.sum = 0
    assert bytes(ip) == raw          # dpkt recomputes the same checksums
    q = udp_packet(A6, B6, 1000, 53, b"abc")
    ip6_ = dpkt.ip6.IP6(q)
    assert ip6_.data.data == b"abc"
    assert_valid(p)
    assert_valid(q)
