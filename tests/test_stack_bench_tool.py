"""tools/bench/stack_bench.py's connection runs close every connection they
open, on its compressed clock and on the --rate clock with the real timer
lengths (TIME_WAIT, connect timeout), for this checkout and through --repo.
Never asserts speeds."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "tools", "bench", "stack_bench.py")


@pytest.mark.parametrize("extra", [[], ["--rate", "2000"], ["--rate", "500", "--repo", REPO]])
def test_connection_runs_close_every_connection(extra):
    r = subprocess.run([sys.executable, BENCH, "--bytes", "0", "--conns", "400", *extra],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "only" not in r.stderr, r.stderr            # "conns: only N/M connections closed"
    assert re.search(r"conns_per_s=\d+", r.stdout.splitlines()[-1]), r.stdout


def test_stack_counts_counts_netstack_of_the_given_checkout():
    tool = os.path.join(REPO, "tools", "bench", "stack_counts.py")
    r = subprocess.run([sys.executable, tool, "--repo", REPO, "--conns", "100", "--top", "5"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    m = re.search(r"per connection in netstack: ([\d.]+) bytecodes, ([\d.]+) Python calls", r.stdout)
    assert m and float(m.group(1)) > 1000 and float(m.group(2)) > 10, r.stdout
    assert "netstack/tcp/demux.py:tcp_input" in r.stdout
