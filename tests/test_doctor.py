"""tun2xray.xray.doctor pieces: target parsing, the DNS query it sends, inbound
probes, the report lines, and the loop check on real marked routes in a
namespace of its own (the whole doctor runs against real setups in
tests/e2e/test_xray_e2e.py)."""

import io
import os
import socket
import struct
import subprocess
import sys
import threading

import pytest

from tun2xray import xray
from tun2xray.xray import autoroute, doctor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import netlab  # (tools/ is not a package)


def test_hostport():
    assert doctor._hostport("10.0.0.1:80") == ("10.0.0.1", 80)
    assert doctor._hostport("[fd00::1]:53") == ("fd00::1", 53)
    for bad in ("10.0.0.1", "example.com:80", "10.0.0.1:0", "10.0.0.1:x", ":80"):
        with pytest.raises(ValueError):
            doctor._hostport(bad)


def test_dns_query_is_a_wellformed_question():
    qid, q = doctor.dns_query("web.e2.test", 28)
    assert struct.unpack_from("!HHHHHH", q) == (qid, 0x0100, 1, 0, 0, 0)
    assert q[12:] == b"\x03web\x02e2\x04test\x00" + struct.pack("!HH", 28, 1)


def test_report_lines_and_counts():
    out = io.StringIO()
    rep = doctor.Report(out)
    rep.ok("tun", "xr0 up")
    rep.fail("loop", "server 1.2.3.4 into xr0", "exclude it")
    assert out.getvalue().splitlines() == ["[PASS] tun: xr0 up",
                                           "[FAIL] loop: server 1.2.3.4 into xr0 -- hint: exclude it"]
    assert (rep.passed, rep.failed) == (1, 1)


def _server(handler):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(4)

    def serve():
        try:
            c, _ = s.accept()
        except OSError:
            return
        with c:
            handler(c)
    threading.Thread(target=serve, daemon=True).start()
    return s


def test_probe_socks_inbound():
    got = []

    def socks(c):
        got.append(c.recv(3))
        c.sendall(b"\x05\x00")
        got.append(c.recv(10))
        c.sendall(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x12\x34")
        got.append(c.recv(1))
    s = _server(socks)
    ib = xray.Inbound(0, "socks", "socks", "127.0.0.1", s.getsockname()[1], frozenset({"tcp"}))
    assert doctor._probe_inbound(ib, 2.0) is None
    s.close()
    # the greeting, then a UDP ASSOCIATE it closes (which the core does not log)
    assert got[:2] == [b"\x05\x01\x00", b"\x05\x03\x00\x01" + bytes(6)]

    silent = _server(lambda c: c.recv(16) and threading.Event().wait(2))
    ib = xray.Inbound(0, "socks", "socks", "127.0.0.1", silent.getsockname()[1], frozenset({"tcp"}))
    assert "no SOCKS5 answer" in doctor._probe_inbound(ib, 0.3)
    silent.close()

    http = _server(lambda c: (c.recv(16), c.sendall(b"HTTP/1.1 400\r\n")))
    ib = xray.Inbound(0, "socks", "socks", "127.0.0.1", http.getsockname()[1], frozenset({"tcp"}))
    assert "not a SOCKS5 answer" in doctor._probe_inbound(ib, 2.0)
    http.close()


def test_probe_dokodemo_udp_inbound():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))
    ib = xray.Inbound(1, "dns", "dokodemo-door", "127.0.0.1", u.getsockname()[1], frozenset({"udp"}))
    assert doctor._probe_inbound(ib, 1.0) is None
    port = u.getsockname()[1]
    u.close()
    ib = xray.Inbound(1, "dns", "dokodemo-door", "127.0.0.1", port, frozenset({"udp"}))
    assert doctor._probe_inbound(ib, 1.0) == "nothing listens on udp"


def test_udp_probe_expects_its_echo():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))

    def echo():
        data, addr = u.recvfrom(2048)
        u.sendto(data, addr)
    threading.Thread(target=echo, daemon=True).start()
    assert doctor._probe("udp", "127.0.0.1", u.getsockname()[1], None, 2.0) is None
    u.close()


# --- the loop check on real routes, in a namespace of its own ------------------

NS = "xn-doctor"
MARK = 0x99


def _ip(*args):
    r = subprocess.run(["ip", "-n", NS, *args], capture_output=True, text=True, timeout=10, check=False)
    assert r.returncode == 0, f"ip {' '.join(args)}: {r.stderr}"


@pytest.fixture
def marked_routes():
    """xn-doctor: TUN xntun0 (main table: 10.232.0.0/24 into it) and a veth
    xnv0 (table 7777: the same prefix via its peer), with a policy rule
    ``fwmark 0x99 lookup 7777`` -- the shape --auto-route gives the core."""
    if os.geteuid() != 0:
        pytest.skip("needs root (a network namespace); CI runs as root")
    import fcntl
    import tempfile
    # one user of the namespace name at a time (two test runs queue here)
    lock = os.open(os.path.join(tempfile.gettempdir(), f"netlab-{NS}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    netlab.delete_netns(NS)
    try:
        subprocess.run(["ip", "netns", "add", NS], check=True, timeout=10)
        _ip("link", "set", "lo", "up")
        _ip("tuntap", "add", "dev", "xntun0", "mode", "tun")
        _ip("link", "add", "xnv0", "type", "veth", "peer", "name", "xnv1")
        _ip("addr", "add", "10.231.0.1/30", "dev", "xnv0")
        for dev in ("xntun0", "xnv0", "xnv1"):
            _ip("link", "set", dev, "up")
        _ip("route", "add", "10.232.0.0/24", "dev", "xntun0")
        _ip("route", "add", "10.232.0.0/24", "via", "10.231.0.2", "dev", "xnv0", "table", "7777")
        _ip("rule", "add", "fwmark", hex(MARK), "lookup", "7777", "priority", "100")
        yield
    finally:
        netlab.delete_netns(NS)
        os.close(lock)


def test_route_dev_follows_the_mark(marked_routes):
    with netlab.netns(NS):
        assert autoroute.route_dev("10.232.0.5") == "xntun0"
        assert autoroute.route_dev("10.232.0.5", mark=MARK) == "xnv0"
        assert autoroute.route_dev("10.232.0.5", mark=MARK + 1) == "xntun0"     # another mark: main


def test_loop_check_on_a_real_auto_route(marked_routes):
    """--auto-route's own rules and table (no server excluded): the core's
    marked sockets go around the TUN, so doctor finds no loop; the same
    server looked up without the mark would be one."""
    _ip("route", "add", "default", "via", "10.231.0.2", "dev", "xnv0")
    cfg = {"outbounds": [{"protocol": "vmess", "settings": {"vnext": [
        {"address": "10.233.0.7", "port": 443, "users": []}]}}]}
    with netlab.netns(NS):
        ar = autoroute.AutoRoute("xntun0", mark=MARK, families=(4,))
        ar.up()
        try:
            assert autoroute.route_dev("10.233.0.7") == "xntun0"
            out = io.StringIO()
            rep = doctor.Report(out)
            doctor.check_loop(rep, "xntun0", cfg, MARK)
            doctor.check_loop(rep, "xntun0", cfg, None)
        finally:
            ar.down()
    lines = out.getvalue().splitlines()
    assert lines[0] == "[PASS] loop: outbound servers go around the TUN: 10.233.0.7:443 via xnv0", lines
    assert lines[1].startswith("[FAIL] loop: outbound server 10.233.0.7:443 is routed into xntun0"), lines
