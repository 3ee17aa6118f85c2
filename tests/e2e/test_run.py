"""Acceptance tests for `tun2xray run` through a real TUN in the lab.

In e2-cli: TUN e2tun0 held by `python3 -m tun2xray.cli run` (socks5 to the
local core, udp:53 mapped to its dokodemo-door inbound), the targets
(10.99.0.0/24, fd99::/64) routed through e2tun0, and ordinary clients (curl,
dig, iperf3, Python sockets). The local core carries everything over VLESS
on the veth to the far core in e2-srv, which reaches the real servers.

Nothing in e2-cli can reach a target except through the TUN (see
test_lab.py::test_targets_unreachable_without_proxy), so every pass here
went through netstack and the engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time

import pytest

import netlab
from netlab import (CLOSED_PORT, DNS4, DNS6, ECHO_PORT, IPERF_PORT, LATE_PORT, TARGET4,
                    TARGET6)

pytestmark = pytest.mark.e2e

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TUN = "e2tun0"
CTL = "/tmp/e2-ctl.sock"
RUN = [sys.executable, "-m", "tun2xray.cli", "run", "--device", f"tun://{TUN}",
       "--proxy", "socks5://127.0.0.1:10808", "--map", "udp:53=dokodemo://127.0.0.1:10853",
       "--address", "198.18.0.1/15", "--address6", "fd00:7478::1/64",
       "--control", f"unix://{CTL}"]
ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
# Every test that uses the running engine runs in two modes: TUN offloads
# on with two workers forked from the zygote (the default on four cores and
# up; two cores default to one process) and the plain path (?offload=0, one
# process: what a Darwin-like device gets).
MODES = {"offload-workers": ("", "2"), "plain-single": ("?offload=0", "1")}


# --- helpers ---------------------------------------------------------------

def engine_log(lab, grep=()) -> str:
    """The engine's warnings and errors, lines mentioning ``grep`` words, and
    the tail of its log, for failure messages."""
    text = lab.log("tun2xray")
    lines = text.splitlines()
    notable = [ln for ln in lines if " info " not in ln and " debug " not in ln or any(g in ln for g in grep)]
    return ("\n--- tun2xray log: notable lines ---\n" + "\n".join(notable[-60:]) +
            "\n--- tun2xray log: tail ---\n" + text[-2000:])


def recv_n(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 16))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def recv_all(sock: socket.socket) -> bytes:
    buf = bytearray()
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return bytes(buf)
        buf += chunk


def cli_socket(lab, family=socket.AF_INET, type=socket.SOCK_STREAM, timeout=10.0):
    """A socket in e2-cli (its traffic to the targets goes through the TUN)."""
    with lab.in_cli():
        s = socket.socket(family, type)
    s.settimeout(timeout)
    return s


def cli_connect(lab, addr, timeout=10.0):
    fam = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    s = cli_socket(lab, fam, timeout=timeout)
    try:
        s.connect(addr)
    except BaseException:
        s.close()
        raise
    return s


def echo_once(lab, addr, payload: bytes, timeout=10.0) -> bytes:
    with cli_connect(lab, addr, timeout) as s:
        s.sendall(payload)
        return recv_n(s, len(payload))


def udp_roundtrip(lab, u: socket.socket, payload: bytes, addr, what="datagram"):
    """Send one datagram and expect it echoed from ``addr`` (no retry)."""
    u.sendto(payload, addr)
    try:
        data, src = u.recvfrom(65535)
    except (TimeoutError, socket.timeout):
        pytest.fail(f"{what}: no echo within {u.gettimeout()}s" + engine_log(lab))
    assert data == payload, what + engine_log(lab)
    assert src[:2] == addr, src


def ended(sock: socket.socket, timeout: float) -> tuple[bool, str]:
    """Wait up to ``timeout`` for the peer to end the flow (FIN or RST)."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(1 << 16)
    except ConnectionResetError:
        return True, "reset"
    except (TimeoutError, socket.timeout):
        return False, "still open"
    return data == b"", "eof" if data == b"" else f"data {data[:20]!r}"


def start_engine(lab):
    query, workers = MODES[lab.t2x_mode]
    argv = [a + query if a == f"tun://{TUN}" else a for a in RUN]
    env = dict(ENV)
    if workers is not None:
        env["TUN2XRAY_WORKERS"] = workers
    return lab.run_tun2xray(argv, TUN, env=env, describe=lambda: engine_log(lab))


