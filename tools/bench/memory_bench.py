#!/usr/bin/env python3
"""Memory of a packet-flow host under a burst, with and without memory_budget_mb.

The host (--host) is tools/reference_host.py (python: tun2xray.bridge behind
a Linux TUN, as a Network Extension would drive it) or tools/abi_host.c over
libtun2xray (abi: the C host reads the TUN and calls the C ABI; the engine
runs in the library's embedded Python; built here with `python3 -m
tun2xray.abi build` and cc), both on plain asyncio with no uvloop, as on
iOS, in the two-namespace lab of tools/netlab.py (prefix "bm": a local and a
far v2ray over VLESS, real HTTP/echo servers).  For each budget it reports
the host process's resident memory (VmRSS, MB):

  idle          after one download, one DNS query and one UDP echo
  1000 idle     with 1,000 TCP connections open (each echoed once), idle
  burst peak    VmHWM (reset before) during 8 parallel 50 MB downloads
                (sha256 checked) and 600 UDP sessions echoing all along
  budget peak   the engine's own count of buffered bytes at its highest
  target        idle + budget + 5 MB (the issue's bound for the burst peak)

    python3 tools/bench/memory_bench.py [--host python|abi] [--budgets none,16] [--no-ssl] [--idle-flows 1000]
                                        [--downloads 8] [--udp-sessions 600] [--tcp-buffer-kb N]
                                        [--fixed-mmap-threshold]
    python3 tools/bench/memory_bench.py --imports [--no-ssl]   # what idle RSS is made of

The C host has no Python of its own to set the lean options in, so for it
they are the environment's: --fixed-mmap-threshold sets glibc's
MALLOC_MMAP_THRESHOLD_ (the same setting as tun2xray.lean's), and --no-ssl,
like the absent uvloop, is a module that fails to import, first on the
library's TUN2XRAY_PYTHONPATH (asyncio then runs as on a Python without
OpenSSL).

Needs root (namespaces, TUN) and v2ray on PATH; --host abi also cffi, the
Python headers and cc (tools/install.sh --abi).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tools"))

import netlab  # noqa: E402  (tools/ is not a package)

MB = 1 << 20


def vm(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} for {pid}")


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def abi_env(workdir: str, no_ssl: bool, fixed_mmap: bool) -> dict:
    """The C host's environment: the library finds this checkout, and no
    uvloop (nor ssl with no_ssl) through TUN2XRAY_PYTHONPATH."""
    sys.path.insert(0, HERE)
    from benchlab import embedded_env
    env = embedded_env(workdir, REPO, ("uvloop",) + (("ssl",) if no_ssl else ()))
    if fixed_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 << 10)
    return env


def build_abi(workdir: str) -> str:
    """libtun2xray and tools/abi_host.c, built as abi_bench builds them."""
    sys.path.insert(0, HERE)
    from abi_bench import build_abi_host
    return build_abi_host(REPO, os.path.join(workdir, "abi"))


def python_argv(tun, profile, status_file, no_ssl, fixed_mmap):
    argv = [sys.executable, os.path.join(REPO, "tools", "reference_host.py"), "--tun", tun,
            "--config", profile, "--status-file", status_file, "--loop", "asyncio"]
    if no_ssl:
        argv.append("--no-ssl")
    if fixed_mmap:
        argv.append("--fixed-mmap-threshold")
    return argv


def loaded(pid: int) -> str:
    """Which of uvloop's and ssl's shared objects the process has mapped."""
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read()
    found = [name for name, mark in (("uvloop", "/uvloop/"), ("ssl", "/_ssl."), ("libssl", "/libssl."))
             if mark in maps]
    return ", ".join(found) or "neither uvloop nor ssl"


class Host:
    """One host (python or abi) with a profile; stopped by close()."""

    def __init__(self, lab, budget_mb, no_ssl: bool, tcp_buffer_kb=None, fixed_mmap=False, abi_exe=None):
        self.lab = lab
        self.abi = abi_exe is not None
        self.name = f"bm-{'abi' if self.abi else 'host'}-{budget_mb}"
        self.tun = tun = f"{lab.prefix}tun0"
        prof = {"proxy": f"socks5://127.0.0.1:{netlab.SOCKS_PORT}",
                "rules": [{"network": "udp", "port": 53, "to": f"dokodemo://127.0.0.1:{netlab.DOKODEMO_PORT}"}]}
        if budget_mb is not None:
            prof["memory_budget_mb"] = budget_mb
        if tcp_buffer_kb is not None:
            prof["tcp_buffer_kb"] = tcp_buffer_kb
        self.profile = os.path.join(lab.workdir, f"{self.name}.json")
        with open(self.profile, "w") as f:
            json.dump(prof, f)
        self.status_file = os.path.join(lab.workdir, f"{self.name}.status.json")
        if self.abi:     # the addresses and MTU the reference host takes from the profile's defaults
            argv = [abi_exe, "--tun", tun, "--config", self.profile, "--status-file", self.status_file,
                    "--mtu", "1500", "--addr", "198.18.0.1/15", "--addr", "fd00:7478::1/64"]
            env = abi_env(lab.workdir, no_ssl, fixed_mmap)
        else:
            argv = python_argv(tun, self.profile, self.status_file, no_ssl, fixed_mmap)
            env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = lab.cli_popen(self.name, argv, cwd=REPO, env=env)
        netlab.wait_until(lambda: self.proc.poll() is not None or netlab.link_exists(lab.cli_ns, tun),
                          30, tun)
        if self.proc.poll() is not None:
            raise SystemExit(f"{self.name} exited: {lab.log(self.name)[-2000:]}")
        lab.route_via(tun)
        netlab.wait_until(lambda: (self.status() or {}).get("state") == "connected", 20, "connected")
        print(f"# {self.name}: pid {self.proc.pid}, loaded: {loaded(self.proc.pid)}", flush=True)

    def status(self):
        """The engine's status (abi_host wraps it with its own counters)."""
        st = read_json(self.status_file)
        if self.abi and st is not None:
            st = (st.get("reply") or {}).get("status")
        return st

    def rss(self) -> int:
        return vm(self.proc.pid, "VmRSS")

    def reset_peak(self) -> None:
        with open(f"/proc/{self.proc.pid}/clear_refs", "w") as f:
            f.write("5")                      # resets VmHWM to the current RSS

    def peak(self) -> int:
        return vm(self.proc.pid, "VmHWM")

    def close(self) -> None:
        self.lab.stop(self.name)
        self.lab.unroute()


