"""End to end through the bridge API: tools/reference_host.py (a Linux stand-in
for a NEPacketTunnelProvider: TUN reads in batches, Darwin family numbers,
callback or poll output) in the lab's client namespace, real curl / dig /
iperf3 as clients, the lab's real cores and servers behind it.

Own lab (prefix "br": br-cli, br-srv, brv0/brv1, TUN brtun0), so it runs
beside the other e2e tests' lab.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import pytest

import netlab
from netlab import DNS4, DNS6, IPERF_PORT, TARGET4, TARGET6

pytestmark = pytest.mark.e2e

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TUN = "brtun0"
PROFILE = {
    "proxy": f"socks5://127.0.0.1:{netlab.SOCKS_PORT}",
    "mtu": 1500,
    "ipv4": {"address": "198.18.0.1/15"},
    "ipv6": {"address": "fd00:7478::1/64"},
    "rules": [{"network": "udp", "port": 53, "to": f"dokodemo://127.0.0.1:{netlab.DOKODEMO_PORT}"}],
}


@pytest.fixture(scope="module")
def brlab():
    if os.geteuid() != 0:
        pytest.skip("e2e tests need root (network namespaces, veth, TUN); CI runs them as root")
    lab = netlab.Lab(prefix="br", files={"small.bin": (300_000, 1)})
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


@pytest.fixture(scope="module", params=["callback", "poll"])
def refhost(request, brlab):
    lab = brlab
    mode = request.param
    name = f"refhost-{mode}"
    cfg = os.path.join(lab.workdir, "bridge-profile.json")
    with open(cfg, "w") as f:
        json.dump(PROFILE, f)
    status_file = os.path.join(lab.workdir, f"{name}.status.json")
    argv = [sys.executable, os.path.join(REPO, "tools", "reference_host.py"), "--tun", TUN,
            "--config", cfg, "--status-file", status_file, "--log-level", "debug"]
    if mode == "poll":
        argv.append("--poll")
    p = lab.cli_popen(name, argv, cwd=REPO)
    try:
        netlab.wait_until(lambda: p.poll() is not None or netlab.link_exists(lab.cli_ns, TUN),
                          15, f"{TUN} to appear")
        assert p.poll() is None, f"reference host exited with {p.returncode}" + host_log(lab, name)
        lab.route_via(TUN)
        netlab.wait_until(lambda: (read_status(status_file) or {}).get("state") == "connected",
                          15, "the bridge to report connected")
    except BaseException:
        lab.stop(name)
        lab.unroute()
        raise
    yield lab, name, status_file
    lab.stop(name)
    lab.unroute()
    # the final status the host printed on its way out (SIGTERM -> bridge.stop)
    final = read_status(status_file)
    assert final is not None, host_log(lab, name)
    h = final["host"]
    assert h["mode"] == mode
    assert h["tx_family_mismatch"] == 0, h
    assert h["rx_packets"] > 0 and h["tx_packets"] > 0
    d = final["device"]
    assert d["rx_family_mismatch"] == 0 and d["rx_bad_protocol"] == 0 and d["rx_queue_full"] == 0
    assert d["rx_packets"] == d["rx_delivered"] + d["rx_queued"] + d["rx_dropped"]
    assert d["tx_callback_errors"] == 0 and d["engine_errors"] == 0
    assert not netlab.link_exists(lab.cli_ns, TUN), "the TUN outlived its host"


@pytest.mark.deadline(120)
@pytest.mark.parametrize("v6", [False, True])
def test_curl_download(refhost, v6):
    lab, name, _ = refhost
    _, size, sha = lab.files["small.bin"]
    r = lab.cli_run(["curl", "-sS", "--fail", "--max-time", "30", lab.url("small.bin", v6)], timeout=40)
    assert r.returncode == 0, r.stderr.decode() + host_log(lab, name)
    assert len(r.stdout) == size and hashlib.sha256(r.stdout).hexdigest() == sha


@pytest.mark.deadline(120)
def test_curl_upload(refhost):
    lab, name, _ = refhost
    path, size, sha = lab.files["small.bin"]
    r = lab.cli_run(["curl", "-sS", "--fail", "--max-time", "30", "-T", path, lab.upload_url(True)],
                    timeout=40)
    assert r.returncode == 0, r.stderr.decode() + host_log(lab, name)
    assert r.stdout.decode().split() == [sha, str(size)]


@pytest.mark.deadline(60)
@pytest.mark.parametrize("server,qtype,want", [(DNS4, "A", TARGET4), (DNS6, "AAAA", TARGET6)])
def test_dig_through_dokodemo_rule(refhost, server, qtype, want):
    """udp/53 goes to the dokodemo inbound (fixed target: the lab's dnsmasq),
    over IPv4 and IPv6 alike: the answer comes back from the address asked."""
    lab, name, status_file = refhost
    r = lab.cli_run(["dig", f"@{server}", "+short", "+tries=2", "+time=3", "web.e2.test", qtype],
                    timeout=20)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode() + host_log(lab, name)
    assert r.stdout.decode().split() == [want]
    log = lab.log(name)
    assert f"dokodemo://127.0.0.1:{netlab.DOKODEMO_PORT}" in log


@pytest.mark.deadline(90)
def test_iperf3_short(refhost):
    lab, name, _ = refhost
    r = lab.cli_run(["iperf3", "-c", TARGET4, "-p", str(IPERF_PORT), "-t", "2", "-J"], timeout=40)
    assert r.returncode == 0, r.stdout.decode()[-2000:] + r.stderr.decode() + host_log(lab, name)
    res = json.loads(r.stdout)
    sent = res["end"]["sum_sent"]["bytes"]
    got = res["end"]["sum_received"]["bytes"]
    assert sent > 1_000_000 and got > 0.9 * sent, (sent, got)
    print(f"iperf3 through the bridge ({name}): {res['end']['sum_received']['bits_per_second'] / 1e6:.1f} Mbit/s")


@pytest.mark.deadline(60)
def test_status_while_running(refhost):
    lab, name, status_file = refhost
    # some traffic, then the host's status file shows it, with the shared shape
    assert lab.cli_run(["curl", "-sS", "--fail", "--max-time", "10", lab.url("small.bin")],
                       timeout=20).returncode == 0
    # the host rewrites its status file now and then: wait for one that shows the flow
    netlab.wait_until(lambda: ((read_status(status_file) or {}).get("engine") or {}).get("tcp_opened", 0) >= 1,
                      10, "a status file that shows the curl's flow")
    s = read_status(status_file)
    assert s["state"] == "connected" and s["reason"] is None
    for key in ("since", "uptime", "device", "stack", "engine", "udp_associations", "flows"):
        assert key in s
    assert s["engine"]["tcp_opened"] >= 1
    assert s["stack"]["rx_packets"] == s["device"]["rx_delivered"]
