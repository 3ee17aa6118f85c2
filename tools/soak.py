#!/usr/bin/env python3
"""soak: mixed real traffic through `tun2xray run --xray-config` for a long
while, sampling what a leak would make climb; fails on growth without bound
or on a healthy flow that loses (or changes) a byte.

    python3 tools/soak.py [--duration 1200] [--interval 5] [--json out.json]

The world is tools/netlab.py's (prefix ``sk``): clients in ``sk-cli`` reach
the targets only through the TUN ``sktun0``; tun2xray runs with its default
workers and supervises the local core itself (``--xray-config`` on a
``config.json`` link to ``nodes/a.json``; node ``b`` goes through a second
far core). Both hops are VLESS (a VMess hop's replay filter refuses about one
new connection in a thousand, docs/reliability.md).

Traffic, all at once for ``--duration`` seconds: new HTTP connections (a
Python client, 100 kB each, IPv4 and IPv6), curl downloads of the same
file, long rate-limited curl downloads, UDP echo on long-lived and on new
sockets, DNS with dig through the dokodemo-door rule, and idle TCP flows
that echo after sitting idle. Every byte received is compared with what was
sent or served. In the middle the core is killed (tun2xray restarts it) and
later ``tun2xray node use b`` switches nodes. A failed flow that was open
when such a disruption began is counted as cut by it (whenever its client
notices), and so is one begun while the core was down that fails until
``--grace`` seconds after traffic flows again (see cut_by); any other
failure is a lost healthy flow.

Every ``--interval`` seconds: RSS and PSS (``/proc/PID/smaps_rollup``) and
open fds of tun2xray's processes (supervisor and workers; the core is shown
apart), and from its status: live flows, asyncio tasks, buffered bytes,
stack timers, UDP associations. A metric "grows without bound" when, after
the warm-up (the first ``--warmup`` share of the run), the median of its
last third exceeds the median of its first third by more than
``rel * early + abs`` (per metric, see LIMITS). After the traffic stops,
every TCP flow must close and the buffered bytes return to zero within
``--drain`` seconds. Exit status 0 when all holds, 1 with a one-line reason
otherwise, 2 when the lab cannot be built.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import random
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import netlab
from netlab import DNS4, ECHO_PORT, HTTP_PORT, TARGET4, TARGET6

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAR = {"a": "10.201.0.2", "b": "10.201.0.3"}
FAR_PORT = netlab.VLESS_PORT
T2X = [sys.executable, "-m", "tun2xray"]

# metric -> (rel, abs): late median may exceed early median by rel*early + abs
LIMITS = {
    "rss_kb": (0.10, 12 << 10),
    "pss_kb": (0.10, 12 << 10),
    "fds": (0.25, 24),
    "tasks": (0.5, 40),
    "flows": (0.5, 60),
    "buffered": (1.0, 4 << 20),
    "timers": (0.5, 200),
    "assocs": (0.5, 8),
}
INFO = ("core_rss_kb",)
# the cores' policy: the lab's, but with the core's own default of 5 s for
# downlinkOnly (the lab's 30 s, for half-close tests, would hold every flow
# the client closed first for 30 s after the traffic stops)
POLICY = {"levels": {"0": {"handshake": 4, "connIdle": 300, "uplinkOnly": 1, "downlinkOnly": 5,
                           "bufferSize": 512}}}            # shown, not judged (the core is restarted mid-run)


# --------------------------------------------------------------------------
# the world: far cores a and b, node configs, the link, tun2xray

def node_config(uid: str, far: str, logdir: str, name: str) -> dict:
    return {"log": {"loglevel": "warning", "error": os.path.join(logdir, f"node-{name}.err")},
            "policy": POLICY,
            "inbounds": [
                {"tag": "socks", "listen": "127.0.0.1", "port": netlab.SOCKS_PORT, "protocol": "socks",
                 "settings": {"auth": "noauth", "udp": True, "ip": "127.0.0.1"}},
                {"tag": "dns", "listen": "127.0.0.1", "port": netlab.DOKODEMO_PORT,
                 "protocol": "dokodemo-door",
                 "settings": {"address": DNS4, "port": 53, "network": "tcp,udp"}}],
            "outbounds": [{"tag": "far", "protocol": "vless",
                           "settings": {"vnext": [{"address": far, "port": FAR_PORT,
                                                   "users": [{"id": uid, "encryption": "none"}]}]}}]}


def far_config(uid: str, addr: str, logdir: str, name: str) -> dict:
    return {"log": {"loglevel": "warning", "error": os.path.join(logdir, f"far-{name}.err")},
            "policy": POLICY,
            "inbounds": [{"listen": addr, "port": FAR_PORT, "protocol": "vless",
                          "settings": {"clients": [{"id": uid}], "decryption": "none"}}],
            "outbounds": [{"protocol": "freedom"}]}


class World:
    def __init__(self, lab, tun: str, workers: int | None = None):
        self.lab = lab
        self.tun = tun
        self.workers = workers          # None: tun2xray's default
        self.dir = os.path.join(lab.workdir, "xray")
        self.link = os.path.join(self.dir, "config.json")
        self.ctl = f"unix://{lab.workdir}/soak-ctl.sock"
        self.proc = None

    def build(self) -> None:
        lab = self.lab
        lab.ip(lab.cli_ns, "route", "add", "default", "via", netlab.VETH_SRV4)
        lab.start_servers()
        os.makedirs(os.path.join(self.dir, "nodes"))
        for name, addr in FAR.items():
            lab.ip(lab.srv_ns, "addr", "add", f"{addr}/32", "dev", "lo")
            path = lab._write_config(f"far-{name}.json", far_config(lab.user_id, addr, lab.workdir, name))
            p = lab.spawn(f"far-{name}", lab.srv_ns, netlab.core_cmd(lab.core, path))
            netlab.wait_port(lab.srv_ns, FAR_PORT, "tcp", proc=p)
            with open(os.path.join(self.dir, "nodes", f"{name}.json"), "w") as f:
                json.dump(node_config(lab.user_id, addr, lab.workdir, name), f, indent=1)
        os.symlink("nodes/a.json", self.link)

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "TUN2XRAY_WORKERS"}   # default workers
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        argv = T2X + ["run", "--device", f"tun://{self.tun}", "--xray-config", self.link,
                      "--control", self.ctl, "--log-level", "info"]
        if self.workers is not None:
            argv += ["--workers", str(self.workers)]
        self.proc = self.lab.run_tun2xray(argv, self.tun, name="tun2xray", env=env, timeout=60)

    def status(self, timeout: float = 5.0) -> dict | None:
        from tun2xray.control import query
        try:
            return query(self.ctl, timeout=timeout)
        except (OSError, ValueError):
            return None

    def echo_ok(self) -> bool:
        try:
            with netlab.netns(self.lab.cli_ns):
                s = socket.socket()
            with s:
                s.settimeout(2)
                s.connect((TARGET4, ECHO_PORT))
                s.sendall(b"alive?")
                return s.recv(6) == b"alive?"
        except OSError:
            return False

    def tree(self) -> dict:
        """pid -> comm of tun2xray's process and its descendants."""
        kids: dict = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    with open(f"/proc/{d}/stat") as f:
                        head, rest = f.read().rsplit(") ", 1)
                    kids.setdefault(int(rest.split()[1]), []).append((int(d), head.split(" (", 1)[1]))
        out, todo = {}, [self.proc.pid]
        with contextlib.suppress(OSError), open(f"/proc/{self.proc.pid}/comm") as f:
            out[self.proc.pid] = f.read().strip()
        while todo:
            for pid, comm in kids.get(todo.pop(), []):
                out[pid] = comm
                todo.append(pid)
        return out