@pytest.fixture(scope="module", params=list(MODES))
def engine_mod(lab, request):
    lab.t2x_mode = request.param
    start_engine(lab)
    yield lab
    lab.stop("tun2xray")
    lab.unroute()


@pytest.fixture
def t2x(engine_mod, core_up):
    """tun2xray running, core up. An engine that dies during a test fails
    that test (at teardown); the next test then gets a fresh one."""
    lab = engine_mod
    p = lab.procs.get("tun2xray")
    if p is None or p.poll() is not None:
        lab.stop("tun2xray")
        p = start_engine(lab)
    yield lab
    if lab.procs.get("tun2xray") is p and p.poll() is not None:
        pytest.fail(f"tun2xray exited with {p.returncode} during this test" + engine_log(lab))


# --- bulk transfers ----------------------------------------------------------

@pytest.mark.deadline(240)
def test_download_50m(t2x):
    lab = t2x
    _, size, sha = lab.files["50M.bin"]
    t0 = time.monotonic()
    r = lab.cli_run(["curl", "-sS", "--fail", "--max-time", "200", lab.url("50M.bin")],
                    timeout=220)
    dt = time.monotonic() - t0
    assert r.returncode == 0, r.stderr.decode() + engine_log(lab)
    assert len(r.stdout) == size
    assert hashlib.sha256(r.stdout).hexdigest() == sha
    print(f"download 50 MB: {dt:.2f} s, {size / dt / 1e6:.1f} MB/s")


@pytest.mark.deadline(240)
def test_upload_50m(t2x):
    lab = t2x
    path, size, sha = lab.files["50M.bin"]
    t0 = time.monotonic()
    r = lab.cli_run(["curl", "-sS", "--fail", "--max-time", "200", "-T", path,
                     lab.upload_url()], timeout=220)
    dt = time.monotonic() - t0
    assert r.returncode == 0, r.stderr.decode() + engine_log(lab)
    assert r.stdout.decode().split() == [sha, str(size)]
    print(f"upload 50 MB: {dt:.2f} s, {size / dt / 1e6:.1f} MB/s")


# --- many connections ----------------------------------------------------------

