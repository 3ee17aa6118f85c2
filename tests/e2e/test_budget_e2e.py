"""A flood of distinct UDP flows through a real TUN: the table stays at
`max_udp_flows` (least recently used flows evicted), memory stays bounded,
and DNS through the dokodemo rule and a TCP download still work.

Lab prefix "bu" (TUN butun0). The flood goes from e2-cli's sockets through
the TUN, tun2xray, and the local v2ray's socks UDP inbound; that core's
routing sends the flood's prefix (10.98.0.0/16) to a blackhole outbound, as
a user's block rule would, so the flood costs the core one short-lived
link per destination instead of 20,000 connections to the far core. DNS
(dokodemo rule) and HTTP (socks) go through both cores to the real servers.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys

import pytest

import netlab
from netlab import DNS4, TARGET4

pytestmark = pytest.mark.e2e

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TUN = "butun0"
CTL = "/tmp/bu-ctl.sock"
FLOOD_NET = "10.98.0.0/16"
FLOWS = 20_000
SOCKETS = 20                    # client sockets; each sends to FLOWS / SOCKETS destinations
MAX_UDP_FLOWS = 1000
CHUNK = 200                     # datagrams sent before waiting for the engine to take them
# what one UDP flow may cost the engine (stack flow, relay, table entries,
# timer), with a wide margin over the ~1 KB measured; and what the Python
# allocator may keep from 20,000 short-lived flows and the transfers
PER_FLOW = 4096
SLACK = 16 << 20
ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture(scope="module")
def bulab():
    if os.geteuid() != 0:
        pytest.skip("e2e tests need root (network namespaces, veth, TUN); CI runs them as root")
    lab = netlab.Lab(prefix="bu", hop="vless", files={"small.bin": (2 << 20, 7)})
    with lab:
        _core_with_blackhole(lab)
        yield lab
    assert not netlab.netns_exists(lab.cli_ns) and not netlab.netns_exists(lab.srv_ns)


def _core_with_blackhole(lab) -> None:
    """Restart the local core with a routing rule: FLOOD_NET -> blackhole."""
    lab.stop_local_core()
    cfg = netlab.local_core_config(lab.user_id, lab.workdir, lab.hop)
    cfg["outbounds"].append({"tag": "sink", "protocol": "blackhole"})
    cfg["routing"] = {"rules": [{"type": "field", "ip": [FLOOD_NET], "outboundTag": "sink"}]}
    path = lab._write_config("local.json", cfg)
    p = lab.spawn("local-core", lab.cli_ns, netlab.core_cmd(lab.core, path))
    netlab.wait_port(lab.cli_ns, netlab.SOCKS_PORT, "tcp", proc=p)
    netlab.wait_port(lab.cli_ns, netlab.SOCKS_PORT, "udp", proc=p)
    netlab.wait_port(lab.cli_ns, netlab.DOKODEMO_PORT, "udp", proc=p)


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def status() -> dict:
    from tun2xray.control import query
    return query(f"unix://{CTL}")


def log_tail(lab) -> str:
    return "\n--- tun2xray log (tail) ---\n" + lab.log("tun2xray")[-3000:]


def dig(lab):
    r = lab.cli_run(["dig", "+time=2", "+tries=3", "+short", f"@{DNS4}", "web.e2.test", "A"], timeout=20)
    return r.returncode, r.stdout.decode().split()


def download(lab):
    _, size, sha = lab.files["small.bin"]
    r = lab.cli_run(["curl", "-sS", "--fail", "--max-time", "30", lab.url("small.bin")], timeout=40)
    assert r.returncode == 0, r.stderr.decode() + log_tail(lab)
    assert len(r.stdout) == size and hashlib.sha256(r.stdout).hexdigest() == sha


@pytest.fixture
def engine(bulab):
    lab = bulab
    prof = os.path.join(lab.workdir, "bu-profile.json")
    with open(prof, "w") as f:
        json.dump({"proxy": f"socks5://127.0.0.1:{netlab.SOCKS_PORT}", "workers": 1,
                   "max_udp_flows": MAX_UDP_FLOWS,
                   "rules": [{"network": "udp", "port": 53,
                              "to": f"dokodemo://127.0.0.1:{netlab.DOKODEMO_PORT}"}]}, f)
    argv = [sys.executable, "-m", "tun2xray.cli", "run", "--device", f"tun://{TUN}", "--config", prof,
            "--control", f"unix://{CTL}"]
    p = lab.run_tun2xray(argv, TUN, env=ENV)
    try:
        lab.ip(lab.cli_ns, "route", "replace", FLOOD_NET, "dev", TUN)
        yield lab, p
    finally:
        lab.stop("tun2xray")
        lab.unroute()


@pytest.mark.deadline(240)
def test_20000_udp_flows_then_dns_and_a_download_still_work(engine):
    lab, p = engine
    # warm up what a working engine has anyway (a DNS flow, a TCP flow), then the baseline
    assert dig(lab) == (0, [TARGET4]), log_tail(lab)
    download(lab)
    base = rss(p.pid)
    opened0 = status()["engine"].get("udp_opened", 0)
    with lab.in_cli():
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(SOCKETS)]
    try:
        peak = base
        for start in range(0, FLOWS, CHUNK):
            for i in range(start, start + CHUNK):
                dst = f"10.98.{i >> 8 & 0xFF}.{i & 0xFF}"
                socks[i % SOCKETS].sendto(b"flood %d" % i, (dst, 9 + i % 7))
            # wait until the engine has taken all but this last chunk (the TUN's queue holds 500)
            netlab.wait_until(lambda: status()["engine"].get("udp_opened", 0) - opened0 >= start, 20,
                              f"the engine to open {start} flows")
            if start % 2000 == 0:
                peak = max(peak, rss(p.pid))
            assert status()["stack"]["udp_flows"] <= MAX_UDP_FLOWS
        netlab.wait_until(lambda: status()["engine"].get("udp_opened", 0) - opened0 >= FLOWS - CHUNK, 20,
                          "the last flows")
    finally:
        for s in socks:
            s.close()
    st = status()
    opened = st["engine"]["udp_opened"] - opened0
    stack = st["stack"]
    print(f"flood: {opened} UDP flows opened, {stack['udp_evicted']} evicted, table {stack['udp_flows']}; "
          f"RSS baseline {base / 2**20:.1f} MB, peak seen {peak / 2**20:.1f} MB")
    assert opened >= FLOWS - CHUNK, st["stack"]["drops"]
    assert stack["udp_flows"] <= MAX_UDP_FLOWS
    assert stack["udp_evicted"] >= opened - MAX_UDP_FLOWS
    assert stack["drops"].get("flow_limit", 0) == 0
    # DNS through the dokodemo rule and a TCP download through socks, right after the flood
    assert dig(lab) == (0, [TARGET4]), log_tail(lab)
    download(lab)
    after = rss(p.pid)
    # every byte the engine buffered for those flows went back (no accounting leak)
    netlab.wait_until(lambda: status()["stack"]["memory"]["used"] == 0, 10, "buffered bytes back to 0")
    bound = base + MAX_UDP_FLOWS * PER_FLOW + SLACK
    print(f"RSS after DNS and download {after / 2**20:.1f} MB; bound {bound / 2**20:.1f} MB")
    assert max(peak, after) <= bound, (peak, after, bound)