# --------------------------------------------------------------------------
# outcomes

class Ledger:
    """Every operation's outcome: kind, start, end, ok, error class, detail, bytes."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ops: list[tuple] = []
        self.corrupt: list[str] = []
        self.cuts: list[tuple] = []
        self.retries: list[tuple] = []        # (kind, when) of UDP echoes that needed a second send

    def add(self, kind: str, t0: float, ok: bool, err: str = "", detail: str = "", nbytes: int = 0):
        with self.lock:
            self.ops.append((kind, t0, time.monotonic(), ok, err, detail, nbytes))

    def bad_bytes(self, what: str) -> None:
        with self.lock:
            self.corrupt.append(what)


def _err_class(e: BaseException) -> str:
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timeout"
    if isinstance(e, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)) or \
            getattr(e, "errno", None) in (errno.ECONNRESET, errno.EPIPE, errno.ECONNREFUSED):
        return "reset"
    return "error"


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        b = s.recv(n - len(buf))
        if not b:
            raise ConnectionResetError("EOF")
        buf += b
    return bytes(buf)


# --------------------------------------------------------------------------
# traffic (each loop runs in its own thread, moved into the client namespace)

class Traffic:
    def __init__(self, world: World, ledger: Ledger, args):
        self.w = world
        self.lab = world.lab
        self.ledger = ledger
        self.args = args
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.small = self._read(self.lab.files["small.bin"][0])
        self.long = self._read(self.lab.files["long.bin"][0])

    @staticmethod
    def _read(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def spawn(self, name, fn, *a):
        def body():
            with netlab.netns(self.lab.cli_ns):
                while not self.stop.is_set():
                    t0 = time.monotonic()
                    try:
                        fn(*a)
                    except OSError as e:          # a client call failed outside the checks above
                        self.ledger.add(name.rstrip("0123456789"), t0, False, _err_class(e), repr(e))
                        self.pause(0.5)
        t = threading.Thread(target=body, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def start(self) -> None:
        a = self.args
        for i in range(a.http_threads):
            self.spawn(f"http{i}", self.http_new, TARGET6 if i % 2 else TARGET4)
        self.spawn("curl", self.curl_small)
        for i in range(a.long_threads):
            self.spawn(f"long{i}", self.long_download)
        self.spawn("udp4", self.udp_stream, TARGET4)
        self.spawn("udp6", self.udp_stream, TARGET6)
        self.spawn("udpnew", self.udp_new)
        self.spawn("dns", self.dns)
        for i in range(a.idle_flows):
            self.spawn(f"idle{i}", self.idle_flow, TARGET6 if i % 2 else TARGET4, i)

    def join(self, timeout: float) -> None:
        self.stop.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))

    def pause(self, secs: float) -> None:
        self.stop.wait(secs)

    # -- HTTP: a new connection per request, our own client

    def http_new(self, host: str) -> None:
        t0 = time.monotonic()
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        got = bytearray()
        try:
            with socket.socket(fam, socket.SOCK_STREAM) as s:
                s.settimeout(15)
                s.connect((host, HTTP_PORT))
                s.sendall(b"GET /small.bin HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
                while True:
                    b = s.recv(65536)
                    if not b:
                        break
                    got += b
        except OSError as e:
            self._check_prefix("http", got, e)
            self.ledger.add("http", t0, False, _err_class(e), f"{host}: {e}", len(got))
        else:
            head, _, body = bytes(got).partition(b"\r\n\r\n")
            if body != self.small or not head.startswith(b"HTTP/1.1 200"):
                self.ledger.bad_bytes(f"http {host}: {len(body)} B, head {head[:40]!r}")
                self.ledger.add("http", t0, False, "corrupt", host, len(body))
            else:
                self.ledger.add("http", t0, True, nbytes=len(body))
        self.pause(1.0 / self.args.http_rate)

    def _check_prefix(self, kind, got, e) -> None:
        """A cut HTTP reply must still be a true prefix of the file."""
        _, sep, body = bytes(got).partition(b"\r\n\r\n")
        if sep and self.small[:len(body)] != body:
            self.ledger.bad_bytes(f"{kind}: a cut reply's {len(body)} B differ from the file ({e})")

    # -- curl: short and long downloads, streamed and compared as they come

    def _curl(self, kind: str, name: str, want: bytes, rate: float = 0, max_time: float = 30) -> None:
        """curl NAME; with ``rate``, read its output no faster than that (curl
        then stops reading its socket: a slow client, flow control end to end;
        curl 7.88's own --limit-rate does not hold back a download)."""
        t0 = time.monotonic()
        argv = ["ip", "netns", "exec", self.lab.cli_ns, "curl", "-sS", "--fail", "--max-time",
                str(int(max_time)), self.lab.url(name, v6=random.random() < 0.5)]
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
        h = hashlib.sha256()
        n = 0
        same = True
        stopped = False
        while True:
            if self.stop.is_set():
                stopped = True
                break
            ahead = t0 + n / rate - time.monotonic() if rate else 0
            if ahead > 0:
                self.stop.wait(min(ahead, 0.5))
                continue
            r, _, _ = select.select([p.stdout], [], [], 0.5)
            if not r:
                continue
            b = os.read(p.stdout.fileno(), 1 << 16)
            if not b:
                break
            if same and want[n:n + len(b)] != b:
                same = False
            h.update(b)
            n += len(b)
        if stopped:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        err = p.communicate()[1].decode(errors="replace").strip()
        rc = p.wait()
        if not same:
            self.ledger.bad_bytes(f"{kind}: byte {n} differs from the file")
        if stopped:
            self.ledger.add(kind + "_stopped", t0, True, nbytes=n)
        elif rc == 0 and n == len(want) and same and h.hexdigest() == self.lab.files[name][2]:
            self.ledger.add(kind, t0, True, nbytes=n)
        else:
            cls = "timeout" if rc == 28 else ("corrupt" if not same else "reset")
            self.ledger.add(kind, t0, False, cls, f"curl rc {rc} after {n} B: {err[-120:]}", n)

    def curl_small(self) -> None:
        self._curl("curl", "small.bin", self.small)
        self.pause(self.args.curl_every)

    def long_download(self) -> None:
        """A long download by a slow reader: a small receive buffer and reads
        no faster than --long-rate, so the flow lives for the whole transfer
        (curl would let the kernel buffer megabytes and end the flow early)."""
        host = random.choice((TARGET4, TARGET6))
        t0 = time.monotonic()
        want, rate = self.long, self.args.long_rate
        h = hashlib.sha256()
        n = 0
        head = bytearray()
        try:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
                s.settimeout(20)
                s.connect((host, HTTP_PORT))
                s.sendall(b"GET /long.bin HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
                while b"\r\n\r\n" not in head:
                    b = s.recv(4096)
                    if not b:
                        raise ConnectionResetError("EOF in the reply header")
                    head += b
                head, _, body = bytes(head).partition(b"\r\n\r\n")
                while True:
                    if body:
                        if want[n:n + len(body)] != body:
                            self.ledger.bad_bytes(f"long {host}: byte {n} differs from the file")
                            self.ledger.add("long", t0, False, "corrupt", host, n)
                            return
                        h.update(body)
                        n += len(body)
                    if self.stop.is_set():
                        self.ledger.add("long_stopped", t0, True, nbytes=n)
                        return
                    ahead = t0 + n / rate - time.monotonic()
                    if ahead > 0:
                        self.stop.wait(ahead)
                    body = s.recv(16 << 10)
                    if not body:
                        break
        except OSError as e:
            self.ledger.add("long", t0, False, _err_class(e), f"{host} after {n} B: {e}", n)
            return
        if not head.startswith(b"HTTP/1.1 200") or n != len(want) or h.hexdigest() != self.lab.files["long.bin"][2]:
            self.ledger.add("long", t0, False, "reset", f"{host}: {n} of {len(want)} B, {head[:20]!r}", n)
        else:
            self.ledger.add("long", t0, True, nbytes=n)

    # -- UDP: a long-lived socket (one flow), and new sockets (new flows)

    def _udp_echo(self, s: socket.socket, dst, seq: int, kind: str) -> tuple[bool, str]:
        payload = struct.pack("!Q", seq) + random.randbytes(random.randint(8, 1200))
        for attempt in range(2):               # a UDP client sends again once
            s.sendto(payload, dst)
            deadline = time.monotonic() + 2.0
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([s], [], [], left)[0]:
                    break
                try:
                    data = s.recv(65535)
                except OSError as e:
                    return False, f"recv: {e}"
                if data == payload:
                    if attempt:
                        with self.ledger.lock:
                            self.ledger.retries.append((kind, time.monotonic()))
                    return True, ""
                if data[:8] != payload[:8]:
                    continue                   # a late echo of an earlier datagram
                self.ledger.bad_bytes(f"udp echo of {len(payload)} B came back as {len(data)} B")
                return False, "corrupt"
        return False, "no echo"

    def udp_stream(self, host: str) -> None:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            seq = 0
            while not self.stop.is_set():
                t0 = time.monotonic()
                seq += 1
                ok, why = self._udp_echo(s, (host, ECHO_PORT), seq, "udp")
                self.ledger.add("udp", t0, ok, "" if ok else "timeout", why, 0)
                self.pause(self.args.udp_every)

    def udp_new(self) -> None:
        host = random.choice((TARGET4, TARGET6))
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
            t0 = time.monotonic()
            ok, why = self._udp_echo(s, (host, ECHO_PORT), 1, "udp_new")
            self.ledger.add("udp_new", t0, ok, "" if ok else "timeout", why, 0)
        self.pause(self.args.udp_new_every)

    # -- DNS through the dokodemo-door rule

    def dns(self) -> None:
        qtype, want = random.choice((("A", TARGET4), ("AAAA", TARGET6)))
        t0 = time.monotonic()
        try:
            r = subprocess.run(["ip", "netns", "exec", self.lab.cli_ns, "dig", "+short", "+time=2",
                                "+tries=2", f"@{DNS4}", "web.e2.test", qtype],
                               capture_output=True, timeout=15, check=False)
            out = r.stdout.decode().split()
            ok = out == [want]
            self.ledger.add("dns", t0, ok, "" if ok else "timeout", f"{qtype}: {out} rc {r.returncode}")
        except subprocess.TimeoutExpired:
            self.ledger.add("dns", t0, False, "timeout", "dig hung")
        self.pause(self.args.dns_every)

    # -- idle TCP flows: echo, sit idle, echo again; anything unasked is a cut

    def idle_flow(self, host: str, i: int) -> None:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        t0 = time.monotonic()
        try:
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect((host, ECHO_PORT))
        except OSError as e:
            s.close()
            self.ledger.add("idle", t0, False, _err_class(e), f"connect: {e}")
            self.pause(1.0)
            return
        with s:
            wait = random.uniform(0, self.args.idle)          # spread the flows' echoes
            while not self.stop.is_set():
                t0 = time.monotonic()
                payload = random.randbytes(random.randint(1, 2000))
                try:
                    s.sendall(payload)
                    got = _recv_exact(s, len(payload))
                except OSError as e:
                    self.ledger.add("idle", t0, False, _err_class(e), f"echo: {e}")
                    return
                if got != payload:
                    self.ledger.bad_bytes(f"idle flow {i}: echo of {len(payload)} B differs")
                    self.ledger.add("idle", t0, False, "corrupt", "")
                    return
                self.ledger.add("idle", t0, True, nbytes=len(payload))
                if not self._sit_idle(s, wait):
                    return
                wait = self.args.idle

    def _sit_idle(self, s: socket.socket, secs: float) -> bool:
        """Idle: the flow must stay silent. A RST or FIN now is a cut, noted
        when it comes (False); True when the idle time passed quietly."""
        end = time.monotonic() + secs
        while not self.stop.is_set() and time.monotonic() < end:
            if select.select([s], [], [], min(1.0, max(0.0, end - time.monotonic())))[0]:
                t0 = time.monotonic()
                try:
                    b = s.recv(1)
                    why, cls = ("EOF while idle", "reset") if not b else ("unasked data while idle", "corrupt")
                except OSError as e:
                    why, cls = f"while idle: {e}", _err_class(e)
                self.ledger.add("idle", t0, False, cls, why)
                return False
        return True


# --------------------------------------------------------------------------
# sampling

def _proc_kb(pid: int, path: str, key: str) -> int:
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def sample(world: World, t0: float) -> dict:
    tree = world.tree()
    core = {p for p, c in tree.items() if c in ("v2ray", "xray")}
    ours = [p for p in tree if p not in core]
    fds = 0
    for p in ours:
        with contextlib.suppress(OSError):
            fds += len(os.listdir(f"/proc/{p}/fd"))
    row = {"t": round(time.monotonic() - t0, 1), "procs": len(ours),
           "rss_kb": sum(_proc_kb(p, "status", "VmRSS:") for p in ours),
           "pss_kb": sum(_proc_kb(p, "smaps_rollup", "Pss:") for p in ours),
           "fds": fds, "core_rss_kb": sum(_proc_kb(p, "status", "VmRSS:") for p in core)}
    st = world.status()
    if st is None:
        row["status"] = False
        return row
    res = st.get("resources", {})
    stack = st.get("stack", {})
    row.update(status=True, flows=len(st.get("flows", [])), tcp=stack.get("tcp_flows", 0),
               udp=stack.get("udp_flows", 0), tasks=res.get("tasks", 0),
               buffered=res.get("buffered_bytes", 0), timers=stack.get("timers", 0),
               assocs=st.get("udp_associations", 0), worker_restarts=st.get("worker_restarts", 0),
               core_pid=(st.get("xray") or {}).get("core", {}).get("pid"),
               pending_why=res.get("close_reasons_held", 0))
    return row


class Sampler(threading.Thread):
    def __init__(self, world: World, t0: float, interval: float):
        super().__init__(name="sampler", daemon=True)
        self.world, self.t0, self.interval = world, t0, interval
        self.rows: list[dict] = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.rows.append(sample(self.world, self.t0))
            self.stop.wait(self.interval)


def growth(rows: list[dict], metric: str, warmup_t: float) -> dict:
    """Early and late medians after the warm-up, and whether the late one
    breaks the metric's bound."""
    pts = [(r["t"], r[metric]) for r in rows if r.get(metric) is not None and r["t"] >= warmup_t]
    vals = [r[metric] for r in rows if r.get(metric) is not None]
    out = {"start": vals[0] if vals else None, "end": vals[-1] if vals else None,
           "max": max(vals) if vals else None}
    if len(pts) < 6:
        out["verdict"] = "too few samples"
        return out
    span = pts[-1][0] - pts[0][0]
    early = [v for t, v in pts if t <= pts[0][0] + span / 3]
    late = [v for t, v in pts if t >= pts[-1][0] - span / 3]
    e, lt = statistics.median(early), statistics.median(late)
    out.update(early=e, late=lt)
    # least-squares slope per minute over the judged samples (shown, not judged)
    mt = statistics.fmean(t for t, _ in pts)
    mv = statistics.fmean(v for _, v in pts)
    den = sum((t - mt) ** 2 for t, _ in pts)
    out["slope_per_min"] = round(60 * sum((t - mt) * (v - mv) for t, v in pts) / den, 2) if den else 0.0
    if metric in LIMITS:
        rel, ab = LIMITS[metric]
        out["bound"] = round(e * (1 + rel) + ab, 1)
        out["verdict"] = "grows" if lt > out["bound"] else "bounded"
    else:
        out["verdict"] = "info"
    return out


# --------------------------------------------------------------------------
# the run

class Disruption:
    def __init__(self, name: str, t0: float):
        self.name, self.start, self.ready, self.detail = name, time.monotonic() - t0, None, ""
        self.seen_after = 0.0          # the longest a client took to see its flow's cut


def disrupt_restart(world: World, t0: float) -> Disruption:
    d = Disruption("core restart", t0)
    old = world.status()["xray"]["core"]["pid"]
    os.kill(old, signal.SIGKILL)

    def back():
        st = world.status()
        c = (st or {}).get("xray", {}).get("core", {})
        return c.get("alive") and c.get("pid") not in (None, old) and world.echo_ok()
    netlab.wait_until(back, 60, "the core's restart and an echo through it", interval=0.2)
    d.ready = time.monotonic() - t0
    d.detail = f"core pid {old} killed (SIGKILL); restarted"
    return d


def disrupt_switch(world: World, t0: float, node: str) -> Disruption:
    d = Disruption(f"node use {node}", t0)
    r = world.lab.cli_run(T2X + ["node", "use", node, "--xray-config", world.link, "--control", world.ctl],
                          timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"node use {node} failed: {r.stderr.decode().strip()}")
    netlab.wait_until(world.echo_ok, 60, "an echo through the new node", interval=0.2)
    d.ready = time.monotonic() - t0
    d.detail = f"switched to node {node}"
    return d


def cut_by(disruptions: list, start: float, end: float, grace: float):
    """The disruption that cut a flow which failed at ``end``, or None.

    A flow open when a disruption began is cut by it, whenever the client
    notices: neither a killed core nor a node switch leaves a flow of the old
    core alive, and a slow reader sees the end only after reading what the
    path still held (tun2xray's buffers and the kernel's socket buffers on
    both sides, megabytes at a low rate). A flow that began while the core
    was down is cut by it only if it fails within ``grace`` seconds after
    traffic flows again; a flow begun later is healthy."""
    for d in reversed(disruptions):
        if d.start > end:
            continue
        if start < d.start or end <= d.ready + grace:
            return d
        return None
    return None


def classify(ledger: Ledger, t0: float, disruptions: list, grace: float) -> dict:
    kinds: dict = {}
    lost = []
    ledger.retries = [(k, round(t - t0, 1)) for k, t in ledger.retries]
    for kind, s, e, ok, err, detail, n in ledger.ops:
        k = kinds.setdefault(kind, {"ok": 0, "bytes": 0, "cut": {}, "lost": 0, "ok_after": 0})
        k["bytes"] += n if ok else 0
        if ok:
            k["ok"] += 1
            if disruptions and s - t0 > disruptions[-1].ready:
                k["ok_after"] += 1
            continue
        hit = cut_by(disruptions, s - t0, e - t0, grace)
        end = e - t0
        if hit is not None and err != "corrupt":
            key = f"{hit.name} ({err})"
            k["cut"][key] = k["cut"].get(key, 0) + 1
            ledger.cuts.append((kind, round(s - t0, 1), round(end, 1), hit.name, err, detail))
            hit.seen_after = max(hit.seen_after, round(end - hit.start, 1))
        else:
            k["lost"] += 1
            lost.append(f"{kind} at {end:.1f}s: {err} {detail}".strip())
    return {"kinds": kinds, "lost": lost}


def verdict(args, rows, cls, ledger, gr, drained, disruptions) -> str | None:
    if ledger.corrupt:
        return f"{len(ledger.corrupt)} transfer(s) carried wrong bytes, first: {ledger.corrupt[0]}"
    if cls["lost"]:
        return f"{len(cls['lost'])} healthy flow(s) lost, first: {cls['lost'][0]}"
    for m, g in gr.items():
        if g.get("verdict") == "grows":
            return (f"{m} grows without bound: late median {g['late']:g} > bound {g['bound']:g} "
                    f"(early median {g['early']:g})")
        if g.get("verdict") == "too few samples" and m in LIMITS:
            return f"too few samples to judge {m} (run longer or sample more often)"
    for kind in ("http", "curl", "long", "udp", "udp_new", "dns", "idle"):
        k = cls["kinds"].get(kind)
        if not k or not k["ok"]:
            return f"no {kind} transfer succeeded"
        if disruptions and not k["ok_after"]:
            return f"no {kind} transfer succeeded after the last disruption"
    bad_status = sum(1 for r in rows if not r.get("status"))
    if bad_status > max(1, len(rows) // 20):
        return f"the control socket did not answer {bad_status} of {len(rows)} status requests"
    restarts = max((r.get("worker_restarts", 0) for r in rows), default=0)
    if restarts:
        return f"{restarts} worker restart(s) during the run"
    return drained


def drain(world: World, secs: float, udp: bool) -> tuple[str | None, dict]:
    last = {}

    def empty():
        nonlocal last
        st = world.status()
        if st is None:
            return False
        last = {"tcp": st["stack"].get("tcp_flows"), "udp": st["stack"].get("udp_flows"),
                "buffered": st.get("resources", {}).get("buffered_bytes"),
                "tasks": st.get("resources", {}).get("tasks"), "assocs": st.get("udp_associations")}
        return last["tcp"] == 0 and last["buffered"] == 0 and (not udp or last["udp"] == last["assocs"] == 0)
    t0 = time.monotonic()
    try:
        netlab.wait_until(empty, secs, "the flows to drain", interval=0.5)
        last["seconds"] = round(time.monotonic() - t0, 1)
    except TimeoutError:
        return (f"{last.get('tcp')} TCP flow(s), {last.get('udp')} UDP flow(s) and {last.get('buffered')} "
                f"buffered bytes left {secs:g}s after the traffic stopped"), last
    return None, last


def report(args, rows, gr, cls, disruptions, ledger, drained_at, load, fail) -> str:
    out = [(f"soak: {args.duration:g}s, {len(rows)} samples every {args.interval:g}s, "
            f"load average {load[0]:.2f}/{load[1]:.2f} at start/end")]
    out.append(f"{'metric':<12}{'start':>12}{'end':>12}{'max':>12}{'early':>12}{'late':>12}"
               f"{'bound':>12}{'drained':>10}  verdict")
    for m, g in gr.items():
        def f(v):
            return "-" if v is None else f"{v:g}"
        out.append(f"{m:<12}{f(g.get('start')):>12}{f(g.get('end')):>12}{f(g.get('max')):>12}"
                   f"{f(g.get('early')):>12}{f(g.get('late')):>12}{f(g.get('bound')):>12}"
                   f"{f(drained_at.get(m)):>10}  {g['verdict']}")
    out.append(f"{'traffic':<12}{'ok':>8}{'MB':>10}{'lost':>6}  cut by a disruption")
    for kind, k in sorted(cls["kinds"].items()):
        cut = ", ".join(f"{v} {n}" for n, v in sorted(k["cut"].items())) or "-"
        out.append(f"{kind:<12}{k['ok']:>8}{k['bytes'] / 1e6:>10.1f}{k['lost']:>6}  {cut}")
    out.append(f"udp echoes that needed a second send: {len(ledger.retries)} "
               f"({', '.join(f'{k} at {t:.1f}s' for k, t in ledger.retries[:8]) or '-'})")
    if drained_at:
        out.append(f"after the traffic stopped: {drained_at.get('tcp')} TCP flows, {drained_at.get('udp')} UDP "
                   f"flows (they end after udp_timeout), {drained_at.get('assocs')} UDP associations, "
                   f"{drained_at.get('buffered')} B buffered, "
                   f"{drained_at.get('tasks')} tasks, within {drained_at.get('seconds', '-')} s")
    for d in disruptions:
        out.append(f"{d.name} at {d.start:.1f}s: {d.detail}; traffic flowed again after "
                   f"{d.ready - d.start:.1f}s; the last client saw its cut after {d.seen_after:g}s")
    out.append("verdict: " + ("PASS" if fail is None else "FAIL: " + fail))
    return "\n".join(out)


def run(args) -> int:
    files = {"small.bin": (100_000, 1), "long.bin": (int(args.long_mb * (1 << 20)), 2)}
    lab = netlab.Lab(prefix=args.prefix, start=False, files=files, hop="vless")
    with lab:
        w = World(lab, f"{args.prefix}tun0", args.workers)
        w.build()
        w.start()
        ledger = Ledger()
        traffic = Traffic(w, ledger, args)
        t0 = time.monotonic()
        load0 = os.getloadavg()
        sampler = Sampler(w, t0, args.interval)
        sampler.start()
        traffic.start()
        disruptions = []
        for at, what in ((0.45, "restart"), (0.55, "switch")):
            time.sleep(max(0.0, t0 + args.duration * at - time.monotonic()))
            if w.proc.poll() is not None:
                break
            disruptions.append(disrupt_restart(w, t0) if what == "restart" else disrupt_switch(w, t0, "b"))
        time.sleep(max(0.0, t0 + args.duration - time.monotonic()))
        sampler.stop.set()
        sampler.join(args.interval + 10)
        traffic.join(30)
        load1 = os.getloadavg()
        if w.proc.poll() is not None:
            fail = f"tun2xray exited with {w.proc.returncode}: {lab.log('tun2xray').strip()[-300:]}"
            drained, drained_at = fail, {}
        else:
            drained, drained_at = drain(w, args.drain, args.drain_udp)
        rows = sampler.rows
        warm = args.duration * args.warmup
        gr = {m: growth(rows, m, warm) for m in (*LIMITS, *INFO)}
        cls = classify(ledger, t0, disruptions, args.grace)
        fail = verdict(args, rows, cls, ledger, gr, drained, disruptions)
        print(report(args, rows, gr, cls, disruptions, ledger, drained_at, (load0[0], load1[0]), fail))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "samples": rows, "growth": gr,
                           "traffic": cls["kinds"], "lost": cls["lost"], "corrupt": ledger.corrupt,
                           "cuts": ledger.cuts, "udp_retries": ledger.retries,
                           "disruptions": [vars(d) for d in disruptions], "drained": drained_at,
                           "load": [load0, load1], "verdict": fail or "PASS"}, f, indent=1)
        if fail is not None:
            print(f"soak: FAIL: {fail}", file=sys.stderr)
            return 1
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="soak", description=__doc__.split("\n", 1)[0])
    p.add_argument("--duration", type=float, default=1200, help="seconds of traffic (default 1200)")
    p.add_argument("--interval", type=float, default=5, help="seconds between samples (default 5)")
    p.add_argument("--warmup", type=float, default=0.2, help="share of the run before judging growth")
    p.add_argument("--grace", type=float, default=10, help="seconds after traffic flows again in which "
                   "a flow begun during a disruption still counts as cut by it when it fails")
    p.add_argument("--drain", type=float, default=30, help="seconds for every TCP flow to close after the traffic stops")
    p.add_argument("--drain-udp", action="store_true", help="also wait for every UDP flow and "
                   "association to end (give --drain more than the udp_timeout, 60 s)")
    p.add_argument("--prefix", default="sk")
    p.add_argument("--workers", type=int, help="tun2xray worker processes (default: tun2xray's own default)")
    p.add_argument("--http-threads", type=int, default=2)
    p.add_argument("--http-rate", type=float, default=2, help="requests/s per HTTP thread")
    p.add_argument("--curl-every", type=float, default=2)
    p.add_argument("--long-threads", type=int, default=2)
    p.add_argument("--long-mb", type=float, default=32)
    p.add_argument("--long-rate", type=float, default=512 << 10, help="bytes/s per long download")
    p.add_argument("--udp-every", type=float, default=0.2)
    p.add_argument("--udp-new-every", type=float, default=1.0)
    p.add_argument("--dns-every", type=float, default=2.0)
    p.add_argument("--idle-flows", type=int, default=32)
    p.add_argument("--idle", type=float, default=30, help="seconds an idle flow sits between echoes")
    p.add_argument("--json", help="write samples, summary and verdict here")
    args = p.parse_args(argv)
    if args.duration < 20 or args.interval <= 0:
        p.error("--duration must be at least 20 s and --interval positive")
    try:
        return run(args)
    except (OSError, RuntimeError, TimeoutError, subprocess.SubprocessError) as e:
        print(f"soak: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
