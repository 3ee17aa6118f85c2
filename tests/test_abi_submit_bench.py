"""Smoke test of tools/bench/abi_submit.py: the real library built from
this checkout, its C harness compiled and run both ways (back to back and
paced); every figure is a real measurement of the packets it sent (the
harness waits until the stack has counted each one). Never asserts speeds."""

from __future__ import annotations

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "tools", "bench", "abi_submit.py")


def test_abi_submit_reports_both_modes():
    r = subprocess.run([sys.executable, BENCH, "--repo", REPO, "-n", "400", "--rounds", "1", "--gap-us", "20"],
                       capture_output=True, text=True, timeout=280, check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    rows = re.findall(r"^(\S+)\s+(back to back|paced)\s+(\d+\.\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)$", r.stdout, re.M)
    assert [row[1] for row in rows] == ["back to back", "paced"], out
    for _, mode, host, process, wakeups in rows:
        assert 0 <= float(host) <= float(process) and float(process) > 0, out
        # paced: the engine sleeps between packets, so nearly each one wakes it
        assert float(wakeups) > (0.5 if mode == "paced" else 0), out
