"""`tun2xray run` rejects bad input with one line on stderr and a non-zero exit."""

import socket
import subprocess
import sys

import pytest


def run_cli(*args, timeout=20):
    return subprocess.run([sys.executable, "-m", "tun2xray", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def listening_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield s.getsockname()[1]
    s.close()


def _closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _one_line_error(r, *needles):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("tun2xray: error:"), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]


def test_malformed_proxy_url(listening_port):
    r = run_cli("run", "--device", "tun://t2xbad0", "--proxy", "socks5://127.0.0.1")
    _one_line_error(r, "--proxy")
    r = run_cli("run", "--device", "tun://t2xbad0", "--proxy", "http://127.0.0.1:8080")
    _one_line_error(r, "--proxy")


def test_unreachable_proxy_at_start():
    r = run_cli("run", "--device", "tun://t2xbad0", "--proxy", f"socks5://127.0.0.1:{_closed_port()}")
    _one_line_error(r, "unreachable")


@pytest.mark.parametrize("spec", ["udp53=dokodemo://127.0.0.1:10853", "udp:70000=dokodemo://127.0.0.1:1",
                                  "sctp:53=dokodemo://127.0.0.1:1", "udp:53=gopher://x:1"])
def test_bad_map(listening_port, spec):
    r = run_cli("run", "--device", "tun://t2xbad0", "--proxy", f"socks5://127.0.0.1:{listening_port}",
                "--map", spec)
    _one_line_error(r, "--map")


def test_unknown_device_scheme(listening_port):
    r = run_cli("run", "--device", "bogus://x", "--proxy", f"socks5://127.0.0.1:{listening_port}")
    _one_line_error(r, "--device")


def test_missing_flag_is_one_line():
    r = run_cli("run", "--proxy", "socks5://127.0.0.1:1")
    _one_line_error(r, "--device")


def test_bad_profile(tmp_path, listening_port):
    prof = tmp_path / "p.json"
    prof.write_text('{"proxy": "socks5://127.0.0.1:1", "rules": [{"port": "70000", "to": "socks5://127.0.0.1:1"}]}')
    r = run_cli("run", "--device", "tun://t2xbad0", "--config", str(prof))
    _one_line_error(r, 'rules[0].port: "70000" is not a port')
    r = run_cli("run", "--device", "tun://t2xbad0", "--config", str(tmp_path / "missing.json"))
    _one_line_error(r, "--config")


def test_status_without_server(tmp_path):
    r = run_cli("status", "--control", f"unix://{tmp_path}/none.sock")
    _one_line_error(r, "cannot reach")