@pytest.mark.deadline(120)
def test_200_concurrent_connections(t2x):
    lab = t2x
    n, size = 200, 32_768
    socks = [cli_socket(lab, timeout=60) for _ in range(n)]
    barrier = threading.Barrier(n, timeout=60)
    results = [None] * n

    def one(i):
        s = socks[i]
        port = "?"
        try:
            s.connect((TARGET4, ECHO_PORT))
            port = s.getsockname()[1]
            barrier.wait()                      # all 200 are established at once
            payload = hashlib.sha256(b"conn%d" % i).digest() * (size // 32)
            s.sendall(payload)
            got = recv_n(s, len(payload))
            results[i] = True if got == payload else f"{len(got)} bytes, equal prefix " \
                f"{os.path.commonprefix([got, payload]).__len__()}"
        except Exception as e:
            results[i] = f"{e!r} on local port {port}"
        finally:
            s.close()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    bad = [(i, r) for i, r in enumerate(results) if r is not True]
    ports = [f":{str(r).rsplit(' ', 1)[-1]} " for _, r in bad[:5]]
    assert not bad, f"{len(bad)} of {n} failed, e.g. {bad[:5]}" + engine_log(lab, ports)


# --- TCP semantics -----------------------------------------------------------

def test_half_close_reply_still_arrives(t2x):
    # the client sends its request and its FIN; the reply comes after that.
    # (The core never forwards the FIN, NOTES.md, so the server replies on its own.)
    lab = t2x
    n = 1_000_000
    with cli_connect(lab, (TARGET4, LATE_PORT), timeout=20) as s:
        s.sendall(b"%d\n" % n)
        s.shutdown(socket.SHUT_WR)
        got = recv_all(s)
    assert got == netlab.late_reply_payload(n), f"{len(got)} bytes" + engine_log(lab)


def test_half_close_echo_after_fin(t2x):
    lab = t2x
    payload = os.urandom(200_000)
    with cli_connect(lab, (TARGET4, ECHO_PORT), timeout=20) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        assert recv_n(s, len(payload)) == payload


@pytest.mark.parametrize("target", [TARGET4, TARGET6])
def test_closed_port_refused_within_5s(t2x, target):
    # the socks inbound of this core says "success" and then closes when the
    # far side is refused (NOTES.md); the client must learn it promptly, and
    # as a refusal/reset rather than a hang or a polite EOF.
    lab = t2x
    t0 = time.monotonic()
    s = cli_socket(lab, socket.AF_INET6 if ":" in target else socket.AF_INET, timeout=5)
    outcome = None
    try:
        s.connect((target, CLOSED_PORT))
        s.settimeout(max(0.1, 5 - (time.monotonic() - t0)))
        data = s.recv(100)
        outcome = "eof" if data == b"" else f"data {data!r}"
    except ConnectionRefusedError:
        outcome = "refused"
    except ConnectionResetError:
        outcome = "reset"
    except (TimeoutError, socket.timeout):
        outcome = "timeout"
    finally:
        s.close()
    dt = time.monotonic() - t0
    assert outcome in ("refused", "reset"), f"{outcome} after {dt:.2f}s" + engine_log(lab)
    assert dt < 5


# --- DNS through the dokodemo mapping --------------------------------------

def dig(lab, *args):
    r = lab.cli_run(["dig", "+time=2", "+tries=2", "+short", *args], timeout=15)
    return r.returncode, r.stdout.decode().split()


@pytest.mark.parametrize("qtype,want", [("A", TARGET4), ("AAAA", TARGET6)])
def test_dig_through_dokodemo(t2x, qtype, want):
    assert dig(t2x, f"@{DNS4}", "web.e2.test", qtype) == (0, [want])


def test_dig_any_server_address_goes_to_the_mapped_inbound(t2x):
    # nothing listens on 10.99.0.77 or fd99::77: an answer proves udp/53 went
    # to the dokodemo inbound (whose fixed target is 10.99.0.53), not to socks
    assert dig(t2x, "@10.99.0.77", "web.e2.test", "A") == (0, [TARGET4])
    assert dig(t2x, "@fd99::77", "web.e2.test", "AAAA") == (0, [TARGET6])


def test_dig_over_tcp_via_socks(t2x):
    # tcp/53 is not mapped: it rides SOCKS CONNECT to the real server
    assert dig(t2x, "+tcp", f"@{DNS4}", "dns.e2.test", "A") == (0, [DNS4])
    assert dig(t2x, "+tcp", f"@{DNS6}", "dns.e2.test", "AAAA") == (0, [DNS6])


# --- UDP through SOCKS UDP ASSOCIATE -----------------------------------------

@pytest.mark.parametrize("target", [TARGET4, TARGET6])
def test_udp_echo(t2x, target):
    # no retries: the first datagram of a flow must not be lost while the
    # association is being set up. Sizes stay below the ~2 KB v2ray 4.34 carries.
    lab = t2x
    fam = socket.AF_INET6 if ":" in target else socket.AF_INET
    with cli_socket(lab, fam, socket.SOCK_DGRAM, timeout=5) as u:
        for i, size in enumerate((1, 100, 512, 1200, 1400, 64, 1)):
            udp_roundtrip(lab, u, bytes([i]) * size, (target, ECHO_PORT), f"datagram {i}")


def test_udp_many_flows(t2x):
    lab = t2x
    # UDP promises no delivery: like any UDP client (a resolver, say) each
    # flow sends again when its answer does not come; every flow must answer
    # within three tries (the first datagram of a flow also opens its
    # association through both cores, where one may be lost)
    socks = [cli_socket(lab, socket.AF_INET, socket.SOCK_DGRAM, timeout=3) for _ in range(20)]
    try:
        for i, u in enumerate(socks):
            u.sendto(b"flow %d" % i, (TARGET4, ECHO_PORT))
        for i, u in enumerate(socks):
            for attempt in range(3):
                try:
                    got = u.recvfrom(100)[0]
                    break
                except (TimeoutError, socket.timeout):
                    u.sendto(b"flow %d" % i, (TARGET4, ECHO_PORT))
            else:
                pytest.fail(f"flow {i}: no echo after three tries" + engine_log(lab))
            assert got == b"flow %d" % i
    finally:
        for u in socks:
            u.close()


# --- IPv6 --------------------------------------------------------------------

def test_ipv6_http_and_echo(t2x):
    lab = t2x
    _, _, sha = lab.files["small.bin"]
    r = lab.cli_run(["curl", "-sS", "--fail", "--max-time", "20", lab.url("small.bin", v6=True)],
                    timeout=30)
    assert r.returncode == 0, r.stderr.decode() + engine_log(lab)
    assert hashlib.sha256(r.stdout).hexdigest() == sha
    payload = os.urandom(2_000_000)
    assert echo_once(lab, (TARGET6, ECHO_PORT), payload, timeout=30) == payload


# --- iperf3 ------------------------------------------------------------------

@pytest.mark.deadline(60)
@pytest.mark.parametrize("reverse", [False, True], ids=["upload", "download"])
def test_iperf3(t2x, reverse):
    lab = t2x
    argv = ["iperf3", "-c", TARGET4, "-p", str(IPERF_PORT), "-t", "3", "-J",
            "--connect-timeout", "5000"] + (["-R"] if reverse else [])
    r = lab.cli_run(argv, timeout=45)
    res = json.loads(r.stdout or b"{}")
    assert r.returncode == 0 and "error" not in res, (res.get("error"), r.stderr.decode()) \
        + (engine_log(lab),)
    got = res["end"]["sum_received"]
    assert got["bytes"] > 0
    print(f"iperf3 {'-R ' if reverse else ''}: {got['bits_per_second'] / 1e6:.1f} Mbit/s")


# --- control API ---------------------------------------------------------------

def status(lab) -> dict:
    r = lab.cli_run([sys.executable, "-m", "tun2xray.cli", "status", "--control",
                     f"unix://{CTL}"], timeout=15)
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)


