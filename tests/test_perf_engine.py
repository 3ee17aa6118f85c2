"""The engine's pipelined SOCKS5 dial (greeting + CONNECT in one write, the
replies parsed by the relay) against a strict, scriptable SOCKS5 server:
success with data in the reply's segment, every failure reply, a proxy that
hangs up or stays silent. The client side is raw packets through the
in-memory device; engine and server share one loop on a virtual clock, so the
silent proxy's 1 s connect timeout passes without waiting for it.
"""

from __future__ import annotations

import pytest
from helpers import addr, build_packet, tcp_options
from upstream_fixtures import StrictSocks
from vclock import EngineHarness, run_virtual

SRC, DST = addr("10.0.0.2"), addr("93.184.216.34")


def with_engine(strict_setup, body, connect_timeout=1):
    """Run body(strict, host, loop) with a StrictSocks and an engine on one
    virtual-clock loop (tcp_connect_timeout 1 s unless given)."""
    async def main(loop):
        strict = await StrictSocks().start()
        strict_setup(strict)
        host = await EngineHarness(f"socks5://127.0.0.1:{strict.port}",
                                   connect_timeout=connect_timeout).start()
        try:
            return await body(strict, host, loop)
        finally:
            await host.stop()
            await strict.stop()
    return run_virtual(main)


async def syn(host, sport):
    host.send(build_packet(4, SRC, DST, sport, 80, 1000, 0, "S", 65535, tcp_options(mss=1400)))
    return await host.expect(lambda s: s.dport == sport and s.flags & 0x06)   # SYN-ACK or RST


def test_success_sends_one_request_and_data_after_the_reply_reaches_the_client():
    def setup(strict):
        strict.after_reply = b"banner!"

    async def body(strict, host, loop):
        s = await syn(host, 41000)
        assert s.flags & 0x12 == 0x12, s                 # SYN-ACK only once CONNECT succeeded
        # (the proxy watch's probes are UDP ASSOCIATE requests: command 3)
        assert [r for r in strict.requests if r[0] != 3] == [(1, b"\x01" + bytes([93, 184, 216, 34])
                                                             + (80).to_bytes(2, "big"))]
        host.send(build_packet(4, SRC, DST, 41000, 80, 1001, s.seq + 1, "A", 65535))
        d = await host.expect(lambda x: x.dport == 41000 and x.payload)
        assert d.payload == b"banner!" and d.seq == s.seq + 1
        st = host.status()["engine"]
        assert st["tcp_opened"] == 1 and st.get("upstream_connect_failed", 0) == 0

    with_engine(setup, body)


@pytest.mark.parametrize("mode,reply", [("ok", 5), ("short_fail", 2), ("no_method", 0),
                                        ("close_after_greeting", 0), ("garbage", 0),
                                        ("close_mid_reply", 0), ("silent", 0)])
def test_failures_reset_the_client(mode, reply):
    def setup(strict):
        strict.mode = mode
        strict.reply = reply

    async def body(strict, host, loop):
        t0 = loop.time()
        s = await syn(host, 41001)
        assert s.flags & 0x04, s                         # RST: the connect request is refused
        assert s.ack == 1001
        assert loop.time() - t0 < 3                      # silent: the 1 s connect timeout (virtual clock)
        st = host.status()
        assert st["engine"]["upstream_connect_failed"] == 1 and st["engine"].get("tcp_opened", 0) == 0
        assert st["engine"].get("upstream_closed_empty", 0) == 0      # counted once, as a failed dial
        assert st["stack"]["tcp_flows"] == 0
        return loop.time() - t0

    elapsed = with_engine(setup, body)
    if mode == "silent":
        # the RST came from the connect timeout, not from anything earlier
        assert elapsed >= 1.0


