#!/usr/bin/env python3
"""End-to-end bench: tun2xray against the kernel's own path, real clients, one run.

Builds its own namespaces (tools/bench/benchlab.py: eb-cli with the TUN,
tun2xray and the clients; eb-srv with a plain v2ray socks inbound + freedom
outbound on the veth, and the servers on its lo), then measures in one go,
each figure through tun2xray and directly over the veth in the same run:

  - iperf3 single stream, up and down, at MTU 1500 and 9000 (veth and TUN);
  - iperf3 -P 4, up and down, MTU 1500;
  - UDP (iperf3 -u) at a fixed offered rate, up and down: loss and goodput;
  - connections per second of short HTTP requests to nginx: wrk with
    "Connection: close" (direct, TUN), and one small asyncio client
    (benchmark's own, uvloop) direct, through the SOCKS hop with no TUN, and
    through the TUN, so the SOCKS hop's own cost is visible;
  - tun2xray's RSS idle and with 1,000 idle TCP connections through it.

Beside each throughput figure: CPU-seconds per GB (utime+stime from
/proc/PID/stat) of tun2xray and of v2ray. Ratios are tunnel / direct.

Final line:
  e2e_bench: up1500_Gbps=… down1500_Gbps=… up9000_Gbps=… down9000_Gbps=… cps=… udp_loss_pct=… rss_idle_MB=… rss_1000_MB=…

(tunnel figures; cps is wrk through the TUN; udp_loss_pct is the upload
direction at the offered rate). A failed measurement prints its reason and
shows as nan; the exit status is then 1. Needs root. ``--quick``: 1-second
runs for the smoke test. Everything is cleaned up on exit, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import benchlab  # noqa: E402
from benchlab import (DIRECT_TARGET, HOLD_PORT, HTTP_PORT, IPERF_PORT, SOCKS_ADDR,  # noqa: E402
                      SOCKS_PORT, TUN_TARGET, cpu_seconds, rss_mb)

NAN = float("nan")
FINAL_KEYS = ("up1500_Gbps", "down1500_Gbps", "up9000_Gbps", "down9000_Gbps", "cps",
              "udp_loss_pct", "rss_idle_MB", "rss_1000_MB")


class MeasureError(Exception):
    """One measurement failed (the bench goes on with the next one)."""


PHASE_ERRORS = (MeasureError, OSError, RuntimeError, TimeoutError, ValueError, KeyError,
                subprocess.SubprocessError)


def _ratio(a: float, b: float) -> float:
    if b and not math.isnan(a) and not math.isnan(b):
        return a / b
    return NAN


def _fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


class Bench:
    def __init__(self, lab: benchlab.BenchLab, args):
        self.lab = lab
        self.args = args
        self.secs = 1 if args.quick else args.time
        self.failed: list[str] = []
        self.final = dict.fromkeys(FINAL_KEYS, NAN)
        self.query = args.device_query

    # -- helpers -----------------------------------------------------------

    def say(self, line: str = "") -> None:
        print(line, flush=True)

    def fail(self, what: str, why: str) -> None:
        self.failed.append(what)
        self.say(f"  {what}: FAILED: {why}")

    def tunnel_pid(self) -> int:
        p = self.lab.tunnel
        if p is None or p.poll() is not None:
            code = None if p is None else p.returncode
            self.failed.append(f"tun2xray died (exit {code})")
            self.say(f"  (tun2xray not running, exit {code}; restarting it)"
                     + (f"\n  log tail: {self.lab.log('tun2xray')[-600:]!r}" if p else ""))
            return self.lab.start_tunnel(self.lab.tunnel_mtu or 1500, self.query)
        return p.pid

    def v2ray_pid(self) -> int:
        return self.lab.procs["v2ray"].pid

    def restart_iperf(self, tag: str) -> None:
        # an interrupted test can leave an iperf3 server busy for minutes
        name = f"iperf3-{tag}"
        addr = TUN_TARGET if tag == "tun" else DIRECT_TARGET
        self.lab.stop(name)
        self.lab.spawn(name, self.lab.srv_ns, ["iperf3", "-s", "-B", addr, "-p", str(IPERF_PORT)])
        benchlab.wait_until(lambda: self.lab._listeners("tcp", IPERF_PORT) >= 2, 10, "iperf3 back")

    # -- iperf3 --------------------------------------------------------------

    def iperf(self, target: str, reverse=False, parallel=1, udp_rate=None, length=None) -> dict:
        argv = ["iperf3", "-c", target, "-p", str(IPERF_PORT), "-t", str(self.secs), "-J"]
        if reverse:
            argv.append("-R")
        if parallel > 1:
            argv += ["-P", str(parallel)]
        if udp_rate:
            argv += ["-u", "-b", udp_rate]
        if length:
            argv += ["-l", str(length)]
        tunneled = target == TUN_TARGET
        pids = (self.tunnel_pid(), self.v2ray_pid()) if tunneled else ()
        cpu0 = [cpu_seconds(p) for p in pids]
        try:
            r = self.lab.cli_run(argv, timeout=self.secs + 30)
        except subprocess.TimeoutExpired:
            self.restart_iperf("tun" if tunneled else "direct")
            raise MeasureError("iperf3 timed out") from None
        cpu1 = [cpu_seconds(p) for p in pids]
        try:
            j = json.loads(r.stdout)
        except ValueError:
            raise MeasureError(f"iperf3 exit {r.returncode}: {r.stderr.decode(errors='replace')[-300:]}") from None
        if r.returncode != 0 or "error" in j:
            raise MeasureError(f"iperf3: {j.get('error', r.returncode)}")
        rx = j["end"]["sum_received"]
        out = {"Gbps": rx["bits_per_second"] / 1e9, "bytes": rx["bytes"]}
        if udp_rate:
            out["loss_pct"] = rx.get("lost_percent", NAN)
            out["jitter_ms"] = rx.get("jitter_ms", NAN)
        if tunneled and rx["bytes"]:
            gb = rx["bytes"] / 1e9
            out["tun_cpu_per_GB"] = (cpu1[0] - cpu0[0]) / gb
            out["v2ray_cpu_per_GB"] = (cpu1[1] - cpu0[1]) / gb
        return out

    def pair(self, label: str, **kw) -> tuple[dict | None, dict | None]:
        """The same iperf3 run direct and through the tunnel; prints one row."""
        res = {}
        for path, target in (("direct", DIRECT_TARGET), ("tunnel", TUN_TARGET)):
            try:
                res[path] = self.iperf(target, **kw)
            except PHASE_ERRORS as e:
                self.fail(f"{label} {path}", str(e))
                res[path] = None
        d, t = res["direct"], res["tunnel"]
        dg = d["Gbps"] if d else NAN
        tg = t["Gbps"] if t else NAN
        row = f"  {label:<26} {_fmt(dg):>9} {_fmt(tg):>9} {_fmt(_ratio(tg, dg)):>8}"
        if kw.get("udp_rate"):
            dl = d["loss_pct"] if d else NAN
            tl = t["loss_pct"] if t else NAN
            row += f"   loss direct {_fmt(dl)}% tunnel {_fmt(tl)}%"
        if t:
            row += f"   {_fmt(t['tun_cpu_per_GB']):>6} {_fmt(t['v2ray_cpu_per_GB']):>6}"
        self.say(row)
        return d, t

    def throughput_header(self, mtu: int) -> None:
        self.say(f"\niperf3, MTU {mtu} (veth and TUN), {self.secs} s each; Gbps received; "
                 "cpu-s/GB of tun2xray, v2ray")
        self.say(f"  {'test':<26} {'direct':>9} {'tunnel':>9} {'ratio':>8}   "
                 f"{'t2x':>6} {'v2ray':>6}")

    def tcp_runs(self, mtu: int, parallel_too: bool) -> None:
        self.throughput_header(mtu)
        for rev, word in ((False, "up"), (True, "down")):
            _, t = self.pair(f"tcp {word} 1 stream", reverse=rev)
            self.final[f"{word}{mtu}_Gbps"] = t["Gbps"] if t else NAN
        if parallel_too:
            for rev, word in ((False, "up"), (True, "down")):
                self.pair(f"tcp {word} -P 4", reverse=rev, parallel=4)

    def udp_runs(self) -> None:
        rate = self.args.udp_rate
        self.say(f"\nUDP, iperf3 -u -b {rate} -l {self.args.udp_len}, MTU 1500, {self.secs} s; "
                 "Gbps received, loss")
        for rev, word in ((False, "up"), (True, "down")):
            _, t = self.pair(f"udp {word} {rate}", reverse=rev, udp_rate=rate,
                             length=self.args.udp_len)
            if not rev:
                self.final["udp_loss_pct"] = t["loss_pct"] if t else NAN

    # -- connection rate -------------------------------------------------------

    def wrk(self, target: str) -> float:
        secs = self.secs
        r = self.lab.cli_run(["wrk", "-t1", f"-c{self.args.conns}", f"-d{secs}s",
                              "--timeout", "5s", "-H", "Connection: close",
                              f"http://{target}:{HTTP_PORT}/"], timeout=secs + 30)
        text = r.stdout.decode(errors="replace")
        m = re.search(r"Requests/sec:\s+([\d.]+)", text)
        if r.returncode != 0 or not m:
            raise MeasureError(f"wrk exit {r.returncode}: {text[-300:]} "
                               f"{r.stderr.decode(errors='replace')[-300:]}")
        bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
        if bad:
            raise MeasureError(f"wrk: {bad.group(1)} non-2xx responses")
        errs = re.search(r"Socket errors: (.*)", text)
        rate = float(m.group(1))
        if errs:
            self.say(f"    (wrk {target}: socket errors: {errs.group(1)})")
        return rate

    def pyclient(self, mode: str) -> float:
        argv = [sys.executable, os.path.abspath(__file__), "cps-client", "--mode", mode,
                "-c", str(self.args.conns), "-d", str(self.secs)]
        r = self.lab.cli_run(argv, timeout=self.secs + 30)
        try:
            j = json.loads(r.stdout)
        except ValueError:
            raise MeasureError(f"cps-client exit {r.returncode}: "
                               f"{r.stderr.decode(errors='replace')[-300:]}") from None
        if j["errors"]:
            self.say(f"    (python client {mode}: {j['errors']} errors, first: {j['first_error']})")
        if not j["ok"]:
            raise MeasureError(f"python client {mode}: no request completed")
        self._lat = f"   latency p50 {_fmt(j['p50_ms'])} p90 {_fmt(j['p90_ms'])} p99 {_fmt(j['p99_ms'])} ms"
        return j["ok"] / j["secs"]

    def cps_runs(self) -> None:
        c = self.args.conns
        self.say(f"\nconnections/s, short HTTP GET to nginx, {c} concurrent, {self.secs} s")
        rates = {}
        for name, fn in (("wrk direct", lambda: self.wrk(DIRECT_TARGET)),
                         ("wrk tunnel", lambda: self.wrk(TUN_TARGET)),
                         ("python direct", lambda: self.pyclient("direct")),
                         ("python socks", lambda: self.pyclient("socks")),
                         ("python tunnel", lambda: self.pyclient("tun"))):
            pid = self.tunnel_pid()
            self._lat = ""
            vpid = self.v2ray_pid()
            c0, v0 = cpu_seconds(pid), cpu_seconds(vpid)
            t0 = time.monotonic()
            try:
                rates[name] = fn()
            except PHASE_ERRORS as e:
                self.fail(f"cps {name}", str(e))
                rates[name] = NAN
            wall = max(time.monotonic() - t0, 1e-9)
            busy = (cpu_seconds(pid) - c0) / wall
            vbusy = (cpu_seconds(vpid) - v0) / wall
            extra = self._lat + (f"   tun2xray busy {busy * 100:.0f}%" if "tunnel" in name else "")
            if "direct" not in name:
                extra += f"   v2ray busy {vbusy * 100:.0f}%"
            self.say(f"  {name:<26} {_fmt(rates[name], 4):>9}/s{extra}")
        self.say(f"  ratio wrk tunnel/direct {_fmt(_ratio(rates['wrk tunnel'], rates['wrk direct']))}; "
                 f"python tunnel/direct {_fmt(_ratio(rates['python tunnel'], rates['python direct']))}, "
                 f"tunnel/socks {_fmt(_ratio(rates['python tunnel'], rates['python socks']))}, "
                 f"socks/direct {_fmt(_ratio(rates['python socks'], rates['python direct']))}")
        self.final["cps"] = rates["wrk tunnel"]

    # -- memory ---------------------------------------------------------------

    def rss_idle(self) -> None:
        pid = self.tunnel_pid()
        time.sleep(0.5)
        self.final["rss_idle_MB"] = rss_mb(pid)

    def rss_held(self) -> None:
        n = self.args.idle_conns
        pid = self.tunnel_pid()
        before = rss_mb(pid)
        socks: list[socket.socket] = []
        try:
            t0 = time.monotonic()
            with self.lab.in_cli():
                for _ in range(n):
                    s = socket.socket()
                    socks.append(s)
            for s in socks:
                s.settimeout(10)
                s.connect((TUN_TARGET, HOLD_PORT))
            for i, s in enumerate(socks):
                s.sendall(i.to_bytes(4, "big"))
            for i, s in enumerate(socks):
                got = b""
                while len(got) < 4:
                    chunk = s.recv(4 - len(got))
                    if not chunk:
                        raise MeasureError(f"connection {i} closed before its echo")
                    got += chunk
                if got != i.to_bytes(4, "big"):
                    raise MeasureError(f"connection {i}: wrong echo {got!r}")
            opened = time.monotonic() - t0
            time.sleep(1.0)          # let the engine settle (buffers, timers)
            held = rss_mb(pid)
            flows = None
            try:
                st = self.lab.status()
                flows = len(st.get("flows") or [])
            except (RuntimeError, ValueError, subprocess.TimeoutExpired):
                pass
            self.final["rss_1000_MB"] = held
            per = (held - before) * 1024 / n
            self.say(f"\nRSS of tun2xray (fresh process): idle {_fmt(self.final['rss_idle_MB'])} MB; before "
                     f"{_fmt(before)} MB; with {n} idle TCP connections (each echoed once, opened "
                     f"in {opened:.1f} s) {_fmt(held)} MB = {per:.1f} kB/connection; "
                     f"status lists {flows} flows")
        except (MeasureError, OSError) as e:
            self.fail(f"rss with {n} idle connections", str(e))
        finally:
            for s in socks:
                s.close()

    def counters(self) -> None:
        """tun2xray's drop and engine counters so far (context for the figures)."""
        try:
            st = self.lab.status()
        except RuntimeError as e:
            self.say(f"  (no status: {e})")
            return
        stack = st.get("stack", {})
        dev = st.get("device", {})
        parts = [f"device rx {dev.get('rx_packets')} tx {dev.get('tx_packets')} packets"]
        for key in ("drops", "tcp_drops", "frag_drops"):
            if stack.get(key):
                parts.append(f"{key} {json.dumps(stack[key], separators=(',', ':'))}")
        for key in ("rx_dropped", "tx_dropped", "tx_errors", "rx_bad_header"):
            if dev.get(key):
                parts.append(f"device {key} {dev[key]}")
        parts.append(f"engine {json.dumps(st.get('engine', {}), separators=(',', ':'))}")
        self.say(f"  tun2xray counters (MTU {self.lab.tunnel_mtu}): " + "; ".join(parts))

    # -- the whole run ---------------------------------------------------------

    def run(self) -> int:
        a = self.args
        self.say(f"e2e_bench: tun2xray (tun://{self.lab.tun}"
                 f"{'?' + self.query if self.query else ''}) -> v2ray socks {SOCKS_ADDR}:{SOCKS_PORT}"
                 f" -> lo, vs direct over the veth; core {self.lab.core}; {os.cpu_count()} CPUs;"
                 f" tun2xray from {self.lab.repo}"
                 f"{'; QUICK mode' if a.quick else ''}")
        self.say("(figures from a shared machine are noisy; compare ratios from the same run)")
        # memory first, on a fresh process: later runs grow its heap
        plan = ((1500, (("rss idle", self.rss_idle), ("rss held", self.rss_held),
                        ("tcp 1500", lambda: self.tcp_runs(1500, parallel_too=True)),
                        ("udp", self.udp_runs), ("cps", self.cps_runs),
                        ("counters", self.counters))),
                (9000, (("tcp 9000", lambda: self.tcp_runs(9000, parallel_too=False)),
                        ("counters", self.counters))))
        for mtu, steps in plan:
            try:
                self.lab.stop_tunnel()
                self.lab.set_veth_mtu(mtu)
                self.lab.start_tunnel(mtu, self.query)
            except PHASE_ERRORS as e:
                self.fail(f"tunnel at MTU {mtu}", str(e))
                continue
            for name, step in steps:
                try:
                    step()
                except PHASE_ERRORS as e:
                    self.fail(name, str(e))
        self.say("")
        if self.failed:
            self.say(f"FAILED: {', '.join(self.failed)}")
        self.say("e2e_bench: " + " ".join(f"{k}={_fmt(v, 4)}" for k, v in self.final.items()))
        return 1 if self.failed else 0


