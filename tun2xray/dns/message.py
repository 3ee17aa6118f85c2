"""DNS messages, read and written with dnspython (imported only here, and
this module only when DNS handling is on).

Everything a query can do wrong ends as a value, never an exception out of
this module: ``parse_query`` answers (message, None, None) for a query we
serve, or (None, reply, reason) with a FORMERR/NOTIMP reply built from the
header alone, or (None, None, reason) for bytes to drop (shorter than a
header, or a response instead of a query).
"""

from __future__ import annotations

import ipaddress
import struct

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.rdata
import dns.rdtypes.svcbbase
import dns.reversename
import dns.rrset

from .book import name_ok

# what dnspython raises for bytes it cannot read (the fuzz target "dns" holds it to this)
READ_ERRORS = (dns.exception.DNSException, ValueError, UnicodeError)

A = dns.rdatatype.A
AAAA = dns.rdatatype.AAAA
HTTPS = dns.rdatatype.HTTPS
SVCB = dns.rdatatype.SVCB
PTR = dns.rdatatype.PTR
IN = dns.rdataclass.IN
NOERROR = dns.rcode.NOERROR
SERVFAIL = dns.rcode.SERVFAIL
HINTS = (dns.rdtypes.svcbbase.ParamKey.IPV4HINT, dns.rdtypes.svcbbase.ParamKey.IPV6HINT)
_HDR = struct.Struct("!HHHHHH")
QR = 0x8000
UDP_MIN = 512
UDP_MAX = 65507                 # the largest UDP payload over IPv4


def header_reply(wire: bytes, rcode: int) -> bytes:
    """A reply with no sections to the query whose header starts *wire*
    (FORMERR, NOTIMP, SERVFAIL when nothing else can be said)."""
    qid, flags = struct.unpack_from("!HH", wire)
    flags = QR | (flags & 0x7900) | dns.flags.RA | (rcode & 0xF)   # opcode and RD kept
    return _HDR.pack(qid, flags, 0, 0, 0, 0)


def parse_query(wire: bytes):
    """(message, reply, reason): see the module text."""
    if len(wire) < 12:
        return None, None, "short"
    flags = wire[2]
    if flags & 0x80:
        return None, None, "not_a_query"
    if (flags >> 3) & 0xF != dns.opcode.QUERY:
        return None, header_reply(wire, dns.rcode.NOTIMP), "notimp"
    try:
        q = dns.message.from_wire(wire)
    except READ_ERRORS:
        return None, header_reply(wire, dns.rcode.FORMERR), "formerr"
    if len(q.question) != 1:
        return None, header_reply(wire, dns.rcode.FORMERR), "formerr"
    return q, None, None


def question(q):
    """(name as text, lower case without the final dot; rdtype; rdclass)."""
    rr = q.question[0]
    return rr.name.to_text(omit_final_dot=True).lower(), rr.rdtype, rr.rdclass


def type_text(rdtype: int) -> str:
    return dns.rdatatype.to_text(rdtype)


def udp_limit(q) -> int:
    """The largest reply this query may get over UDP."""
    return max(UDP_MIN, min(q.payload, UDP_MAX)) if q.edns >= 0 else UDP_MIN


def fakeable(name: str) -> bool:
    return name_ok(name)


def _to_wire(resp, max_size: int) -> bytes:
    try:
        return resp.to_wire(max_size=max_size)
    except dns.exception.TooBig:
        resp.answer.clear()
        resp.authority.clear()
        resp.additional.clear()
        resp.flags |= dns.flags.TC
        return resp.to_wire(max_size=max_size)


def address_reply(q, addrs, ttl: int, max_size: int) -> bytes:
    """The answer to an A/AAAA query: *addrs* (packed) with *ttl*, or no
    records (NOERROR, empty) when *addrs* is empty."""
    resp = dns.message.make_response(q, recursion_available=True)
    if addrs:
        rr = q.question[0]
        rrset = resp.find_rrset(resp.answer, rr.name, IN, rr.rdtype, create=True)
        cls = dns.rdtypes.IN.A.A if rr.rdtype == A else dns.rdtypes.IN.AAAA.AAAA
        for a in addrs:
            rrset.add(cls(IN, rr.rdtype, str(ipaddress.ip_address(a))), ttl)
    return _to_wire(resp, max_size)