def test_status_over_control_socket(t2x):
    # `tun2xray status`: counters that move with traffic, and live flows
    lab = t2x
    before = status(lab)
    _, size, _ = lab.files["small.bin"]
    r = lab.cli_run(["curl", "-sS", "--fail", "--max-time", "10", lab.url("small.bin")],
                    timeout=20)
    assert len(r.stdout) == size
    with cli_connect(lab, (TARGET4, ECHO_PORT)) as s:
        s.sendall(b"live")
        assert recv_n(s, 4) == b"live"
        during = status(lab)
    assert during["device"]["tx_bytes"] - before["device"]["tx_bytes"] >= size
    assert during["engine"]["tcp_opened"] - before["engine"]["tcp_opened"] >= 2
    live = [f for f in during["flows"] if f["proto"] == "tcp" and
            f["dst"] == f"{TARGET4}:{ECHO_PORT}"]
    assert live, during["flows"]


# --- the core restarts under us -------------------------------------------------

@pytest.mark.deadline(90)
def test_core_restart_mid_run(t2x):
    lab = t2x
    eng = lab.procs["tun2xray"]
    tcp = cli_connect(lab, (TARGET4, ECHO_PORT))
    dl = cli_connect(lab, (TARGET4, 80))
    udp = cli_socket(lab, socket.AF_INET, socket.SOCK_DGRAM, timeout=3)
    try:
        tcp.sendall(b"before")
        assert recv_n(tcp, 6) == b"before"
        udp_roundtrip(lab, udp, b"before", (TARGET4, ECHO_PORT), "old UDP flow")
        # a 50 MB download in progress: we read 1 MB, then stop reading
        dl.sendall(b"GET /50M.bin HTTP/1.1\r\nHost: e2\r\n\r\n")
        assert len(recv_n(dl, 1 << 20)) == 1 << 20

        lab.restart_local_core()

        # the TCP flows the old core carried end (reset or FIN), they do not hang
        done, how = ended(tcp, 10)
        assert done, f"old echo flow: {how}" + engine_log(lab)
        dl.settimeout(10)
        got = 1 << 20
        try:
            while True:
                chunk = dl.recv(1 << 16)
                if not chunk:
                    break
                got += len(chunk)
        except ConnectionResetError:
            pass
        except (TimeoutError, socket.timeout):
            pytest.fail(f"old download still open after {got} bytes" + engine_log(lab))
        assert got < lab.files["50M.bin"][1], "the download outlived its core"
        assert eng.poll() is None, "tun2xray died with the core" + engine_log(lab)

        # new flows work at once
        assert echo_once(lab, (TARGET4, ECHO_PORT), b"after") == b"after"
        r = lab.cli_run(["curl", "-sS", "--fail", "--max-time", "10", lab.url("small.bin")],
                        timeout=20)
        assert hashlib.sha256(r.stdout).hexdigest() == lab.files["small.bin"][2], \
            r.stderr.decode() + engine_log(lab)
        assert dig(lab, f"@{DNS4}", "web.e2.test", "A") == (0, [TARGET4])
        with cli_socket(lab, socket.AF_INET, socket.SOCK_DGRAM, timeout=5) as u2:
            udp_roundtrip(lab, u2, b"new udp", (TARGET4, ECHO_PORT), "new UDP flow after restart")

        # the old UDP flow (same 5-tuple) recovers once the engine notices its
        # association died with the old core: allow a few seconds, not a whole
        # udp_timeout
        deadline = time.monotonic() + 6
        while True:
            udp.sendto(b"again", (TARGET4, ECHO_PORT))
            try:
                if udp.recvfrom(100)[0] == b"again":
                    break
            except (TimeoutError, socket.timeout):
                pass
            assert time.monotonic() < deadline, "old UDP flow never recovered" + engine_log(lab)
    finally:
        tcp.close()
        dl.close()
        udp.close()


