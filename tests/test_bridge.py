"""tun2xray.bridge: the handle API a packet-flow host (NEPacketTunnelProvider,
VpnService) drives, tested the way such a host uses it: raw IP packets in
from host threads, packets out through a callback or poll_outbound, a real
upstream SOCKS5 server (echo after CONNECT) and a UDP echo server behind a
dokodemo rule, both on loopback.
"""

from __future__ import annotations

import gc
import json
import os
import queue
import random
import socket
import struct
import threading
import time

import pytest
from helpers import build_packet, parse_packet, tcp_options

from netstack.wire import checksum as ck
from tun2xray import bridge, state

try:
    import uvloop  # noqa: F401
    LOOPS = ["asyncio", "uvloop"]
except ImportError:  # an iOS-like host: plain asyncio only
    LOOPS = ["asyncio"]

CLIENT4, SERVER4 = bytes([198, 18, 0, 1]), bytes([10, 1, 2, 3])
CLIENT6 = socket.inet_pton(socket.AF_INET6, "fd00:7478::1")
SERVER6 = socket.inet_pton(socket.AF_INET6, "fd99::10")
_UDP = struct.Struct("!HHHH")
_IP4 = struct.Struct("!BBHHHBBH4s4s")
_IP6 = struct.Struct("!IHBB16s16s")


# ----------------------------------------------------------------- servers

def _recv_exact(c, n):
    buf = b""
    while len(buf) < n:
        b = c.recv(n - len(buf))
        if not b:
            raise ConnectionError("eof")
        buf += b
    return buf


