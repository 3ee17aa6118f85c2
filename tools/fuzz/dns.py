"""Fuzz target "dns": the engine's DNS server and the DNS message code.

Byte 0 picks the part:
  0  a query (the rest of the input) handled by the fake-IP server, over
     UDP or TCP (bit 0 of byte 1): either a counted drop with no reply, or
     exactly one reply that reads back as a DNS response to that query's ID;
     an A/AAAA answer's addresses lie in the fake pools and map back to the
     name asked.
  1  the same in remember mode, the upstream answering with bytes from the
     input: one reply, never an exception; what is remembered is 4 or 16
     bytes with a TTL.
  2  a forwarded reply as fake-IP mode passes it on (strip_fake_ip): unread
     (None) or a message with no HTTPS/SVCB address hints and, for non-address
     questions, no A/AAAA records.
Only the module's own errors are allowed to stay inside it: any exception
out of these calls is a finding.
"""

from __future__ import annotations

import ipaddress

import dns.message
import dns.rdatatype
import dns.rrset

from tun2xray.dns import message
from tun2xray.dns.book import NameBook
from tun2xray.dns.server import DnsServer
from tun2xray.dns.settings import DnsSettings

from .common import Provider, check

PARTS = 3


class _Forwarder:
    """Answers at once with the bytes it was given (or None)."""

    url = "dokodemo://fuzz:53"

    def __init__(self, answer):
        self.answer = answer
        self.counters = {}

    def query(self, wire, reply, tcp=False):
        reply(None if self.answer is None else wire[:2] + self.answer[2:])

    def close(self):
        pass


class _Clock:
    now = 0.0

    def __call__(self):
        return self.now


def _server(mode: str, answer=None) -> DnsServer:
    s = DnsSettings(mode, avoid=["198.18.0.1", "198.18.0.2"], servers=["198.18.0.2"])
    book = NameBook(s.fake_ipv4 if mode == "fake-ip" else None, s.fake_ipv6 if mode == "fake-ip" else None,
                    avoid=s.avoid, clock=_Clock(), capacity=64)
    return DnsServer(s, book, _Forwarder(answer) if mode == "remember" or answer is not None else None)


def _handled(server: DnsServer, wire: bytes, tcp: bool) -> list:
    replies = []
    took = server.handle(wire, tcp, replies.append)
    check(took == bool(replies) and len(replies) <= 1, lambda: f"handle said {took}, replied {len(replies)}")
    if replies:
        out = replies[0]
        check(isinstance(out, bytes) and len(out) >= 12, "a reply shorter than a header")
        check(out[:2] == wire[:2] and out[2] & 0x80, "the reply is not a response to that query's ID")
        check(tcp or len(out) <= 65535, "reply too big")
    return replies


def fake_ip(data: bytes) -> None:
    fdp = Provider(data)
    tcp = fdp.flag()
    wire = fdp.rest()
    server = _server("fake-ip")
    replies = _handled(server, wire, tcp)
    if not replies or replies[0][3] & 0xF:
        return
    r = dns.message.from_wire(replies[0])
    q = dns.message.from_wire(wire)
    name = q.question[0].name.to_text(omit_final_dot=True).lower()
    for rrset in r.answer:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            for rd in rrset:
                packed = ipaddress.ip_address(rd.address).packed
                check(server.book.is_fake(packed), "an A/AAAA answer outside the fake pools")
                check(server.book.lookup(packed) == name, "a fake address that does not map back to its name")


def remember(data: bytes) -> None:
    fdp = Provider(data)
    tcp = fdp.flag()
    answer = fdp.blob(4096)
    wire = fdp.rest()
    server = _server("remember", answer if len(answer) >= 2 else None)
    _handled(server, wire, tcp)
    for addr, (name, expires) in server.book.remembered.items():
        check(len(addr) in (4, 16) and isinstance(name, str) and expires > 0, "a remembered entry")


def strip(data: bytes) -> None:
    fdp = Provider(data)
    qtype = fdp.pick((dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.HTTPS, dns.rdatatype.MX))
    out, n = message.strip_fake_ip(fdp.rest(), qtype)
    if out is None:
        return
    check(n >= 0, "negative count")
    m = dns.message.from_wire(out)
    for section in (m.answer, m.additional):
        for rrset in section:
            if qtype not in (dns.rdatatype.A, dns.rdatatype.AAAA):
                check(rrset.rdtype not in (dns.rdatatype.A, dns.rdatatype.AAAA), "a real address passed on")
            if rrset.rdtype in (dns.rdatatype.HTTPS, dns.rdatatype.SVCB) and rrset.rdclass == 1:
                for rd in rrset:
                    check(not any(int(k) in (4, 6) for k in rd.params), "an address hint passed on")


PART_FUNCS = (fake_ip, remember, strip)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    PART_FUNCS[data[0] % PARTS](data[1:])


def seeds() -> list:
    from .common import put_blob
    qs = [dns.message.make_query(n, t).to_wire() for n, t in
          (("example.com", "A"), ("example.com", "AAAA"), ("example.com", "HTTPS"), ("example.com", "MX"),
           ("19.198.in-addr.arpa", "PTR"), ("1.0.19.198.in-addr.arpa", "PTR"), ("bad_name!.x", "A"))]
    qs.append(dns.message.make_query("edns.example", "A", use_edns=0, payload=1232).to_wire())
    https = dns.message.make_response(dns.message.make_query("example.com", "HTTPS"))

    https.answer.append(dns.rrset.from_text("example.com.", 30, "IN", "HTTPS",
                                            '1 . alpn="h2" ipv4hint="192.0.2.1" ipv6hint="2001:db8::1"'))
    a = dns.message.make_response(dns.message.make_query("example.com", "A"))
    a.answer.append(dns.rrset.from_text("example.com.", 30, "IN", "A", "192.0.2.1"))
    out = [b"\0\0" + q for q in qs] + [b"\0\1" + q for q in qs]
    out += [b"\0\0" + b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example", b"\0\0\x01\x02\x03",
            b"\0\0" + a.to_wire()]
    out += [b"\1\0" + put_blob(a.to_wire()) + qs[0], b"\1\0" + put_blob(https.to_wire()) + qs[2],
            b"\1\1" + put_blob(b"\0\0garbage") + qs[1]]
    out += [b"\2\2" + https.to_wire(), b"\2\3" + a.to_wire(), b"\2\0" + a.to_wire()]
    return out
