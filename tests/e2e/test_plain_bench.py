"""Smoke test of tools/bench/plain_bench.py: one round of 1-second runs
through a real TUN, v2ray and iperf3. Checks that each run is a real
measurement and that the medians line names the checkout; never asserts
speeds. Namespace prefix "pbt"."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.deadline(200)
def test_plain_bench_quick(root):
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "bench", "plain_bench.py"), "-t", "1",
                        "--rounds", "1", "--prefix", "pbt"], capture_output=True, text=True, timeout=180)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    for word in ("down", "up"):
        assert re.search(rf"^round 1 {re.escape(REPO)} {word}: \d+\.\d+ Gbit/s \d+\.\d+ CPU-s/GB", r.stdout,
                         re.M), out[-3000:]
    final = r.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"plain_bench: {re.escape(REPO)} down=\d+\.\d+,\d+\.\d+ up=\d+\.\d+,\d+\.\d+",
                        final), final
    assert not any(os.path.exists(f"/var/run/netns/pbt-{side}") for side in ("cli", "srv"))
