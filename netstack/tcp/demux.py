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

_TS_WORDS = struct.Struct("!III").unpack_from   # an option block's first word, tsval, tsecr
_TS_HEAD = 0x0101080A                            # NOP NOP kind 8 length 10


def tcp_input(stack, family, src, dst, mv, off, now):
    """Stack._tcp_in: parse one TCP segment and hand it to its connection."""
    seglen = len(mv) - off
    try:
        if seglen >= 20:
            # the fast form; what it cannot vouch for goes through the checked unpack
            sport, dport, seq, ack, doff, flags, wnd = _fields(mv, off)
            doff = (doff >> 4) << 2
            if doff < 20 or doff > seglen:
                sport, dport, seq, ack, doff, flags, wnd = _unpack(mv, off)
        else:
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
    opts = None
    if doff > 20:
        if doff == 32 and conn is not None:
            # NOP NOP TS, on nearly every segment of a connection that uses
            # timestamps: read into the stack's one reused TcpOptions instead
            # of a new object per segment (nothing keeps a segment's options)
            head, tsv, tse = _TS_WORDS(mv, off + 20)
            if head == _TS_HEAD:
                opts = stack.ts_opts
                opts.ts_val = tsv
                opts.ts_ecr = tse
        if opts is None:
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
    conn.segment_arrives(seq, ack, flags, wnd, opts, mv[off + doff:], now)
    at = conn.poll_at
    if at is not None and at != conn._sched_at and not conn.closed:
        stack._reschedule(conn)


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

