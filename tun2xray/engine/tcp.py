"""The engine's TCP side: connect requests, the upstream dial, established
and closed connections, and the refusal window (an empty early close from
the upstream is a refused destination).  A mixin of Engine; its state is
the Engine's.
"""

from __future__ import annotations

import asyncio
import errno
import logging

from ..rules import BLOCK
from ..upstream._net import needs_protect, open_tcp
from ..upstream.socks5 import socks_client
from ..upstream.socks5_proto import CMD_CONNECT, reply_text
from ..upstream.url import DokodemoUpstream, SocksUpstream
from .dnshook import DnsTcp
from .relay import TcpRelay, _fmt, _hostport, _route_rule

log = logging.getLogger("tun2xray.engine")

# a dial that fails with one of these failed here, not at the upstream: the
# process is out of file descriptors, the machine out of ephemeral ports
# (EADDRNOTAVAIL from connect, EAGAIN from a UDP autobind) or buffers
LOCAL_EXHAUSTION = {errno.EMFILE: "out of file descriptors", errno.ENFILE: "out of file descriptors (system)",
                    errno.EADDRNOTAVAIL: "out of local ports", errno.EAGAIN: "out of local ports",
                    errno.ENOBUFS: "out of buffer space", errno.ENOMEM: "out of memory"}
EXHAUSTION_LOG_EVERY = 5.0    # seconds between the warnings while it lasts


def local_exhaustion(e) -> str | None:
    """What ran out here when the dial failed with e (None: not that)."""
    return LOCAL_EXHAUSTION.get(e.errno) if isinstance(e, OSError) else None


