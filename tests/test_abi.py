"""libtun2xray through its C ABI: the library is built as a user builds it
(python3 -m tun2xray.abi build), then driven through ctypes with the
header's signatures, or by small C programs compiled against the header
(tests/abi_cycle.c).  Behind it: the real engine, a SOCKS5 echo server and
a UDP echo server on loopback (tests/test_bridge.py's)."""

from __future__ import annotations

import ctypes
import json
import os
import queue
import random
import re
import subprocess
import sys
import threading

import pytest
from abi_support import OUT_CB, PROTECT_CB, Abi, build_library, collect, compile_c
from helpers import ACK, RST, SYN, build_packet, parse_packet
from test_bridge import (CLIENT4, CLIENT6, SERVER4, SERVER6, SocksEcho, UdpEcho, udp_packet,
                         udp_payload)

from tun2xray.abi import header as hdr

HERE = os.path.dirname(os.path.abspath(__file__))
OK, QUEUE_FULL = hdr.OK, hdr.QUEUE_FULL
E_HANDLE, E_ARG, E_JSON, E_SHORT = hdr.E_HANDLE, hdr.E_ARG, hdr.E_JSON, hdr.E_SHORT

CONTRACT = """
typedef void (*t2x_outbound_cb)(void *ctx, const uint8_t *const *packets, const size_t *lengths,
                                const int32_t *protocols, size_t count);
typedef int32_t (*t2x_protect_cb)(void *ctx, int32_t fd);
int32_t t2x_start(const char *profile_json, t2x_outbound_cb on_outbound, void *ctx);
int32_t t2x_submit_inbound(int32_t handle, const uint8_t *packet, size_t length, int32_t protocol);
int32_t t2x_submit_inbound_batch(int32_t handle, const uint8_t *const *packets, const size_t *lengths,
                                 const int32_t *protocols, size_t count);
int32_t t2x_poll_outbound(int32_t handle, uint8_t *buf, size_t capacity, int32_t *protocol, int32_t timeout_ms);
int32_t t2x_message(int32_t handle, const char *request_json, char *reply, size_t capacity);
int32_t t2x_set_protect(int32_t handle, t2x_protect_cb protect, void *ctx);
int32_t t2x_stop(int32_t handle);
const char *t2x_last_error(void);
const char *t2x_version(void);
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("abi"))
    return build_library(out)


@pytest.fixture(scope="module")
def abi(built):
    return Abi(built[0])


@pytest.fixture(scope="module")
def servers():
    s, u = SocksEcho(), UdpEcho()
    yield s, u
    s.close()
    u.close()


def profile(servers, **extra) -> bytes:
    socks, udp = servers
    p = {"proxy": f"socks5://127.0.0.1:{socks.port}", "tcp_connect_timeout": 3,
         "rules": [{"network": "udp", "port": 53, "to": f"dokodemo://127.0.0.1:{udp.port}"}]}
    p.update(extra)
    return json.dumps(p).encode()


class Tunnel:
    """One handle, in callback mode (output in a queue) or poll mode."""

    def __init__(self, abi, config: bytes, poll=False):
        self.abi = abi
        self.out = queue.Queue()
        self.resumes = 0
        self.block = None                 # an Event the callback waits on, when set
        self.cb = OUT_CB(self._on_outbound)
        self.poll_mode = poll
        self.handle = abi.start(config, OUT_CB() if poll else self.cb, None)
        assert self.handle > 0, abi.error()

    def _on_outbound(self, ctx, packets, lengths, protocols, count):
        if count == 0:
            self.resumes += 1
            return
        for item in collect(packets, lengths, protocols, count):
            self.out.put(item)
        if self.block is not None:
            self.block.wait(10)

    def next(self, timeout=5.0):
        if self.poll_mode:
            n, pkt, proto = self.abi.poll(self.handle, timeout_ms=int(timeout * 1000))
            assert n > 0, (n, self.abi.error())
            return pkt, proto
        return self.out.get(timeout=timeout)

    def status(self) -> dict:
        n, reply = self.abi.ask(self.handle, b'{"op": "status"}')
        assert n > 0, self.abi.error()
        return json.loads(reply)["status"]

    def stop(self):
        assert self.abi.stop(self.handle) == OK, self.abi.error()


def udp_roundtrip(t: Tunnel, family: int, af6: int, sport: int, payload: bytes) -> int:
    src, dst = (CLIENT4, SERVER4) if family == 4 else (CLIENT6, SERVER6)
    proto = 2 if family == 4 else af6
    pkt = udp_packet(family, src, dst, sport, 53, payload)
    assert t.abi.submit_inbound(t.handle, pkt, len(pkt), proto) == OK, t.abi.error()
    got, got_proto = t.next()
    assert udp_payload(got) == b"echo:" + payload
    return got_proto


# ------------------------------------------------------------------ build

def test_the_header_declares_the_contract(built):
    lib, header = built
    assert os.path.basename(lib) == "libtun2xray.so" and os.path.getsize(lib) > 0
    text = open(header).read()

    def decls(s):
        s = re.sub(r"/\*.*?\*/", "", s, flags=re.S)
        return {re.sub(r"\s+", " ", d).strip() for d in re.findall(r"(?:typedef|int32_t|const char)[^;#]*;", s)}
    assert decls(CONTRACT) <= decls(text)
    for name, value in hdr.CODES.items():
        assert re.search(rf"#define {name}\s+\({value}\)", text), name


def test_a_c_program_compiles_against_the_header_and_links(built, tmp_path):
    lib_dir = os.path.dirname(built[0])
    src = tmp_path / "v.c"
    src.write_text('#include <stdio.h>\n#include "tun2xray.h"\n'
                   'int main(void) { const char *v = t2x_version(), *e0 = t2x_last_error();\n'
                   '  printf("%s|%s|", v, e0); int r = t2x_stop(12345);\n'
                   '  printf("%d|%s\\n", r, t2x_last_error()); return 0; }\n')
    exe = compile_c([str(src)], str(tmp_path / "v"), lib_dir)
    r = subprocess.run([exe], capture_output=True, text=True, timeout=60, env=_no_pythonpath())
    assert r.returncode == 0, r.stderr
    version, error, code, error2 = r.stdout.strip().split("|")
    from tun2xray import __version__
    assert version == f"tun2xray {__version__}" and error == ""
    assert int(code) == E_HANDLE and error2 == "handle 12345: unknown or already stopped"


def test_the_override_variable_is_honoured(built, tmp_path):
    # TUN2XRAY_PYTHONPATH comes first on the embedded sys.path: a tun2xray
    # package there (one that fails to import) is the one the library loads,
    # and the host gets an error code with the reason, not a crash
    lib_dir = os.path.dirname(built[0])
    fake = tmp_path / "override" / "tun2xray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("the override directory was used")\n')
    src = tmp_path / "o.c"
    src.write_text('#include <stdio.h>\n#include "tun2xray.h"\n'
                   'int main(void) { int r = t2x_stop(1); printf("%d|%s\\n", r, t2x_last_error()); '
                   'int h = t2x_start("{}", 0, 0); printf("%d|%s\\n", h, t2x_last_error()); return 0; }\n')
    exe = compile_c([str(src)], str(tmp_path / "o"), lib_dir)
    env = _no_pythonpath()
    env["TUN2XRAY_PYTHONPATH"] = str(tmp_path / "override")
    r = subprocess.run([exe], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    (code, message), (h, message2) = (line.split("|") for line in r.stdout.splitlines())
    assert int(code) == hdr.E_INTERNAL and "TUN2XRAY_PYTHONPATH" in message
    assert int(h) == 0 and "did not load" in message2
    assert "the override directory was used" in r.stderr


def _no_pythonpath() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


# ---------------------------------------------------------- families, modes

@pytest.mark.parametrize("poll", [False, True], ids=["callback", "poll"])
@pytest.mark.parametrize("af6", [30, 10], ids=["darwin", "linux"])
def test_both_family_numberings_both_modes(abi, servers, poll, af6):
    t = Tunnel(abi, profile(servers), poll=poll)
    try:
        assert udp_roundtrip(t, 6, af6, 40000, b"six") == af6
        assert udp_roundtrip(t, 4, af6, 40001, b"four") == 2
        d = t.status()["device"]
        assert d["rx_family_mismatch"] == 0 and d["rx_bad_protocol"] == 0
    finally:
        t.stop()


def test_several_handles_at_once_from_several_threads(abi, servers):
    tunnels = [Tunnel(abi, profile(servers), poll=i % 2 == 1) for i in range(3)]
    errors = []

    def run(t, k):
        try:
            for i in range(20):
                payload = f"h{t.handle}-{i}".encode()
                assert udp_roundtrip(t, 4 if i % 2 else 6, 30, 41000 + k * 100 + i, payload) in (2, 30)
        except BaseException as e:       # reported below, with the handle
            errors.append((t.handle, e))
    threads = [threading.Thread(target=run, args=(t, k)) for k, t in enumerate(tunnels)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    try:
        assert errors == []
        assert len({t.handle for t in tunnels}) == 3
        tunnels[0].stop()
        # the others keep working after one stopped
        assert udp_roundtrip(tunnels[1], 4, 30, 42000, b"still") == 2
        assert udp_roundtrip(tunnels[2], 4, 30, 42001, b"still") == 2
    finally:
        for t in tunnels[1:]:
            t.stop()


def _ip4_unknown_protocol(src_last: int, seq: int) -> bytes:
    """A well-formed IPv4 packet (right header checksum) of protocol 99,
    which the stack counts as unsupported_protocol."""
    hdr = bytearray(b"\x45\x00\x00\x20" + seq.to_bytes(2, "big") + b"\x00\x00\x40\x63\x00\x00"
                    + bytes([10, 0, 0, src_last]) + bytes([10, 0, 1, 1]))
    s = sum(int.from_bytes(hdr[i:i + 2], "big") for i in range(0, 20, 2))
    s = (s & 0xFFFF) + (s >> 16)
    hdr[10:12] = ((~((s & 0xFFFF) + (s >> 16))) & 0xFFFF).to_bytes(2, "big")
    return bytes(hdr) + seq.to_bytes(4, "big") * 3


def test_submits_from_several_threads_into_one_handle_reach_the_stack_once(abi, servers):
    """The inbound queue is C's (a submit never enters Python): packets
    submitted by four host threads at once, singly and in batches, each
    reach the stack exactly once, and the counters add up."""
    t = Tunnel(abi, profile(servers))
    per_thread, errors = 3000, []

    def run(k):
        try:
            pkts = [_ip4_unknown_protocol(k + 1, i) for i in range(per_thread)]
            i = 0
            while i < per_thread:
                if i % 3 == 0:
                    r = abi.submit_inbound(t.handle, pkts[i], len(pkts[i]), 2)
                    assert r in (OK, QUEUE_FULL), (r, abi.error())
                    i += r == OK
                else:
                    n = abi.submit_batch(t.handle, pkts[i:i + 7], [2] * len(pkts[i:i + 7]))
                    assert n >= 0, abi.error()
                    i += n
        except BaseException as e:       # reported below
            errors.append(e)
    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert errors == []
        total = 4 * per_thread
        _wait(lambda: t.status()["device"]["rx_queued"] == 0, "the queue to drain")
        s = t.status()
        d = s["device"]
        assert d["rx_packets"] == total and d["rx_dropped"] == 0
        assert d["rx_delivered"] == total == s["stack"]["rx_packets"]
        assert s["stack"]["drops"]["unsupported_protocol"] == total
        assert 1 <= d["rx_wakeups"] <= total
    finally:
        t.stop()


def _ip4_big(seq: int, size: int = 60000) -> bytes:
    p = bytearray(_ip4_unknown_protocol(7, seq)[:20])
    p[2:4] = size.to_bytes(2, "big")
    p[10:12] = b"\x00\x00"
    s = sum(int.from_bytes(p[i:i + 2], "big") for i in range(0, 20, 2))
    s = (s & 0xFFFF) + (s >> 16)
    p[10:12] = ((~((s & 0xFFFF) + (s >> 16))) & 0xFFFF).to_bytes(2, "big")
    return bytes(p) + bytes(size - 20)


def test_big_bursts_fill_the_queue_and_all_arrive(abi, servers):
    """Bursts of 60,000-byte packets fill the inbound queue's byte bound (a
    prefix is taken, the rest waits for room): round after round (the C
    queue frees its big buffers between them), every packet reaches the
    stack whole."""
    t = Tunnel(abi, profile(servers))
    try:
        sent = 0
        for rnd in range(3):
            rest = [_ip4_big(rnd * 1000 + i) for i in range(300)]   # 18 MB: more than the queue holds
            while rest:
                k = abi.submit_batch(t.handle, rest, [2] * len(rest))
                assert k >= 0, abi.error()
                sent += k
                rest = rest[k:]
                if rest:
                    _wait(lambda r=t.resumes: t.resumes > r or t.status()["device"]["rx_queued"] == 0,
                          "room in the queue")
            _wait(lambda: t.status()["device"]["rx_queued"] == 0, "the queue to drain")
        s = t.status()
        d = s["device"]
        assert sent == 900 == d["rx_packets"] == d["rx_delivered"] == s["stack"]["rx_packets"]
        assert s["stack"]["drops"]["unsupported_protocol"] == 900 and d["rx_queue_full"] == 0
        assert d["rx_bytes"] == 900 * 60000
    finally:
        t.stop()


def test_poll_mode_several_pollers_get_every_packet_once(abi, servers):
    """Poll mode's outbound queue is C's too (a poll never enters Python):
    echoes of both families, polled by three host threads at once, each
    come out exactly once, whole, with their family number; the tx counters
    add up."""
    t = Tunnel(abi, profile(servers), poll=True)
    want = {}
    for i in range(150):
        family = 4 if i % 2 else 6
        payload = f"p{i}-".encode() * (1 + i % 40)
        want[b"echo:" + payload] = 2 if family == 4 else 10
        assert udp_roundtrip(t, family, 10, 45000 + i, payload) in (2, 10)   # opens each flow
    got, lock, stop = [], threading.Lock(), threading.Event()

    def poller():
        while not stop.is_set():
            n, pkt, proto = abi.poll(t.handle, timeout_ms=50)
            if n > 0:
                with lock:
                    got.append((udp_payload(pkt), proto))
    threads = [threading.Thread(target=poller) for _ in range(3)]
    try:
        for th in threads:
            th.start()
        for i in range(150):                      # again, now all at once
            family = 4 if i % 2 else 6
            src, dst = (CLIENT4, SERVER4) if family == 4 else (CLIENT6, SERVER6)
            payload = f"p{i}-".encode() * (1 + i % 40)
            pkt = udp_packet(family, src, dst, 45000 + i, 53, payload)
            assert abi.submit_inbound(t.handle, pkt, len(pkt), 2 if family == 4 else 10) == OK
        _wait(lambda: len(got) >= 150, "150 echoes polled")
        stop.set()
        for th in threads:
            th.join(10)
        assert sorted(got) == sorted(want.items())
        d = t.status()["device"]
        assert d["tx_queued"] == 0 and d["tx_dropped"] == 0
        assert d["tx_packets"] == 300 and d["tx_bytes"] > 0
    finally:
        stop.set()
        t.stop()


# ------------------------------------------------------- misuse, bad input

def test_stale_and_unknown_handles_are_error_codes(abi, servers):
    t = Tunnel(abi, profile(servers))
    t.stop()
    pkt = udp_packet(4, CLIENT4, SERVER4, 1, 53, b"x")
    for h in (t.handle, 0, -7, 2**31 - 1):
        assert abi.submit_inbound(h, pkt, len(pkt), 2) == E_HANDLE
        assert "unknown or already stopped" in abi.error() or "handle" in abi.error()
        assert abi.submit_batch(h, [pkt], [2]) == E_HANDLE
        assert abi.poll(h)[0] == E_HANDLE
        assert abi.ask(h, b'{"op":"status"}')[0] == E_HANDLE
        if h != 0:                       # 0: the default for later handles
            assert abi.set_protect(h, PROTECT_CB(lambda c, fd: 0), None) == E_HANDLE
        assert abi.stop(h) == E_HANDLE and abi.error()


def test_null_pointers_and_short_buffers(abi, servers):
    assert abi.start(None, OUT_CB(), None) == 0 and abi.error() == "profile_json is NULL"
    t = Tunnel(abi, profile(servers), poll=True)
    try:
        h = t.handle
        assert abi.submit_inbound(h, None, 20, 2) == E_ARG and abi.error() == "packet is NULL"
        assert abi.submit_inbound_batch(h, None, None, None, 3) == E_ARG and "NULL" in abi.error()
        assert abi.submit_inbound_batch(h, None, None, None, 0) == 0
        pkts = (ctypes.c_char_p * 2)(b"\x45" + bytes(19), None)
        lens = (ctypes.c_size_t * 2)(20, 20)
        protos = (ctypes.c_int32 * 2)(2, 2)
        assert abi.submit_inbound_batch(h, pkts, lens, protos, 2) == E_ARG and abi.error() == "packets[1] is NULL"
        big = b"\x45" + bytes(39)
        assert abi.submit_inbound(h, big, 1 << 40, 2) == E_ARG and "longer than any IP packet" in abi.error()
        lens_big = (ctypes.c_size_t * 2)(20, 65576)
        pkts2 = (ctypes.c_char_p * 2)(big, big)
        assert abi.submit_inbound_batch(h, pkts2, lens_big, protos, 2) == E_ARG
        assert abi.error() == "lengths[i] 65576 is longer than any IP packet (65575)"
        assert abi.poll_outbound(h, None, 100, None, 0) == E_ARG and abi.error() == "buf is NULL"
        assert abi.poll(h, timeout_ms=-1)[0] == E_ARG
        assert abi.lib.t2x_message(h, None, None, 0) == E_ARG
        assert abi.lib.t2x_message(h, b'{"op":"status"}', None, 10) == E_ARG and abi.error() == "reply is NULL"
        # a reply longer than the buffer: cut, NUL-terminated, full length returned
        req = b'{"op":"reset_flows"}'
        full, whole = abi.ask(h, req)
        assert whole == b'{"ok":true,"reset":0}' and full == len(whole)
        assert abi.ask(h, req, capacity=0) == (full, None)
        n, cut = abi.ask(h, req, capacity=10)
        assert n == full and cut == whole[:9]
        assert abi.ask(h, req, capacity=full + 1) == (full, whole)
        # a packet bigger than the poll buffer stays queued
        payload = b"p" * 300
        pkt = udp_packet(4, CLIENT4, SERVER4, 43000, 53, payload)
        assert abi.submit_inbound(h, pkt, len(pkt), 2) == OK
        n, _, _ = abi.poll(h, capacity=100, timeout_ms=5000)
        assert n == E_SHORT and "stays queued" in abi.error()
        n, got, proto = abi.poll(h, capacity=2048, timeout_ms=0)
        assert n == len(got) == 20 + 8 + 5 + 300 and udp_payload(got) == b"echo:" + payload and proto == 2
        assert abi.poll(h, timeout_ms=0)[0] == 0
    finally:
        t.stop()


@pytest.mark.parametrize("text,why", [
    (b"{", "not valid JSON"),
    (b"[]", "profile"),
    (b'{"proxy": "socks5://127.0.0.1:1", "no_such_key": 1}', "no_such_key"),
    (b'{"proxy": "socks5://127.0.0.1:1", "mtu": "big"}', "mtu"),
    (b"\xff\xfe", "not UTF-8"),
])
def test_bad_profiles_are_refused_with_a_reason(abi, text, why):
    assert abi.start(text, OUT_CB(), None) == 0
    assert why in abi.error()


@pytest.mark.parametrize("req,why", [
    (b"{", "not JSON"), (b"[1]", "JSON object"), (b'{"op": "fly"}', "unknown op"),
    (b'{"nop": 1}', "unknown op"), (b'{"op": "set_log_level", "level": "loud"}', "loud"),
    (b'{"op": "set_log_level"}', "level"), (b"\xff", "UTF-8"),
])
def test_bad_messages_are_error_codes(abi, servers, req, why):
    t = Tunnel(abi, profile(servers))
    try:
        n, _ = abi.ask(t.handle, req)
        assert n == E_JSON and why in abi.error()
    finally:
        t.stop()


def test_malformed_packets_100k(abi, servers):
    rng = random.Random(11)
    t = Tunnel(abi, profile(servers), poll=True)
    try:
        total = 0
        single_bad = 0
        for _ in range(100):
            packets, protos = [], []
            for _ in range(1000):
                kind = rng.randrange(5)
                if kind == 0:
                    p = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 60)))
                elif kind == 1:      # an IPv4 header claiming what it does not hold
                    p = b"\x45" + bytes(rng.randrange(256) for _ in range(rng.randrange(19, 80)))
                elif kind == 2:      # IPv6 sent as IPv4 and the other way
                    p = b"\x60" + bytes(39)
                else:
                    p = b"\x45\x00" + bytes(rng.randrange(256) for _ in range(38))
                packets.append(p)
                protos.append(rng.choice([2, 2, 10, 30, 0, 23, -1]))
            done = 0
            while done < len(packets):        # a full queue takes a prefix: resubmit the rest
                n = abi.submit_batch(t.handle, packets[done:], protos[done:])
                assert n >= 0, abi.error()
                done += n
            total += done
        for p, proto in ((b"\x60" + bytes(39), 2), (b"\x45" + bytes(19), 77)):
            r = abi.submit_inbound(t.handle, p, len(p), proto)
            single_bad += 1
            assert r == E_ARG and "packet dropped" in abi.error()
        assert total == 100_000
        # still serving, and every packet is accounted for
        assert udp_roundtrip(t, 4, 30, 44000, b"alive") == 2
        d = t.status()["device"]
        assert d["rx_packets"] == total + single_bad + 1
        assert d["rx_packets"] == d["rx_delivered"] + d["rx_queued"] + d["rx_dropped"]
        assert d["rx_family_mismatch"] > 0 and d["rx_bad_protocol"] > 0 and d["engine_errors"] == 0
    finally:
        t.stop()


# ------------------------------------------------------------------ messages

def test_message_ops(abi, servers):
    t = Tunnel(abi, profile(servers))
    h = t.handle
    try:
        assert udp_roundtrip(t, 4, 30, 45000, b"flow") == 2
        s = t.status()
        assert s["state"] in ("connecting", "connected") and s["device"]["rx_packets"] == 1
        assert s["stack"]["rx_packets"] == s["device"]["rx_delivered"], s

        def op(req):
            n, reply = abi.ask(h, json.dumps(req).encode())
            assert n > 0, abi.error()
            return json.loads(reply)
        assert op({"op": "network_changed"}) == {"ok": True, "reset": 0}    # the flow's socket is fine
        assert op({"op": "sleep"}) == {"ok": True}
        assert op({"op": "wake"}) == {"ok": True, "reset": 0}
        assert udp_roundtrip(t, 4, 30, 45000, b"after wake") == 2
        assert op({"op": "reset_flows"}) == {"ok": True, "reset": 1}
        assert op({"op": "set_log_level", "level": "debug"}) == {"ok": True, "level": "debug"}
        assert op({"op": "set_log_level", "level": "warning"}) == {"ok": True, "level": "warning"}
        assert t.status()["engine"]["flows_reset"] == 1
    finally:
        t.stop()


# ------------------------------------------------------------------- protect

SYN_WND = 65535


def _syn(dport, sport):
    return build_packet(4, CLIENT4, SERVER4, sport, dport, 1000, 0, "S", SYN_WND)


def test_protect_is_called_for_non_loopback_dials_only(abi, servers):
    # port 80 goes to a SOCKS server at a TEST-NET address; the protect
    # callback refuses it, so the dial fails before any packet leaves
    cfg = json.loads(profile(servers))
    cfg["rules"].append({"network": "tcp", "port": 80, "to": "socks5://192.0.2.1:1080"})
    t = Tunnel(abi, json.dumps(cfg).encode())
    calls = []

    def protect(ctx, fd):
        calls.append((fd, os.path.exists(f"/proc/self/fd/{fd}") and
                      os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")))
        return -1
    cb = PROTECT_CB(protect)
    try:
        assert abi.set_protect(t.handle, cb, None) == OK
        # a loopback dial (the default proxy): no protect call, the client gets its SYN-ACK
        assert abi.submit_inbound(t.handle, _syn(81, 46000), 40, 2) == OK
        seg = parse_packet(t.next()[0])
        assert seg.flags & (SYN | ACK | RST) == SYN | ACK, seg
        assert calls == []
        # a non-loopback dial: protect sees the socket before it connects and refuses it
        assert abi.submit_inbound(t.handle, _syn(80, 46001), 40, 2) == OK
        seg = parse_packet(t.next()[0])
        assert seg.flags & RST, seg
        assert len(calls) == 1 and calls[0][1], calls
        d = t.status()["device"]
        assert d["protect_calls"] == 1 and d["protect_failed"] == 1
        assert t.status()["engine"]["upstream_connect_failed"] == 1
        # NULL removes the hook
        assert abi.set_protect(t.handle, PROTECT_CB(), None) == OK
    finally:
        t.stop()


# ---------------------------------------------------------------- backpressure

def test_a_full_queue_takes_a_prefix_then_signals_room(abi, servers):
    t = Tunnel(abi, profile(servers))
    try:
        # hold the engine thread inside the outbound callback
        t.block = threading.Event()
        assert abi.submit_inbound(t.handle, *_udp(47000, b"hold"), 2) == OK
        pkt, _ = t.out.get(timeout=5)
        assert udp_payload(pkt) == b"echo:hold"
        junk = [b"\x45" + bytes(39)] * 5000           # well-formed family, dropped by the stack
        n = abi.submit_batch(t.handle, junk, [2] * len(junk))
        assert 0 < n < len(junk), n                    # a prefix: the queue's bound
        assert abi.submit_batch(t.handle, junk[n:], [2] * (len(junk) - n)) == 0
        assert abi.submit_inbound(t.handle, junk[0], 40, 2) == QUEUE_FULL
        assert t.resumes == 0
        ev, t.block = t.block, None
        ev.set()
        _wait(lambda: t.resumes >= 1, "the resume signal (on_outbound with count 0)")
        rest = junk[n:]
        while rest:
            k = abi.submit_batch(t.handle, rest, [2] * len(rest))
            assert k >= 0
            rest = rest[k:]
            if rest:
                _wait(lambda r=t.resumes: t.resumes > r, "another resume")
        d = t.status()["device"]
        assert d["rx_queue_full"] == 0               # held back, never dropped
        assert d["rx_packets"] == 1 + len(junk)
        assert d["rx_resumed"] >= 1
    finally:
        if t.block is not None:
            t.block.set()
        t.stop()


def _udp(sport, payload):
    p = udp_packet(4, CLIENT4, SERVER4, sport, 53, payload)
    return p, len(p)


def _wait(pred, what, timeout=10.0):
    ev = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if pred():
            return
        ev.wait(0.01)
    raise AssertionError(f"no {what} within {timeout:g} s")


# ---------------------------------------------------------------- life cycle

def test_stop_start_100_times_without_growth(built, servers, tmp_path):
    """A C program starts and stops a handle 100 times (from two host
    threads in turn, a packet through each), and reports its fds, threads
    and RSS after 10 and after 110 cycles."""
    lib_dir = os.path.dirname(built[0])
    exe = compile_c([os.path.join(HERE, "abi_cycle.c")], str(tmp_path / "abi_cycle"), lib_dir)
    r = subprocess.run([exe, profile(servers).decode(), "10", "100"], capture_output=True, text=True,
                       timeout=600, env=os.environ)
    assert r.returncode == 0, r.stdout + r.stderr
    first, last = (json.loads(line) for line in r.stdout.split())
    assert last["cycles"] == 110 and last["echoes"] == 110, last
    assert last["fds"] == first["fds"], (first, last)
    assert last["threads"] == first["threads"], (first, last)
    assert last["rss_kb"] - first["rss_kb"] < 6 * 1024, (first, last)


def test_the_last_error_is_per_thread(abi):
    # two host threads fail differently at the same time; each reads its own reason
    barrier = threading.Barrier(2)
    seen = {}

    def fail_with(name, call):
        barrier.wait()
        code = call()
        barrier.wait()                # both have failed before either reads
        seen[name] = (code, abi.error())
    a = threading.Thread(target=fail_with, args=("a", lambda: abi.stop(987654)))
    b = threading.Thread(target=fail_with, args=("b", lambda: abi.submit_inbound(1, None, 1, 2)))
    for t in (a, b):
        t.start()
    for t in (a, b):
        t.join(30)
    assert seen["a"] == (E_HANDLE, "handle 987654: unknown or already stopped")
    assert seen["b"] == (E_ARG, "packet is NULL")


def test_a_missing_compiler_is_one_clear_line(tmp_path):
    env = dict(os.environ, CC="/nonexistent/cc")
    env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "tun2xray.abi", "build", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tun2xray.abi: compiling libtun2xray failed"), r.stderr
    assert "/nonexistent/cc" in lines[0] and "tools/install.sh --abi" in lines[0]
    assert not (tmp_path / "libtun2xray.so").exists()


def test_stop_from_the_outbound_callback_is_refused(abi, servers):
    got = []
    box = {}

    def on_outbound(ctx, packets, lengths, protocols, count):
        if count:
            got.append((abi.stop(box["h"]), abi.error()))
    cb = OUT_CB(on_outbound)
    h = box["h"] = abi.start(profile(servers), cb, None)
    assert h > 0, abi.error()
    try:
        pkt, n = _udp(48000, b"stop?")
        assert abi.submit_inbound(h, pkt, n, 2) == OK
        _wait(lambda: got, "the callback")
        assert got[0][0] == hdr.E_STATE and "engine thread" in got[0][1], got
        # the handle still serves
        assert abi.submit_inbound(h, pkt, n, 2) == OK
        _wait(lambda: len(got) >= 2, "a second callback")
    finally:
        assert abi.stop(h) == OK, abi.error()


def test_poll_mode_a_full_queue_and_the_early_poll_return(abi, servers):
    """Poll mode: the engine thread is held inside the protect callback (a
    dial to a non-loopback address), the queue fills, and once the engine
    drains it a waiting t2x_poll_outbound returns 0 early (the resume
    signal), beside the RST of the refused dial."""
    cfg = json.loads(profile(servers))
    cfg["rules"].append({"network": "tcp", "port": 80, "to": "socks5://192.0.2.1:1080"})
    t = Tunnel(abi, json.dumps(cfg).encode(), poll=True)
    release = threading.Event()
    entered = threading.Event()

    def protect(ctx, fd):
        entered.set()
        release.wait(30)
        return -1
    cb = PROTECT_CB(protect)
    results = []
    try:
        assert abi.set_protect(t.handle, cb, None) == OK
        assert abi.submit_inbound(t.handle, _syn(80, 49000), 40, 2) == OK
        assert entered.wait(10), "the protect callback was not called"
        junk = [b"\x45" + bytes(39)] * 5000
        n = abi.submit_batch(t.handle, junk, [2] * len(junk))
        assert 0 < n < len(junk)
        assert abi.submit_inbound(t.handle, junk[0], 40, 2) == QUEUE_FULL

        def poller():
            for _ in range(2):           # a long timeout: only a packet or the resume ends it
                results.append(abi.poll(t.handle, timeout_ms=600_000))
        th = threading.Thread(target=poller)
        th.start()
        release.set()
        th.join(20)
        assert not th.is_alive(), f"a poll did not return (resume missing?): {results}"
        kinds = sorted("resume" if r[0] == 0 else "rst" if parse_packet(r[1]).flags & RST else r for r in results)
        assert kinds == ["resume", "rst"], results
        assert abi.submit_batch(t.handle, junk[n:n + 100], [2] * 100) == 100
        assert t.status()["device"]["rx_resumed"] >= 1
    finally:
        release.set()
        t.stop()


def test_a_default_protect_sees_the_first_socket_of_a_non_loopback_proxy(abi):
    """t2x_set_protect(0, ...) before t2x_start: the engine's very first
    socket (the proxy probe) already goes through it; refused, no packet
    leaves for the TEST-NET proxy, and a client's SYN is answered by a RST."""
    calls = []

    def protect(ctx, fd):
        calls.append(fd)
        return -1
    cb = PROTECT_CB(protect)
    assert abi.set_protect(0, cb, None) == OK
    try:
        t = Tunnel(abi, json.dumps({"proxy": "socks5://192.0.2.1:1080", "tcp_connect_timeout": 3}).encode())
    finally:
        assert abi.set_protect(0, PROTECT_CB(), None) == OK     # later handles: none
    try:
        _wait(lambda: calls, "the probe's protect call")
        assert abi.submit_inbound(t.handle, _syn(443, 49500), 40, 2) == OK
        seg = parse_packet(t.next()[0])
        assert seg.flags & RST, seg
        d = t.status()["device"]
        assert d["protect_calls"] == len(calls) >= 2 and d["protect_failed"] == d["protect_calls"]
    finally:
        t.stop()