def cli_socket(lab, kind=socket.SOCK_STREAM):
    with lab.in_cli():
        return socket.socket(socket.AF_INET, kind)


def warm_up(lab) -> None:
    r = lab.cli_run(["curl", "-sS", "--fail", "-o", "/dev/null", lab.url("small.bin")], timeout=30)
    assert r.returncode == 0, r.stderr
    r = lab.cli_run(["dig", "+short", "+time=2", f"@{netlab.DNS4}", "web.e2.test"], timeout=15)
    assert netlab.TARGET4.encode() in r.stdout.split(), r.stdout
    u = cli_socket(lab, socket.SOCK_DGRAM)
    with u:
        u.settimeout(3)
        for _ in range(3):
            u.sendto(b"warm", (netlab.TARGET4, netlab.ECHO_PORT))
            try:
                if u.recvfrom(100)[0] == b"warm":
                    break
            except OSError:
                continue


def idle_flows(lab, host, n: int) -> int:
    """RSS with n idle TCP connections (each echoed once); closes them after."""
    socks = []
    try:
        for i in range(n):
            s = cli_socket(lab)
            socks.append(s)
            s.settimeout(10)
            s.connect((netlab.TARGET4, netlab.ECHO_PORT))
            s.sendall(b"x%d" % i)
            want = b"x%d" % i
            got = b""
            while len(got) < len(want):
                got += s.recv(64)
        netlab.wait_until(lambda: ((host.status() or {}).get("stack") or {}).get("tcp_flows", 0) >= n, 20,
                          "the flows in status")
        return host.rss()
    finally:
        for s in socks:
            s.close()
        netlab.wait_until(lambda: ((host.status() or {}).get("stack") or {}).get("tcp_flows", 1) == 0, 60,
                          "the idle flows to close")