class EngineTcp:
    # ----------------------------------------------------------------------- TCP

    def _tcp_request(self, conn) -> None:
        if conn.dport == 53 and self.dns is not None and self.dns.wants(conn.dst):
            self._dns_tcp(conn)                   # answered by the engine (engine/dnshook.py)
            return
        self.counters["tcp_requests"] += 1
        routed = self._route_new(conn, "tcp")
        if routed is None:
            return
        up, url, rule, name = routed
        hs = None
        if type(up) is SocksUpstream:
            # by name when the book knows one: Xray's domain routing sees it
            hs = socks_client(up, CMD_CONNECT, name if name is not None else conn.dst, conn.dport)
        if self._debug:
            self._log_dial(conn, "tcp", up, url, rule, hs is not None and hs.pipelined, name)
        relay = TcpRelay(self, conn, url, hs=hs)
        if hs is not None:
            relay.name = name       # what the CONNECT carried (None: the address)
        relay.dialing = self._spawn(self._tcp_dial(conn, up, relay))
        # the dial is the request's until it is answered: a request that ends
        # first (shed by admission, the client's RST) takes its dial with it
        self._dials[conn] = (relay.dialing, relay)
        relay.hs_timer = self.loop.call_later(self.connect_timeout, relay.timed_out)

    def _route_new(self, flow, proto: str):
        """Route a new TCP or UDP flow by its address and the name the DNS
        book has for it: (upstream, url, rule, name), or None when the flow
        was refused instead (a block rule, or a fake address with no name
        behind it, which a proxy must never be asked for).  ``rule`` is
        only looked up when debug logging shows it."""
        names = self.names
        name = names.lookup(flow.dst) if names is not None else None
        rule = None
        if self._debug:
            up, url, rule = _route_rule(self.router, proto, flow.dst, flow.dport, name)
        else:
            up, url = self.router.route(proto, flow.dst, flow.dport, name)
        if up is BLOCK:
            if not self._debug:         # which rule: for status and the closed-flow history
                rule = _route_rule(self.router, proto, flow.dst, flow.dport, name)[2]
            self._refuse(flow, proto, "blocked", rule, name)
            return None
        if (name is None and names is not None and not isinstance(up, DokodemoUpstream)
                and names.is_fake(flow.dst)):
            self._refuse(flow, proto, "unmapped fake address", None, None)
            return None
        return up, url, rule, name

    def _refuse(self, flow, proto: str, why: str, rule, name) -> None:
        """Refuse a new flow without dialing: a block rule, or a fake
        address the book has no name for (never dialled as itself).  TCP
        gets the engine's reject (RST, or ICMP as configured), UDP ICMP
        port unreachable; counted, and kept in the closed-flow history."""
        counters = self.counters
        if why == "blocked":
            counters[f"{proto}_blocked"] += 1
            detail = f"{rule}" + (f" for {name}" if name is not None else "")
        else:
            counters[f"{proto}_unmapped_fake"] += 1
            self.names.unmapped_hit()
            detail = "the DNS layer has no name for this fake address"
        if self._debug:
            f = self._flow_fields(flow, proto, reason=why, domain=name)
            log.debug("%s flow %d %s -> %s refused: %s (%s)", proto, flow.id, f["src"], f["dst"], why, detail,
                      extra=f)
        self._why[flow] = (why, detail)
        if proto == "tcp":
            flow.reject(self.reject_with)
        else:
            flow.reject("port")
        self.kick()

    def _cancel_dial(self, conn) -> None:
        """conn ended before its upstream answered: stop the dial (its
        connect, or the SOCKS handshake on its socket) and free the socket
        now instead of at the connect timeout."""
        dial = self._dials.pop(conn, None)
        if dial is None:
            return
        task, relay = dial
        task.cancel()              # closes the socket of a connect in progress
        relay.close()              # ... or the connected one whose handshake runs
        self.counters["tcp_dials_cancelled"] += 1

    # debug lines of a flow's life (callers check self._debug first)

    def _flow_fields(self, flow, proto: str, **more) -> dict:
        return {"flow": flow.id, "proto": proto, "src": _fmt(flow.src, flow.sport),
                "dst": _fmt(flow.dst, flow.dport), **more}

    def _log_dial(self, flow, proto, up, url, rule, pipelined=False, name=None) -> None:
        f = self._flow_fields(flow, proto, rule=rule, upstream=url, domain=name)
        if isinstance(up, DokodemoUpstream):
            how = f"dokodemo {up.host}:{up.port} (fixed target)"
        elif proto == "tcp":
            what = (f"{_hostport(name, flow.dport)} by name" if name is not None
                    else f"{f['dst']} by address")
            how = (f"socks5 {up.host}:{up.port} CONNECT {what}"
                   + (", greeting and request in one write" if pipelined else ""))
        else:
            how = f"socks5 {up.host}:{up.port} UDP ASSOCIATE" + (
                f", datagrams to {_hostport(name, flow.dport)} by name" if name is not None else "")
        log.debug("%s flow %d %s -> %s: rule %s -> %s; dialing %s", proto, flow.id, f["src"], f["dst"],
                  rule, url, how, extra=f)

    def _log_socks_reply(self, conn, code: int, bound) -> None:
        f = self._flow_fields(conn, "tcp", socks_reply=code)
        if bound is not None:
            f["bound"] = _hostport(*bound)
        log.debug("tcp flow %d: socks %s%s", conn.id, reply_text(code),
                  f", bound {f['bound']}" if bound is not None else "", extra=f)

    async def _tcp_dial(self, conn, up, relay) -> None:
        """Connect to the upstream with the relay as the transport's protocol
        from the start (no socket hand-over).  With ``relay.hs`` (a SOCKS5
        machine) the relay runs the handshake and accepts or refuses the
        client when the proxy answers; without (dokodemo) the connect is the
        dial. The relay's one timer bounds both (tcp_connect_timeout): when
        it fires during the connect it cancels this task."""
        raw = relay.hs is None
        try:
            if needs_protect(up.host):      # the host's protect() sees it first
                sock = await open_tcp(up.host, up.port)
                try:
                    await self.loop.create_connection(lambda: relay, sock=sock)
                except BaseException:
                    sock.close()
                    raise
            else:
                await self.loop.create_connection(lambda: relay, up.host, up.port)
        except asyncio.CancelledError:
            if not relay.expired:
                raise
            why = TimeoutError()
        except OSError as e:
            why = e
        else:
            relay.dialing = None
            if conn.closed:
                relay.close()
            elif raw:
                relay.close_timer()
                self._tcp_established(conn, relay)
            return
        relay.dialing = None
        relay.close_timer()
        relay.hs = None
        self._tcp_dial_failed(conn, relay.url, why)

    def _tcp_dial_failed(self, conn, url, why) -> None:
        self._dials.pop(conn, None)
        short = local_exhaustion(why)
        if short is not None:
            self._dial_exhausted(conn, "tcp", short, why)
            if not conn.closed:
                conn.reject(self.reject_with)
                self.kick()
            return
        self.counters["upstream_connect_failed"] += 1
        self._upstream_failed()
        if not conn.closed:
            f = self._flow_fields(conn, "tcp", upstream=url, reason=str(why))
            log.info("tcp flow %d %s -> %s via %s refused: %s", conn.id, f["src"], f["dst"], url, why,
                     extra=f)
            timeout = isinstance(why, (TimeoutError, asyncio.TimeoutError)) or why == "no SOCKS reply in time"
            self._why[conn] = ("connect timeout" if timeout else "upstream refused",
                               f"{url}: {str(why) or type(why).__name__}")
            conn.reject(self.reject_with)
            self.kick()

    def _dial_exhausted(self, flow, proto, short, why) -> None:
        """A new flow is refused because a local resource ran out (not the
        upstream's fault: the watch is not told). Counted per resource; a
        warning at most every EXHAUSTION_LOG_EVERY seconds while it lasts."""
        c = self.counters
        c["refused_local_exhaustion"] += 1
        c["refused_" + short.split(" (")[0].replace(" ", "_")] += 1
        self._why[flow] = ("no local resources", f"{short}: {why}")
        now = self.loop.time()
        if now >= self._exhausted_log_at:
            self._exhausted_log_at = now + EXHAUSTION_LOG_EVERY
            log.warning("%s flow %d refused: %s (%s); %d new flows refused so far", proto, flow.id, short,
                        why, c["refused_local_exhaustion"],
                        extra=self._flow_fields(flow, proto, reason=str(why)))

    def _refused(self, relay) -> bool:
        """Is an empty clean close from relay's upstream a refusal? Only
        within refusal_window of the CONNECT reply: a v2ray/Xray socks
        inbound answers CONNECT before it dials, so a refused far port
        shows up as that early close. The clock is the loop's, read when
        the close is handled; a starved loop makes the gap look longer,
        which errs towards the honest FIN."""
        at = relay.up_at
        return at is not None and self.loop.time() - at <= self.refusal_window

    def _upstream_failed(self) -> None:
        cb = self.on_upstream_failed
        if cb is not None:
            cb()

    def _tcp_established(self, conn, relay) -> None:
        """The upstream is connected: answer the connect request (SYN-ACK)."""
        self._dials.pop(conn, None)
        if conn.closed:
            relay.close()
            return
        conn.user = relay
        relay.up_at = self.loop.time()
        conn.accept()
        self.counters["tcp_opened"] += 1
        if self._debug:
            f = self._flow_fields(conn, "tcp", upstream=relay.url)
            log.debug("tcp flow %d accepted (SYN-ACK sent): %s -> %s via %s", conn.id, f["src"], f["dst"],
                      relay.url, extra=f)
        self.kick()

    def _tcp_closed(self, conn, reason) -> None:
        relay = conn.user
        if isinstance(relay, TcpRelay):
            if reason == "closed":
                t = relay.transport
                if t is not None:
                    relay.transport = None
                    t.close()
            else:
                relay.close()
            relay.release()
            counters = self.counters
            counters["tcp_closed"] += 1
            counters["bytes_up"] += relay.bytes_up
            counters["bytes_down"] += relay.bytes_down
            if self._debug:
                f = self._flow_fields(conn, "tcp", upstream=relay.url, reason=reason,
                                      bytes_up=relay.bytes_up, bytes_down=relay.bytes_down)
                log.debug("tcp flow %d closed (%s): %s -> %s up=%d down=%d bytes", conn.id, reason,
                          f["src"], f["dst"], relay.bytes_up, relay.bytes_down, extra=f)
        elif isinstance(relay, DnsTcp):
            relay.close()                 # a hijacked DNS connection (engine/dnshook.py)
            self.counters["tcp_closed"] += 1
            self.counters["bytes_up"] += relay.bytes_up
            self.counters["bytes_down"] += relay.bytes_down
        else:
            self._cancel_dial(conn)
        self._remember("tcp", conn, relay, self._tcp_close_reason(conn, relay, reason))
        conn.user = None
