"""The soak (tools/soak.py) in short: 75 s of mixed real traffic through
`tun2xray run --xray-config` with its default workers, a killed core and a
`node use` in the middle, in namespaces of its own (prefix ``sk``). The
20-minute run and its figures are in docs/reliability.md.

The growth rule itself is checked on made-up series first: a test of the
judge must be able to fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import soak

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rows(values, step=2.0):
    return [{"t": i * step, "rss_kb": v} for i, v in enumerate(values)]


def test_growth_flags_a_steady_leak_and_spares_a_flat_noisy_series():
    leak = [80_000 + 400 * i for i in range(100)]              # 80 MB, +400 kB per sample
    g = soak.growth(_rows(leak), "rss_kb", warmup_t=20)
    assert g["verdict"] == "grows" and g["late"] > g["bound"], g
    assert g["slope_per_min"] > 0
    flat = [90_000 + (7_000 if i % 17 == 0 else (i * 7919) % 3_000) for i in range(100)]
    g = soak.growth(_rows(flat), "rss_kb", warmup_t=20)
    assert g["verdict"] == "bounded", g
    # a warm-up climb before the judged span is not growth
    warm = [40_000 + 5_000 * i for i in range(10)] + [90_000] * 90
    assert soak.growth(_rows(warm), "rss_kb", warmup_t=20)["verdict"] == "bounded"
    assert soak.growth(_rows([1, 2, 3]), "rss_kb", warmup_t=0)["verdict"] == "too few samples"


@pytest.mark.e2e
@pytest.mark.deadline(170)
def test_short_soak_keeps_every_healthy_byte_and_stays_bounded(root, tmp_path):
    out = tmp_path / "soak.json"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "soak.py"), "--duration", "75",
                        "--interval", "2", "--long-mb", "4", "--long-rate", "262144", "--idle", "10",
                        "--idle-flows", "24", "--grace", "8", "--json", str(out),
                        # two workers: the supervisor and the workers forked from its zygote are soaked too
                        "--workers", "2"],
                       capture_output=True, text=True, timeout=160, env=env, check=False)
    report = r.stdout + r.stderr
    assert r.returncode == 0, report
    d = json.loads(out.read_text())
    assert d["verdict"] == "PASS" and not d["lost"] and not d["corrupt"], report
    assert len(d["samples"]) >= 30 and all(s["status"] for s in d["samples"]), report
    assert all(s["procs"] >= 3 for s in d["samples"]), report       # supervisor + 2 workers
    t = d["traffic"]
    for kind in ("http", "curl", "long", "udp", "udp_new", "dns", "idle"):
        assert t[kind]["ok"] > 0 and t[kind]["ok_after"] > 0, (kind, report)
    # both disruptions happened and cut the idle flows open at the time; those
    # cuts are reported as such (the client saw a RST or FIN), not as losses
    assert [x["name"] for x in d["disruptions"]] == ["core restart", "node use b"], report
    cut = t["idle"]["cut"]
    assert any(k.startswith("core restart") for k in cut) and any(k.startswith("node use b") for k in cut), cut
    assert d["drained"]["tcp"] == 0 and d["drained"]["buffered"] == 0, d["drained"]
    for m in soak.LIMITS:
        assert d["growth"][m]["verdict"] == "bounded", (m, d["growth"][m])


def test_cut_by_attributes_failures_to_the_disruption_that_caused_them():
    restart, switch = soak.Disruption("core restart", 0), soak.Disruption("node use b", 0)
    restart.start, restart.ready = 100.0, 101.0
    switch.start, switch.ready = 160.0, 161.0
    ds = [restart, switch]
    assert soak.cut_by(ds, 90.0, 100.2, 10) is restart          # open at the kill, seen at once
    assert soak.cut_by(ds, 90.0, 118.0, 10) is restart          # a slow reader sees it late
    assert soak.cut_by(ds, 100.5, 105.0, 10) is restart         # dialed while the core was down
    assert soak.cut_by(ds, 100.5, 130.0, 10) is None            # ... but then it had a core
    assert soak.cut_by(ds, 120.0, 150.0, 10) is None            # a healthy flow, lost
    assert soak.cut_by(ds, 90.0, 99.0, 10) is None              # failed before any disruption
    assert soak.cut_by(ds, 120.0, 160.5, 10) is switch
    assert soak.cut_by(ds, 170.0, 175.0, 10) is None
