"""The engine's UDP side: datagrams from the stack, their upstreams (SOCKS5
UDP ASSOCIATE per client, or a dokodemo socket per flow), replies and
releases.  A mixin of Engine; its state is the Engine's.
"""

from __future__ import annotations

import asyncio
import logging

from ..upstream.dokodemo import DokodemoUdp
from ..upstream.socks5 import SocksUdpAssociation
from ..upstream.url import DokodemoUpstream
from .relay import UDP_QUEUE, SocksAssoc, UdpRelay, _fmt, _hostport
from .tcp import local_exhaustion

log = logging.getLogger("tun2xray.engine")


class EngineUdp:
    # ----------------------------------------------------------------------- UDP

    def _udp_datagram(self, flow, data, new) -> None:
        if flow.closed:
            return      # evicted by a newer flow in the same batch: its UdpClosed follows
        if flow.dport == 53 and self.dns is not None and self.dns.wants(flow.dst):
            self._dns_udp(flow, data, new)        # answered by the engine (engine/dnshook.py)
            return
        relay = flow.user
        if new or relay is None:
            routed = self._route_new(flow, "udp")
            if routed is None:
                return
            up, url, rule, name = routed
            dok = isinstance(up, DokodemoUpstream)
            relay = flow.user = UdpRelay(flow, url)
            self.counters["udp_opened"] += 1
            if self._debug:
                self._log_dial(flow, "udp", up, url, rule, name=None if dok else name)
            if dok:
                relay.queue.append(data)
                self.budget.used += len(data)
                self._spawn(self._udp_open_dokodemo(flow, relay, up))
                return
            key = (flow.src, flow.sport)
            a = self._assocs.get(key)
            if a is None or a.closed:
                a = self._assocs[key] = SocksAssoc(key, up)
                self._spawn(self._udp_open_socks(a))
            a.flows.add(flow)
            relay.assoc = a
            if name is not None:
                # datagrams addressed by name (SOCKS5 ATYP 3); replies map
                # back to this flow's own address
                relay.name = relay.dst_host = name
                a.named[(name, flow.dport)] = flow
        if relay.dok is not None:
            relay.dok.send(data)
        elif relay.assoc is not None and relay.assoc.assoc is not None:
            relay.assoc.assoc.sendto(data, relay.dst_host, flow.dport)
        elif len(relay.queue) < UDP_QUEUE:
            relay.queue.append(data)
            self.budget.used += len(data)
        else:
            relay.dropped += 1
            self.counters["udp_queue_full"] += 1

    async def _udp_open_dokodemo(self, flow, relay, up) -> None:
        try:
            dok = await DokodemoUdp.open(up, on_datagram=lambda d: self._udp_reply(flow, d))
        except asyncio.CancelledError:
            raise
        except OSError as e:
            short = local_exhaustion(e)
            if short is not None:
                self._dial_exhausted(flow, "udp", short, e)
            else:
                self.counters["upstream_connect_failed"] += 1
                log.info("udp flow %d %s: dokodemo %s failed: %s", flow.id, _fmt(flow.dst, flow.dport), relay.url,
                         e, extra=self._flow_fields(flow, "udp", upstream=relay.url, reason=str(e)))
                self._upstream_failed()
            if not flow.closed:
                if short is None:
                    self._why[flow] = ("upstream refused", f"{relay.url}: {e}")
                flow.reject("port")
                self.kick()
            return
        if flow.closed:
            dok.close()
            return
        relay.dok = dok
        for d in relay.queue:
            dok.send(d)
        self._udp_unqueue(relay)

    async def _udp_open_socks(self, a: SocksAssoc) -> None:
        def on_datagram(host, port, data, a=a):
            self._socks_reply(a, host, port, data)

        def on_closed(exc, a=a):
            self._socks_closed(a, exc)

        try:
            assoc = await SocksUdpAssociation.open(a.up, timeout=self.connect_timeout,
                                                   on_datagram=on_datagram, on_closed=on_closed, packed=True)
        except asyncio.CancelledError:
            raise
        except (OSError, TimeoutError, asyncio.TimeoutError) as e:
            short = local_exhaustion(e)
            if short is None:
                self.counters["upstream_connect_failed"] += 1
                log.info("udp association for %s failed: %s", _fmt(*a.key), e,
                         extra={"src": _fmt(*a.key), "reason": str(e)})
                self._upstream_failed()
            a.closed = True
            if self._assocs.get(a.key) is a:
                del self._assocs[a.key]
            for flow in list(a.flows):
                if not flow.closed:
                    if short is not None:
                        self._dial_exhausted(flow, "udp", short, e)
                    else:
                        self._why[flow] = ("connect timeout" if isinstance(e, TimeoutError) else "upstream refused",
                                           f"UDP ASSOCIATE: {str(e) or type(e).__name__}")
                    flow.reject("port")
            self.kick()
            return
        a.opening = False
        if a.closed or not a.flows:
            assoc.close()
            return
        a.assoc = assoc
        if self._debug:
            src = _fmt(*a.key)
            log.debug("udp association for %s opened: socks reply 0 (succeeded), relay %s", src,
                      _hostport(*assoc.relay), extra={"src": src, "socks_reply": 0,
                                                      "bound": _hostport(*assoc.relay)})
        for flow in a.flows:
            relay = flow.user
            if relay is not None and relay.queue:
                for d in relay.queue:
                    assoc.sendto(d, relay.dst_host, flow.dport)
                self._udp_unqueue(relay)

    def _socks_reply(self, a: SocksAssoc, host, port, data) -> None:
        """A datagram from the relay: ``host`` is the packed source address
        as the header carries it, or a str for a domain."""
        src, sport = a.key
        flow = self.stack.udp.get((src, sport, host, port)) if host.__class__ is bytes else None
        if flow is None and a.named:
            flow = _named_flow(a, host, port)
        if flow is None or flow.closed:
            self.counters["udp_reply_no_flow"] += 1
            return
        flow.send(data)
        self.kick()

    def _socks_closed(self, a: SocksAssoc, exc) -> None:
        if self._debug:
            src = _fmt(*a.key)
            why = str(exc) if exc is not None else "released"
            log.debug("udp association for %s closed: %s (%d flows)", src, why, len(a.flows),
                      extra={"src": src, "reason": why})
        a.closed = True
        if self._assocs.get(a.key) is a:
            del self._assocs[a.key]
        for flow in list(a.flows):
            relay = flow.user
            if relay is not None:
                relay.assoc = None
            if not flow.closed:
                self._why[flow] = ("upstream closed", "the UDP association ended")
                flow.close()
        a.flows.clear()
        self.kick()

    def _udp_reply(self, flow, data) -> None:
        if flow.closed:
            return
        flow.send(data)
        self.kick()

    def _udp_unqueue(self, relay) -> None:
        """Forget the datagrams queued while the upstream opened (sent or dropped)."""
        q = relay.queue
        if q:
            self.budget.used -= sum(map(len, q))
            q.clear()

    def _udp_release(self, flow) -> None:
        relay = flow.user
        if relay is None:
            return
        flow.user = None
        self._udp_unqueue(relay)
        counters = self.counters
        counters["bytes_up"] += flow.bytes_in
        counters["bytes_down"] += flow.bytes_out
        if relay.dok is not None:
            relay.dok.close()
            relay.dok = None
        a = relay.assoc
        if a is not None:
            a.flows.discard(flow)
            if relay.name is not None and a.named.get((relay.name, flow.dport)) is flow:
                del a.named[(relay.name, flow.dport)]
            if not a.flows and not a.opening:
                a.closed = True
                if self._assocs.get(a.key) is a:
                    del self._assocs[a.key]
                if a.assoc is not None:
                    a.assoc.close()

    def _udp_closed(self, flow, reason) -> None:
        relay = flow.user
        if relay is not None:
            self.counters["udp_closed"] += 1
            if self._debug:
                f = self._flow_fields(flow, "udp", upstream=flow.user.url, reason=reason,
                                      bytes_up=flow.bytes_in, bytes_down=flow.bytes_out)
                log.debug("udp flow %d closed (%s): %s -> %s up=%d down=%d bytes", flow.id, reason,
                          f["src"], f["dst"], flow.bytes_in, flow.bytes_out, extra=f)
        why = self._why.pop(flow, None)
        if why is None:
            why = ("idle timeout" if reason == "idle" else reason, None)
        self._remember("udp", flow, relay, why)
        self._udp_release(flow)


def _named_flow(a: SocksAssoc, host, port):
    """The flow a reply to a datagram sent by name belongs to.  A core may
    answer with the name (v2ray 4.x echoes the request's address) or with
    the address it resolved the name to (the reply's real source), which
    the client never saw: that goes to the one flow by name to that port,
    and is dropped (counted) when several could own it."""
    if host.__class__ is str:
        return a.named.get((host.rstrip(".").lower(), port)) or a.named.get((host, port))
    found = None
    for (_name, p), flow in a.named.items():
        if p == port:
            if found is not None:
                return None
            found = flow
    return found
