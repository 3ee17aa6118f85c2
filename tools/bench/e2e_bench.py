#!/usr/bin/env python3
"""End-to-end bench: tun2xray against the kernel's own path, real clients, one run.

Builds its own namespaces (tools/bench/benchlab.py: eb-cli with the TUN,
tun2xray and the clients; eb-srv with a plain v2ray socks inbound + freedom
outbound on the veth, and the servers on its lo), then measures in one go,
each figure through tun2xray and directly over the veth in the same run:

  - iperf3 single stream, up and down, at MTU 1500 and 9000 (veth and TUN);
  - iperf3 -P 4, up and down, MTU 1500;
  - the plain path (``?offload=0``, one worker: what a phone's host has),
    single stream, at MTU 1500 and 4064;
  - UDP (iperf3 -u) at a fixed offered rate, up and down: loss and goodput;
  - connections per second of short HTTP requests to nginx: wrk with
    "Connection: close" direct, through tun2xray as it starts by default
    (one worker per two cores), with one worker and with two, and one small asyncio client
    (benchmark's own, uvloop) direct, through the SOCKS hop with no TUN, and
    through the TUN, so the SOCKS hop's own cost is visible; beside each
    rate the tunnel's CPU time per connection (steadier than the rate on
    a loaded machine);
  - memory of tun2xray's whole process tree idle and with 1,000 idle TCP
    connections through it: RSS summed over the processes, and PSS (pages
    shared by k processes count 1/k each, so a supervisor and workers that
    share pages are not counted once per process), by default, with one
    worker and with two.

``--hev PATH``: hev-socks5-tunnel (the C tunnel) is run on the same TUN name
and route, to the same SOCKS inbound, for the same figures in the same run,
and the summary gives tun2xray's ratios to it and to the kernel's path.

Beside each throughput figure: CPU-seconds per GB (utime+stime from
/proc/PID/stat) of the tunnel's process tree and of v2ray. Ratios are
tunnel / direct.

Final line:
  e2e_bench: up1500_Gbps=… down1500_Gbps=… up9000_Gbps=… down9000_Gbps=… cps=… udp_loss_pct=… rss_idle_MB=… rss_1000_MB=… pss_idle_MB=… pss_1000_MB=… cps_1w=… plain_up1500_Gbps=… plain_down1500_Gbps=… plain_up4064_Gbps=… plain_down4064_Gbps=…

(tun2xray's figures as it starts by default; cps is wrk through the TUN,
cps_1w with one worker; udp_loss_pct is the upload direction at the offered
rate; plain_* the plain path). A failed measurement prints its reason and
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
                      SOCKS_PORT, TUN_TARGET, cpu_seconds, pss_mb, rss_mb)

NAN = float("nan")
FINAL_KEYS = ("up1500_Gbps", "down1500_Gbps", "up9000_Gbps", "down9000_Gbps", "cps",
              "udp_loss_pct", "rss_idle_MB", "rss_1000_MB", "pss_idle_MB", "pss_1000_MB", "cps_1w",
              "plain_up1500_Gbps", "plain_down1500_Gbps", "plain_up4064_Gbps", "plain_down4064_Gbps")
STEPS = ("mem", "tcp", "udp", "cps")


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
        self.current = None             # (peer key, mtu) serving the TUN now
        self.res: dict = {}             # (peer, what) -> figure, for the summary
        w = args.workers
        self.peers = {"t2x": ("tun2xray " + (f"{w} workers" if w else "default"), w, self.query),
                      "t2x1": ("tun2xray 1 worker", 1, self.query),
                      "t2x2": ("tun2xray 2 workers", 2, self.query),
                      "plain": ("tun2xray plain, 1 worker", 1, "offload=0")}
        if args.hev:
            self.peers["hev"] = ("hev-socks5-tunnel", None, None)

    # -- helpers -----------------------------------------------------------

    def say(self, line: str = "") -> None:
        print(line, flush=True)

    def fail(self, what: str, why: str) -> None:
        self.failed.append(what)
        self.say(f"  {what}: FAILED: {why}")

    def use(self, key: str, mtu: int, fresh: bool = False) -> int:
        """Serve the TUN with peer ``key`` at ``mtu`` (veth too); its pid."""
        p = self.lab.tunnel
        if not fresh and self.current == (key, mtu) and p is not None and p.poll() is None:
            return p.pid
        self.current = None
        self.lab.stop_tunnel()
        self.lab.set_veth_mtu(mtu)
        _, workers, query = self.peers[key]
        if key == "hev":
            pid = self.lab.start_hev(self.args.hev, mtu)
        else:
            pid = self.lab.start_tunnel(mtu, query, workers=workers)
        self.current = (key, mtu)
        return pid

    def tunnel_pid(self) -> int:
        p = self.lab.tunnel
        if p is None or p.poll() is not None:
            code = None if p is None else p.returncode
            self.failed.append(f"{self.lab.peer} died (exit {code})")
            self.say(f"  ({self.lab.peer} not running, exit {code}; restarting it)"
                     + (f"\n  log tail: {self.lab.log(self.lab.peer)[-600:]!r}" if p else ""))
            if self.current is None:
                raise MeasureError("no tunnel")
            return self.use(*self.current, fresh=True)
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

    def _iperf_or_nan(self, what: str, target: str, **kw):
        for attempt in (1, 2):
            try:
                return self.iperf(target, **kw)
            except PHASE_ERRORS as e:
                if attempt == 1 and "server is busy" in str(e):
                    # the server still ends the previous test: start it afresh, once
                    self.restart_iperf("tun" if target == TUN_TARGET else "direct")
                    continue
                self.fail(what, str(e))
                return None

    def tcp_runs(self) -> None:
        """Single streams (and -P 4 at 1500) direct, then through each peer:
        the default at 1500 and 9000 (one worker at 1500 too), the plain
        path at 1500 and 4064."""
        plan = ((1500, (("t2x", True), ("t2x1", True), ("plain", False), ("hev", True))),
                (4064, (("plain", False), ("hev", False))),
                (9000, (("t2x", False), ("hev", False))))
        for mtu, peers in plan:
            peers = [(k, par) for k, par in peers if k in self.peers]
            self.current = None
            self.lab.stop_tunnel()
            self.lab.set_veth_mtu(mtu)
            self.say(f"\niperf3, MTU {mtu} (veth and TUN), {self.secs} s each; Gbps received; "
                     "cpu-s/GB of the tunnel, v2ray")
            self.say(f"  {'test':<42} {'direct':>9} {'tunnel':>9} {'ratio':>8}   {'tun':>6} {'v2ray':>6}")
            tests = [(rev, word, 1) for rev, word in ((False, "up"), (True, "down"))]
            if any(par for _, par in peers):
                tests += [(rev, word, 4) for rev, word in ((False, "up"), (True, "down"))]
            direct = {}
            for rev, word, n in tests:
                d = self._iperf_or_nan(f"tcp {word} -P {n} direct {mtu}", DIRECT_TARGET,
                                       reverse=rev, parallel=n)
                direct[(word, n)] = d["Gbps"] if d else NAN
            for key, par in peers:
                label = self.peers[key][0]
                try:
                    self.use(key, mtu)
                except PHASE_ERRORS as e:
                    self.fail(f"{label} at MTU {mtu}", str(e))
                    continue
                for rev, word, n in tests:
                    if n > 1 and not par:
                        continue
                    what = f"tcp {word} {'1 stream' if n == 1 else f'-P {n}'}, {label}"
                    t = self._iperf_or_nan(f"{what} {mtu}", TUN_TARGET, reverse=rev, parallel=n)
                    dg = direct[(word, n)]
                    tg = t["Gbps"] if t else NAN
                    row = f"  {what:<42} {_fmt(dg):>9} {_fmt(tg):>9} {_fmt(_ratio(tg, dg)):>8}"
                    if t:
                        row += f"   {_fmt(t['tun_cpu_per_GB']):>6} {_fmt(t['v2ray_cpu_per_GB']):>6}"
                        self.res[(key, f"{word}{mtu}P{n}")] = tg
                        self.res[(key, f"{word}{mtu}P{n}cpu")] = t["tun_cpu_per_GB"]
                    self.res[("kernel", f"{word}{mtu}P{n}")] = dg
                    self.say(row)
                    if n == 1 and key in ("t2x", "plain") and mtu in ((1500, 9000) if key == "t2x" else (1500, 4064)):
                        self.final[f"{'plain_' if key == 'plain' else ''}{word}{mtu}_Gbps"] = tg
            self.counters()

    def udp_runs(self) -> None:
        rate = self.args.udp_rate
        self.use("t2x", 1500)
        self.say(f"\nUDP, iperf3 -u -b {rate} -l {self.args.udp_len}, MTU 1500, {self.secs} s, "
                 f"{self.peers['t2x'][0]}; Gbps received, loss")
        for rev, word in ((False, "up"), (True, "down")):
            kw = dict(reverse=rev, udp_rate=rate, length=self.args.udp_len)
            d = self._iperf_or_nan(f"udp {word} direct", DIRECT_TARGET, **kw)
            t = self._iperf_or_nan(f"udp {word} tunnel", TUN_TARGET, **kw)
            dg, tg = (d["Gbps"] if d else NAN), (t["Gbps"] if t else NAN)
            self.say(f"  udp {word} {rate:<10} {_fmt(dg):>9} {_fmt(tg):>9} {_fmt(_ratio(tg, dg)):>8}"
                     f"   loss direct {_fmt(d['loss_pct'] if d else NAN)}% "
                     f"tunnel {_fmt(t['loss_pct'] if t else NAN)}%")
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
        self.say(f"\nconnections/s, short HTTP GET to nginx, {c} concurrent, {self.secs} s, MTU 1500")
        plan = [("wrk direct", None, lambda: self.wrk(DIRECT_TARGET))]
        plan += [(f"wrk {self.peers[k][0]}", k, lambda: self.wrk(TUN_TARGET))
                 for k in ("t2x", "t2x1", "t2x2", "hev") if k in self.peers]
        plan += [("python direct", None, lambda: self.pyclient("direct")),
                 ("python socks", None, lambda: self.pyclient("socks")),
                 ("python tunnel", "t2x", lambda: self.pyclient("tun"))]
        rates = {}
        for name, key, fn in plan:
            try:
                pid = self.use(key or "t2x", 1500)
            except PHASE_ERRORS as e:
                self.fail(f"cps {name}", str(e))
                rates[name] = NAN
                continue
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
            # CPU per connection: steadier than the rate on a loaded machine
            per = busy * 1e6 / rates[name] if rates[name] else NAN
            extra = self._lat + (f"   tunnel busy {busy * 100:.0f}% = {per:.0f} us CPU/connection"
                                 if key else "")
            if key and name.startswith("wrk"):
                self.res[(key, "cpu_conn")] = per
            if "direct" not in name:
                extra += f"   v2ray busy {vbusy * 100:.0f}%"
            self.say(f"  {name:<32} {_fmt(rates[name], 4):>9}/s{extra}")
            self.res[(key or "kernel", "cps")] = rates[name] if name != "python tunnel" else \
                self.res.get(("t2x", "cps"), NAN)
        self.res[("kernel", "cps")] = rates["wrk direct"]
        wt = rates.get(f"wrk {self.peers['t2x'][0]}", NAN)
        self.say(f"  ratio wrk tunnel/direct {_fmt(_ratio(wt, rates['wrk direct']))}; "
                 f"python tunnel/direct {_fmt(_ratio(rates['python tunnel'], rates['python direct']))}, "
                 f"tunnel/socks {_fmt(_ratio(rates['python tunnel'], rates['python socks']))}, "
                 f"socks/direct {_fmt(_ratio(rates['python socks'], rates['python direct']))}")
        self.final["cps"] = wt
        self.final["cps_1w"] = rates.get(f"wrk {self.peers['t2x1'][0]}", NAN)

    # -- memory ---------------------------------------------------------------

    def mem_runs(self) -> None:
        """Each peer freshly started: RSS and PSS of its process tree idle,
        then with --idle-conns idle TCP connections through it."""
        n = self.args.idle_conns
        self.say(f"\nmemory of the whole process tree (fresh start, MTU 1500), MB: idle, then with {n} "
                 "idle TCP connections (each echoed once)")
        for key in ("t2x", "t2x1", "t2x2", "hev"):
            if key not in self.peers:
                continue
            label = self.peers[key][0]
            try:
                pid = self.use(key, 1500, fresh=True)
                time.sleep(0.5)
                idle = (rss_mb(pid), pss_mb(pid))
                held, opened = self.hold(n)
                held = (rss_mb(pid), pss_mb(pid))
            except PHASE_ERRORS as e:
                self.fail(f"memory {label}", str(e))
                continue
            flows = ""
            if key != "hev":
                try:
                    flows = f"; status lists {len(self.lab.status().get('flows') or [])} flows"
                except (RuntimeError, ValueError, subprocess.TimeoutExpired):
                    pass
            per = (held[1] - idle[1]) * 1024 / n
            self.say(f"  {label:<26} idle RSS {_fmt(idle[0])} PSS {_fmt(idle[1])}; with {n} idle TCP "
                     f"connections RSS {_fmt(held[0])} PSS {_fmt(held[1])} (PSS {per:.1f} kB/connection, "
                     f"opened in {opened:.1f} s, {len(benchlab.process_tree(pid))} processes){flows}")
            self.res[(key, "pss_idle")], self.res[(key, "pss_held")] = idle[1], held[1]
            self.res[(key, "rss_idle")], self.res[(key, "rss_held")] = idle[0], held[0]
            self.close_held()
            if key == "t2x":
                self.final.update(rss_idle_MB=idle[0], rss_1000_MB=held[0], pss_idle_MB=idle[1],
                                  pss_1000_MB=held[1])

    def hold(self, n: int):
        """n idle connections through the TUN, each echoed once (kept in
        self.socks); (n, seconds to open them)."""
        self.socks: list[socket.socket] = []
        t0 = time.monotonic()
        with self.lab.in_cli():
            for _ in range(n):
                self.socks.append(socket.socket())
        try:
            for s in self.socks:
                s.settimeout(10)
                s.connect((TUN_TARGET, HOLD_PORT))
            for i, s in enumerate(self.socks):
                s.sendall(i.to_bytes(4, "big"))
            for i, s in enumerate(self.socks):
                got = b""
                while len(got) < 4:
                    chunk = s.recv(4 - len(got))
                    if not chunk:
                        raise MeasureError(f"connection {i} closed before its echo")
                    got += chunk
                if got != i.to_bytes(4, "big"):
                    raise MeasureError(f"connection {i}: wrong echo {got!r}")
        except (MeasureError, OSError):
            self.close_held()
            raise
        opened = time.monotonic() - t0
        time.sleep(1.0)          # let the tunnel settle (buffers, timers)
        return n, opened

    def close_held(self) -> None:
        for s in getattr(self, "socks", []):
            s.close()
        self.socks = []

    def counters(self) -> None:
        """tun2xray's drop and engine counters so far (context for the figures)."""
        if self.lab.peer != "tun2xray" or self.lab.tunnel is None:
            return
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

    def summary(self) -> None:
        """tun2xray's figures beside hev's and the kernel's from this run."""
        r = self.res
        rows = [("conn/s (wrk)", "cps", "t2x"), ("conn/s (wrk), 1 worker", "cps", "t2x1"),
                ("conn/s (wrk), 2 workers", "cps", "t2x2"), ("CPU us/connection", "cpu_conn", "t2x"),
                ("CPU us/connection, 1 worker", "cpu_conn", "t2x1"),
                ("CPU us/connection, 2 workers", "cpu_conn", "t2x2")]
        for what, mtu in (("up", 1500), ("down", 1500), ("up", 9000), ("down", 9000)):
            rows.append((f"{what} MTU {mtu} Gbps", f"{what}{mtu}P1", "t2x"))
        rows += [(f"{w} -P 4 Gbps", f"{w}1500P4", "t2x") for w in ("up", "down")]
        for what, mtu in (("up", 1500), ("down", 1500), ("up", 4064), ("down", 4064)):
            rows.append((f"plain {what} MTU {mtu} Gbps", f"{what}{mtu}P1", "plain"))
            rows.append((f"plain {what} MTU {mtu} cpu-s/GB", f"{what}{mtu}P1cpu", "plain"))
        rows += [("PSS idle MB", "pss_idle", "t2x"), ("PSS 1,000 flows MB", "pss_held", "t2x"),
                 ("RSS idle MB", "rss_idle", "t2x"), ("RSS 1,000 flows MB", "rss_held", "t2x"),
                 ("PSS idle MB, 2 workers", "pss_idle", "t2x2"),
                 ("PSS 1,000 flows MB, 2 workers", "pss_held", "t2x2")]
        self.say(f"\nsummary ({self.peers['t2x'][0]} unless named; hev and the kernel in the same run)")
        self.say(f"  {'figure':<30} {'tun2xray':>9} {'hev':>9} {'kernel':>9} {'/hev':>7} {'/kernel':>8}")
        for name, what, key in rows:
            t = r.get((key, what), NAN)
            h = r.get(("hev", what), NAN)
            k = r.get(("kernel", what), NAN)
            self.say(f"  {name:<30} {_fmt(t):>9} {_fmt(h):>9} {_fmt(k):>9} {_fmt(_ratio(t, h)):>7} "
                     f"{_fmt(_ratio(t, k)):>8}")

    def run(self) -> int:
        a = self.args
        load = os.getloadavg()
        self.say(f"e2e_bench: tun2xray (tun://{self.lab.tun}"
                 f"{'?' + self.query if self.query else ''}) -> v2ray socks {SOCKS_ADDR}:{SOCKS_PORT}"
                 f" -> lo, vs direct over the veth; core {self.lab.core}; {os.cpu_count()} CPUs;"
                 f" load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f};"
                 f" tun2xray from {self.lab.repo}"
                 f"{'; hev ' + a.hev if a.hev else ''}{'; QUICK mode' if a.quick else ''}")
        self.say("(figures from a shared machine are noisy; compare ratios from the same run)")
        steps = {"mem": self.mem_runs, "tcp": self.tcp_runs, "udp": self.udp_runs, "cps": self.cps_runs}
        # memory first, on fresh processes: later runs grow the heap
        for name in STEPS:
            if name not in a.steps:
                continue
            try:
                steps[name]()
            except PHASE_ERRORS as e:
                self.fail(name, str(e))
        self.summary()
        self.say(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
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
    p.add_argument("--workers", type=int, default=None,
                   help="tun2xray worker processes of the default figures (default: as tun2xray starts, "
                        "one per core); one worker is measured beside it")
    p.add_argument("--hev", metavar="PATH",
                   help="hev-socks5-tunnel binary: measured as a peer in the same run")
    p.add_argument("--steps", default=",".join(STEPS),
                   help=f"which parts to run, comma-separated (default: {','.join(STEPS)})")
    p.add_argument("--repo", default=benchlab.REPO,
                   help="checkout whose tun2xray is benchmarked (default: this one)")
    p.add_argument("--prefix", default="eb", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = [x.strip() for x in args.steps.split(",") if x.strip()]
    bad = [x for x in args.steps if x not in STEPS]
    if bad:
        p.error(f"--steps: unknown {', '.join(bad)} (choose from {', '.join(STEPS)})")
    if args.hev and not os.access(args.hev, os.X_OK):
        p.error(f"--hev {args.hev}: not an executable file")
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
