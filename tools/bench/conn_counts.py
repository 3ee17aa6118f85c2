#!/usr/bin/env python3
"""Per-connection counts of one tun2xray worker under wrk's short connections:
system calls (strace -c) or Python function calls (a profile hook started
and stopped by SIGUSR2), each divided by the connections the engine opened
meanwhile (its tcp_opened counter).  Counts, unlike rates, do not move with
the load of a shared machine.

  python3 tools/bench/conn_counts.py syscalls [--repo DIR] [-t 5]
  python3 tools/bench/conn_counts.py calls    [--repo DIR] [-t 5] [--top 40]
  python3 tools/bench/conn_counts.py gc       [--repo DIR] [-t 5]

A BenchLab (plain v2ray SOCKS core, nginx) with one worker on a plain TUN
(offload=0); wrk with ``Connection: close``, 50 clients.  ``calls`` counts
every Python function entered and every C function called from Python in
the worker's main thread (the hook slows the worker down; the counts are
what matter), by file and function; ``gc`` the CPU time the worker spent
in the cyclic garbage collector (gc.callbacks) beside its whole CPU time.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlab  # noqa: E402

# loaded by the worker through PYTHONPATH (sitecustomize runs at start-up)
_HOOK = '''
import os, sys
if os.environ.get("T2X_CONN_COUNTS") and "tun2xray" in " ".join(getattr(sys, "orig_argv", [])):
    import collections, json, signal
    _on = [False]
    _c = collections.Counter()
    def _site(co):
        return os.path.basename(co.co_filename) + ":" + co.co_name
    def _prof(frame, event, arg):
        if _on[0]:
            if event == "call":
                _c[_site(frame.f_code)] += 1
            elif event == "c_call":
                _c["C:" + getattr(arg, "__qualname__", "?") + " <- " + _site(frame.f_code)] += 1
    import gc, time
    _gc = {"t0": 0.0, "cpu": 0.0}
    def _collector(phase, info):
        if _on[0]:
            if phase == "start":
                _gc["t0"] = time.process_time()
            else:
                _c["gc:generation %d" % info["generation"]] += 1
                _c["gc:seconds"] += time.process_time() - _gc["t0"]
    def _toggle(sig, frm):
        if _on[0]:                      # the second signal: stop, write the counts
            _on[0] = False
            _c["cpu:seconds"] = time.process_time() - _gc["cpu"]
            with open(os.environ["T2X_CONN_COUNTS"], "w") as f:
                json.dump(dict(_c), f)
        else:                           # the first: start counting
            _c.clear()
            _gc["cpu"] = time.process_time()
            _on[0] = True
    signal.signal(signal.SIGUSR2, _toggle)
    if os.environ.get("T2X_CONN_COUNTS_GC"):
        gc.callbacks.append(_collector)
    else:
        sys.setprofile(_prof)
'''


def wrk(lab, secs: int, clients: int = 50) -> int:
    r = lab.cli_run(["wrk", "-t1", f"-c{clients}", f"-d{secs}s", "--timeout", "5s", "-H", "Connection: close",
                     f"http://{benchlab.TUN_TARGET}:{benchlab.HTTP_PORT}/"], timeout=secs + 30)
    m = re.search(r"(\d+) requests in", r.stdout.decode(errors="replace"))
    if r.returncode != 0 or not m:
        raise SystemExit(f"wrk failed: {r.stdout.decode(errors='replace')[-300:]}")
    return int(m.group(1))


def opened(lab) -> int:
    return int((lab.status().get("engine") or {}).get("tcp_opened", 0))


def syscalls(lab, worker: int, secs: int) -> None:
    with tempfile.NamedTemporaryFile(suffix=".strace") as out:
        n0 = opened(lab)
        p = subprocess.Popen(["strace", "-f", "-c", "-o", out.name, "-p", str(worker)])
        time.sleep(1)
        wrk(lab, secs)
        p.send_signal(signal.SIGINT)
        p.wait()
        n = opened(lab) - n0
        rows = []
        with open(out.name) as f:
            text = f.read()
        for line in text.splitlines():
            f = line.split()
            if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
                rows.append((int(f[3]), f[-1]))
    print(f"{n} connections; system calls per connection {sum(c for c, _ in rows) / n:.1f}:")
    for c, name in sorted(rows, reverse=True):
        print(f"  {name:<16} {c / n:6.2f}")


def _counted(lab, worker: int, secs: int, out: str):
    n0 = opened(lab)
    os.kill(worker, signal.SIGUSR2)
    wrk(lab, secs)
    os.kill(worker, signal.SIGUSR2)
    benchlab.wait_until(lambda: os.path.exists(out), 10, "the worker's counts")
    n = opened(lab) - n0
    with open(out) as f:
        return n, json.load(f)


def collector(lab, worker: int, secs: int, out: str) -> None:
    n, c = _counted(lab, worker, secs, out)
    gens = ", ".join(f"{k[3:]}: {v}" for k, v in sorted(c.items()) if k.startswith("gc:generation"))
    print(f"{n} connections; the worker's CPU {c['cpu:seconds'] / n * 1e6:.0f} µs per connection, of it "
          f"the collector {c.get('gc:seconds', 0) / n * 1e6:.1f} µs; collections ({gens or 'none'})")


def calls(lab, worker: int, secs: int, out: str, top: int, sites: int = 0) -> None:
    n, c = _counted(lab, worker, secs, out)
    c.pop("cpu:seconds", None)
    total = sum(c.values())
    py = sum(v for k, v in c.items() if not k.startswith("C:"))
    print(f"{n} connections; calls per connection {total / n:.1f}: Python functions {py / n:.1f}, "
          f"C functions {(total - py) / n:.1f}")
    by_file = collections.Counter()
    for k, v in c.items():
        site = k.split(" <- ")[-1] if k.startswith("C:") else k
        by_file[site.split(":")[0]] += v
    print("by the file of the calling or called Python function:")
    for f, v in by_file.most_common(top):
        print(f"  {f:<24} {v / n:7.2f}")
    if sites:
        print("by function (C functions: by the Python function calling them):")
        for k, v in collections.Counter(c).most_common(sites):
            print(f"  {v / n:7.2f}  {k}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="conn_counts", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("syscalls", "calls", "gc"))
    p.add_argument("--repo", default=benchlab.REPO, help="checkout whose tun2xray is counted")
    p.add_argument("-t", "--time", type=int, default=5, help="seconds of wrk (default 5)")
    p.add_argument("--top", type=int, default=30, help="files listed by calls (default 30)")
    p.add_argument("--sites", type=int, default=0, help="calls: also list this many functions by calls")
    p.add_argument("--prefix", default="cp", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as hook_dir:
        out = os.path.join(hook_dir, "counts.json")
        if args.what != "syscalls":
            with open(os.path.join(hook_dir, "sitecustomize.py"), "w") as f:
                f.write(_HOOK)
            os.environ["PYTHONPATH"] = hook_dir
            os.environ["T2X_CONN_COUNTS"] = out
            if args.what == "gc":
                os.environ["T2X_CONN_COUNTS_GC"] = "1"
        with benchlab.BenchLab(prefix=args.prefix, repo=args.repo, workers=1) as lab:
            pid = lab.start_tunnel(query="offload=0", workers=1)
            worker = benchlab.process_tree(pid)[-1]
            wrk(lab, 1)             # warm: the first connections pay for imports and caches
            if args.what == "syscalls":
                syscalls(lab, worker, args.time)
            elif args.what == "gc":
                collector(lab, worker, args.time, out)
            else:
                calls(lab, worker, args.time, out, args.top, args.sites)
    return 0


if __name__ == "__main__":
    sys.exit(main())
