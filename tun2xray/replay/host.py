"""The fake host of the replay: class Replay feeds a capture's client-side
packets to a Stack at their recorded times and plays the host, mirroring
the recorded server (see the package docstring for what it does), while it
records what the stack put on the wire for the judge."""

from __future__ import annotations

import random

from netstack import Stack, StackConfig
from netstack import events as ev
from netstack.wire import tcp as wtcp
from netstack.wire.tcp import build_options
from netstack.wire.templates import TcpTemplate

from .capture import ACK, FIN, M32, RST, SYN, _rel, _unreachable, parse_ip, split_flows, tcp_options
from .checksums import CHECKSUM_MODES, ChecksumReport, _checksum_ok, _fix_tcp_checksum, prepare_checksums
from .judge import judge


# ------------------------------------------------------------------ the replay

class Replay:
    """Replays one capture.  After run(): flows, stack, stray, drops."""

    def __init__(self, packets, config: StackConfig | None = None, seed: int = 0, rng=None,
                 checksums: str = "auto"):
        if checksums not in CHECKSUM_MODES:
            raise ValueError(f"checksums: {checksums!r} is not one of {', '.join(CHECKSUM_MODES)}")
        self.packets = [parse_ip(ts, raw) for ts, raw in packets]
        self.flows, self.sequence, self.stray = split_flows(self.packets)
        self.checksums = ChecksumReport(checksums)
        prepare_checksums(self.sequence, self.checksums)
        self.stack = Stack(config or StackConfig(verify_checksums=True), rng=rng or random.Random(seed))
        self.by_key = {}              # 4-tuple -> its current flow (a capture may reuse one)
        self.by_reply_key = {}
        for f in reversed(self.flows):
            self.by_key[f.key] = f
            self.by_reply_key[(f.proto, f.key[2], f.key[3], f.key[0], f.key[1])] = f
        self.bad_output = 0           # stack packets that are not well-formed (checksums, lengths)
        self.unmatched_output = 0     # stack packets for no recorded flow
        self.output = []              # every packet the stack emitted: (ts, bytes)
        self._active = {}             # TCP flows the host holds an open handle of (ordered)
        self.now = packets[0][0] if packets else 0.0

    # ---------------------------------------------------------------- driving

    def run(self, drain_for: float = 600.0):
        st = self.stack
        for p, f, from_client in self.sequence:
            self._timers_until(p.ts)
            self.now = now = max(self.now, p.ts)     # a capture's clock may step back: ours does not
            if f is None:
                st.input(p.raw, now)      # the stack must cope (counts a drop)
                self._settle()
                continue
            if self.by_key[f.key] is not f:    # the 4-tuple's next connection (port reuse)
                self.by_key[f.key] = f
                self.by_reply_key[(f.proto, f.key[2], f.key[3], f.key[0], f.key[1])] = f
            if from_client:
                if f.proto == 6:
                    self._feed_tcp(f, p, now)
                else:
                    self._input(f, p.raw, now, p)
            else:
                self._server_acts(f, p)
            self._settle()
        # after the capture: let timers (retransmissions, TIME-WAIT, idle) run out
        end = self.now + drain_for
        for _ in range(100000):
            if all(self._done(f) for f in self.flows):
                break
            at = st.next_deadline()
            if at is None or at > end:
                break
            self.now = max(self.now, at)
            st.poll(self.now)
            self._settle()
        for f in self.flows:
            judge(f)
        return self

    def _done(self, f) -> bool:
        if f.proto == 17:
            return True
        return f.close_reason is not None or (f.handle is None and f.expected != "open" and f.refused)

    def _timers_until(self, t):
        st = self.stack
        for _ in range(10000):
            at = st.next_deadline()
            if at is None or at > t:
                return
            self.now = max(self.now, at)
            st.poll(self.now)
            self._settle()

    def _settle(self):
        """Poll, answer events and collect output until nothing changes."""
        st = self.stack
        for _ in range(1000):
            self._events()
            self._host_io()
            st.poll(self.now)
            self._events()
            out = st.take_output()
            for pkt in out:
                self._observe(pkt)
            if not self._synthesize_acks() and not out and not st.events:
                return

    # ------------------------------------------------------------------ host

    def _events(self):
        for e in self.stack.take_events():
            t = type(e)
            if t is ev.TcpConnectRequest:
                f = self.by_key.get(e.conn.key)
                if f is None or f.proto != 6:
                    e.conn.reject("rst")
                    continue
                f.handle = e.conn
                self._active[f] = None
                if f.refused:
                    kind = _unreachable(f.rec_icmp)
                    e.conn.reject("icmp-" + kind if kind else "rst")
                else:
                    e.conn.accept()
            elif t is ev.TcpReadable or t is ev.TcpWritable:
                pass                       # _host_io reads and writes every flow
            elif t is ev.TcpClosed:
                f = self.by_key.get(e.conn.key)
                if f is not None and f.handle is e.conn:
                    self._read_all(f)
                    f.close_reason = e.reason
                    self._active.pop(f, None)
            elif t is ev.UdpDatagram:
                f = self.by_key.get(e.flow.key)
                if f is not None:
                    f.handle = e.flow
                    f.host_datagrams.append(bytes(e.data))
                    kind = _unreachable(f.rec_icmp)
                    if kind is not None:
                        e.flow.reject(kind)
            elif t is ev.UdpClosed:
                f = self.by_key.get(e.flow.key)
                if f is not None:
                    f.close_reason = e.reason

    def _read_all(self, f):
        c = f.handle
        while c.readable:
            data = c.read()
            if not data:
                break
            f.received += data

    def _host_io(self):
        for f in self._active:
            c = f.handle
            if f.close_reason is not None or f.refused:
                continue
            self._read_all(f)
            if f.abort_due:
                f.abort_due = False
                c.abort()
                continue
            if f.written < f.write_limit:
                data = f.server_stream[f.written:f.write_limit]
                if data:
                    f.written += c.write(data)
            if f.shutdown_due and not f.shut and f.written >= len(f.server_stream):
                f.shut = True
                c.shutdown()

    def _server_acts(self, f, p):
        """A recorded server packet: the host does what that server did."""
        if p.icmp is not None:
            return                 # mirrored when the flow's request reached the host
        if f.proto == 17:
            if f.handle is not None:
                f.handle.send(p.payload)
            return
        if f.server_isn is None or p.flags & SYN:
            return
        if p.flags & RST:
            if f.handle is not None and f.close_reason is None:
                f.abort_due = True
            return
        end = _rel(p.seq, f.server_isn) - 1 + len(p.payload)
        if end > f.write_limit:
            f.write_limit = end
        if p.flags & FIN:
            f.shutdown_due = True

    # ---------------------------------------------------------------- client

    def _feed_tcp(self, f, p, now):
        if p.flags & SYN:
            f.last_client = p
            f.client_sent = max(f.client_sent, 1)
            f.client_wscale = tcp_options(p.opts).get(3, (0, None))[1]
            self._input(f, p.raw, now, p)
            return
        raw = self._translate(f, p)
        end = _rel(p.seq, f.client_isn) + len(p.payload) + (1 if p.flags & FIN else 0)
        if end > f.client_sent and end < 1 << 31:
            f.client_sent = end
        f.last_client = p
        self._input(f, raw, now, p)

    def _input(self, f, raw, now, p, note=""):
        """Feed one client packet to the stack, noting it (and whether the
        stack dropped it on arrival) in the flow's ladder."""
        st = self.stack
        d0, t0 = dict(st.drops), dict(st.tcp_drops)
        st.input(raw, now)
        why = _grown(d0, st.drops)
        if why:
            note = (note + ", " if note else "") + "dropped by the stack: " + why
        else:
            why = _grown(t0, st.tcp_drops)
            if why:
                note = (note + ", " if note else "") + "discarded by the connection: " + why
        f.ladder.append((now, True, p if raw is p.raw else parse_ip(now, raw), note))

    def _translate(self, f, p) -> bytes:
        """The client packet with its ACK, SACK edges and TS echo moved from
        the recorded server's sequence/timestamp space to the stack's."""
        if f.stack_isn is None or f.server_isn is None or not (p.flags & ACK):
            return p.raw
        rel = _rel(p.ack, f.server_isn)
        if rel >= 1 << 31:
            rel = 0
        if rel > f.ack_target:
            f.ack_target = rel
        ack_rel = min(rel, f.snd_max)
        if ack_rel < rel:
            f.lowered += 1
        if ack_rel > f.acked_to_stack:
            f.acked_to_stack = ack_rel
        buf = bytearray(p.raw)
        l4 = p.l4
        buf[l4 + wtcp.OFF_ACK:l4 + wtcp.OFF_ACK + 4] = ((f.stack_isn + ack_rel) & M32).to_bytes(4, "big")
        opts = tcp_options(p.opts)
        base = l4 + 20
        if 8 in opts and f.stack_tsval is not None:
            i, (_tsval, _ecr) = opts[8]
            buf[base + i + 6:base + i + 10] = f.stack_tsval.to_bytes(4, "big")
        if 5 in opts:
            i, blocks = opts[5]
            for j, (left, right) in enumerate(blocks):
                lr = min(_rel(left, f.server_isn), f.snd_max)
                rr = min(_rel(right, f.server_isn), f.snd_max)
                wtcp.SACK_EDGES.pack_into(buf, base + i + 2 + 8 * j, (f.stack_isn + lr) & M32, (f.stack_isn + rr) & M32)
        _fix_tcp_checksum(buf, p.family, l4)
        if p.csum_bad:
            buf[l4 + 17] ^= 1         # rewritten, it stays as wrong as captured (--checksums verify)
        self._advertised(f, ack_rel, p.wnd)
        return bytes(buf)

    def _advertised(self, f, ack_rel, wnd):
        edge = ack_rel + (wnd << f.wscale)
        if edge > f.right_edge:
            f.right_edge = edge

    def _synthesize_acks(self) -> bool:
        """Acknowledge, for the client, stack bytes the recording shows the
        client had acknowledged but which the stack had not sent back then."""
        fed = False
        for f in self._active:
            if (f.stack_isn is None or f.close_reason is not None or f.last_client is None
                    or f.last_client.flags & (SYN | RST)):
                continue
            want = min(f.ack_target, f.snd_max)
            if want <= f.acked_to_stack:
                continue
            f.acked_to_stack = want
            f.synthesized += 1
            self._advertised(f, want, f.last_client.wnd)
            raw = self._client_ack(f, want)
            self._input(f, raw, self.now, parse_ip(self.now, raw), "synthesized")
            fed = True
        return fed

    def _client_ack(self, f, ack_rel) -> bytes:
        lp = f.last_client
        c_src, c_port, s_dst, s_port = f.key
        tpl = TcpTemplate(f.family, c_src, s_dst, c_port, s_port, self.stack.config)
        opts = b""
        ts = tcp_options(lp.opts).get(8)
        if ts is not None:
            opts = build_options(ts=(ts[1][0], f.stack_tsval if f.stack_tsval is not None else 0))
        return tpl.build((f.client_isn + f.client_sent) & M32, (f.stack_isn + ack_rel) & M32, ACK, lp.wnd, opts, b"")

    # ---------------------------------------------------------------- output

    def _observe(self, pkt):
        """Record one packet the stack emitted toward the client."""
        pkt = bytes(pkt)
        self.output.append((self.now, pkt))
        p = parse_ip(self.now, pkt)
        if p.proto is None or not _checksum_ok(p):
            self.bad_output += 1
            return
        if p.icmp is not None:
            f = self.by_key.get(p.inner[1:]) if p.inner is not None else None
            if f is None or p.inner[0] != f.proto:
                self.unmatched_output += 1
            else:
                f.stack_icmp.append(p.icmp)
                f.ladder.append((self.now, False, p, ""))
            return
        f = self.by_reply_key.get((p.proto, p.src, p.sport, p.dst, p.dport))
        if f is None:
            self.unmatched_output += 1
            return
        f.ladder.append((self.now, False, p, ""))
        if f.proto == 17:
            f.stack_datagrams.append(bytes(p.payload))
            return
        f.stack_segments += 1
        if p.flags & SYN:
            f.stack_isn = p.seq
            f.syn_ack = (p.seq, p.ack if p.flags & ACK else None)
            f.snd_max = max(f.snd_max, 1)
            if f.client_wscale is not None and 3 in tcp_options(p.opts):
                f.wscale = f.client_wscale
            f.right_edge = max(f.right_edge, 1 + f.last_client.wnd if f.last_client is not None else 1)
        if p.flags & RST:
            f.stack_rst.append((p.seq, p.ack, p.flags))
        if f.stack_isn is None:
            return
        opts = tcp_options(p.opts)
        if 8 in opts:
            f.stack_tsval = opts[8][1][0]
        if p.flags & ACK:
            f.stack_acks.append((_rel(p.ack, f.client_isn), f.client_sent))
        if 5 in opts:
            f.stack_sacks.append((_rel(p.ack, f.client_isn), [(_rel(a, f.client_isn), _rel(b, f.client_isn)) for a, b in opts[5][1]],
                                  f.client_sent))
        if p.flags & SYN:
            return
        rel = _rel(p.seq, f.stack_isn)
        if rel >= 1 << 31:
            return
        f.stack_stream.put(rel - 1, bytes(p.payload))
        end = rel + len(p.payload)
        # flow control: nothing beyond the window the client offered (a
        # one-byte probe of a closed window is allowed, RFC 9293 3.8.6.1)
        if len(p.payload) and end > f.right_edge + (1 if len(p.payload) == 1 else 0):
            f.window_violations += 1
        if p.flags & FIN:
            f.stack_fin = end - 1
            end += 1
        if end > f.snd_max:
            f.snd_max = end


def _grown(before: dict, after: dict) -> str:
    """The counters that grew, by name ("" if none)."""
    return ", ".join(k for k, v in after.items() if v > before.get(k, 0))