# --- bad input: non-zero exit, one line on stderr, nothing left behind ---------

BAD_TUN = "e2tun9"


def run_bad(lab, *args):
    argv = [sys.executable, "-m", "tun2xray.cli", "run", *args]
    r = lab.cli_run(argv, timeout=20)
    return r.returncode, r.stderr.decode()


def assert_one_line_error(rc, err, needle, lab):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc != 0
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    assert not netlab.link_exists(lab.cli_ns, BAD_TUN), f"{BAD_TUN} left behind"


@pytest.mark.parametrize("device", ["tap://e2tun9", "e2tun9", "tun://e2tun9-name-too-long",
                                    "fd://notanumber"])
def test_bad_device_scheme(lab, device):
    rc, err = run_bad(lab, "--device", device, "--proxy", "socks5://127.0.0.1:10808")
    assert_one_line_error(rc, err, "--device", lab)


@pytest.mark.parametrize("proxy", ["socks5://127.0.0.1", "127.0.0.1:10808",
                                   "socks5://127.0.0.1:99999", "http://127.0.0.1:10808"])
def test_malformed_proxy_url(lab, proxy):
    rc, err = run_bad(lab, "--device", f"tun://{BAD_TUN}", "--proxy", proxy)
    assert_one_line_error(rc, err, "--proxy", lab)


def test_unreachable_proxy_at_start(lab):
    t0 = time.monotonic()
    rc, err = run_bad(lab, "--device", f"tun://{BAD_TUN}", "--proxy", "socks5://127.0.0.1:1")
    assert_one_line_error(rc, err, "unreachable", lab)
    assert time.monotonic() - t0 < 15


@pytest.mark.parametrize("spec", ["udp:53", "udp53=dokodemo://127.0.0.1:10853",
                                  "udp:70000=dokodemo://127.0.0.1:10853",
                                  "sctp:53=dokodemo://127.0.0.1:10853",
                                  "udp:53=ftp://127.0.0.1:10853"])
def test_bad_map(lab, spec):
    rc, err = run_bad(lab, "--device", f"tun://{BAD_TUN}", "--proxy",
                      "socks5://127.0.0.1:10808", "--map", spec)
    assert_one_line_error(rc, err, "--map", lab)


# --- clean shutdown (keep last: it stops the module's engine) ------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_exits_0_and_removes_tun(t2x, sig):
    lab = t2x
    p = lab.procs["tun2xray"]
    # a flow is open while we stop: it must not hold the exit up
    s = cli_connect(lab, (TARGET4, ECHO_PORT))
    try:
        s.sendall(b"x")
        assert recv_n(s, 1) == b"x"
        os.kill(p.pid, sig)
        try:
            rc = p.wait(10)
        except Exception:
            pytest.fail(f"tun2xray did not exit within 10 s of {sig.name}" + engine_log(lab))
    finally:
        s.close()
    assert rc == 0, engine_log(lab)
    assert not netlab.link_exists(lab.cli_ns, TUN), f"{TUN} left behind after exit"
    assert not os.path.exists(CTL), "control socket left behind"
    lab.stop("tun2xray")
