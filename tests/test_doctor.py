"""tun2xray.doctor pieces that need no namespace: target parsing, the DNS
query it sends, inbound probes and the report lines (the whole doctor runs
against real setups in tests/e2e/test_xray_e2e.py)."""

import io
import socket
import struct
import threading

import pytest

from tun2xray import doctor, xray


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
    def socks(c):
        c.recv(16)
        c.sendall(b"\x05\x00")
    s = _server(socks)
    ib = xray.Inbound(0, "socks", "socks", "127.0.0.1", s.getsockname()[1], frozenset({"tcp"}))
    assert doctor._probe_inbound(ib, 2.0) is None
    s.close()

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
