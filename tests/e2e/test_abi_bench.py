"""Smoke test of tools/bench/abi_bench.py: one MTU, 1-second runs, the real
hosts (tools/abi_host.c and tools/reference_host.py), v2ray and iperf3.
Checks that every figure is a real measurement (no nan), that both hosts
ran both ways, and that nothing is left behind. Never asserts speeds.
Namespace prefix "abt" (TUN abttun0)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.deadline(300)
def test_abi_bench_quick(root):
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "bench", "abi_bench.py"), "-t", "1",
                        "--mtu", "1500", "--prefix", "abt"], capture_output=True, text=True, timeout=280,
                       env=dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    for host in ("reference_host", "abi_host"):
        for word in ("up", "down"):
            assert re.search(rf"^\s+{word}\s+{host}\s+\d+\.\d+\s+\d+\.\d+$", r.stdout, re.M), out[-3000:]
    final = r.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"abi_bench: up1500_ratio=\d+\.\d+ down1500_ratio=\d+\.\d+ cpu1500_ratio=\d+\.\d+",
                        final), final
    assert not any(os.path.exists(f"/var/run/netns/abt-{side}") for side in ("cli", "srv"))
