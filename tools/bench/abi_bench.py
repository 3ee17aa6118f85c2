#!/usr/bin/env python3
"""The C boundary's cost: iperf3 through tools/abi_host.c (libtun2xray)
beside tools/reference_host.py (the same bridge from Python), on the plain
TUN path a NEPacketTunnelProvider or VpnService host has (no offloads), at
MTU 1500 and 4064, with the kernel's own path in the same run.

The world is tools/bench/benchlab.py's (prefix "ab": ab-cli with the TUN
abtun0 and the host, ab-srv with a plain v2ray socks inbound on the veth and
the iperf3 servers). For each MTU and host: iperf3 single stream up and
down; Gbps received and the host process's CPU-seconds per GB (utime+stime,
all its threads).

    python3 tools/bench/abi_bench.py [-t SECONDS] [--mtu 1500 --mtu 4064] [--hev PATH]

--hev PATH: hev-socks5-tunnel (the C tunnel, started by benchlab on the same
TUN name, MTU and SOCKS inbound) is measured in the same run, after the two
hosts at each MTU.

Both hosts run as a phone's would: plain asyncio (iOS has no uvloop; the C
host's library is kept from importing it, `--loop auto` lets it) and the
profile's "trust_checksums": true, which the embedding guides recommend for
packets from the host's own kernel (`--verify-checksums` measures without;
needed for a checkout older than that key).

Final line:
  abi_bench: up1500_ratio=… down1500_ratio=… cpu1500_ratio=… up4064_ratio=… …
(ratios are abi_host / reference_host: throughput, and CPU-s/GB summed over
both directions); with --hev, each MTU's figures go on with
up1500_hev_ratio=… down1500_hev_ratio=… cpu1500_hev_ratio=… (abi_host / hev).
Needs root; cleans up on exit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import benchlab  # noqa: E402
from benchlab import (DIRECT_TARGET, IPERF_PORT, SOCKS_ADDR, SOCKS_PORT,  # noqa: E402
                      TUN_NET, TUN_TARGET, cpu_seconds)

NAN = float("nan")
HOSTS = ("reference", "abi")
LABELS = {"reference": "reference_host", "abi": "abi_host", "hev": "hev"}


def build_abi_host(repo: str, out: str) -> str:
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "tun2xray.abi", "build", "--out", out], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise SystemExit(f"abi_bench: building libtun2xray failed: {r.stderr.strip()}")
    exe = os.path.join(out, "abi_host")
    r = subprocess.run(["cc", "-O2", "-o", exe, os.path.join(repo, "tools", "abi_host.c"), "-I", out,
                        "-L", out, "-ltun2xray", f"-Wl,-rpath,{out}", "-lpthread"],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise SystemExit(f"abi_bench: compiling abi_host failed: {r.stderr.strip()}")
    return exe


def _maps_uvloop(pid: int) -> bool:
    """Has the process mapped uvloop's extension module?"""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "uvloop" in f.read()
    except OSError:
        return False