class SocksEcho:
    """A SOCKS5 server (no auth, CONNECT) that echoes the stream after its reply."""

    def __init__(self, port=0):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.targets = []
        self.conns = set()
        self._lock = threading.Lock()
        self._stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.conns.add(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        try:
            ver, n = _recv_exact(c, 2)
            _recv_exact(c, n)
            c.sendall(b"\x05\x00")
            _, cmd, _, atyp = _recv_exact(c, 4)
            if atyp == 1:
                a = socket.inet_ntop(socket.AF_INET, _recv_exact(c, 4))
            elif atyp == 4:
                a = socket.inet_ntop(socket.AF_INET6, _recv_exact(c, 16))
            else:
                a = _recv_exact(c, _recv_exact(c, 1)[0]).decode()
            port = struct.unpack("!H", _recv_exact(c, 2))[0]
            with self._lock:
                self.targets.append((cmd, a, port))
            c.sendall(b"\x05\x00\x00\x01" + bytes(6))
            while True:
                b = c.recv(65536)
                if not b:
                    break
                c.sendall(b)
        except OSError:
            pass
        finally:
            # close before leaving the set: tests wait on the set, then count fds
            c.close()
            with self._lock:
                self.conns.discard(c)

    def close(self):
        self._stop = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes the blocked accept()
        except OSError:
            pass
        self.sock.close()
        with self._lock:
            conns = list(self.conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.thread.join(5)


class UdpEcho:
    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            try:
                d, a = self.sock.recvfrom(65536)
                if a is None:        # woken by shutdown()
                    return
                self.sock.sendto(b"echo:" + d, a)
            except OSError:
                return

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes the blocked recvfrom() (ENOTCONN all the same)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def socks():
    s = SocksEcho()
    yield s
    s.close()


@pytest.fixture(scope="module")
def udp_echo():
    u = UdpEcho()
    yield u
    u.close()


def profile(socks, udp_echo=None, **extra) -> str:
    p = {"proxy": f"socks5://127.0.0.1:{socks.port}", "tcp_connect_timeout": 3}
    if udp_echo is not None:
        p["rules"] = [{"network": "udp", "port": 53, "to": f"dokodemo://127.0.0.1:{udp_echo.port}"}]
    p.update(extra)
    return json.dumps(p)


# ------------------------------------------------------------------ packets

def udp_packet(family, src, dst, sport, dport, payload) -> bytes:
    ulen = 8 + len(payload)
    ps = (ck.pseudo4 if family == 4 else ck.pseudo6)(src, dst, 17, ulen)
    c = ck.checksum(_UDP.pack(sport, dport, ulen, 0) + payload, ps) or 0xFFFF
    udp = _UDP.pack(sport, dport, ulen, c) + payload
    if family == 4:
        iph = _IP4.pack(0x45, 0, 20 + ulen, 0, 0x4000, 64, 17, 0, src, dst)
        return iph[:10] + struct.pack("!H", ck.checksum(iph)) + iph[12:] + udp
    return _IP6.pack(0x60000000, ulen, 17, 64, src, dst) + udp


def udp_payload(pkt: bytes) -> bytes:
    off = (pkt[0] & 15) * 4 if pkt[0] >> 4 == 4 else 40
    return pkt[off + 8:]


def is_tcp(p) -> bool:
    return (p[9] if p[0] >> 4 == 4 else p[6]) == 6


def addrs(family):
    return (CLIENT4, SERVER4) if family == 4 else (CLIENT6, SERVER6)


class Host:
    """A packet-flow host: submits from its threads, takes output by callback
    (default) or poll_outbound, and checks each packet's protocol number."""

    def __init__(self, config, *, af6=bridge.AF_INET6_DARWIN, poll=False, loop="auto"):
        self.af6 = af6
        self.out = queue.Queue()
        self.callbacks = 0
        self.poll_mode = poll
        self.handle = bridge.start(config, None if poll else self._on_outbound, loop=loop)

    def _on_outbound(self, packets, protocols):
        self.callbacks += 1
        for p, proto in zip(packets, protocols):
            self.out.put((p, proto))

    def proto(self, family):
        return bridge.AF_INET if family == 4 else self.af6

    def send(self, pkt, family):
        bridge.submit_inbound(self.handle, pkt, self.proto(family))

    def next(self, timeout=5.0):
        """The next outbound (packet, protocol), checking the protocol."""
        if self.poll_mode:
            deadline = time.monotonic() + timeout
            while True:
                if not self.out.empty():
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("no packet from the bridge")
                for item in bridge.poll_outbound(self.handle, 16, min(left, 0.5)):
                    self.out.put(item)
        try:
            p, proto = self.out.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no packet from the bridge") from None
        want = bridge.AF_INET if p[0] >> 4 == 4 else self.af6
        assert proto == want, f"IPv{p[0] >> 4} packet answered with protocol {proto}"
        return p, proto

    def expect_tcp(self, pred, timeout=5.0):
        deadline = time.monotonic() + timeout
        while True:
            p, _ = self.next(max(0.05, deadline - time.monotonic()))
            if not is_tcp(p):
                continue
            seg = parse_packet(p)
            if pred(seg):
                return seg

    def stop(self):
        if self.handle in bridge.handles():
            bridge.stop(self.handle)


def tcp_echo(host: Host, family: int, sport: int, payload: bytes) -> bytes:
    """Handshake, send payload, return what comes back (the SOCKS server echoes)."""
    src, dst = addrs(family)
    host.send(build_packet(family, src, dst, sport, 80, 1000, 0, "S", 65535,
                           tcp_options(mss=1400)), family)
    synack = host.expect_tcp(lambda s: s.dport == sport and s.flags & 0x12 == 0x12)
    assert synack.ack == 1001
    rcv = synack.seq + 1
    host.send(build_packet(family, src, dst, sport, 80, 1001, rcv, "A", 65535), family)
    host.send(build_packet(family, src, dst, sport, 80, 1001, rcv, "PA", 65535, payload=payload), family)
    got = b""
    while len(got) < len(payload):
        seg = host.expect_tcp(lambda s: s.dport == sport and s.payload)
        assert seg.seq == rcv + len(got)
        got += seg.payload
    host.send(build_packet(family, src, dst, sport, 80, 1001 + len(payload), rcv + len(got), "A",
                           65535), family)
    return got


def wait_for(pred, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def check_accounting(s):
    d, k = s["device"], s["stack"]
    assert d["rx_packets"] == d["rx_delivered"] + d["rx_queued"] + d["rx_dropped"]
    assert d["rx_dropped"] == sum(d[r] for r in bridge._RX_DROPS)
    if k:
        assert k["rx_packets"] == d["rx_delivered"]
        assert k["rx_packets"] == sum(k["drops"].values()) + k["delivered"] + k["frag_held"]


def settled(handle):
    """Status once the inbound queue has drained into the stack."""
    return wait_for(lambda: (lambda s: s if s["device"]["rx_queued"] == 0 and
                             s["stack"].get("rx_packets") == s["device"]["rx_delivered"] else None)
                    (bridge.status(handle)), what="the inbound queue to drain")


@pytest.fixture
def hosts():
    made = []
    yield made
    for h in made:
        h.stop()


# -------------------------------------------------------------------- tests

@pytest.mark.parametrize("loop", LOOPS)
def test_lifecycle_and_status_shape(socks, loop):
    h = bridge.start(profile(socks), loop=loop)
    try:
        assert bridge.loop_kind(h) == loop
        s = wait_for(lambda: (lambda s: s if s["state"] == state.CONNECTED else None)(bridge.status(h)),
                     what="connected")
        assert s["reason"] is None
        # the shape the CLI's control socket shares (state.compose)
        assert list(s)[:3] == ["state", "reason", "since"]
        # every key, in the order the CLI's status has them (compose of a lifecycle and Engine.status())
        # (+ the network settings the host applies, docs/profile.md)
        assert list(s) == list(state.compose(state.Lifecycle(), None)) + ["network"]
        assert s["since"].endswith("Z") and isinstance(s["since_epoch"], float)
        assert s["rate"] == {"up": 0.0, "down": 0.0} and s["closed_flows"] == []
        assert s["device"]["mtu"] == 1500
        check_accounting(s)
    finally:
        bridge.stop(h)
    with pytest.raises(bridge.InvalidHandle, match="unknown or already stopped"):
        bridge.status(h)


def test_connecting_while_proxy_unreachable():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()                      # nothing listens there now
    h = bridge.start(json.dumps({"proxy": f"socks5://127.0.0.1:{port}"}))
    try:
        s = wait_for(lambda: (lambda s: s if s["reason"] and "unreachable" in s["reason"] else None)
                     (bridge.status(h)), what="a reason")
        assert s["state"] == state.CONNECTING
    finally:
        bridge.stop(h)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("family,af6", [(4, 30), (6, 10), (6, 30)])
def test_tcp_through_callback(socks, hosts, loop, family, af6):
    host = Host(profile(socks), af6=af6, loop=loop)
    hosts.append(host)
    payload = os.urandom(5000)
    assert tcp_echo(host, family, 40000 + af6, payload) == payload
    dst = "10.1.2.3" if family == 4 else "fd99::10"
    assert (1, dst, 80) in socks.targets
    s = bridge.status(host.handle)
    assert s["device"]["tx_packets"] >= 4 and s["device"]["tx_callback_errors"] == 0
    assert host.callbacks >= 1
    check_accounting(s)


@pytest.mark.parametrize("family,af6", [(4, 10), (6, 10), (6, 30)])
def test_tcp_through_poll(socks, hosts, family, af6):
    host = Host(profile(socks), af6=af6, poll=True)
    hosts.append(host)
    payload = os.urandom(3000)
    assert tcp_echo(host, family, 41000 + af6, payload) == payload
    assert host.callbacks == 0
    s = bridge.status(host.handle)
    assert s["device"]["tx_queued"] == 0 or s["device"]["tx_queued"] == len(
        bridge._get(host.handle)._outq)


@pytest.mark.parametrize("family,af6", [(4, 30), (6, 10), (6, 30)])
@pytest.mark.parametrize("poll", [False, True])
def test_udp_dokodemo_rule(socks, udp_echo, hosts, family, af6, poll):
    host = Host(profile(socks, udp_echo), af6=af6, poll=poll)
    hosts.append(host)
    src, dst = addrs(family)
    host.send(udp_packet(family, src, dst, 5353, 53, b"query"), family)
    p, proto = host.next()
    assert p[0] >> 4 == family and proto == host.proto(family)
    assert udp_payload(p) == b"echo:query"


@pytest.mark.parametrize("trust", [False, True])
def test_trust_checksums_decides_whether_a_bad_tcp_checksum_is_dropped(socks, hosts, trust):
    """trust_checksums (a host whose packets come from its own kernel): a
    SYN whose TCP checksum is wrong is dropped and counted by default, and
    with the key set it reaches the stack like any other (a connect
    request: its SYN-ACK comes back)."""
    host = Host(profile(socks, trust_checksums=trust), poll=True)
    hosts.append(host)
    syn = bytearray(build_packet(4, CLIENT4, SERVER4, 40000, 80, 1, 0, "S", 100))
    syn[20 + 16] ^= 0x5A                     # the TCP checksum field
    bridge.submit_inbound(host.handle, bytes(syn), 2)
    s = settled(host.handle)
    drops = s["stack"]["drops"].get("bad_tcp_checksum", 0)
    if trust:
        assert drops == 0
        synack = host.expect_tcp(lambda seg: seg.dport == 40000 and seg.flags & 0x12 == 0x12)
        assert synack.ack == 2
    else:
        assert drops == 1 and s["stack"]["tcp_flows"] == 0


def test_family_mismatch_and_bad_protocol_are_counted(socks, hosts):
    host = Host(profile(socks), poll=True)
    hosts.append(host)
    h = host.handle
    v4 = build_packet(4, CLIENT4, SERVER4, 1, 80, 1, 0, "S", 100)
    v6 = build_packet(6, CLIENT6, SERVER6, 1, 80, 1, 0, "S", 100)
    bridge.submit_inbound(h, v4, 30)         # v4 packet said to be IPv6 (Darwin)
    bridge.submit_inbound(h, v4, 10)         # ... (Linux)
    bridge.submit_inbound(h, v6, 2)          # v6 packet said to be IPv4
    bridge.submit_inbound_batch(h, [v4, v6, v4], [17, 28, None])   # no such families
    bridge.submit_inbound_batch(h, ["text", None, 12], [2, 2, 2])  # not packets
    bridge.submit_inbound(h, b"\x45" + bytes(70000), 2)            # larger than IP allows
    s = settled(h)
    d = s["device"]
    assert d["rx_family_mismatch"] == 3
    assert d["rx_bad_protocol"] == 3
    assert d["rx_bad_type"] == 3
    assert d["rx_oversize"] == 1
    assert d["rx_packets"] == 10 and d["rx_dropped"] == 10 and d["rx_delivered"] == 0
    assert s["stack"]["rx_packets"] == 0 and s["stack"]["tcp_flows"] == 0
    assert bridge.poll_outbound(h, 64, 0.1) == []
    check_accounting(s)


def test_v6_numbering_follows_the_host(socks, udp_echo, hosts):
    """The answer uses the AF_INET6 number the host last used."""
    host = Host(profile(socks, udp_echo), af6=10)
    hosts.append(host)
    h = host.handle
    for af6, sport in ((10, 6000), (30, 6001), (10, 6002)):
        host.af6 = af6
        bridge.submit_inbound(h, udp_packet(6, CLIENT6, SERVER6, sport, 53, b"x"), af6)
        p, proto = host.next()
        assert proto == af6


def test_callback_that_raises_is_counted(socks, hosts):
    calls = []

    def bad(packets, protocols):
        calls.append(len(packets))
        raise RuntimeError("host bug")

    h = bridge.start(profile(socks), bad)
    try:
        ping = bytes.fromhex("4500001c0000400040010000") + CLIENT4 + SERVER4 + bytes.fromhex("0800f7fe00000001")
        ping = ping[:10] + struct.pack("!H", ck.checksum(ping[:20])) + ping[12:]
        for i in range(3):
            bridge.submit_inbound(h, ping, 2)
            wait_for(lambda: len(calls) > i, what="a callback")
        s = bridge.status(h)
        assert s["device"]["tx_callback_errors"] == 3
        assert s["device"]["tx_dropped"] == 3 and s["device"]["tx_packets"] == 0
        assert s["state"] in (state.CONNECTING, state.CONNECTED)
        assert s["stack"]["delivered"] == 3
    finally:
        bridge.stop(h)


def test_stop_from_callback_is_refused(socks):
    errors = []
    h = None

    def cb(packets, protocols):
        try:
            bridge.stop(h)
        except bridge.BridgeError as e:
            errors.append(str(e))

    h = bridge.start(profile(socks), cb)
    try:
        bridge.submit_inbound(h, build_packet(4, CLIENT4, SERVER4, 1234, 80, 7, 0, "S", 100), 2)
        wait_for(lambda: errors, what="the callback")
        assert "engine thread" in errors[0]
        assert h in bridge.handles()
    finally:
        bridge.stop(h)


def test_stale_and_bad_handles(socks):
    h = bridge.start(profile(socks))
    bridge.stop(h)
    for call in (lambda x: bridge.status(x), lambda x: bridge.stop(x),
                 lambda x: bridge.submit_inbound(x, b"\x45", 2),
                 lambda x: bridge.submit_inbound_batch(x, [], []),
                 lambda x: bridge.poll_outbound(x)):
        for bad in (h, 0, -1, 10**9, "1", None, True, 1.0):
            with pytest.raises(ValueError, match="handle"):
                call(bad)
    h2 = bridge.start(profile(socks))
    try:
        assert h2 > h                  # handles are never reused
        with pytest.raises(bridge.BridgeError, match="2 packets but 1 protocols"):
            bridge.submit_inbound_batch(h2, [b"", b""], [2])
        with pytest.raises(bridge.BridgeError, match="max_packets"):
            bridge.poll_outbound(h2, 0)
    finally:
        bridge.stop(h2)


@pytest.mark.parametrize("text,path", [
    ('{"proxy": "socks5://127.0.0.1:1080", "rules": [{"to": "dokodemo://1.2.3.4:53", "port": 70000}]}',
     "rules[0].port"),
    ('{"proxy": "socks5://127.0.0.1:1080", "ipv6": {"address": "10.0.0.1/8"}}', "ipv6.address"),
    ('{"proxy": "socks5://127.0.0.1:1080", "mtu": 100}', "mtu"),
    ('{"proxy": "socks5://127.0.0.1:1080", "dns": {"servers": ["1.1.1.1", "nope"]}}', "dns.servers[1]"),
    ('{"proxy": "socks5://127.0.0.1:1080", "bogus": 1}', "bogus"),
    ('{"mtu": 1500}', "proxy"),
    ('{"proxy": "dokodemo://127.0.0.1:53"}', "proxy"),
    ('{"proxy": ', "not valid JSON"),
    ('[1, 2]', "JSON object"),
])
def test_malformed_config_names_the_key(text, path):
    before = threading.active_count()
    with pytest.raises(ValueError) as ei:
        bridge.start(text)
    assert str(ei.value).startswith(path) or path in str(ei.value), str(ei.value)
    assert threading.active_count() == before


def test_config_must_be_text():
    for bad in (None, 12, {"proxy": "socks5://127.0.0.1:1"}):
        with pytest.raises(bridge.BridgeError, match="config_json"):
            bridge.start(bad)
    with pytest.raises(bridge.BridgeError, match="on_outbound"):
        bridge.start('{"proxy": "socks5://127.0.0.1:1"}', on_outbound=5)
    with pytest.raises(bridge.BridgeError, match="loop"):
        bridge.start('{"proxy": "socks5://127.0.0.1:1"}', loop="trio")


def test_inbound_overflow_is_counted(socks, hosts):
    host = Host(profile(socks), poll=True)
    hosts.append(host)
    junk = b"\x45" + bytes(19)
    n = bridge.INBOUND_PACKETS + 904
    bridge.submit_inbound_batch(host.handle, [junk] * n, [2] * n)
    s = settled(host.handle)
    assert s["device"]["rx_queue_full"] == 904
    assert s["device"]["rx_delivered"] == bridge.INBOUND_PACKETS
    check_accounting(s)


def test_outbound_overflow_in_poll_mode_is_counted(socks, monkeypatch, hosts):
    monkeypatch.setattr(bridge, "OUTBOUND_PACKETS", 5)
    host = Host(profile(socks), poll=True)
    hosts.append(host)
    # ICMP echo requests: the stack answers each with one reply
    ping = bytes.fromhex("4500001c0000400040010000") + CLIENT4 + SERVER4 + bytes.fromhex("0800f7fe00000001")
    ping = ping[:10] + struct.pack("!H", ck.checksum(ping[:20])) + ping[12:]
    bridge.submit_inbound_batch(host.handle, [ping] * 8, [2] * 8)
    wait_for(lambda: bridge.status(host.handle)["device"]["tx_queue_full"] == 3, what="3 tail drops")
    got = bridge.poll_outbound(host.handle, 64)
    assert len(got) == 5 and all(proto == 2 for _, proto in got)
    d = bridge.status(host.handle)["device"]
    assert d["tx_packets"] == 5 and d["tx_dropped"] == 3 and d["tx_queued"] == 0


def test_a_memory_budget_bounds_the_outbound_queue_and_shares_with_the_engine(socks, hosts):
    # memory_budget_mb 1: each queue may hold an eighth (128 KiB), the engine's buffers the rest
    host = Host(profile(socks, memory_budget_mb=1), poll=True)
    hosts.append(host)
    body = bytes.fromhex("0800") + bytes(2) + bytes.fromhex("00000001") + bytes(1400)
    body = body[:2] + struct.pack("!H", ck.checksum(body)) + body[4:]
    head = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(body), 0, 0x4000, 64, 1, 0) + CLIENT4 + SERVER4
    ping = head[:10] + struct.pack("!H", ck.checksum(head)) + head[12:] + body
    fits = (128 << 10) // len(ping)
    # the inbound queue takes 128 KiB of a batch; their replies fill the outbound queue
    bridge.submit_inbound_batch(host.handle, [ping] * 200, [2] * 200)
    assert bridge.status(host.handle)["device"]["rx_queue_full"] == 200 - fits
    wait_for(lambda: bridge.status(host.handle)["device"]["tx_queued"] == fits, what="the replies queued")
    # ... which has no room for more
    bridge.submit_inbound_batch(host.handle, [ping] * fits, [2] * fits)
    wait_for(lambda: bridge.status(host.handle)["device"]["tx_queue_full"] == fits,
             what="the replies beyond 128 KiB dropped")
    got = bridge.poll_outbound(host.handle, 256)
    assert len(got) == fits
    assert bridge.status(host.handle)["stack"]["memory"]["budget"] == (1 << 20) - 2 * (128 << 10)


def test_poll_timeout_waits_and_stop_wakes_it(socks, monkeypatch):
    h = bridge.start(profile(socks))
    t0 = time.monotonic()
    assert bridge.poll_outbound(h, 8, 0.2) == []
    assert time.monotonic() - t0 >= 0.19        # it waited (a lower bound: no machine is too slow for it)
    # stop() wakes a poll that would wait 60 s: the thread is let in, stop()
    # follows; once the poll has its tunnel, the tunnel's closing ends its
    # wait (before or during it), so this is not a race
    polling = threading.Event()
    real_poll = bridge._Tunnel.poll

    def poll(self, max_packets, timeout):
        polling.set()
        return real_poll(self, max_packets, timeout)

    monkeypatch.setattr(bridge._Tunnel, "poll", poll)
    woke = []
    th = threading.Thread(target=lambda: woke.append(bridge.poll_outbound(h, 8, 60)))
    th.start()
    assert polling.wait(10)
    bridge.stop(h)
    th.join(30)                                 # a deadline, far below the poll's own 60 s
    assert not th.is_alive() and woke == [[]]


def test_concurrent_submitters(socks):
    """8 host threads at once: each runs its own TCP echo and also sprays junk;
    every packet is accounted for and every conversation completes."""
    out = {}
    lock = threading.Lock()

    def cb(packets, protocols):
        for p, proto in zip(packets, protocols):
            if not is_tcp(p):
                continue
            seg = parse_packet(p)
            with lock:
                q = out.get(seg.dport)
            if q is not None:
                q.put((p, proto))

    h = bridge.start(profile(socks), cb)
    errors = []
    n_threads, junk_batches = 8, 50

    def worker(i):
        try:
            family = 4 if i % 2 else 6
            sport = 42000 + i
            q = queue.Queue()
            with lock:
                out[sport] = q

            class _H(Host):
                def __init__(self):
                    self.af6, self.out, self.poll_mode, self.handle = 30, q, False, h
            host = _H()
            rnd = random.Random(i)
            junk = [bytes([0x45]) + rnd.randbytes(rnd.randrange(0, 60)) for _ in range(20)]
            tunnel = bridge._get(h)
            for _ in range(junk_batches):
                bridge.submit_inbound_batch(h, junk, [2] * len(junk))
                # pace like a host whose reads are bounded: the queue never overflows,
                # so the TCP packets below are never the ones dropped
                while tunnel.stats["rx_queued"] > 1000:
                    time.sleep(0.001)
            payload = rnd.randbytes(2000)
            if tcp_echo(host, family, sport, payload) != payload:
                errors.append(f"thread {i}: echo differs")
        except Exception as e:
            errors.append(f"thread {i}: {e!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        s = settled(h)
        d = s["device"]
        assert d["rx_packets"] >= n_threads * (junk_batches * 20 + 4)
        assert d["rx_queue_full"] == 0
        check_accounting(s)
        assert s["engine"]["tcp_opened"] == n_threads
    finally:
        bridge.stop(h)


def _malformed(rnd: random.Random, i: int):
    """A malformed packet and the protocol a confused host would give it."""
    kind = i % 8
    good = build_packet(4, CLIENT4, SERVER4, 1000 + i % 5000, 80, i, 0, "S", 100)
    good6 = build_packet(6, CLIENT6, SERVER6, 1000 + i % 5000, 80, i, 0, "S", 100)
    if kind == 0:
        return good[: rnd.randrange(0, 40)], 2                 # truncated
    if kind == 1:
        b = bytearray(good)
        b[rnd.randrange(20, len(b))] ^= 0xFF                    # bad TCP checksum
        return bytes(b), 2
    if kind == 2:
        return bytes([0x40 | rnd.randrange(16)]) + rnd.randbytes(rnd.randrange(0, 80)), 2
    if kind == 3:
        return bytes([0x60]) + rnd.randbytes(rnd.randrange(0, 100)), 30
    if kind == 4:
        return good6[: rnd.randrange(0, 60)], 10               # truncated v6
    if kind == 5:
        b = bytearray(good)
        b[2:4] = struct.pack("!H", rnd.randrange(65536))        # total length lies
        return bytes(b), 2
    if kind == 6:
        return good, 30                                         # family disagrees
    return rnd.randbytes(rnd.randrange(1, 64)), rnd.choice([2, 10, 30, 7])


def test_100k_malformed_packets(socks):
    rnd = random.Random(7)
    q = queue.Queue()
    h = bridge.start(profile(socks), lambda p, pr: [q.put(x) for x in zip(p, pr)])
    try:
        total = 100_000
        batch = 500
        pool = [_malformed(rnd, i) for i in range(4000)]
        sent = 0
        while sent < total:
            chunk = [pool[(sent + j) % len(pool)] for j in range(batch)]
            bridge.submit_inbound_batch(h, [p for p, _ in chunk], [pr for _, pr in chunk])
            sent += batch
            # a host that paces itself (as readPackets does): never overflow
            while bridge._get(h).stats["rx_queued"] > 2000:
                time.sleep(0.001)
        s = settled(h)
        d = s["device"]
        assert d["rx_packets"] == total and d["rx_queue_full"] == 0
        assert d["rx_delivered"] > total // 2
        check_accounting(s)
        assert d["rx_family_mismatch"] > 0 and sum(s["stack"]["drops"].values()) > 0
        assert d["engine_errors"] == 0
        assert s["state"] in (state.CONNECTING, state.CONNECTED)
        # the same engine still serves: a real conversation after the flood
        while not q.empty():              # whatever the junk provoked (ICMP errors, RSTs)
            q.get()

        class _H(Host):
            def __init__(self):
                self.af6, self.out, self.poll_mode, self.handle = 30, q, False, h
        assert tcp_echo(_H(), 4, 45000, b"alive") == b"alive"
        assert tcp_echo(_H(), 6, 45001, b"alive6") == b"alive6"
    finally:
        bridge.stop(h)


def open_fds() -> list:
    """What this process has open, by kind (socket, pipe, eventpoll, file path),
    leaving out the directory listing itself."""
    kinds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:          # the listing's own fd, closed by now
            continue
        kinds.append(target.split("[")[0] if ":[" in target else target)
    return sorted(kinds)


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("loop,cycles", [("auto", 100), ("asyncio", 100)])
def test_start_stop_leaks_nothing(socks, loop, cycles):
    cfg = profile(socks)
    ping = build_packet(4, CLIENT4, SERVER4, 999, 80, 1, 0, "S", 100)

    def cycle():
        h = bridge.start(cfg, loop=loop)
        bridge.submit_inbound(h, ping, 2)
        bridge.status(h)
        bridge.stop(h)

    for _ in range(5):                # warm up: imports, caches, first allocations
        cycle()
    gc.collect()
    # the in-test SOCKS server's own sockets (it lives in this process) close
    # when it sees the engine's upstream connections end
    wait_for(lambda: not socks.conns, what="the SOCKS server's connections to end")
    fds = open_fds()
    threads = {t.ident for t in threading.enumerate()}
    rss = _rss_kb()
    for _ in range(cycles):
        cycle()
    gc.collect()
    # the SOCKS server's per-connection threads end on their own; wait for them
    wait_for(lambda: {t.ident for t in threading.enumerate()} <= threads | {socks.thread.ident},
             what="threads to end")
    assert open_fds() == fds
    assert not [t for t in threading.enumerate() if t.name.startswith("tun2xray-bridge")]
    grown = _rss_kb() - rss
    assert grown < 4096, f"RSS grew by {grown} KB over {cycles} start/stop cycles"
    assert bridge.handles() == []


def test_memory_bench_smoke():
    """tools/bench/bridge_mem.py runs, opens every flow and reports figures
    within the targets (idle < 30 MB, < 10 KB per idle TCP flow)."""
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(repo, "tools", "bench", "bridge_mem.py"),
                        "--flows", "300"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "with 300 idle TCP flows" in r.stdout and "tcp_opened=300" in r.stdout


def _ping(seq: int = 1) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x77, seq)
    icmp = icmp[:2] + struct.pack("!H", ck.checksum(icmp)) + icmp[4:]
    ip = _IP4.pack(0x45, 0, 28, 0, 0x4000, 64, 1, 0, CLIENT4, SERVER4)
    return ip[:10] + struct.pack("!H", ck.checksum(ip)) + ip[12:] + icmp


def test_batches_in_one_wakeup_and_out_in_one_callback(socks):
    """A burst submitted while the engine is busy costs one wake-up, and the
    replies to one submitted batch come back in one callback."""
    calls = []
    gate = threading.Event()
    entered = threading.Event()

    def cb(packets, protocols):
        calls.append(list(protocols))
        if len(calls) == 1:
            entered.set()
            gate.wait(10)           # hold the engine thread

    h = bridge.start(profile(socks), cb)
    try:
        bridge.submit_inbound(h, _ping(0), 2)
        assert entered.wait(5)
        before = bridge._get(h).stats["rx_wakeups"]
        for i in range(100):
            bridge.submit_inbound(h, _ping(i + 1), 2)
        assert bridge._get(h).stats["rx_wakeups"] == before + 1
        gate.set()
        wait_for(lambda: sum(map(len, calls)) == 101, what="101 echo replies")
        assert calls[1] == [2] * 100         # one batch in, one callback out
        bridge.submit_inbound_batch(h, [_ping(200 + i) for i in range(8)], [2] * 8)
        wait_for(lambda: len(calls) == 3, what="the next callback")
        assert calls[2] == [2] * 8
    finally:
        gate.set()
        bridge.stop(h)


def test_engine_that_fails_to_start(socks, monkeypatch):
    from tun2xray import engine as engine_mod

    async def boom(self):
        raise RuntimeError("no engine today")

    monkeypatch.setattr(engine_mod.Engine, "run", boom)
    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(bridge.BridgeError, match="no engine today"):
        bridge.start(profile(socks))
    assert {t.ident for t in threading.enumerate()} <= before
    assert bridge.handles() == []


def test_feed_failure_is_counted_and_the_engine_lives_on(socks, hosts, monkeypatch):
    from netstack import Stack
    host = Host(profile(socks))
    hosts.append(host)
    real = Stack.input_batch
    fails = [1]

    def flaky(self, packets, now):
        if fails:
            fails.pop()
            raise RuntimeError("stack bug")
        return real(self, packets, now)

    monkeypatch.setattr(Stack, "input_batch", flaky)
    bridge.submit_inbound(host.handle, _ping(1), 2)
    wait_for(lambda: bridge._get(host.handle).stats["engine_errors"] == 1, what="the error count")
    bridge.submit_inbound(host.handle, _ping(2), 2)
    p, proto = host.next()
    assert proto == 2 and p[20] == 0          # an echo reply: still serving
    assert bridge.status(host.handle)["state"] in (state.CONNECTING, state.CONNECTED)


def test_protocol_must_be_an_int(socks, hosts):
    host = Host(profile(socks), poll=True)
    hosts.append(host)
    bridge.submit_inbound_batch(host.handle, [_ping(1)] * 3, [2.0, "2", True])
    d = settled(host.handle)["device"]
    assert d["rx_bad_protocol"] == 3 and d["rx_delivered"] == 0


def test_engine_that_ends_on_its_own_is_an_error(socks):
    h = bridge.start(profile(socks))
    try:
        t = bridge._get(h)
        t.loop.call_soon_threadsafe(t.engine.stop)       # not through bridge.stop
        t.thread.join(5)
        s = bridge.status(h)
        assert s["state"] == state.ERROR and "on its own" in s["reason"]
        bridge.submit_inbound_batch(h, [_ping(1)] * 3, [2] * 3)
        d = bridge.status(h)["device"]
        assert d["rx_engine_down"] == 3 and d["rx_dropped"] == 3
        with pytest.raises(bridge.BridgeError, match="not running"):
            bridge.reset_flows(h)
    finally:
        bridge.stop(h)                                   # still stops cleanly
    assert bridge.handles() == []


def test_reset_flows(socks, hosts):
    host = Host(profile(socks))
    hosts.append(host)
    assert tcp_echo(host, 4, 46000, b"one") == b"one"
    assert bridge.reset_flows(host.handle) == 1
    rst = host.expect_tcp(lambda s: s.dport == 46000 and s.flags & 0x04)
    assert rst.flags & 0x04
    s = bridge.status(host.handle)
    assert s["engine"]["flows_reset"] == 1
    [f] = s["closed_flows"]
    assert (f["reason"], f["bytes_up"], f["bytes_down"], f["src"]) == ("reset by reset_flows", 3, 3,
                                                                       "198.18.0.1:46000"), f


def test_closed_flows_say_who_closed(socks, hosts):
    """The history names the side that ended each flow, with its bytes."""
    host = Host(profile(socks))
    hosts.append(host)
    src, dst = addrs(4)
    # 46100: echoed, then reset by the client
    assert tcp_echo(host, 4, 46100, b"hello") == b"hello"
    [flow] = [f for f in bridge.status(host.handle)["flows"] if f["src"].endswith(":46100")]
    assert flow["bytes_up"] == 5 and flow["rate_up"] >= 0 and flow["rate_down"] >= 0
    host.send(build_packet(4, src, dst, 46100, 80, 1006, 0, "R", 0), 4)
    # 46101: echoed, then the client sends FIN; the SOCKS server closes in turn
    host.send(build_packet(4, src, dst, 46101, 80, 1000, 0, "S", 65535, tcp_options(mss=1400)), 4)
    synack = host.expect_tcp(lambda s: s.dport == 46101 and s.flags & 0x12 == 0x12)
    rcv = synack.seq + 1
    host.send(build_packet(4, src, dst, 46101, 80, 1001, rcv, "PA", 65535, payload=b"bye!"), 4)
    seg = host.expect_tcp(lambda s: s.dport == 46101 and s.payload)
    assert seg.payload == b"bye!"
    rcv += 4
    host.send(build_packet(4, src, dst, 46101, 80, 1005, rcv, "FA", 65535), 4)
    fin = host.expect_tcp(lambda s: s.dport == 46101 and s.flags & 0x01)
    host.send(build_packet(4, src, dst, 46101, 80, 1006, fin.seq + 1, "A", 65535), 4)

    def closed(port):
        return wait_for(lambda: [f for f in bridge.status(host.handle)["closed_flows"]
                                 if f["src"].endswith(f":{port}")], what=f"flow {port} in the history")

    [f] = closed(46100)
    assert (f["reason"], f["bytes_up"], f["bytes_down"]) == ("client RST", 5, 5), f
    assert f["duration"] >= 0 and f["ended"].endswith("Z") and f["inbound"].startswith("socks5://")
    [f] = closed(46101)
    assert (f["reason"], f["bytes_up"], f["bytes_down"]) == ("client FIN", 4, 4), f


def test_refused_dial_is_in_the_history(hosts):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()                      # nothing listens there now
    host = Host(json.dumps({"proxy": f"socks5://127.0.0.1:{port}"}))
    hosts.append(host)
    src, dst = addrs(4)
    host.send(build_packet(4, src, dst, 46200, 80, 1000, 0, "S", 65535, tcp_options(mss=1400)), 4)
    assert host.expect_tcp(lambda s: s.dport == 46200).flags & 0x04      # RST: refused
    [f] = wait_for(lambda: bridge.status(host.handle)["closed_flows"], what="the refused flow")
    assert f["reason"] == "upstream refused" and f["bytes_up"] == f["bytes_down"] == 0, f
    assert f["detail"].startswith(f"socks5://127.0.0.1:{port}: "), f


def test_state_degraded_while_the_proxy_is_gone():
    """connected -> degraded (with the reason) when the SOCKS server goes,
    connected again when it is back on its port."""
    srv = SocksEcho()
    port = srv.port
    h = bridge.start(json.dumps({"proxy": f"socks5://127.0.0.1:{port}"}))
    try:
        wait_for(lambda: bridge.status(h)["state"] == state.CONNECTED, what="connected")
        srv.close()
        s = wait_for(lambda: (lambda s: s if s["state"] == state.DEGRADED else None)(bridge.status(h)),
                     timeout=15, what="degraded")
        assert s["reason"] == f"proxy 127.0.0.1:{port} unreachable: Connection refused", s["reason"]
        srv = SocksEcho(port)
        s = wait_for(lambda: (lambda s: s if s["state"] == state.CONNECTED else None)(bridge.status(h)),
                     timeout=15, what="connected again")
        assert s["reason"] is None
    finally:
        bridge.stop(h)
        srv.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_stop_with_open_flows_releases_their_sockets(socks, udp_echo, loop):
    """stop() while TCP and UDP flows are open: their upstream sockets close
    before stop returns (the engine process keeps no fd of theirs)."""
    def cycle(i):
        host = Host(profile(socks, udp_echo), loop=loop)
        try:
            assert tcp_echo(host, 4 if i % 2 else 6, 47000 + i, b"x" * 100) == b"x" * 100
            host.send(udp_packet(4, CLIENT4, SERVER4, 7000 + i, 53, b"q"), 4)
            p, _ = host.next()
            assert udp_payload(p) == b"echo:q"
            s = bridge.status(host.handle)
            assert s["stack"]["tcp_flows"] == 1 and s["stack"]["udp_flows"] == 1
        finally:
            bridge.stop(host.handle)

    cycle(0)
    wait_for(lambda: not socks.conns, what="the SOCKS server's connections to end")
    fds = open_fds()
    for i in range(1, 11):
        cycle(i)
    wait_for(lambda: not socks.conns, what="the SOCKS server's connections to end")
    assert open_fds() == fds
