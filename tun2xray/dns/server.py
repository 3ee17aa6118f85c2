"""The engine's DNS server: every hijacked query is answered here.

``fake-ip``: A/AAAA questions for a name get its address from the fake
pools at once (PTR questions about a fake address get the name back); every
other question goes to the upstream and its answer comes back without real
addresses (HTTPS/SVCB lose ipv4hint/ipv6hint, A/AAAA records in other
answers are dropped). ``remember``: every question goes to the upstream,
the answer comes back unchanged, and its addresses are remembered for the
name asked (tun2xray.dns.book) within their TTL.

Transport-free: ``handle(wire, tcp, reply)`` calls ``reply(bytes)`` at once
or later (a forwarded question), or never (a dropped query, counted). The
engine's hook (tun2xray.engine.dnshook) frames UDP and TCP.
"""

from __future__ import annotations

import logging

from . import cachefile, message
from .book import NameBook
from .forward import Forwarder
from .settings import default_upstream, parse_upstream_url

log = logging.getLogger("tun2xray.dns")

SAVE_SOON = 1.0                 # seconds after a new fake mapping the cache file is written
SAVE_LATER = 60.0               # ... after mappings only moved in LRU order
QTYPE_KEYS = 64                 # distinct query types counted by name; the rest as "other"


class DnsServer:
    def __init__(self, settings, book: NameBook, forwarder: Forwarder | None):
        self.settings = settings
        self.mode = settings.mode
        self.fake = settings.mode == "fake-ip"
        self.hijack = settings.hijack
        self.ttl = settings.ttl
        self.book = book
        self.forwarder = forwarder
        self.own = set()
        import ipaddress
        for s in settings.servers:
            self.own.add(ipaddress.ip_address(s).packed)
        self.counters = {"fake_answers": 0, "forwarded": 0, "forward_failed": 0, "no_upstream": 0,
                         "addresses_stripped": 0, "answered_empty": 0, "ptr_answers": 0, "formerr": 0,
                         "notimp": 0, "dropped_short": 0, "dropped_not_a_query": 0, "cache_saves": 0,
                         "cache_save_failed": 0}
        self.queries = {}
        self._loop = None
        self._save_timer = None
        self._save_at = None

    # -- life

    def start(self, loop) -> None:
        self._loop = loop

    def close(self) -> None:
        if self._save_timer is not None:
            self._save_timer.cancel()
            self._save_timer = None
        if self.book.changed or self.book.touched:
            self.save()
        if self.forwarder is not None:
            self.forwarder.close()

    # -- queries

    def wants(self, dst: bytes) -> bool:
        """Is a flow to *dst* port 53 ours? (all of them with hijack)"""
        return self.hijack or dst in self.own

    def handle(self, wire: bytes, tcp: bool, reply) -> bool:
        """Answer *wire*: ``reply(bytes)`` now or later and True, or False
        (a counted drop: no reply will come)."""
        q, err, why = message.parse_query(wire)
        c = self.counters
        if q is None:
            c[why if err is not None else f"dropped_{why}"] += 1
            if err is None:
                return False
            reply(err)
            return True
        name, qtype, qclass = message.question(q)
        self._count(qtype)
        limit = 65535 if tcp else message.udp_limit(q)
        if self.fake and qclass == message.IN:
            if qtype in (message.A, message.AAAA) and message.fakeable(name):
                addr = self.book.fake_address(name, 4 if qtype == message.A else 6)
                c["fake_answers"] += 1
                reply(message.address_reply(q, [addr] if addr is not None else [], self.ttl, limit))
                self._mapped()
                return True
            if qtype == message.PTR:
                addr = message.reverse_address(q)
                if addr is not None and self.book.is_fake(addr):
                    c["ptr_answers"] += 1
                    reply(message.ptr_reply(q, self.book.lookup(addr), self.ttl, limit))
                    return True
        self._forward(q, wire, name, qtype, limit, reply, tcp)
        return True

    def _count(self, qtype: int) -> None:
        key = message.type_text(qtype)
        qs = self.queries
        if key not in qs and len(qs) >= QTYPE_KEYS:
            key = "other"
        qs[key] = qs.get(key, 0) + 1

    def _forward(self, q, wire, name, qtype, limit, reply, tcp) -> None:
        c = self.counters
        hinted = qtype in (message.HTTPS, message.SVCB)
        if self.forwarder is None:
            c["no_upstream"] += 1
            if self.fake and hinted:
                c["answered_empty"] += 1
                reply(message.rcode_reply(q, message.NOERROR, limit))
            else:
                reply(message.rcode_reply(q, message.SERVFAIL, limit))
            return
        c["forwarded"] += 1

        def answered(data, q=q, name=name, qtype=qtype, limit=limit):
            if data is None or len(data) < 12 or not data[2] & 0x80:
                c["forward_failed"] += 1
                reply(message.rcode_reply(q, message.SERVFAIL, limit))
                return
            if self.fake:
                out, n = message.strip_fake_ip(data, qtype)
                c["addresses_stripped"] += n
                if out is None:
                    c["forward_failed"] += 1
                    out = message.rcode_reply(q, message.NOERROR if hinted else message.SERVFAIL, limit)
                reply(out)
                return
            for addr, ttl in message.answered_addresses(data):
                self.book.remember(addr, name, ttl)
            reply(data)

        self.forwarder.query(wire, answered, tcp)

    # -- the cache file

    def _mapped(self) -> None:
        if self.settings.cache_file is None or self._loop is None:
            return
        delay = SAVE_SOON if self.book.changed else SAVE_LATER
        at = self._loop.time() + delay
        if self._save_timer is not None:
            if self._save_at <= at:
                return
            self._save_timer.cancel()
        self._save_at = at
        self._save_timer = self._loop.call_at(at, self._save_due)

    def _save_due(self) -> None:
        self._save_timer = None
        self.save()

    def save(self) -> bool:
        path = self.settings.cache_file
        if path is None:
            return False
        try:
            cachefile.save(path, self.book)
        except OSError as e:
            if not self.counters["cache_save_failed"]:
                log.warning("dns cache %s not written: %s", path, e.strerror or e)
            self.counters["cache_save_failed"] += 1
            return False
        self.book.changed = self.book.touched = 0
        self.counters["cache_saves"] += 1
        return True

    # -- status

    def status(self) -> dict:
        fw = self.forwarder
        return {"mode": self.mode, "hijack": self.hijack, "upstream": fw.url if fw is not None else None,
                "cache_file": self.settings.cache_file, "queries": dict(self.queries),
                "cache_size": self.book.size(), **self.counters, **self.book.status(),
                **(fw.counters if fw is not None else {})}


def build(settings, router, *, clock=None) -> DnsServer | None:
    """The server for *settings* (None when the mode is off): the book with
    its cache file loaded, and the forwarder to the upstream given, else to
    the router's udp/53 target."""
    if not settings.on:
        return None
    kw = {"avoid": settings.avoid}
    if clock is not None:
        kw["clock"] = clock
    fake = settings.mode == "fake-ip"
    book = NameBook(settings.fake_ipv4 if fake else None, settings.fake_ipv6 if fake else None, **kw)
    if fake and settings.cache_file:
        cachefile.load(settings.cache_file, book)
    url = settings.upstream or default_upstream(router)
    forwarder = None
    if url is not None:
        up, base, server = parse_upstream_url(url)
        forwarder = Forwarder(up, base, server=server)
    return DnsServer(settings, book, forwarder)
