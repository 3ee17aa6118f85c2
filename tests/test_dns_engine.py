"""The engine's DNS: hijacked port-53 flows (UDP and TCP, any address)
answered by the engine on the in-memory device, on a virtual clock; the
upstream is a real UDP socket on loopback answering like a DNS dokodemo
inbound would. dnspython builds the clients' queries and reads the replies."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import struct
import sys

import dns.flags
import dns.message
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import dns.rrset
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from helpers import build_packet, parse_packet  # noqa: E402
from test_stack_pkt import A4, A6, udp_packet  # noqa: E402
from vclock import run_virtual  # noqa: E402

from tun2xray.device import memory_pair  # noqa: E402
from tun2xray.dns import server as dns_server  # noqa: E402
from tun2xray.dns.settings import DnsSettings  # noqa: E402
from tun2xray.engine import Engine  # noqa: E402
from tun2xray.rules import Router  # noqa: E402
from tun2xray.upstream.url import parse_upstream  # noqa: E402

REAL4 = "93.184.216.34"
NINE = ipaddress.ip_address("9.9.9.9").packed
TUN_DNS = ipaddress.ip_address("198.18.0.2").packed


class Upstream(asyncio.DatagramProtocol):
    """What a DNS dokodemo inbound would pass on: real answers."""

    def __init__(self):
        self.seen = []
        self.sent = []
        self.silent = False

    def connection_made(self, t):
        self.t = t

    def datagram_received(self, data, addr):
        q = dns.message.from_wire(data)
        self.seen.append(q)
        if self.silent:
            return
        r = dns.message.make_response(q)
        rr = q.question[0]
        if rr.name.to_text().startswith("big."):
            r.flags |= dns.flags.TC               # "ask me over TCP"
            self.t.sendto(r.to_wire(), addr)
            return
        add = r.answer.append
        if rr.rdtype == dns.rdatatype.A:
            add(dns.rrset.from_text(rr.name, 30, "IN", "A", REAL4))
        elif rr.rdtype == dns.rdatatype.HTTPS:
            add(dns.rrset.from_text(rr.name, 30, "IN", "HTTPS",
                                    '1 . alpn="h3,h2" ipv4hint="93.184.216.34" ipv6hint="2001:db8::1"'))
        elif rr.rdtype == dns.rdatatype.MX:
            add(dns.rrset.from_text(rr.name, 30, "IN", "MX", "10 mail.example.com."))
            r.additional.append(dns.rrset.from_text("mail.example.com.", 30, "IN", "A", "192.0.2.25"))
        out = r.to_wire()
        self.sent.append(out)
        self.t.sendto(out, addr)


def big_answer(wire: bytes) -> bytes:
    q = dns.message.from_wire(wire)
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text(q.question[0].name, 30, "IN", "TXT",
                                        *[f'"{"x" * 200}-{i}"' for i in range(20)]))
    return r.to_wire()


async def _tcp_upstream(reader, writer):
    try:
        n = int.from_bytes(await reader.readexactly(2), "big")
        out = big_answer(await reader.readexactly(n))
        writer.write(len(out).to_bytes(2, "big") + out)
        await writer.drain()
    finally:
        writer.close()


class V26Socks:
    """A SOCKS5 server that handles UDP as Xray does since v26.6.1: a fresh
    UDP port per UDP ASSOCIATE, datagrams accepted only from the client
    address the request declared (or the TCP peer's address when it
    declared 0.0.0.0), the association gone with its control connection."""

    def __init__(self):
        self.assocs = 0
        self.rejected = 0
        self.writers = []

    async def start(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self):
        for w in self.writers:
            w.close()
        self.server.close()

    async def _serve(self, r, w):
        self.writers.append(w)
        loop = asyncio.get_running_loop()
        _, n = await r.readexactly(2)
        await r.readexactly(n)
        w.write(b"\x05\x00")
        _, cmd, _, atyp = await r.readexactly(4)
        assert cmd == 3 and atyp == 1
        ip = ipaddress.ip_address(await r.readexactly(4))
        port = int.from_bytes(await r.readexactly(2), "big")
        if ip.is_unspecified:
            ip = ipaddress.ip_address(w.get_extra_info("peername")[0])
        declared = (str(ip), port)
        server = self
        self.assocs += 1

        class Out(asyncio.DatagramProtocol):
            def datagram_received(self, data, src):
                hdr = b"\x00\x00\x00\x01" + ipaddress.ip_address(src[0]).packed + src[1].to_bytes(2, "big")
                relay.sendto(hdr + data, self.client)

        class Relay(asyncio.DatagramProtocol):
            def datagram_received(self, data, src):
                if src[0] != declared[0] or (declared[1] and src[1] != declared[1]):
                    server.rejected += 1
                    return
                assert data[:4] == b"\x00\x00\x00\x01"
                out_p.client = src
                out_t.sendto(data[10:], (str(ipaddress.ip_address(data[4:8])), int.from_bytes(data[8:10], "big")))

        relay, _ = await loop.create_datagram_endpoint(Relay, local_addr=("127.0.0.1", 0))
        out_t, out_p = await loop.create_datagram_endpoint(Out, local_addr=("127.0.0.1", 0))
        w.write(b"\x05\x00\x00\x01" + bytes([127, 0, 0, 1]) + relay.get_extra_info("sockname")[1].to_bytes(2, "big"))
        try:
            await r.read()
        finally:
            relay.close()
            out_t.close()


class Rig:
    def __init__(self, mode="fake-ip", upstream=None, **kw):
        self.mode = mode
        self.upstream = upstream            # port of the DNS upstream -> its URL (default: dokodemo)
        self.kw = kw

    async def __aenter__(self):
        loop = asyncio.get_running_loop()
        for _ in range(50):           # a UDP and a TCP socket on one port, as a dokodemo inbound has
            self.up_t, self.up = await loop.create_datagram_endpoint(Upstream, local_addr=("127.0.0.1", 0))
            port = self.up_t.get_extra_info("sockname")[1]
            try:
                self.tcp_up = await asyncio.start_server(_tcp_upstream, "127.0.0.1", port)
                break
            except OSError:
                self.up_t.close()
        self.clock = loop.time
        url = self.upstream(port) if self.upstream else f"dokodemo://127.0.0.1:{port}"
        ds = DnsSettings(self.mode, upstream=url, servers=["198.18.0.2"],
                         avoid=["198.18.0.1", "198.18.0.2"], **self.kw)
        self.dev, self.host = memory_pair()
        proxy = "socks5://127.0.0.1:9"
        router = Router(default=parse_upstream(proxy), default_url=proxy)
        self.server = dns_server.build(ds, router, clock=loop.time)
        self.engine = Engine(self.dev, router, dns=self.server, connect_timeout=1.0)
        self.task = asyncio.ensure_future(self.engine.run())
        await asyncio.sleep(0)
        self.backlog = []
        return self

    async def __aexit__(self, *exc):
        self.engine.stop()
        await self.task
        self.dev.close()
        self.up_t.close()
        self.tcp_up.close()

    async def packet(self, pred, timeout=5.0):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            self.backlog += self.host.read()
            while self.backlog:
                p = self.backlog.pop(0)
                if pred(p):
                    return p
            await asyncio.sleep(0.01)
        raise AssertionError("no such packet from the engine")

    async def ask_udp(self, q, dst=NINE, src=A4, sport=40000, timeout=5.0):
        self.host.write([udp_packet(src, dst, sport, 53, q.to_wire())])
        p = await self.packet(lambda p: _udp_sport(p) == 53, timeout)
        return dns.message.from_wire(_udp_payload(p))


def _udp_off(p):
    if p[0] >> 4 == 4:
        return (p[0] & 15) * 4 if p[9] == 17 else None
    return 40 if p[6] == 17 else None


def _udp_sport(p):
    off = _udp_off(p)
    return None if off is None else struct.unpack_from("!H", p, off)[0]


def _udp_payload(p):
    return p[_udp_off(p) + 8:]


def _addrs(reply):
    return [rd.address for rrset in reply.answer for rd in rrset if rrset.rdtype in (1, 28)]


@pytest.mark.parametrize("rdtype,dst,src,pool", [
    pytest.param("A", NINE, A4, "198.19.0.0/16", id="A-to-9.9.9.9"),
    pytest.param("AAAA", NINE, A4, "fd00:7478:f::/64", id="AAAA-to-9.9.9.9"),
    pytest.param("A", TUN_DNS, A4, "198.19.0.0/16", id="A-to-the-tun-dns"),
    pytest.param("AAAA", ipaddress.ip_address("2620:fe::fe").packed, A6, "fd00:7478:f::/64",
                 id="AAAA-over-ipv6-to-2620:fe::fe")])
def test_fake_ip_answers_a_and_aaaa_from_the_pools_for_any_address(rdtype, dst, src, pool):
    async def main(loop):
        async with Rig() as rig:
            r = await rig.ask_udp(dns.message.make_query("web.example.com", rdtype), dst=dst, src=src)
            assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.QR
            (addr,) = _addrs(r)
            assert ipaddress.ip_address(addr) in ipaddress.ip_network(pool)
            assert r.answer[0].ttl == 60
            assert rig.engine.names.lookup(ipaddress.ip_address(addr).packed) == "web.example.com"
            assert rig.up.seen == []                      # answered without the upstream
            st = rig.engine.status()["dns"]
            assert st["queries"] == {rdtype: 1} and st["fake_answers"] == 1 and st["cache_size"] == 1
            assert rig.engine.status()["flows"][0]["inbound"] == "dns"
            assert rig.engine.counters["udp_opened"] == rig.engine.counters["dns_udp_flows"] == 1
    run_virtual(main)


def _tcp_query(rig, wire, dst=TUN_DNS, before=b""):
    """A TCP DNS exchange through the stack: SYN, framed query, reply."""
    async def go():
        seq = 5000
        rig.host.write([build_packet(4, A4, dst, 41000, 53, seq, 0, 0x02, 65535)])
        syn_ack = parse_packet(await rig.packet(lambda p: p[9] == 6))
        assert syn_ack.flags & 0x12 == 0x12
        seq += 1
        ack = (syn_ack.seq + 1) & 0xFFFFFFFF
        data = before + len(wire).to_bytes(2, "big") + wire
        rig.host.write([build_packet(4, A4, dst, 41000, 53, seq, ack, 0x18, 65535, payload=data)])
        got = b""
        while len(got) < 2 or len(got) < 2 + int.from_bytes(got[:2], "big"):
            s = parse_packet(await rig.packet(lambda p: p[9] == 6 and len(parse_packet(p).payload) > 0))
            got += s.payload
        return dns.message.from_wire(got[2:])
    return go()


def test_tcp_queries_are_answered_with_length_framing():
    async def main(loop):
        async with Rig() as rig:
            r = await _tcp_query(rig, dns.message.make_query("tcp.example.com", "A").to_wire(), dst=NINE)
            (addr,) = _addrs(r)
            assert rig.engine.names.lookup(ipaddress.ip_address(addr).packed) == "tcp.example.com"
            c = rig.engine.counters
            assert c["dns_tcp_flows"] == 1 and c["tcp_opened"] == 1     # the exit summary counts it
    run_virtual(main)


def test_other_types_are_forwarded_and_lose_real_addresses_in_fake_ip_mode():
    async def main(loop):
        async with Rig() as rig:
            r = await rig.ask_udp(dns.message.make_query("example.com", "HTTPS"))
            (rd,) = r.answer[0]
            keys = {int(k) for k in rd.params}
            assert 1 in keys and 4 not in keys and 6 not in keys     # alpn kept, hints gone
            r = await rig.ask_udp(dns.message.make_query("example.com", "MX"), sport=40001)
            assert [rrset.rdtype for rrset in r.answer] == [dns.rdatatype.MX] and not r.additional
            st = rig.engine.status()["dns"]
            assert st["forwarded"] == 2 and st["addresses_stripped"] == 3
            assert [q.question[0].rdtype for q in rig.up.seen] == [dns.rdatatype.HTTPS, dns.rdatatype.MX]
    run_virtual(main)


def test_remember_mode_passes_answers_unchanged_and_remembers_them_for_their_ttl():
    async def main(loop):
        async with Rig("remember") as rig:
            q = dns.message.make_query("www.example.com", "A")
            rig.host.write([udp_packet(A4, NINE, 40000, 53, q.to_wire())])
            p = await rig.packet(lambda p: _udp_sport(p) == 53)
            assert _udp_payload(p) == q.to_wire()[:2] + rig.up.sent[0][2:]    # the upstream's bytes, our id
            real = ipaddress.ip_address(REAL4).packed
            assert rig.engine.names.lookup(real) == "www.example.com"
            assert not rig.engine.names.is_fake(real)
            await asyncio.sleep(61)                       # the TTL was 30 s, remembered for the 60 s floor
            assert rig.engine.names.lookup(real) is None
    run_virtual(main)


def test_a_silent_upstream_gets_the_client_servfail():
    async def main(loop):
        async with Rig() as rig:
            rig.up.silent = True
            r = await rig.ask_udp(dns.message.make_query("example.com", "TXT"), timeout=10)
            assert r.rcode() == dns.rcode.SERVFAIL
            st = rig.engine.status()["dns"]
            assert st["forward_timeouts"] == 1 and st["forward_failed"] == 1
    run_virtual(main)


def test_malformed_queries_get_formerr_or_a_counted_drop():
    async def main(loop):
        async with Rig() as rig:
            bad = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example"     # question cut short
            rig.host.write([udp_packet(A4, NINE, 40000, 53, bad)])
            p = await rig.packet(lambda p: _udp_sport(p) == 53)
            r = _udp_payload(p)
            assert r[:2] == b"\x12\x34" and r[2] & 0x80 and r[3] & 0xF == dns.rcode.FORMERR
            rig.host.write([udp_packet(A4, NINE, 40001, 53, b"\x01\x02\x03")])           # shorter than a header
            reply = dns.message.make_response(dns.message.make_query("x.test", "A")).to_wire()
            rig.host.write([udp_packet(A4, NINE, 40002, 53, reply)])                      # a response, not a query
            r = await rig.ask_udp(dns.message.make_query("after.test", "A"), sport=40003)
            assert _addrs(r)                                                              # still serving
            st = rig.engine.status()["dns"]
            assert (st["formerr"], st["dropped_short"], st["dropped_not_a_query"]) == (1, 1, 1)
    run_virtual(main)


def test_tcp_framing_survives_a_zero_length_frame_and_answers_the_next_query():
    async def main(loop):
        async with Rig() as rig:
            wire = dns.message.make_query("next.example.com", "A").to_wire()
            r = await _tcp_query(rig, wire, before=b"\x00\x00" + b"\x00\x03abc")   # empty, then too short
            assert _addrs(r)
            assert rig.engine.status()["dns"]["dropped_short"] == 2
    run_virtual(main)


def test_ptr_for_a_fake_address_names_it():
    async def main(loop):
        async with Rig() as rig:
            r = await rig.ask_udp(dns.message.make_query("named.example.com", "A"))
            (addr,) = _addrs(r)
            r = await rig.ask_udp(dns.message.make_query(dns.reversename.from_address(addr), "PTR"), sport=40001)
            assert r.answer[0][0].target.to_text() == "named.example.com."
    run_virtual(main)


def test_without_hijack_only_the_dns_servers_are_answered():
    async def main(loop):
        async with Rig(hijack=False) as rig:
            assert rig.engine.dns.wants(TUN_DNS) and not rig.engine.dns.wants(NINE)
            r = await rig.ask_udp(dns.message.make_query("only.example.com", "A"), dst=TUN_DNS)
            assert _addrs(r)
    run_virtual(main)


def test_the_cache_file_is_written_on_stop_and_read_on_start(tmp_path):
    path = str(tmp_path / "fake.json")

    async def first(loop):
        async with Rig(cache_file=path) as rig:
            r = await rig.ask_udp(dns.message.make_query("kept.example.com", "A"))
            return _addrs(r)[0]

    addr = run_virtual(first)

    async def second(loop):
        async with Rig(cache_file=path) as rig:
            assert rig.engine.names.lookup(ipaddress.ip_address(addr).packed) == "kept.example.com"
            r = await rig.ask_udp(dns.message.make_query("kept.example.com", "A"))
            assert _addrs(r) == [addr]
    run_virtual(second)


def test_dns_off_leaves_port_53_flows_to_the_rules():
    from tun2xray.rules import parse_map

    async def main(loop):
        up_t, up = await loop.create_datagram_endpoint(Upstream, local_addr=("127.0.0.1", 0))
        port = up_t.get_extra_info("sockname")[1]
        dev, host = memory_pair()
        proxy = "socks5://127.0.0.1:9"
        router = Router(default=parse_upstream(proxy), default_url=proxy,
                        rules=[parse_map(f"udp:53=dokodemo://127.0.0.1:{port}")])
        e = Engine(dev, router)
        assert e.dns is None and e.names is None
        task = asyncio.ensure_future(e.run())
        try:
            q = dns.message.make_query("plain.example.com", "A")
            host.write([udp_packet(A4, NINE, 40000, 53, q.to_wire())])
            deadline = loop.time() + 5
            got = []
            while not got and loop.time() < deadline:
                got = [p for p in host.read() if _udp_sport(p) == 53]
                await asyncio.sleep(0.01)
            assert got and _udp_payload(got[0]) == up.sent[0]      # the rule's inbound answered, unchanged
            assert e.status()["flows"][0]["inbound"] == f"dokodemo://127.0.0.1:{port}" and "dns" not in e.status()
        finally:
            e.stop()
            await task
            dev.close()
            up_t.close()
    run_virtual(main)


def test_an_idle_tcp_dns_connection_is_closed():
    async def main(loop):
        async with Rig() as rig:
            await _tcp_query(rig, dns.message.make_query("idle.example.com", "A").to_wire())
            assert len(rig.engine.stack.tcp) == 1
            fin = parse_packet(await rig.packet(lambda p: p[9] == 6 and parse_packet(p).flags & 0x01, timeout=40))
            assert fin.sport == 53
            assert rig.engine.status()["engine"]["bytes_down"] > 0
    run_virtual(main)


def test_a_truncated_answer_to_a_tcp_query_is_asked_again_over_tcp():
    async def main(loop):
        async with Rig() as rig:
            r = await _tcp_query(rig, dns.message.make_query("big.example.com", "TXT").to_wire())
            assert not r.flags & dns.flags.TC and len(r.answer[0]) == 20
            # the same over UDP gets the truncated answer: the client retries over TCP itself
            r = await rig.ask_udp(dns.message.make_query("big.example.com", "TXT"))
            assert r.flags & dns.flags.TC
            d = rig.engine.status()["dns"]
            assert d["forward_tcp"] == 1 and d["forward_tcp_failed"] == 0
    run_virtual(main)


def test_forwarding_through_a_strict_v26_style_socks_udp_server():
    async def main(loop):
        v26 = await V26Socks().start()
        try:
            async with Rig("remember", upstream=lambda p: f"socks5://127.0.0.1:{v26.port}?server=127.0.0.1:{p}") as rig:
                for i, name in enumerate(("a.example.com", "b.example.com", "c.example.com")):
                    r = await rig.ask_udp(dns.message.make_query(name, "A"), sport=40000 + i)
                    assert _addrs(r) == [REAL4]
                # one association for every query, its control connection kept open, nothing refused
                assert (v26.assocs, v26.rejected) == (1, 0)
                assert rig.engine.names.lookup(ipaddress.ip_address(REAL4).packed) == "c.example.com"
                # the server ends the association: the next query opens another
                for w in v26.writers:
                    w.close()
                await asyncio.sleep(0.1)
                r = await rig.ask_udp(dns.message.make_query("d.example.com", "A"), sport=40010)
                assert _addrs(r) == [REAL4] and v26.assocs == 2 and v26.rejected == 0
        finally:
            await v26.stop()
    run_virtual(main)
