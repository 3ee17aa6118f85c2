"""Smoke test of tools/bench/e2e_bench.py: the whole bench in --quick mode.

Runs the real thing (namespaces, veth, TUN, tun2xray, v2ray, iperf3, wrk,
nginx) with 1-second runs, then checks that every figure of the final line is
a real measurement (no nan: a failed measurement makes the bench exit 1),
that the ratio table was printed, and that nothing was left behind. A second
test interrupts a run and checks the clean-up. Never asserts speeds.
Namespace prefix ``ebt`` (not the bench's default ``eb``, so a bench run by
hand at the same time is not disturbed).
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.e2e

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "tools", "bench", "e2e_bench.py")
PREFIX = "ebt"
KEYS = ("up1500_Gbps", "down1500_Gbps", "up9000_Gbps", "down9000_Gbps", "cps",
        "udp_loss_pct", "rss_idle_MB", "rss_1000_MB", "pss_idle_MB", "pss_1000_MB", "cps_1w",
        "plain_up1500_Gbps", "plain_down1500_Gbps", "plain_up4064_Gbps", "plain_down4064_Gbps")


def _netns_left() -> list[str]:
    return [ns for ns in (f"{PREFIX}-cli", f"{PREFIX}-srv")
            if os.path.exists(f"/var/run/netns/{ns}")]


@pytest.fixture
def root():
    if os.geteuid() != 0:
        pytest.skip("the bench needs root (network namespaces, veth, TUN); CI runs it as root")
    yield
    # whatever happened, leave no namespace (and so no process in it) behind
    for ns in _netns_left():
        for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                  text=True).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_quick_bench_reports_every_figure(root):
    r = subprocess.run([sys.executable, BENCH, "--quick", "--prefix", PREFIX],
                       capture_output=True, text=True, timeout=240)
    out = r.stdout
    assert r.returncode == 0, f"bench exit {r.returncode}\n{out[-3000:]}\n{r.stderr[-2000:]}"
    last = out.strip().splitlines()[-1]
    assert last.startswith("e2e_bench: "), last
    figures = dict(kv.split("=", 1) for kv in last.split()[1:])
    assert tuple(figures) == KEYS
    vals = {k: float(v) for k, v in figures.items()}
    for k, v in vals.items():
        assert not math.isnan(v), f"{k} is nan\n{out}"
    for k in KEYS:
        if k != "udp_loss_pct":
            assert vals[k] > 0, f"{k}={vals[k]}"
    # PSS counts pages shared by the processes of the tree once: never above RSS
    assert vals["pss_idle_MB"] <= vals["rss_idle_MB"] and vals["pss_1000_MB"] <= vals["rss_1000_MB"]
    assert 0 <= vals["udp_loss_pct"] <= 100
    # the table: each throughput row has direct, tunnel, ratio, and cpu-s/GB
    rows = [ln for ln in out.splitlines() if re.match(r"\s+tcp (up|down) ", ln)]
    # 1500: default and one worker 1 stream x2 and -P 4 x2, plain 1 stream x2;
    # 4064: plain 1 stream x2; 9000: default 1 stream x2
    assert len(rows) == 14, out
    for ln in rows:
        direct, tunnel, ratio, t2x_cpu, v2_cpu = (float(x) for x in ln.split()[-5:])
        assert direct > 0 and tunnel > 0
        assert ratio == pytest.approx(tunnel / direct, rel=0.02)
        assert t2x_cpu > 0 and v2_cpu > 0
    for name in ("wrk direct", "wrk tun2xray default", "wrk tun2xray 1 worker", "wrk tun2xray 2 workers",
                 "python direct", "python socks", "python tunnel"):
        assert re.search(rf"{name}\s+[\d.]+/s", out), name
    m = re.search(r"with (\d+) idle TCP connections.*status lists (\d+) flows", out)
    assert m and int(m.group(1)) == 1000 and int(m.group(2)) >= 1000, out
    assert not _netns_left()


def test_interrupted_bench_cleans_up(root):
    p = subprocess.Popen([sys.executable, BENCH, "--quick", "--prefix", PREFIX],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # wait until the tunnel is up and measuring, then interrupt
        deadline = time.monotonic() + 60
        for line in p.stdout:
            if line.startswith("memory of the whole process tree"):
                break
            assert time.monotonic() < deadline, "bench did not start measuring"
        else:
            pytest.fail(f"bench ended early: {p.wait()} {p.stderr.read()[-2000:]}")
        assert len(_netns_left()) == 2
        p.send_signal(signal.SIGTERM)
        rc = p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert rc == 130, p.stderr.read()[-2000:]
    assert not _netns_left()


def test_tunnel_that_cannot_start_is_reported_not_hidden(root, tmp_path):
    # a checkout whose tun2xray exits at once: the bench must say so, print
    # nan figures, exit 1 and still clean up
    pkg = tmp_path / "tun2xray"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "cli.py").write_text("import sys\nprint('broken on purpose', file=sys.stderr)\n"
                                "sys.exit(3)\n")
    r = subprocess.run([sys.executable, BENCH, "--quick", "--prefix", PREFIX,
                        "--repo", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout
    assert "tun2xray default at MTU 1500: FAILED" in out and "tun2xray default at MTU 9000: FAILED" in out, out
    assert "memory tun2xray default: FAILED" in out, out
    assert "broken on purpose" in out
    last = out.strip().splitlines()[-1]
    figures = dict(kv.split("=", 1) for kv in last.split()[1:])
    assert tuple(figures) == KEYS and all(v == "nan" for v in figures.values()), last
    assert not _netns_left()
