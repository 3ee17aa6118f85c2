"""ICMP and ICMPv6 in the stack: echo replies, errors we send (destination
unreachable for rejected flows), errors we receive (packet too big /
fragmentation needed, honoured by the flow they quote).

Every function here ends an input packet's accounting: it either counts
stack.delivered (answered, or handed to a flow) or one stack.drops reason.
"""

from __future__ import annotations

from .wire import checksum as ck
from .wire import icmp as wi
from .wire import ipv4 as _v4
from .wire import ipv6 as _v6
from .wire.errors import WireError
from .wire.templates import icmp4_packets, icmp6_packets


def icmp4_input(stack, src, dst, mv, off, now):
    drops = stack.drops
    try:
        type_, code, rest = wi.unpack(mv, off)
    except WireError as e:
        drops[e.reason] += 1
        return
    msg = mv[off:]
    if stack.config.verify_checksums and ck.sum16(msg) != 0xFFFF:
        drops["bad_icmp_checksum"] += 1
        return
    if type_ == wi.ECHO_REQUEST4:
        if stack.config.icmp_echo != "reply":
            drops["icmp_echo_off"] += 1
        elif dst[0] >= 224 or dst == b"\xff\xff\xff\xff":
            drops["icmp_echo_multicast"] += 1
        else:
            stack.output.extend(icmp4_packets(dst, src, wi.ECHO_REPLY4, 0, rest, msg[8:],
                                              stack.config.ttl, stack.config.mtu,
                                              stack._next_ip_id()))
            stack.delivered += 1
        return
    if type_ == wi.UNREACH4 and code == wi.FRAG_NEEDED4:
        _pmtu(stack, 4, mv, off + 8, rest & 0xFFFF, now)
        return
    if type_ in wi.ERRORS4:
        drops["icmp_error_in"] += 1
    else:
        drops["icmp_type"] += 1


def icmp6_input(stack, src, dst, mv, off, now):
    drops = stack.drops
    try:
        type_, code, rest = wi.unpack(mv, off)
    except WireError as e:
        drops[e.reason] += 1
        return
    msg = mv[off:]
    if stack.config.verify_checksums and ck.sum16(msg, ck.pseudo(src, dst, 58, len(msg))) != 0xFFFF:
        drops["bad_icmp_checksum"] += 1
        return
    if type_ == wi.ECHO_REQUEST6:
        if stack.config.icmp_echo != "reply":
            drops["icmp_echo_off"] += 1
        elif dst[0] == 0xFF:
            drops["icmp_echo_multicast"] += 1
        else:
            stack.output.extend(icmp6_packets(dst, src, wi.ECHO_REPLY6, 0, rest, msg[8:],
                                              stack.config.ttl, stack.config.mtu,
                                              stack._next_ip_id()))
            stack.delivered += 1
        return
    if type_ == wi.PACKET_TOO_BIG6:
        _pmtu(stack, 6, mv, off + 8, rest, now)
        return
    if type_ in wi.ND6:
        drops["icmp6_nd"] += 1
    elif type_ in wi.MLD6:
        drops["icmp6_mld"] += 1
    elif type_ < 128:
        drops["icmp_error_in"] += 1
    else:
        drops["icmp_type"] += 1


def _pmtu(stack, family, mv, qoff, mtu, now):
    """A packet-too-big for one of our packets: find the flow it quotes.
    Our packet went from the flow's dst:dport to its src:sport."""
    try:
        qfam, proto, qsrc, qsport, qdst, qdport = wi.parse_quote(mv, qoff)
    except WireError as e:
        stack.drops[e.reason] += 1
        return
    if qfam != family:
        stack.drops["icmp_bad_quote"] += 1
        return
    if mtu < (wi.MIN_MTU4 if family == 4 else wi.MIN_MTU6_FLOOR):
        # RFC 1191 §5 "old-style" zero MTU, or nonsense: nothing to honour
        stack.drops["icmp_bad_mtu"] += 1
        return
    if family == 6 and mtu < wi.MIN_MTU6:
        mtu = wi.MIN_MTU6                    # RFC 8201 §4: never below 1280
    if mtu > 65535:
        mtu = 65535
    key = (qdst, qdport, qsrc, qsport)
    flow = stack.tcp.get(key) if proto == 6 else stack.udp.get(key)
    if flow is None or not hasattr(flow, "on_pmtu"):
        stack.drops["icmp_no_flow"] += 1
        return
    flow.on_pmtu(mtu, now)
    if not flow.closed:
        stack._reschedule(flow)
    stack.delivered += 1


def unreachable(stack, quote, kind: str) -> bool:
    """Send destination unreachable (*kind*: port, host, net, admin) to the
    sender of the packet whose start is *quote*.  False if the quote is not
    an IP packet we can answer (nothing sent)."""
    n = len(quote)
    if n < 1:
        return False
    v = quote[0] >> 4
    cfg = stack.config
    if v == 4 and n >= 20:
        code = wi.UNREACH_CODES4.get(kind)
        if code is None:
            raise ValueError(f"unknown unreachable kind {kind!r}")
        src, dst = bytes(quote[_v4.OFF_SRC:_v4.OFF_DST]), bytes(quote[_v4.OFF_DST:_v4.OFF_DST + 4])
        body = quote[:wi.MAX_ERROR4 - 28]
        stack.output.extend(icmp4_packets(dst, src, wi.UNREACH4, code, 0, body, cfg.ttl,
                                          ident=stack._next_ip_id()))
        return True
    if v == 6 and n >= 40:
        code = wi.UNREACH_CODES6.get(kind)
        if code is None:
            raise ValueError(f"unknown unreachable kind {kind!r}")
        src, dst = bytes(quote[_v6.OFF_SRC:_v6.OFF_DST]), bytes(quote[_v6.OFF_DST:_v6.OFF_DST + 16])
        body = quote[:wi.MAX_ERROR6 - 48]
        stack.output.extend(icmp6_packets(dst, src, wi.UNREACH6, code, 0, body, cfg.ttl,
                                          ident=stack._next_ip_id()))
        return True
    return False
