"""The TCP demux: Stack._tcp_in.  Parses a segment's header, verifies its
checksum when the device does not vouch for it, finds the connection (or
opens one on a plain SYN) and hands the segment over; segments for no flow
are answered as RFC 9293 §3.10.7.1 (CLOSED state) says.  This is the stack's
side of the flow-host boundary: it may use the stack's tables."""

from __future__ import annotations

import struct

from ..seq import HALF as _HALF
from ..seq import MASK as _M
from ..wire import checksum as _ck
from ..wire.errors import WireError
from ..wire.tcp import fields as _fields
from ..wire.tcp import parse_options
from ..wire.tcp import unpack as _unpack
from ..wire.templates import TcpTemplate
from .connection import TcpConnection
from .const import ACK, FIN, PROTO_TCP, RST, SYN, TIME_WAIT

# the header (without checksum and urgent pointer) and the first 12 option
# bytes in one read: a NOP NOP TS block there (nearly every segment of a
# connection with timestamps) needs no second one
_HDR_TS = struct.Struct("!HHIIBBH4xIII").unpack_from
_TS_HEAD = 0x0101080A                            # NOP NOP kind 8 length 10


def tcp_input(stack, family, src, dst, mv, off, now):
    """Stack._tcp_in: parse one TCP segment and hand it to its connection."""
    seglen = len(mv) - off
    try:
        if seglen >= 32:
            # the fast form; what it cannot vouch for goes through the checked unpack
            sport, dport, seq, ack, doff, flags, wnd, head, tsv, tse = _HDR_TS(mv, off)
        elif seglen >= 20:
            sport, dport, seq, ack, doff, flags, wnd = _fields(mv, off)
            head = 0
        else:
            sport, dport, seq, ack, doff, flags, wnd = _unpack(mv, off)
            head = 0
        doff = (doff >> 4) << 2
        if doff < 20 or doff > seglen:
            sport, dport, seq, ack, doff, flags, wnd = _unpack(mv, off)
    except WireError as e:
        stack.drops[e.reason] += 1
        return
    key = (src, sport, dst, dport)
    conn = stack.tcp.get(key)
    if stack.config.verify_checksums:
        if conn is not None:
            ps = conn._ps + seglen            # the flow's pseudo-header sum, cached
        else:
            ps = _ck.pseudo(src, dst, PROTO_TCP, seglen)
        if _ck.sum16(mv[off:], ps) != 0xFFFF:
            stack.drops["bad_tcp_checksum"] += 1
            return
    if doff == 20:
        opts = None
    elif doff == 32 and head == _TS_HEAD and conn is not None:
        # NOP NOP TS: read into the stack's one reused TcpOptions instead
        # of a new object per segment (nothing keeps a segment's options)
        opts = stack.ts_opts
        opts.ts_val = tsv
        opts.ts_ecr = tse
    else:
        try:
            opts = parse_options(mv[off + 20:off + doff])
        except WireError:
            stack.drops["bad_tcp_options"] += 1
            return
    if conn is None:
        conn = _tcp_new(stack, family, key, flags, seq, ack, mv, off, seglen - doff, now)
        if conn is None:
            return
    elif conn.state is TIME_WAIT and (flags & (SYN | ACK | RST | FIN)) == SYN and _tw_reuse(conn, seq, opts):
        # RFC 9293 §3.10.7.4 / RFC 6191: a new incarnation ends TIME_WAIT early
        conn._remove("closed")
        conn = _tcp_new(stack, family, key, flags, seq, ack, mv, off, seglen - doff, now)
        if conn is None:
            return
    stack.delivered += 1
    # a pure ACK (most of what a download reads) gets no view of its empty payload
    conn.segment_arrives(seq, ack, flags, wnd, opts, mv[off + doff:] if seglen > doff else b"", now)
    at = conn.poll_at
    if at is not None and at != conn._sched_at and not conn.closed:
        stack._reschedule(conn)


# An IPv4 header without options and the TCP header with a NOP NOP TS
# block, in one read: version/IHL, total length, fragment word, protocol,
# then as _HDR_TS without the ports (the flow cache compared them, with the
# addresses, as bytes)
_V4_TS = struct.Struct("!BxHxxHxB14xIIBBH4xIII").unpack_from