def ptr_reply(q, name: str | None, ttl: int, max_size: int) -> bytes:
    """PTR for a fake address: the name it stands for, else NXDOMAIN."""
    resp = dns.message.make_response(q, recursion_available=True)
    rr = q.question[0]
    if name is None:
        resp.set_rcode(dns.rcode.NXDOMAIN)
    else:
        rrset = resp.find_rrset(resp.answer, rr.name, IN, PTR, create=True)
        rrset.add(dns.rdata.from_text(IN, PTR, name + "."), ttl)
    return _to_wire(resp, max_size)


def reverse_address(q) -> bytes | None:
    """The packed address a PTR question asks about, or None."""
    try:
        text = dns.reversename.to_address(q.question[0].name)
    except READ_ERRORS:
        return None
    try:
        return ipaddress.ip_address(text).packed
    except ValueError:
        return None


def rcode_reply(q, rcode: int, max_size: int) -> bytes:
    resp = dns.message.make_response(q, recursion_available=True)
    resp.set_rcode(rcode)
    return _to_wire(resp, max_size)


def strip_fake_ip(wire: bytes, qtype: int):
    """A forwarded reply as fake-IP mode passes it on: HTTPS/SVCB records
    without their ipv4hint/ipv6hint, and (for other query types) no A/AAAA
    records, so no real address reaches the client. Returns (reply bytes,
    how many hints and records went) or (None, 0) when the reply cannot be
    read."""
    try:
        m = dns.message.from_wire(wire)
    except READ_ERRORS:
        return None, 0
    gone = 0
    for section in (m.answer, m.additional):
        keep = []
        for rrset in section:
            if rrset.rdtype in (A, AAAA) and qtype not in (A, AAAA):
                gone += len(rrset)          # of any class: nothing that looks like an address passes
                continue
            if rrset.rdtype in (HTTPS, SVCB) and rrset.rdclass == IN:
                n, rrset = _strip_hints(rrset)
                gone += n
                if not rrset:
                    continue                # every record went: no empty RRset on the wire
            keep.append(rrset)
        section[:] = keep
    if not gone:
        return wire, 0
    try:
        return m.to_wire(), gone
    except READ_ERRORS:
        return None, 0


def _strip_hints(rrset):
    """(hints removed, the rrset without them). A record that declares a
    hint mandatory (RFC 9460 section 8) cannot lose it: it goes whole."""
    new = dns.rrset.RRset(rrset.name, rrset.rdclass, rrset.rdtype)
    n = 0
    for rd in rrset:
        params = {k: v for k, v in rd.params.items() if k not in HINTS}
        n += len(rd.params) - len(params)
        if len(params) == len(rd.params):
            new.add(rd, rrset.ttl)
            continue
        try:
            new.add(type(rd)(rd.rdclass, rd.rdtype, rd.priority, rd.target, params), rrset.ttl)
        except ValueError:
            pass                    # a hint was mandatory: the record is dropped
    return n, new


def answered_addresses(wire: bytes):
    """[(packed address, ttl)] a real reply gives: its A/AAAA records and
    HTTPS/SVCB address hints ([] when it cannot be read)."""
    try:
        m = dns.message.from_wire(wire)
    except READ_ERRORS:
        return []
    out = []
    for rrset in m.answer:
        if rrset.rdclass != IN:
            continue                    # only class IN records hold addresses
        if rrset.rdtype in (A, AAAA):
            for rd in rrset:
                out.append((ipaddress.ip_address(rd.address).packed, rrset.ttl))
        elif rrset.rdtype in (HTTPS, SVCB):
            for rd in rrset:
                for k in HINTS:
                    p = rd.params.get(k)
                    if p is not None:
                        out += [(ipaddress.ip_address(a).packed, rrset.ttl) for a in p.addresses]
    return out