def test_a_host_that_dlopens_the_library_locally(built, tmp_path):
    # Java's System.load, Android's loadLibrary and Swift's dlopen load it
    # with RTLD_LOCAL: libpython's symbols must still reach the extension
    # modules Python loads (cffi's backend, uvloop)
    exe = str(tmp_path / "abi_dlopen")
    r = subprocess.run(["cc", "-O2", "-Wall", "-Werror", "-o", exe, os.path.join(HERE, "abi_dlopen.c"), "-ldl"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([exe, built[0], '{"proxy": "socks5://127.0.0.1:9"}'], capture_output=True, text=True,
                       timeout=120, env=_no_pythonpath())
    assert r.returncode == 0, r.stdout + r.stderr
    h, reply, stopped = r.stdout.split()
    assert int(h) > 0 and reply == '{"ok":true,"reset":0}' and stopped == "0"


def test_the_jni_glue_in_the_docs_is_the_file_that_is_run():
    # docs/embedding-c.md shows tools/jni/t2x_jni.c (run by tools/jni/jni_check.py) verbatim
    root = os.path.dirname(HERE)
    with open(os.path.join(root, "docs", "embedding-c.md")) as f:
        doc = f.read()
    with open(os.path.join(root, "tools", "jni", "t2x_jni.c")) as f:
        code = f.read()
    assert "```c\n" + code + "```\n" in doc