def tcp_batch(stack, packets, now):
    """Stack.input_batch.

    A read batch of a transfer is mostly one flow's segments in a row (a
    download's ACKs: ~150 a batch on a plain TUN).  The connection of the
    last segment is kept with its addresses and ports as bytes (BSD's
    one-entry PCB cache, cf. Jacobson's header prediction); a packet whose
    bytes 12-24 match it, that is IPv4 without options or fragments and
    TCP with only a timestamp option, and no SYN, goes straight to the
    connection's segment_arrives: one header read instead of input()'s
    IP parse, tcp_input's and the table lookup.  Checksums are verified
    here when the stack verifies them; a packet that fails goes to input(),
    which finds what is wrong and counts it.  Everything else takes
    input() as before; the counters (rx_*, delivered) move as input()
    moves them, and segment_arrives makes every decision, so the
    connection cannot tell the two routes apart (tests/test_tcp_ackpath.py)."""
    inp = stack.input
    verify = stack.config.verify_checksums
    kb = None            # bytes 12-24 (addresses, ports) of the cached flow
    conn = None
    last = None          # bytes 12-24 of the previous packet, when it was IPv4 TCP
    opts = stack.ts_opts
    for p in packets:
        n = len(p)
        if n >= 52:
            k = p[12:24]
            if k == kb:
                vihl, tot, frag, proto, seq, ack, doff, flags, wnd, head, tsv, tse = _V4_TS(p)
                if (vihl == 0x45 and tot == n and proto == PROTO_TCP and not frag & 0x3FFF
                        and doff >> 4 == 8 and head == _TS_HEAD and not flags & SYN and not conn.closed
                        and (not verify or _sums_ok(p, conn._ps + n - 20))):
                    stack.now = now
                    stack.rx_packets += 1
                    stack.rx_bytes += n
                    stack.delivered += 1
                    opts.ts_val = tsv
                    opts.ts_ecr = tse
                    conn.segment_arrives(seq, ack, flags, wnd, opts, memoryview(p)[52:] if n > 52 else b"", now)
                    at = conn.poll_at
                    if at is not None and at != conn._sched_at and not conn.closed:
                        stack._reschedule(conn)
                    continue
            inp(p, now)
            if k == last and p[0] == 0x45 and p[9] == PROTO_TCP:
                # the second segment of this flow in a row: cache its connection
                c = stack.tcp.get((bytes(p[12:16]), (p[20] << 8) | p[21], bytes(p[16:20]), (p[22] << 8) | p[23]))
                if c is not None:
                    kb = bytes(k)
                    conn = c
            last = k
        else:
            inp(p, now)
            last = None


def _sums_ok(p, ps):
    """The IPv4 header (20 bytes) and the TCP segment after it sum right
    (ps: the flow's pseudo-header sum with the segment's length)."""
    mv = memoryview(p)
    return _ck.sum16(mv[:20]) == 0xFFFF and _ck.sum16(mv[20:], ps) == 0xFFFF


def _tw_reuse(conn, seq, opts):
    if conn.ts_ok and opts is not None and opts.ts_val is not None:
        return 0 < ((opts.ts_val - conn.ts_recent) & _M) < _HALF
    return 0 < ((seq - conn.rcv_nxt) & _M) < _HALF


def _tcp_new(stack, family, key, flags, seq, ack, mv, off, datalen, now):
    """A segment for no flow: a plain SYN opens one; the rest is answered
    as RFC 9293 §3.10.7.1 (CLOSED state) says."""
    if flags & RST:
        stack.drops["tcp_rst_no_flow"] += 1
        return None
    if (flags & (SYN | ACK | FIN)) != SYN:
        stack.drops["tcp_no_flow"] += 1
        _send_rst_for(stack, family, key, flags, seq, ack, datalen)
        return None
    cfg = stack.config
    b = stack.budget
    if b.used >= b.limit > 0:             # b.full, without the property's call
        stack.drops["memory_budget"] += 1
        _send_rst_for(stack, family, key, flags, seq, ack, datalen)
        return None
    src, _, dst, dport = key
    why, victim = stack.admission.check(src, dst, dport, stack.pending)
    if why is not None:
        stack.drops[why] += 1
        return None
    if victim is not None:
        victim.shed()
    if len(stack.tcp) + len(stack.udp) >= cfg.max_flows and not stack._udp_evict():
        stack.drops["flow_limit"] += 1
        _send_rst_for(stack, family, key, flags, seq, ack, datalen)
        return None
    conn = TcpConnection(stack.tcp_host, key, family, bytes(mv[:off + 8]), now)
    stack.tcp[key] = conn
    return conn


def _send_rst_for(stack, family, key, flags, seq, ack, datalen):
    src, sport, dst, dport = key
    tpl = TcpTemplate(family, dst, src, dport, sport, stack.config)
    if flags & ACK:
        stack.output.append(tpl.build(ack, 0, RST, 0, b"", b""))
    else:
        n = datalen + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
        stack.output.append(tpl.build(0, (seq + n) & _M, RST | ACK, 0, b"", b""))