class Bench:
    def __init__(self, lab: benchlab.BenchLab, args, exe: str):
        self.lab = lab
        self.args = args
        self.exe = exe
        self.results = {}

    def start_host(self, host: str, mtu: int) -> int:
        lab = self.lab
        if host == "hev":
            return lab.start_hev(self.args.hev, mtu)
        prof = {"proxy": f"socks5://{SOCKS_ADDR}:{SOCKS_PORT}", "mtu": mtu,
                "ipv4": {"address": "198.18.0.1/15"}, "ipv6": {"address": "fd00:7478::1/64"}}
        if not self.args.verify_checksums:
            prof["trust_checksums"] = True
        cfg = os.path.join(lab.workdir, "profile.json")
        with open(cfg, "w") as f:
            json.dump(prof, f)
        env = dict(os.environ, PYTHONPATH=lab.repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if host == "abi":
            argv = [self.exe, "--tun", lab.tun, "--config", cfg, "--mtu", str(mtu),
                    "--addr", "198.18.0.1/15", "--addr", "fd00:7478::1/64"]
            if self.args.loop == "asyncio":
                env = benchlab.embedded_env(lab.workdir, lab.repo)
        else:
            argv = [sys.executable, os.path.join(lab.repo, "tools", "reference_host.py"), "--tun", lab.tun,
                    "--config", cfg, "--log-level", "warning", "--loop", self.args.loop]
        p = lab.spawn("host", lab.cli_ns, argv, cwd=lab.repo, env=env)
        benchlab.wait_until(lambda: p.poll() is not None or benchlab.netlab.link_exists(lab.cli_ns, lab.tun),
                            20, f"{lab.tun} to appear")
        if p.poll() is not None:
            raise SystemExit(f"abi_bench: {host} host exited: {lab.log('host')[-1500:]}")
        benchlab.netlab.wait_link(lab.cli_ns, lab.tun)
        lab.ip(lab.cli_ns, "route", "replace", TUN_NET, "dev", lab.tun)
        benchlab.wait_until(self.lab.echo_through_tun, 20, "a TCP echo through the TUN", interval=0.2)
        if self.args.loop == "asyncio" and _maps_uvloop(p.pid):
            raise SystemExit(f"abi_bench: the {host} host loaded uvloop, but --loop asyncio was asked for")
        return p.pid

    def stop_host(self, host: str) -> None:
        if host == "hev":
            self.lab.stop_tunnel()
            return
        self.lab.stop("host", timeout=30)
        benchlab.wait_until(lambda: not benchlab.netlab.link_exists(self.lab.cli_ns, self.lab.tun), 10,
                            f"{self.lab.tun} gone")

    def iperf(self, target: str, reverse: bool, pid: int | None) -> tuple[float, float]:
        secs = self.args.time
        argv = ["iperf3", "-c", target, "-p", str(IPERF_PORT), "-t", str(secs), "-J"] + (["-R"] if reverse else [])
        self.lab.wait_iperf_idle()
        cpu0 = cpu_seconds(pid) if pid else 0.0
        r = self.lab.cli_run(argv, timeout=secs + 40)
        cpu1 = cpu_seconds(pid) if pid else 0.0
        try:
            rx = json.loads(r.stdout)["end"]["sum_received"]
        except (ValueError, KeyError):
            try:                        # with -J, iperf3 reports its error in the JSON
                why = json.loads(r.stdout).get("error", "")
            except ValueError:
                why = r.stdout.decode(errors="replace")[-300:]
            print(f"  iperf3 failed: {why} {r.stderr.decode(errors='replace')[-300:]}")
            return NAN, NAN
        gb = rx["bytes"] / 1e9
        return rx["bits_per_second"] / 1e9, ((cpu1 - cpu0) / gb if pid and gb else NAN)

    def hosts(self) -> tuple:
        return HOSTS + (("hev",) if self.args.hev else ())

    def ratios(self, mtu: int, other: str, tag: str) -> list:
        """abi_host / other at mtu: throughput each way, CPU-s/GB of both ways."""
        out = []
        for word in ("up", "down"):
            a = self.results.get((mtu, "abi", word), (NAN, NAN))[0]
            b = self.results.get((mtu, other, word), (NAN, NAN))[0]
            out.append(f"{word}{mtu}{tag}_ratio={a / b if b else NAN:.3f}")
        ca = sum(self.results.get((mtu, "abi", w), (NAN, NAN))[1] for w in ("up", "down"))
        cb = sum(self.results.get((mtu, other, w), (NAN, NAN))[1] for w in ("up", "down"))
        out.append(f"cpu{mtu}{tag}_ratio={ca / cb if cb else NAN:.3f}")
        return out

    def run(self) -> int:
        lab = self.lab
        for mtu in self.args.mtu:
            lab.set_veth_mtu(max(mtu, 1500))
            print(f"\nMTU {mtu}, iperf3 {self.args.time} s single stream; Gbps received, host CPU-s/GB")
            for word, rev in (("up", False), ("down", True)):
                g, _ = self.iperf(DIRECT_TARGET, rev, None)
                print(f"  {word:<5} direct (kernel)     {g:7.3f}")
            for host in self.hosts():
                pid = self.start_host(host, mtu)
                try:
                    for word, rev in (("up", False), ("down", True)):
                        g, c = self.iperf(TUN_TARGET, rev, pid)
                        self.results[(mtu, host, word)] = (g, c)
                        print(f"  {word:<5} {LABELS[host]:<19} {g:7.3f}  {c:7.2f}")
                finally:
                    self.stop_host(host)
        final = []
        for mtu in self.args.mtu:
            final += self.ratios(mtu, "reference", "")
            if self.args.hev:
                final += self.ratios(mtu, "hev", "_hev")
        print("\nabi_bench: " + " ".join(final))
        return 1 if any("nan" in f for f in final) or any(math.isnan(v[0]) for v in self.results.values()) else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="abi_bench", description=__doc__.split("\n", 1)[0])
    p.add_argument("-t", "--time", type=int, default=5, help="seconds per iperf3 run (default 5)")
    p.add_argument("--mtu", type=int, action="append", help="TUN MTU (repeatable; default 1500 and 4064)")
    p.add_argument("--repo", default=benchlab.REPO, help="the checkout whose tun2xray runs")
    p.add_argument("--hev", metavar="PATH",
                   help="hev-socks5-tunnel binary: measured beside the two hosts in the same run")
    p.add_argument("--loop", choices=("asyncio", "auto"), default="asyncio",
                   help="the hosts' event loop: asyncio (default, as on iOS and Android) or auto (uvloop "
                   "where installed)")
    p.add_argument("--verify-checksums", action="store_true",
                   help="leave trust_checksums off (the stack verifies every packet)")
    p.add_argument("--prefix", default="ab", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.mtu = args.mtu or [1500, 4064]
    if args.hev and not os.access(args.hev, os.X_OK):
        p.error(f"--hev {args.hev}: not an executable file")
    if os.geteuid() != 0:
        print("abi_bench: needs root (namespaces, veth, TUN)", file=sys.stderr)
        return 2
    lab = benchlab.BenchLab(prefix=args.prefix, repo=args.repo)
    with lab:
        exe = build_abi_host(lab.repo, os.path.join(lab.workdir, "abi"))
        return Bench(lab, args, exe).run()


if __name__ == "__main__":
    sys.exit(main())
