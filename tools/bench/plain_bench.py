#!/usr/bin/env python3
"""The plain path, checkouts interleaved: iperf3 single stream through
tun2xray on a TUN without offloads (``?offload=0``, one worker: what a
phone's host has), up and down, each checkout in turn, several rounds;
Gbit/s and the worker's CPU-seconds per GB, then the medians.

    python3 tools/bench/plain_bench.py [--repo A --repo B ...] [-t 6] [--rounds 4] [--mtu 1500]

Single runs of a few seconds swing by 20-30% on a shared 2-core machine
(where the client, v2ray and the tunnel land decides much), so a
comparison of two trees interleaves them and reads the medians. The world
is tools/bench/benchlab.py's (prefix "pb"). Needs root; cleans up on exit.

Final line: plain_bench: REPO down=Gbit/s,CPU-s/GB up=... (medians), one per checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import benchlab  # noqa: E402


def one(lab, repo: str, mtu: int, direction: str, secs: int) -> tuple[float, float]:
    """Start tun2xray from repo, one iperf3 run, stop it: (Gbit/s, CPU-s/GB)."""
    pid = lab.start_tunnel(mtu=mtu, query="offload=0", workers=1)
    try:
        worker = benchlab.process_tree(pid)[-1]
        lab.wait_iperf_idle()
        c0 = benchlab.cpu_seconds(worker)
        argv = ["iperf3", "-c", benchlab.TUN_TARGET, "-p", str(benchlab.IPERF_PORT), "-t", str(secs), "-J"]
        r = lab.cli_run(argv + (["-R"] if direction == "down" else []), timeout=secs + 40)
        c1 = benchlab.cpu_seconds(worker)
        rx = json.loads(r.stdout)["end"]["sum_received"]
    finally:
        lab.stop_tunnel()
    gb = rx["bytes"] / 1e9
    return rx["bits_per_second"] / 1e9, (c1 - c0) / gb


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="plain_bench", description=__doc__.split("\n", 1)[0])
    p.add_argument("--repo", action="append", help="checkout to measure (repeatable; default this one)")
    p.add_argument("-t", "--time", type=int, default=6, help="seconds per iperf3 run (default 6)")
    p.add_argument("--rounds", type=int, default=4, help="rounds over every checkout (default 4)")
    p.add_argument("--mtu", type=int, default=1500)
    p.add_argument("--prefix", default="pb", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("plain_bench: needs root (namespaces, veth, TUN)", file=sys.stderr)
        return 2
    repos = [os.path.abspath(r) for r in (args.repo or [benchlab.REPO])]
    got = {(r, d): [] for r in repos for d in ("down", "up")}
    with benchlab.BenchLab(prefix=args.prefix, repo=repos[0], workers=1) as lab:
        lab.set_veth_mtu(max(args.mtu, 1500))
        for n in range(args.rounds):
            for repo in repos:
                for d in ("down", "up"):
                    lab.repo = repo
                    g, c = one(lab, repo, args.mtu, d, args.time)
                    got[(repo, d)].append((g, c))
                    print(f"round {n + 1} {repo} {d}: {g:.2f} Gbit/s {c:.2f} CPU-s/GB "
                          f"(load {os.getloadavg()[0]:.2f})", flush=True)
    for repo in repos:
        parts = []
        for d in ("down", "up"):
            runs = got[(repo, d)]
            parts.append(f"{d}={statistics.median(g for g, _ in runs):.2f},"
                         f"{statistics.median(c for _, c in runs):.2f}")
        print(f"plain_bench: {repo} " + " ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
