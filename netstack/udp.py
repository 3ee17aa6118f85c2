"""UDP flows: one UdpFlow per (src, sport, dst, dport) seen from the client.

The stack creates a flow on the first datagram of a 5-tuple and hands every
datagram to the host as events.UdpDatagram(flow, data, new).  The flow is
the host's handle for the way back:

  flow.send(data)         a reply from dst:dport to src:sport (IP-fragmented
                          when larger than the flow's MTU); returns False on a
                          closed flow (replies that arrive after an idle close
                          are dropped silently: they are normal)
  flow.reject(kind)       ICMP destination unreachable quoting the flow's first
                          datagram, then close ("rejected")
  flow.close()            forget the flow now ("closed")

Idle flows (no datagram either way for config.udp_timeout, or the timeout
config.udp_port_timeouts gives for the destination port) close with
UdpClosed(flow, "idle"); a flow evicted to make room for a new one (the
least recently used, see Stack._udp_evict) with UdpClosed(flow, "evicted").  The timer is lazy: a datagram only moves
`last_seen`; the single heap entry per flow re-arms itself when it fires
early.
"""

from __future__ import annotations

from . import events as ev
from .wire.templates import MIN_MTU4, MIN_MTU6, UdpTemplate

# how much of the first datagram a flow keeps for a later ICMP quote:
# the IP header(s), the UDP header and the start of the data
QUOTE_DATA = 64


class UdpFlow:
    __slots__ = (
        "stack", "id", "key", "family", "src", "sport", "dst", "dport", "user",
        "bytes_in", "bytes_out", "packets_in", "packets_out", "created", "last_seen",
        "closed", "poll_at", "_sched_at", "_tpl", "_quote", "_timeout", "lru_at",
    )

    def __init__(self, stack, key, family, quote: bytes, now: float):
        self.stack = stack
        self.id = stack._next_id()
        self.key = key
        self.family = family
        self.src, self.sport, self.dst, self.dport = key
        self.user = None
        self.bytes_in = self.bytes_out = self.packets_in = self.packets_out = 0
        self.created = self.last_seen = self.lru_at = now
        self.closed = False
        cfg = stack.config
        self._timeout = cfg.udp_port_timeouts.get(self.dport, cfg.udp_timeout)
        self.poll_at = now + self._timeout
        self._sched_at = None
        # replies travel from the flow's destination back to its source
        self._tpl = UdpTemplate(family, self.dst, self.src, self.dport, self.sport, stack.config,
                                stack._next_ip_id)
        self._quote = quote

    def __repr__(self) -> str:
        return f"UdpFlow(id={self.id}, {self.addr_text()}{', closed' if self.closed else ''})"

    def addr_text(self) -> str:
        import ipaddress
        s, d = ipaddress.ip_address(self.src), ipaddress.ip_address(self.dst)
        if self.family == 6:
            return f"[{s}]:{self.sport} -> [{d}]:{self.dport}"
        return f"{s}:{self.sport} -> {d}:{self.dport}"

    # ------------------------------------------------------------ host API

    @property
    def mtu(self) -> int:
        """Largest reply packet sent unfragmented (config.mtu, lowered by ICMP)."""
        return self._tpl.mtu

    def send(self, data) -> bool:
        """Queue one reply datagram for the device.  ValueError when *data*
        cannot fit in one UDP datagram."""
        if self.closed:
            return False
        pkts = self._tpl.build(data)
        out = self.stack.output
        if len(pkts) == 1:
            out.append(pkts[0])
        else:
            out.extend(pkts)
        self.bytes_out += len(data)
        self.packets_out += 1
        self.last_seen = self.stack.now
        return True

    def reject(self, kind: str = "port") -> None:
        """Answer the client with ICMP unreachable (kind: "port", "host",
        "net", "admin") and close the flow."""
        if self.closed:
            return
        self.stack.icmp_unreachable(self._quote, kind)
        self._close("rejected")

    def close(self) -> None:
        if not self.closed:
            self._close("closed")

    # ------------------------------------------------- stack-facing contract

    def on_pmtu(self, mtu: int, now: float) -> None:
        """An ICMP error reported that *mtu* is the path's limit: fragment
        later replies to fit (never below the protocol minimum)."""
        mtu = max(mtu, MIN_MTU4 if self.family == 4 else MIN_MTU6)
        if mtu < self._tpl.mtu:
            self._tpl.mtu = mtu

    def on_timer(self, now: float) -> None:
        deadline = self.last_seen + self._timeout
        if now >= deadline:
            self._close("idle")
        else:
            self.poll_at = deadline

    def flush(self, now: float) -> None:
        pass

    def _close(self, reason: str) -> None:
        self.closed = True
        self.poll_at = None
        self._quote = b""
        st = self.stack
        if st.udp.get(self.key) is self:
            del st.udp[self.key]
        st.events.append(ev.UdpClosed(self, reason))
