"""Fuzz target "wire": the packet parsers of netstack.wire and the fragment
reassembler (netstack.reassembly).

Byte 0 picks the part, the rest is its input:
  0  IPv4 / IPv6 headers and the IPv6 extension-header walk: only WireError
     escapes; what parses re-emits to the same bytes (checksum field aside);
     offsets stay inside the packet
  1  TCP header and option parsing: only WireError; the header re-emits to
     the same bytes (reserved bits and checksum aside); window scale <= 14,
     1-4 SACK blocks
  2  UDP parse/verify and ICMP error quotes: only WireError, lengths and
     offsets consistent
  3  checksums: sum16 against an independent word-by-word sum, with any
     start value; RFC 1624 incremental update against a full recomputation
  4  reassembly: a sequence of fragments (16-bit length + bytes, a time
     step byte each) through Reassembler.add/expire: never raises, stays
     within frag_max_datagrams / frag_max_bytes, and every datagram it
     returns is a whole, well-formed, unfragmented packet
"""

from __future__ import annotations

import struct
from collections import defaultdict

from netstack.config import StackConfig
from netstack.reassembly import Reassembler
from netstack.wire import checksum as ck
from netstack.wire import icmp, ipv4, ipv6, tcp, udp
from netstack.wire.errors import WireError

from .common import Provider, check, inet_sum, is_fragment, put_blob

PARTS = 5


def _wire_error(e: WireError) -> None:
    check(isinstance(e.reason, str) and e.reason.replace("_", "").isalnum(), lambda: f"reason {e.reason!r}")


def ip_headers(data: bytes) -> None:
    for verify in (False, True):
        try:
            h, ihl = ipv4.parse(memoryview(data), verify)
        except WireError as e:
            _wire_error(e)
        else:
            check(20 <= ihl <= min(60, len(data)) and h.header_len == ihl, "IPv4 header length")
            out = ipv4.build(h)
            check(out[:10] + out[12:] == data[:10] + data[12:ihl], "IPv4 header does not re-emit")
            if verify:
                check(inet_sum(data[:ihl]) == 0xFFFF, "IPv4 checksum accepted but wrong")
    try:
        h6, off = ipv6.parse(data)
    except WireError as e:
        _wire_error(e)
    else:
        check(off == 40 and ipv6.build(h6) == data[:40], "IPv6 header does not re-emit")
        end = 40 + h6.payload_len
        try:
            proto, at, frag = ipv6.walk(memoryview(data)[:end])
        except WireError as e:
            _wire_error(e)
        else:
            check(0 <= proto <= 255 and 40 <= at <= end, lambda: f"walk gave ({proto}, {at}) in {end} bytes")


def tcp_header(data: bytes) -> None:
    src, dst = data[:4].ljust(4, b"\0"), data[4:8].ljust(4, b"\0")
    seg = data[8:]
    for addrs in ((None, None), (src, dst)):
        try:
            h, hl = tcp.parse(memoryview(seg), *addrs)
        except WireError as e:
            _wire_error(e)
            continue
        check(20 <= hl <= len(seg) and len(h.options) == hl - 20, "TCP data offset")
        out = tcp.build_header(h)
        want = bytearray(seg[:hl])
        want[12] &= 0xF1
        want[16:18] = b"\0\0"
        check(out == bytes(want), "TCP header does not re-emit")
        if addrs[0] is not None:
            ps = inet_sum(src + dst + struct.pack("!BBH", 0, 6, len(seg)))
            check(inet_sum(seg, ps) == 0xFFFF, "TCP checksum accepted but wrong")
        _options(h.options)
    _options(seg[:40])


def _options(block: bytes) -> None:
    try:
        o = tcp.parse_options(block)
    except WireError as e:
        _wire_error(e)
        return
    check(o.wscale is None or 0 <= o.wscale <= 14, "window scale over 14")
    check(o.sack is None or 1 <= len(o.sack) <= 4, "SACK blocks")


def udp_icmp(data: bytes) -> None:
    fdp = Provider(data)
    family = 4 if fdp.flag() else 6
    src, dst = fdp.take(4 if family == 4 else 16), fdp.take(4 if family == 4 else 16)
    off = fdp.u8() % 64
    body = fdp.rest()
    try:
        sport, dport, ulen, csum = udp.parse(body, off)
    except WireError as e:
        _wire_error(e)
    else:
        check(8 <= ulen <= len(body) - off, "UDP length")
        if len(src) == len(dst) == (4 if family == 4 else 16):
            ok = udp.verify(family, src, dst, body[off:off + ulen])
            zero = body[off + 6:off + 8] == b"\0\0"
            want = (family == 4) if zero else inet_sum(body[off:off + ulen], _pseudo(src, dst, 17, ulen)) == 0xFFFF
            check(ok == want, "UDP checksum verdict")
    try:
        fam, proto, qsrc, sport, qdst, dport = icmp.parse_quote(memoryview(body), off)
    except WireError as e:
        _wire_error(e)
    else:
        check(fam in (4, 6) and proto in (6, 17) and len(qsrc) == len(qdst) == (4 if fam == 4 else 16),
              "ICMP quote fields")