# --------------------------------------------------------------------------
# the connection-rate client (runs inside eb-cli as its own process)

REQUEST = "GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode()


async def _one_request(mode: str) -> None:
    if mode == "socks":
        r, w = await asyncio.open_connection(SOCKS_ADDR, SOCKS_PORT)
        w.write(b"\x05\x01\x00")
        if await r.readexactly(2) != b"\x05\x00":
            raise ConnectionError("socks: no-auth refused")
        w.write(b"\x05\x01\x00\x01" + socket.inet_aton(TUN_TARGET) + HTTP_PORT.to_bytes(2, "big"))
        head = await r.readexactly(4)
        if head[1] != 0:
            raise ConnectionError(f"socks: reply {head[1]}")
        await r.readexactly({1: 6, 4: 18}.get(head[3]) or (await r.readexactly(1))[0] + 2)
    else:
        host = TUN_TARGET if mode == "tun" else DIRECT_TARGET
        r, w = await asyncio.open_connection(host, HTTP_PORT)
    try:
        w.write(REQUEST)
        head = await r.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(f"http: {head[:40]!r}")
        m = re.search(rb"(?i)content-length:\s*(\d+)", head)
        await r.readexactly(int(m.group(1)) if m else 0)
    finally:
        w.close()


async def _cps_main(mode: str, conns: int, secs: float) -> dict:
    ok = 0
    errors = 0
    first = ""
    t0 = time.monotonic()
    deadline = t0 + secs

    lat = []

    async def worker():
        nonlocal ok, errors, first
        while time.monotonic() < deadline:
            t = time.monotonic()
            try:
                await asyncio.wait_for(_one_request(mode), 10)
                ok += 1
                lat.append(time.monotonic() - t)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    asyncio.TimeoutError, ConnectionError) as e:
                errors += 1
                first = first or repr(e)
    await asyncio.gather(*(worker() for _ in range(conns)))
    lat.sort()
    pct = {f"p{q}_ms": lat[min(len(lat) - 1, len(lat) * q // 100)] * 1e3 if lat else NAN
           for q in (50, 90, 99)}
    return {"ok": ok, "errors": errors, "first_error": first, "secs": time.monotonic() - t0, **pct}


def cps_client(argv) -> int:
    p = argparse.ArgumentParser(prog="e2e_bench cps-client")
    p.add_argument("--mode", choices=["direct", "socks", "tun"], required=True)
    p.add_argument("-c", type=int, default=16)
    p.add_argument("-d", type=float, default=5)
    a = p.parse_args(argv)
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    print(json.dumps(run(_cps_main(a.mode, a.c, a.d))))
    return 0


# --------------------------------------------------------------------------

def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cps-client"]:
        return cps_client(argv[1:])
    p = argparse.ArgumentParser(prog="e2e_bench", description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="1-second runs (smoke test)")
    p.add_argument("-t", "--time", type=int, default=5, help="seconds per run (default 5)")
    p.add_argument("--conns", type=int, default=16, help="concurrent clients for connections/s")
    p.add_argument("--idle-conns", type=int, default=1000, help="idle TCP connections for RSS")
    p.add_argument("--udp-rate", default="50M", help="UDP offered rate, iperf3 -b (default 50M)")
    p.add_argument("--udp-len", type=int, default=1400, help="UDP payload bytes (default 1400)")
    p.add_argument("--device-query", default="",
                   help="options for the tun:// URL, e.g. offload=1")
    p.add_argument("--workers", type=int, default=1,
                   help="tun2xray worker processes (default 1: per-engine figures; CPU and RSS sum all)")
    p.add_argument("--repo", default=benchlab.REPO,
                   help="checkout whose tun2xray is benchmarked (default: this one)")
    p.add_argument("--prefix", default="eb", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("e2e_bench: needs root (network namespaces, veth, TUN)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with benchlab.BenchLab(prefix=args.prefix, repo=args.repo, workers=args.workers) as lab:
            return Bench(lab, args).run()
    except KeyboardInterrupt:
        print("e2e_bench: interrupted; cleaned up", file=sys.stderr)
        return 130
    except (OSError, RuntimeError, TimeoutError, subprocess.SubprocessError) as e:
        print(f"e2e_bench: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
