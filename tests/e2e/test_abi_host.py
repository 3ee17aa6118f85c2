"""End to end through the C ABI: tools/abi_host.c (a C packet-flow host:
its own TUN, batched reads, Darwin or Linux family numbers, callback or
poll output, protect) built with the system compiler against the header
that `python3 -m tun2xray.abi build` writes, in the lab's client namespace;
real curl / dig / iperf3 / UDP clients; the lab's real cores and servers.

Own lab (prefix "ab": ab-cli, ab-srv, abv0/abv1, TUN abtun0).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys

import pytest

import netlab
from netlab import DNS4, DNS6, ECHO_PORT, IPERF_PORT, TARGET4, TARGET6, VETH_SRV4, VLESS_PORT

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from abi_support import build_library, compile_c  # noqa: E402

pytestmark = pytest.mark.e2e

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TUN = "abtun0"
PROTECT_PORT = 2087      # routed by a rule to the far core's port over the veth: a non-loopback dial
PROFILE = {
    "proxy": f"socks5://127.0.0.1:{netlab.SOCKS_PORT}",
    "mtu": 1500,
    "ipv4": {"address": "198.18.0.1/15"},
    "ipv6": {"address": "fd00:7478::1/64"},
    "rules": [{"network": "udp", "port": 53, "to": f"dokodemo://127.0.0.1:{netlab.DOKODEMO_PORT}"},
              {"network": "tcp", "port": PROTECT_PORT, "to": f"dokodemo://{VETH_SRV4}:{VLESS_PORT}"}],
}
MODES = {"callback-darwin": [], "poll-linux": ["--poll", "--linux-af"]}


@pytest.fixture(scope="module")
def host_exe(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("abi"))
    lib, _ = build_library(out)
    return compile_c([os.path.join(REPO, "tools", "abi_host.c")], os.path.join(out, "abi_host"),
                     os.path.dirname(lib))


@pytest.fixture(scope="module")
def ablab():
    if os.geteuid() != 0:
        pytest.skip("e2e tests need root (network namespaces, veth, TUN); CI runs them as root")
    lab = netlab.Lab(prefix="ab", hop="vless")
    with lab:
        yield lab
    assert not netlab.netns_exists(lab.cli_ns) and not netlab.netns_exists(lab.srv_ns)


def host_log(lab, name) -> str:
    return f"\n--- {name} log (tail) ---\n" + lab.log(name)[-4000:]


def read_status(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def engine_state(path):
    s = read_status(path) or {}
    return ((s.get("reply") or {}).get("status") or {}).get("state")


@pytest.fixture(scope="module", params=list(MODES))
def abihost(request, ablab, host_exe):
    lab = ablab
    mode = request.param
    name = f"abi-host-{mode}"
    cfg = os.path.join(lab.workdir, "abi-profile.json")
    with open(cfg, "w") as f:
        json.dump(PROFILE, f)
    status_file = os.path.join(lab.workdir, f"{name}.status.json")
    argv = [host_exe, "--tun", TUN, "--config", cfg, "--mtu", "1500", "--addr", "198.18.0.1/15",
            "--addr", "fd00:7478::1/64", "--protect", "ok", "--status-file", status_file, *MODES[mode]]
    p = lab.cli_popen(name, argv, cwd=REPO)
    try:
        netlab.wait_until(lambda: p.poll() is not None or netlab.link_exists(lab.cli_ns, TUN),
                          30, f"{TUN} to appear")
        assert p.poll() is None, f"abi_host exited with {p.returncode}" + host_log(lab, name)
        lab.route_via(TUN)
        netlab.wait_until(lambda: engine_state(status_file) == "connected", 20,
                          "the library to report connected")
    except BaseException:
        lab.stop(name)
        lab.unroute()
        raise
    yield lab, name, status_file, mode
    assert lab.stop(name, timeout=40) == 0, host_log(lab, name)
    lab.unroute()
    final = read_status(status_file)
    assert final is not None, host_log(lab, name)
    h = final["host"]
    assert h["mode"] == mode.split("-")[0] and h["af6"] == (10 if "linux" in mode else 30)
    assert h["tx_family_mismatch"] == 0, h
    assert h["rx_packets"] > 0 and h["tx_packets"] > 0 and h["protect_not_socket"] == 0
    d = final["reply"]["status"]["device"]
    assert d["rx_family_mismatch"] == 0 and d["rx_bad_protocol"] == 0 and d["rx_queue_full"] == 0
    assert d["rx_packets"] == d["rx_delivered"] + d["rx_queued"] + d["rx_dropped"]
    assert d["tx_callback_errors"] == 0 and d["engine_errors"] == 0
    assert not netlab.link_exists(lab.cli_ns, TUN), "the TUN outlived its host"


@pytest.mark.deadline(180)
@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_curl_download_50mb(abihost, v6):
    lab, name, _, _ = abihost
    _, size, sha = lab.files["50M.bin"]
    r = lab.cli_run(["sh", "-c", f"curl -sS --fail --max-time 120 {lab.url('50M.bin', v6)} | sha256sum"],
                    timeout=150)
    assert r.returncode == 0, r.stderr.decode() + host_log(lab, name)
    assert r.stdout.decode().split()[0] == sha


@pytest.mark.deadline(180)
@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_curl_upload_50mb(abihost, v6):
    lab, name, _, _ = abihost
    path, size, sha = lab.files["50M.bin"]
    r = lab.cli_run(["curl", "-sS", "--fail", "--max-time", "120", "-T", path, lab.upload_url(v6)],
                    timeout=150)
    assert r.returncode == 0, r.stderr.decode() + host_log(lab, name)
    assert r.stdout.decode().split() == [sha, str(size)]


@pytest.mark.deadline(60)
@pytest.mark.parametrize("server,qtype,want", [(DNS4, "A", TARGET4), (DNS6, "AAAA", TARGET6)])
def test_dig_through_dokodemo_rule(abihost, server, qtype, want):
    lab, name, _, _ = abihost
    r = lab.cli_run(["dig", f"@{server}", "+short", "+tries=2", "+time=3", "web.e2.test", qtype],
                    timeout=20)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode() + host_log(lab, name)
    assert r.stdout.decode().split() == [want]


@pytest.mark.deadline(60)
@pytest.mark.parametrize("target", [TARGET4, TARGET6])
def test_udp_echo(abihost, target):
    lab, name, _, _ = abihost
    fam = socket.AF_INET6 if ":" in target else socket.AF_INET
    with lab.in_cli():
        u = socket.socket(fam, socket.SOCK_DGRAM)
    with u:
        u.settimeout(5)
        for i, size in enumerate((1, 100, 1200, 1400)):
            payload = bytes([i]) * size
            u.sendto(payload, (target, ECHO_PORT))
            data, src = u.recvfrom(65535)
            assert data == payload and src[:2] == (target, ECHO_PORT), host_log(lab, name)


@pytest.mark.deadline(90)
@pytest.mark.parametrize("reverse", [False, True], ids=["up", "down"])
def test_iperf3_both_ways(abihost, reverse):
    lab, name, _, mode = abihost
    argv = ["iperf3", "-c", TARGET4, "-p", str(IPERF_PORT), "-t", "3", "-J"] + (["-R"] if reverse else [])
    r = lab.cli_run(argv, timeout=60)
    assert r.returncode == 0, r.stdout.decode()[-2000:] + r.stderr.decode() + host_log(lab, name)
    res = json.loads(r.stdout)
    sent = res["end"]["sum_sent"]["bytes"]
    got = res["end"]["sum_received"]["bytes"]
    assert sent > 1_000_000 and got <= sent, (sent, got)
    if not reverse:
        assert got > 0.9 * sent, (sent, got)
    # (with -R the server counts what it wrote into its socket when the time
    # is up; up to a few tens of MB of that are still in the two cores' and
    # the sockets' buffers on the way, not lost: the 50 MB tests check bytes)
    assert got > 1_000_000, (sent, got)
    print(f"iperf3 {'down' if reverse else 'up'} through abi_host ({mode}): "
          f"{res['end']['sum_received']['bits_per_second'] / 1e6:.1f} Mbit/s")


@pytest.mark.deadline(60)
def test_protect_sees_non_loopback_dials_only(abihost):
    lab, name, status_file, _ = abihost

    def calls():
        s = read_status(status_file) or {}
        return s["host"]["protect_calls"], s["reply"]["status"]["device"]["protect_calls"]
    # everything before went to loopback inbounds: no protect call
    assert calls() == (0, 0)
    with lab.in_cli():
        c = socket.socket()
    with c:
        c.settimeout(10)
        c.connect((TARGET4, PROTECT_PORT))     # accepted only once the engine's dial connected
    netlab.wait_until(lambda: calls() == (1, 1), 10, "the protect call to show in the status")
    r = lab.cli_run(["curl", "-sS", "--fail", "--max-time", "20", lab.url("small.bin")], timeout=30)
    assert r.returncode == 0, r.stderr.decode() + host_log(lab, name)
    assert hashlib.sha256(r.stdout).hexdigest() == lab.files["small.bin"][2]
    # a status written after the curl: still the one call
    since = os.stat(status_file).st_mtime_ns
    netlab.wait_until(lambda: os.stat(status_file).st_mtime_ns != since, 5, "a fresh status")
    assert calls() == (1, 1)