def _pseudo(src, dst, proto, length):
    if len(src) == 4:
        return inet_sum(src + dst + struct.pack("!BBH", 0, proto, length))
    return inet_sum(src + dst + struct.pack("!IxxxB", length, proto))


def checksums(data: bytes) -> None:
    fdp = Provider(data)
    start = fdp.u32() if fdp.flag() else 0
    body = fdp.rest()
    got = ck.sum16(body, start)
    want = inet_sum(body, start)
    check(got == want, lambda: f"sum16 {got:#x} != {want:#x} ({len(body)} bytes, start {start:#x})")
    if len(body) >= 4:
        # change the first word, update the checksum incrementally (RFC 1624)
        c = ~inet_sum(body) & 0xFFFF
        new = bytes([body[-1], body[-2]]) + body[2:]
        inc = ck.update16(c, struct.unpack_from("!H", body)[0], struct.unpack_from("!H", new)[0])
        full = ~inet_sum(new) & 0xFFFF
        check(inc == full or {inc, full} == {0, 0xFFFF}, lambda: f"update16 {inc:#x}, recomputed {full:#x}")


def reassembly(data: bytes) -> None:
    fdp = Provider(data)
    cfg = StackConfig(frag_max_datagrams=1 + fdp.u8() % 8, frag_max_bytes=512 + fdp.u16() * 4, frag_timeout=5.0)
    drops = defaultdict(int)
    r = Reassembler(cfg, drops)
    now = 0.0
    while fdp.remaining():
        pkt = fdp.blob()
        now += (0.0, 0.01, 1.0, 6.0)[fdp.u8() & 3]
        whole = r.add(pkt, now)
        for q in r.expire(now):
            check(len(q) >= 20, "reassembly quote too short")
        check(len(r) <= cfg.frag_max_datagrams, "reassembly holds too many datagrams")
        check(0 <= r.bytes_held <= cfg.frag_max_bytes, "reassembly holds too many bytes")
        d = r.next_deadline()
        check(d is None or d > now, "reassembly deadline in the past after expire")
        if whole is not None:
            _whole(whole)


def _whole(p: bytes) -> None:
    n = len(p)
    check(n >= 20 and p[0] >> 4 in (4, 6), "reassembled packet header")
    check(not is_fragment(p) if p[0] >> 4 == 4 else True, "reassembled IPv4 packet still a fragment")
    if p[0] >> 4 == 4:
        ihl = (p[0] & 15) * 4
        check(struct.unpack_from("!H", p, 2)[0] == n <= 65535, "reassembled IPv4 total length")
        check(inet_sum(p[:ihl]) == 0xFFFF, "reassembled IPv4 header checksum")
    else:
        # the fragment header is gone, but the reassembled payload may itself
        # start with one (fragments of a fragment): the stack hands such a
        # datagram to the reassembler again, so no check on that here
        check(n >= 40 and struct.unpack_from("!H", p, 4)[0] == n - 40, "reassembled IPv6 payload length")


PART_FUNCS = (ip_headers, tcp_header, udp_icmp, checksums, reassembly)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    PART_FUNCS[data[0] % PARTS](data[1:])


# ---------------------------------------------------------------- seeds

def seeds() -> list:
    import glob
    import os

    from tun2xray.replay import ReplayError, read_pcap

    from .stack import fragments
    root = os.path.join(os.path.dirname(__file__), "..", "..", "pcaps")
    pkts = []
    for path in sorted(glob.glob(os.path.join(root, "*.pcap"))):
        try:
            pkts += [bytes(p) for _, p in read_pcap(path)[:6]]
        except ReplayError:
            continue
    out = []
    for p in pkts:
        out.append(b"\0" + p)
        l4 = p[(p[0] & 15) * 4:] if p[0] >> 4 == 4 else p[40:]
        out.append(b"\1" + (p[12:20] if p[0] >> 4 == 4 else bytes(8)) + l4)
        out.append(b"\2" + (b"\1" + p[12:20] if p[0] >> 4 == 4 else b"\0" + p[8:40]) + b"\0" + l4)
    out.append(b"\3" + pkts[0])
    for p in pkts[:12]:
        fr = fragments(Provider(b"\2"), p)
        out.append(b"\4\3\0\x40" + b"".join(put_blob(f) + b"\0" for f in fr))
    return out