def udp_sessions(lab, n: int, stop: threading.Event, result: dict) -> None:
    socks = [cli_socket(lab, socket.SOCK_DGRAM) for _ in range(n)]
    sent = got = 0
    try:
        for s in socks:
            s.setblocking(False)
        while not stop.is_set():
            for i, s in enumerate(socks):
                try:
                    s.sendto(b"u%05d" % i + bytes(200), (netlab.TARGET4, netlab.ECHO_PORT))
                    sent += 1
                except BlockingIOError:
                    pass
            deadline = time.monotonic() + 0.2
            while time.monotonic() < deadline:
                r, _, _ = select.select(socks, [], [], 0.05)
                for s in r:
                    try:
                        while s.recv(2048):
                            got += 1
                    except BlockingIOError:
                        pass
    finally:
        for s in socks:
            s.close()
        result.update(sent=sent, echoed=got)


def burst(lab, host, downloads: int, sessions: int) -> dict:
    _, size, sha = lab.files["50M.bin"]
    host.reset_peak()
    stop = threading.Event()
    udp = {}
    t = threading.Thread(target=udp_sessions, args=(lab, sessions, stop, udp), daemon=True)
    t.start()
    samples = []
    procs = [subprocess.Popen(["ip", "netns", "exec", lab.cli_ns, "sh", "-c",
                               f"curl -sS --fail --max-time 300 {lab.url('50M.bin')} | sha256sum"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(downloads)]
    t0 = time.monotonic()
    while any(p.poll() is None for p in procs):
        samples.append(host.rss())
        time.sleep(0.05)
    dt = time.monotonic() - t0
    stop.set()
    t.join(10)
    ok = sum(1 for p in procs if p.stdout.read().split()[:1] == [sha.encode()])
    st = host.status() or {}
    mem = (st.get("stack") or {}).get("memory", {})
    return {"peak": host.peak(), "sampled_max": max(samples) if samples else 0, "seconds": dt,
            "downloads_ok": ok, "downloads": downloads, "bytes": downloads * size,
            "udp": udp, "memory": mem,
            "queues": {k: v for k, v in (st.get("device") or {}).items() if "queue" in k or "dropped" in k}}


def run(args) -> None:
    budgets = [None if b == "none" else int(b) for b in args.budgets.split(",")]
    rows = []
    with netlab.Lab(prefix=args.prefix, hop="vless") as lab:
        exe = build_abi(lab.workdir) if args.host == "abi" else None
        for b in budgets:
            host = Host(lab, b, args.no_ssl, args.tcp_buffer_kb, args.fixed_mmap_threshold, exe)
            try:
                warm_up(lab)
                idle = host.rss()
                with_idle = idle_flows(lab, host, args.idle_flows)
                br = burst(lab, host, args.downloads, args.udp_sessions)
            finally:
                host.close()
            rows.append((b, idle, with_idle, br))
            print(json.dumps({"host": args.host, "budget_mb": b, "idle": idle, "idle_flows": with_idle, **br}),
                  flush=True)
    print(f"\nhost: {'tools/abi_host.c over libtun2xray' if exe else 'tools/reference_host.py'}")
    print(f"{'budget':>8} {'idle':>7} {f'{args.idle_flows} idle':>10} {'burst peak':>11} "
          f"{'engine peak':>12} {'target':>8}  downloads, UDP echoes")
    verdicts = []
    for b, idle, with_idle, br in rows:
        target = f"{(idle + (b or 0) * MB + 5 * MB) / MB:.1f}" if b else "-"
        if b:
            met = br["peak"] <= idle + b * MB + 5 * MB
            verdicts.append(f"budget{b}_target={'met' if met else 'missed'}")
        mem = br["memory"]
        print(f"{(str(b) + ' MB') if b else 'none':>8} {idle / MB:>7.1f} {with_idle / MB:>10.1f} "
              f"{br['peak'] / MB:>11.1f} {mem.get('peak', 0) / MB:>12.1f} {target:>8}  "
              f"{br['downloads_ok']}/{br['downloads']} sha256 ok in {br['seconds']:.1f} s "
              f"({br['bytes'] / br['seconds'] / 1e6:.0f} MB/s), {br['udp'].get('echoed', 0)}/"
              f"{br['udp'].get('sent', 0)} UDP echoed, refused {mem.get('refused', 0)}")
    idles = " ".join(f"idle{b or 'none'}={idle / MB:.1f}" for b, idle, _, _ in rows)
    print(f"\nmemory_bench: host={args.host} {idles} {' '.join(verdicts)}".rstrip())


# ------------------------------------------------------------------ imports

_STAGES = r"""
import sys
def rss():
    with open("/proc/self/status") as f:
        for l in f:
            if l.startswith("VmRSS:"):
                return int(l.split()[1])
rows = [("interpreter", rss())]
if "--no-ssl" in sys.argv:
    from tun2xray.lean import without_ssl
    without_ssl()
for name in ("ssl", "asyncio", "logging", "json", "ipaddress", "random", "netstack", "tun2xray.profile",
             "tun2xray.engine", "tun2xray.bridge"):
    try:
        __import__(name)
    except ImportError:
        pass
    rows.append(("+ " + name + (" (blocked)" if name == "ssl" and sys.modules.get("ssl", 0) is None else ""),
                 rss()))
import time
from tun2xray import bridge
h = bridge.start('{"proxy": "socks5://127.0.0.1:9", "rules": [{"network": "udp", "port": 53, '
                 '"to": "dokodemo://127.0.0.1:10853"}]}', loop="asyncio")
time.sleep(0.5)
rows.append(("+ bridge.start (engine idle)", rss()))
bridge.status(h)
rows.append(("+ first status()", rss()))
bridge.stop(h)
prev = 0
for name, kb in rows:
    print(f"{name:32} {kb / 1024:6.1f} MB  {'+' if prev else ' '}{(kb - prev) / 1024 if prev else 0:5.1f}")
    prev = kb
"""


def imports(args) -> None:
    env = dict(os.environ, PYTHONPATH=REPO)
    argv = [sys.executable, "-S", "-c", _STAGES] + (["--no-ssl"] if args.no_ssl else [])
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    sys.stdout.write(r.stdout + r.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", choices=("python", "abi"), default="python",
                    help="python: tools/reference_host.py (default); abi: tools/abi_host.c over libtun2xray")
    ap.add_argument("--budgets", default="none,16", help="comma-separated memory_budget_mb values; none: no key")
    ap.add_argument("--idle-flows", type=int, default=1000)
    ap.add_argument("--downloads", type=int, default=8)
    ap.add_argument("--udp-sessions", type=int, default=600)
    ap.add_argument("--tcp-buffer-kb", type=int, help="the profile's tcp_buffer_kb (default: the key's default)")
    ap.add_argument("--no-ssl", action="store_true", help="the host keeps asyncio from loading ssl (tun2xray.lean)")
    ap.add_argument("--fixed-mmap-threshold", action="store_true",
                    help="the host fixes glibc's mmap threshold (tun2xray.lean)")
    ap.add_argument("--prefix", default="bm", help=argparse.SUPPRESS)
    ap.add_argument("--imports", action="store_true", help="print RSS import by import and exit")
    args = ap.parse_args(argv)
    if args.imports:
        imports(args)
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
