#!/usr/bin/env python3
"""CPU per packet a C host spends submitting through libtun2xray.

A small C program (below) starts a handle (plain asyncio, as on iOS and
Android: uvloop is kept out), submits N well-formed IPv4 packets the stack
drops at once (protocol 99) with t2x_submit_inbound, waits until the stack
has counted them all, and prints the submitting thread's CPU per packet,
the whole process's (the engine thread's share included) and the engine's
wake-ups.  Back to back (the engine takes many per wake-up) and paced (a
pause after each packet, so each one wakes the engine, as a client's ACKs
do in a download).  Checkouts are interleaved; the medians are printed:

    python3 tools/bench/abi_submit.py --repo /path/before --repo /path/after [-n 20000] [--rounds 3]

Needs a C compiler and the Python headers (tools/install.sh --abi); no root.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import benchlab  # noqa: E402

HARNESS = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "tun2xray.h"

static void on_out(void *c, const uint8_t *const *p, const size_t *l, const int32_t *f, size_t n)
{ (void)c; (void)p; (void)l; (void)f; (void)n; }

static double now(clockid_t id) { struct timespec t; clock_gettime(id, &t); return t.tv_sec + t.tv_nsec / 1e9; }

static long field(const char *json, const char *key)
{
    const char *q = strstr(json, key);
    return q ? atol(q + strlen(key)) : -1;
}

int main(int argc, char **argv)
{
    int n = atoi(argv[1]), gap_us = atoi(argv[2]);
    uint8_t pkt[32] = { 0x45, 0, 0, 32, 0, 0, 0, 0, 64, 99, 0, 0, 10, 0, 0, 1, 10, 0, 1, 1 };
    unsigned s = 0;
    for (int i = 0; i < 20; i += 2)
        s += pkt[i] << 8 | pkt[i + 1];
    s = (s & 0xffff) + (s >> 16);
    s = ~((s & 0xffff) + (s >> 16)) & 0xffff;
    pkt[10] = s >> 8;
    pkt[11] = s & 0xff;
    int32_t h = t2x_start("{\"proxy\": \"socks5://127.0.0.1:9\", \"trust_checksums\": true}", on_out, NULL);
    if (h <= 0) {
        fprintf(stderr, "t2x_start: %s\n", t2x_last_error());
        return 1;
    }
    static char reply[1 << 16];
    double p0 = now(CLOCK_PROCESS_CPUTIME_ID), t0 = now(CLOCK_THREAD_CPUTIME_ID), gap = 0;
    for (int i = 0; i < n; i++) {
        while (t2x_submit_inbound(h, pkt, sizeof pkt, 2) == T2X_QUEUE_FULL)
            usleep(100);
        if (gap_us) {           /* a pause that costs this thread nothing: the engine takes the packet */
            double g0 = now(CLOCK_THREAD_CPUTIME_ID);
            usleep(gap_us);
            gap += now(CLOCK_THREAD_CPUTIME_ID) - g0;
        }
    }
    double t1 = now(CLOCK_THREAD_CPUTIME_ID);
    for (;;) {
        t2x_message(h, "{\"op\":\"status\"}", reply, sizeof reply);
        if (field(reply, "\"rx_queued\":") == 0 && field(reply, "\"rx_delivered\":") == n)
            break;
        usleep(1000);
    }
    double p1 = now(CLOCK_PROCESS_CPUTIME_ID);
    printf("host_us=%.3f process_us=%.3f wakeups=%ld\n", (t1 - t0 - gap) / n * 1e6,
           (p1 - p0 - gap) / n * 1e6, field(reply, "\"rx_wakeups\":"));
    return t2x_stop(h) == T2X_OK ? 0 : 1;
}
"""


def build(repo: str, out: str) -> str:
    env = dict(os.environ, PYTHONPATH=repo)
    r = subprocess.run([sys.executable, "-m", "tun2xray.abi", "build", "--out", out], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    if r.returncode != 0:
        raise SystemExit(f"abi_submit: building libtun2xray in {repo} failed: {r.stderr.strip()}")
    src = os.path.join(out, "harness.c")
    with open(src, "w") as f:
        f.write(HARNESS)
    exe = os.path.join(out, "harness")
    r = subprocess.run(["cc", "-O2", "-o", exe, src, "-I", out, "-L", out, "-ltun2xray", f"-Wl,-rpath,{out}"],
                       capture_output=True, text=True, timeout=120, check=False)
    if r.returncode != 0:
        raise SystemExit(f"abi_submit: compiling the harness failed: {r.stderr.strip()}")
    return exe


def run(exe: str, env: dict, n: int, gap_us: int) -> dict:
    r = subprocess.run([exe, str(n), str(gap_us)], env=env, capture_output=True, text=True, timeout=600,
                       check=False)
    m = re.search(r"host_us=(\S+) process_us=(\S+) wakeups=(\S+)", r.stdout)
    if r.returncode != 0 or not m:
        raise SystemExit(f"abi_submit: the harness failed: {r.stdout}{r.stderr}")
    return {"host": float(m[1]), "process": float(m[2]), "wakeups": int(m[3])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="abi_submit", description=__doc__.split("\n", 1)[0])
    p.add_argument("--repo", action="append", required=True, help="a checkout (repeatable: interleaved)")
    p.add_argument("-n", type=int, default=20000, help="packets per run (default 20000)")
    p.add_argument("--gap-us", type=int, default=50, help="the paced runs' pause after each packet (default 50)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="abi-submit-") as tmp:
        exes, envs, res = {}, {}, {}
        for i, repo in enumerate(args.repo):
            out = os.path.join(tmp, str(i))
            os.makedirs(out)
            exes[repo] = build(os.path.abspath(repo), out)
            envs[repo] = benchlab.embedded_env(out, os.path.abspath(repo))
        for _ in range(args.rounds):
            for repo in args.repo:
                for mode, n, gap in (("back to back", args.n, 0), ("paced", args.n // 4, args.gap_us)):
                    res.setdefault((repo, mode), []).append(run(exes[repo], envs[repo], n, gap))
    print(f"{'checkout':<40} {'mode':<13} {'host thread µs/pkt':>19} {'process µs/pkt':>15} {'wake-ups/pkt':>13}")
    for (repo, mode), rs in res.items():
        n = args.n if mode == "back to back" else args.n // 4
        med = {k: statistics.median(r[k] for r in rs) for k in ("host", "process", "wakeups")}
        print(f"{repo:<40} {mode:<13} {med['host']:>19.2f} {med['process']:>15.2f} {med['wakeups'] / n:>13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
