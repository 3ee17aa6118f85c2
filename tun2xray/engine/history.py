"""What the engine reports: the rate-limited drop summary, the byte-rate
sampler, the bounded history of closed flows and why they closed, status()
and the counters.  A mixin of Engine; its state is the Engine's.
"""

from __future__ import annotations

import asyncio
import time

from .relay import RATE_PERIOD, TcpRelay, _fmt


class EngineHistory:
    # ---------------------------------------------------------- drop summary

    def _drop_total(self) -> int:
        st = self.stack
        # the stack's accounting: rx_packets == sum(drops) + delivered + frag_held
        return (st.rx_packets - st.delivered - st.frag_held + sum(st.frag_drops.values())
                + self.counters["udp_queue_full"])

    def _drop_counts(self) -> dict:
        st = self.stack
        counts = dict(st.drops)
        for k, v in st.frag_drops.items():
            counts[k] = counts.get(k, 0) + v
        q = self.counters["udp_queue_full"]
        if q:
            counts["udp_queue_full"] = q
        return counts

    def _drops_changed(self) -> None:
        """Debug only: tell DropSummary when drops grew; it logs at most one
        line per interval, and a timer reports what the limit held back."""
        total = self._drop_total()
        if total == self._drop_seen:
            return
        dl = self._drop_log
        if self._drop_timer is not None and dl.clock() < dl.next_at:
            return                    # held back: the timer reports it
        self._drop_seen = total
        again = dl.check(self._drop_counts())
        if self._drop_timer is not None:
            self._drop_timer.cancel()
            self._drop_timer = None
        if again is not None:
            delay = max(0.0, again - dl.clock())
            self._drop_timer = self.loop.call_later(delay, self._drop_timer_fired)

    def _drop_timer_fired(self) -> None:
        self._drop_timer = None
        self._drop_seen = -1          # look again whatever the total
        self._drops_changed()

    # ------------------------------------------------------- closed flows, rates

    def close_why(self, obj, reason: str, detail: str | None = None) -> None:
        """Say why the engine is about to end a flow (before abort/reject/close)."""
        self._why[obj] = (reason, detail)

    def _tcp_close_reason(self, conn, relay, reason):
        why = self._why.pop(conn, None)
        if why is not None:
            return why
        if reason == "closed":
            fin = relay.fin_from if isinstance(relay, TcpRelay) else None
            return ("upstream closed" if fin == "upstream" else "client FIN", None)
        if reason == "reset":
            return ("client RST", None)
        if reason == "timeout":
            # a connection still waiting for its SYN-ACK timed out in the stack
            return ("timeout" if isinstance(relay, TcpRelay) else "connect timeout", None)
        return (reason, None)

    def _remember(self, proto, f, relay, why) -> None:
        """Add a closed flow to the bounded history; keep the total rate exact."""
        bi, bo = f.bytes_in, f.bytes_out
        self._flow_rate.pop(f, None)
        cb = self._closed_bytes
        cb[0] += bi
        cb[1] += bo
        now = self.loop.time() if self.loop is not None else f.created
        self.closed_flows.append((proto, f.src, f.sport, f.dst, f.dport,
                                  getattr(relay, "url", None), why[0], why[1], bi, bo,
                                  now - f.created, time.time(), getattr(relay, "name", None)))

    def _sample(self) -> None:
        """Every RATE_PERIOD: bytes/s per flow and in total from the byte
        counters (no per-packet work)."""
        loop = self.loop
        now = loop.time()
        dt = now - self._sample_at
        self._sample_at = now
        self._sampler = loop.call_later(RATE_PERIOD, self._sample)
        if dt <= 0:
            return
        # each flow's counters at the last sample live in its relay (two
        # slots), written only when they moved: no table of tuples rebuilt
        # every second (it showed in the RSS per flow).  A flow without a
        # relay (a request not yet answered) has moved no bytes.
        flow_rate = {}
        tot_in, tot_out = self._closed_bytes
        stack = self.stack
        for table in (stack.tcp, stack.udp):
            for f in table.values():
                bi, bo = f.bytes_in, f.bytes_out
                tot_in += bi
                tot_out += bo
                r = f.user
                if r is None:
                    continue
                pi, po = r.sampled_in, r.sampled_out
                if bi != pi or bo != po:
                    r.sampled_in = bi
                    r.sampled_out = bo
                    flow_rate[f] = ((bi - pi) / dt, (bo - po) / dt)
        self._flow_rate = flow_rate
        ti, to = self._total_at
        self._total_at = (tot_in, tot_out)
        self._rate = ((tot_in - ti) / dt, (tot_out - to) / dt)

    def _closed_status(self) -> list:
        from ..state import utc_text
        out = []
        for (proto, src, sport, dst, dport, url, reason, detail, bi, bo, dur, ended, name) in self.closed_flows:
            out.append({"proto": proto, "src": _fmt(src, sport), "dst": _fmt(dst, dport), "name": name,
                        "inbound": url,
                        "reason": reason, "detail": detail, "bytes_up": bi, "bytes_down": bo,
                        "duration": round(dur, 3), "ended": utc_text(ended), "ended_epoch": round(ended, 3)})
        return out

    # -------------------------------------------------------------------- status

    def status(self) -> dict:
        now = self.loop.time() if self.loop is not None else 0.0
        st = self.stack.status()
        flows = []
        rate = self._flow_rate
        still = (0.0, 0.0)
        for conn in list(self.stack.tcp.values()):
            flows.append(_flow_entry("tcp", conn, conn.state, rate.get(conn, still), now))
        for flow in list(self.stack.udp.values()):
            flows.append(_flow_entry("udp", flow, "open", rate.get(flow, still), now))
        out = {
            "uptime": round(time.time() - self.started, 3),
            "device": {"name": self.device.name, "mtu": self.device.mtu, **dict(self.device.stats)},
            "stack": st,
            "engine": self._engine_counters(),
            "udp_associations": len(self._assocs),
            "rate": {"up": round(self._rate[0], 1), "down": round(self._rate[1], 1)},
            "flows": flows,
            "closed_flows": self._closed_status(),
            "resources": self._resources(),
        }
        if self.dns is not None:
            out["dns"] = self.dns.status()
        return out

    def _resources(self) -> dict:
        """Gauges that stay flat in a healthy run and climb with a leak
        (tools/soak.py samples them): asyncio tasks on the engine's loop,
        the engine's own background tasks, bytes held in buffers (TCP send,
        receive and out-of-order buffers, upstream bytes a relay holds back,
        upstream transports' write buffers, UDP datagrams queued while an
        upstream opens), and the map of close reasons kept by flow."""
        loop = self.loop
        held = 0
        for conn in self.stack.tcp.values():
            held += len(conn.snd_buf) + len(conn.rcv_buf) + conn.ooo.nbytes
            relay = conn.user
            if isinstance(relay, TcpRelay):
                held += len(relay.pending)
                if relay.transport is not None:
                    held += relay.transport.get_write_buffer_size()
        for flow in self.stack.udp.values():
            relay = flow.user
            queue = getattr(relay, "queue", None)
            if queue:
                held += sum(len(d) for d in queue)
        return {
            "tasks": len(asyncio.all_tasks(loop)) if loop is not None else 0,
            "engine_tasks": len(self._tasks),
            "buffered_bytes": held,
            "close_reasons_held": len(self._why),
        }

    def _engine_counters(self) -> dict:
        """The counters, with bytes_up/bytes_down over every flow carried:
        the closed ones (counted at their close) and the live ones so far."""
        c = dict(self.counters)
        up = c.get("bytes_up", 0)
        down = c.get("bytes_down", 0)
        for conn in self.stack.tcp.values():
            relay = conn.user
            if relay is not None:
                up += relay.bytes_up
                down += relay.bytes_down
        for flow in self.stack.udp.values():
            if flow.user is not None:
                up += flow.bytes_in
                down += flow.bytes_out
        c["bytes_up"] = up
        c["bytes_down"] = down
        # gauges, not counters: what the engine holds now (a leak shows here)
        c["tasks"] = len(self._tasks)
        c["dials_pending"] = len(self._dials)
        return c


def _flow_entry(proto: str, flow, state, rates, now: float) -> dict:
    """One open flow in status()["flows"]."""
    relay = flow.user
    return {
        "proto": proto, "src": _fmt(flow.src, flow.sport), "dst": _fmt(flow.dst, flow.dport),
        "name": relay.name if relay is not None else None,
        "inbound": relay.url if relay is not None else None, "state": state,
        "bytes_up": flow.bytes_in, "bytes_down": flow.bytes_out,
        "rate_up": round(rates[0], 1), "rate_down": round(rates[1], 1),
        "age": round(now - flow.created, 3),
    }
