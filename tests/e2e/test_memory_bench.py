"""Smoke test of tools/bench/memory_bench.py with the C host (--host abi):
libtun2xray and tools/abi_host.c built as the bench builds them, the lab's
real cores and servers, a small burst (one 50 MB download checked by
sha256, 20 idle flows, 10 UDP sessions). Checks that the C host ran
without uvloop, that every flow and the download went through, that the
figures and the verdict line are printed, and that nothing is left
behind. Never asserts a memory figure. Namespace prefix "mbt" (TUN mbttun0).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.deadline(400)
def test_memory_bench_abi_host_quick(root):
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "bench", "memory_bench.py"), "--host", "abi",
                        "--budgets", "16", "--idle-flows", "20", "--downloads", "1", "--udp-sessions", "10",
                        "--prefix", "mbt"], capture_output=True, text=True, timeout=380,
                       env=dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    started = re.search(r"^# bm-abi-16: pid \d+, loaded: (.*)$", r.stdout, re.M)
    assert started and "uvloop" not in started.group(1), out[-3000:]
    row = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("{")))
    assert row["host"] == "abi" and row["budget_mb"] == 16
    assert row["downloads_ok"] == 1, row
    assert 0 < row["idle"] <= row["peak"], row
    assert row["udp"]["echoed"] > 0, row
    final = r.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"memory_bench: host=abi idle16=\d+\.\d budget16_target=(met|missed)", final), final
    assert not any(os.path.exists(f"/var/run/netns/mbt-{side}") for side in ("cli", "srv"))