def test_recorded_copies_of_offload_packets_have_complete_checksums():
    # With offload the kernel may hand over TCP/UDP packets whose checksum
    # field holds only the pseudo-header sum; a capture must still replay
    # (tun2xray replay verifies checksums), so the recorded copy is completed.
    from netstack import StackConfig
    from netstack.wire.templates import TcpTemplate, UdpTemplate, ip_packets
    from netstack.wire.ip import complete as _complete_checksum

    partial = StackConfig(checksum_offload=True)
    full = StackConfig()
    for fam, a, b in ((4, SRC, DST), (6, addr("fd00::2"), addr("2001:db8::80"))):
        t_part = TcpTemplate(fam, a, b, 40000, 80, partial)
        t_full = TcpTemplate(fam, a, b, 40000, 80, full)
        for payload in (b"", b"x", b"hello world" * 300):
            p = t_part.build(1000, 2000, 0x18, 512, b"\x01\x01\x08\x0a" + bytes(8), payload)
            q = t_full.build(1000, 2000, 0x18, 512, b"\x01\x01\x08\x0a" + bytes(8), payload)
            if fam == 4:       # the IP identification differs per template: compare from TCP on
                assert _complete_checksum(p)[20:] == q[20:] and p[20:] != q[20:]
            else:
                assert _complete_checksum(p) == q and p != q
        u_part = UdpTemplate(fam, a, b, 5353, 53, partial)
        u_full = UdpTemplate(fam, a, b, 5353, 53, full)
        p, q = u_part.build(b"query")[0], u_full.build(b"query")[0]
        hl = 20 if fam == 4 else 40
        assert _complete_checksum(p)[hl:] == q[hl:] and p[hl:] != q[hl:]
    # fragments and other protocols are recorded as they are
    frags = ip_packets(4, SRC, DST, 17, b"\x00" * 3000, 64, 1500, ident=5)
    assert all(_complete_checksum(f) is f for f in frags)
    icmp = bytes([0x45, 0, 0, 28]) + bytes(5) + b"\x01" + bytes(2) + SRC + DST + bytes(8)
    assert _complete_checksum(icmp) is icmp


def test_a_two_byte_refusal_on_an_open_connection_resets_the_client_at_once():
    """VER REP alone, the proxy keeping the connection open: the relay must
    refuse on those two bytes, not wait for the rest of a reply that never
    comes until the connect timeout (found by tools/fuzz, target socks).
    The connect timeout here (60 s of virtual time) is far longer than the
    wait for the RST."""
    def setup(strict):
        strict.mode = "short_fail_open"
        strict.reply = 5

    async def body(strict, host, loop):
        t0 = loop.time()
        s = await syn(host, 41002)
        assert s.flags & 0x04 and s.ack == 1001, s
        assert loop.time() - t0 < 30, loop.time() - t0      # not the 60 s connect timeout
        st = host.status()["engine"]
        assert st["upstream_connect_failed"] == 1 and st.get("tcp_opened", 0) == 0

    with_engine(setup, body, connect_timeout=60)


def test_a_connect_that_never_completes_is_ended_by_the_one_connect_timer():
    """The relay's one timer covers the connect too: a dial whose TCP connect
    never completes (a black-holed inbound; the loop's connect is replaced,
    below the engine) is cancelled at tcp_connect_timeout and the client gets
    a RST, counted as one failed dial with the reason "connect timeout"."""
    import asyncio

    started, cancelled = [], []

    async def black_hole(*args, **kwargs):
        started.append(args[1:])
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def body(strict, host, loop):
        host.engine.loop.create_connection = black_hole
        t0 = loop.time()
        s = await syn(host, 41002)
        assert s.flags & 0x04 and s.ack == 1001, s       # RST to the SYN
        assert 1.0 <= loop.time() - t0 < 3               # the 1 s timer (virtual clock)
        assert started == [("127.0.0.1", strict.port)] and cancelled == [True]
        st = host.status()
        assert st["engine"]["upstream_connect_failed"] == 1 and st["engine"].get("tcp_opened", 0) == 0
        assert [(c["reason"], c["detail"]) for c in st["closed_flows"]] == \
            [("connect timeout", f"socks5://127.0.0.1:{strict.port}: TimeoutError")]
        assert not host.engine._tasks                    # the dial's task is gone

    with_engine(lambda strict: None, body)
