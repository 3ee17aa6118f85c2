#!/usr/bin/env python3
"""benchlab: the two-namespace world of tools/bench/e2e_bench.py.

Built on tools/netlab.py (namespaces, veth, process spawning, readiness
polls) but with a plain SOCKS hop instead of netlab's VMess pair::

    netns eb-cli                                netns eb-srv
    ┌───────────────────────────────┐          ┌────────────────────────────────────┐
    │ TUN ebtun0 + tun2xray         │          │ v2ray: socks 10.200.0.2:1080 (udp) │
    │   10.99.0.0/24 dev ebtun0     │   veth   │        freedom outbound            │
    │ 10.98.0.0/24 via 10.200.0.2   │ebv0-ebv1 │ lo: 10.99.0.10  (tunnel target)    │
    │ clients: iperf3, wrk, python  │─────────►│     10.98.0.10  (direct target)    │
    └───────────────────────────────┘10.200.0.1│ iperf3 -s on each target, nginx :80│
                                      /.2      │ hold/echo :7 (asyncio)             │
                                               └────────────────────────────────────┘

The tunnel target (10.99.0.10) is reached only through the TUN (tun2xray ->
SOCKS on the veth -> v2ray -> lo); the direct target (10.98.0.10) straight
over the veth: the kernel's own path, with the same servers behind it.

``python3 benchlab.py hold --port 7`` is the idle-connection server run in
eb-srv (internal).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tools"))

import netlab  # noqa: E402  (tools/ is not a package)
from netlab import VETH_SRV4, wait_port, wait_until  # noqa: E402

TUN_TARGET = netlab.TARGET4          # 10.99.0.10, routed through the TUN
TUN_NET = netlab.TARGET_NET4
DIRECT_TARGET = "10.98.0.10"         # routed over the veth
DIRECT_NET = "10.98.0.0/24"
SOCKS_ADDR = VETH_SRV4
SOCKS_PORT = 1080
IPERF_PORT = 5201
HTTP_PORT = 80
HOLD_PORT = 7
TUN = "ebtun0"

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def embedded_env(workdir: str, repo: str, absent=("uvloop",)) -> dict:
    """The environment of a C host embedding libtun2xray (tools/abi_host.c):
    its Python finds *repo* and this interpreter's site-packages (cffi's
    backend) through TUN2XRAY_PYTHONPATH, which replaces the paths baked
    into the library, and each module named in *absent* fails to import
    there (a stub first on that path: uvloop as on iOS, ssl for a lean host)."""
    import site

    stubs = os.path.join(workdir, "absent")
    os.makedirs(stubs, exist_ok=True)
    for mod in absent:
        with open(os.path.join(stubs, mod + ".py"), "w") as f:
            f.write("raise ImportError('absent from this host (tools/bench/benchlab.py embedded_env)')\n")
    sites = [p for p in site.getsitepackages() if os.path.isdir(p)]
    env = dict(os.environ, TUN2XRAY_PYTHONPATH=os.pathsep.join([stubs, repo] + sites))
    env.pop("PYTHONPATH", None)
    return env


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (a supervisor's worker processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _cpu_one(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
    except OSError:
        return 0.0
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its descendants (workers), in seconds."""
    return sum(_cpu_one(p) for p in process_tree(pid))


def _rss_one(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` and its descendants in MB (VmRSS summed)."""
    total = sum(_rss_one(p) for p in process_tree(pid))
    if total == 0.0:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return total


def _pss_one(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def pss_mb(pid: int) -> float:
    """Proportional set size of ``pid`` and its descendants in MB: each
    page shared by k processes counts 1/k in each (smaps_rollup Pss
    summed), so pages a supervisor shares with its workers count once."""
    total = sum(_pss_one(p) for p in process_tree(pid))
    if total == 0.0:
        raise RuntimeError(f"no Pss for pid {pid}")
    return total


HEV_CONFIG = """\
tunnel:
  name: {tun}
  mtu: {mtu}
  ipv4: 198.18.0.1
socks5:
  port: {port}
  address: {addr}
  udp: 'udp'
"""


def socks_core_config(log_dir: str) -> dict:
    """v2ray: a plain socks inbound (UDP on) on the veth address, freedom out."""
    return {
        "log": {"loglevel": "warning", "error": os.path.join(log_dir, "v2ray.err"),
                "access": ""},
        # NOTES.md: v2ray closes a connection uplinkOnly/downlinkOnly seconds
        # after one direction ends; clients here close themselves, so the
        # defaults do. connIdle long: the idle-connection test holds them.
        "policy": {"levels": {"0": {"handshake": 4, "connIdle": 600}}},
        "inbounds": [
            {"tag": "socks", "listen": SOCKS_ADDR, "port": SOCKS_PORT, "protocol": "socks",
             "settings": {"auth": "noauth", "udp": True, "ip": SOCKS_ADDR}},
        ],
        "outbounds": [{"tag": "direct", "protocol": "freedom", "settings": {}}],
    }


NGINX_CONF = """\
user root;
worker_processes 1;
daemon off;
master_process on;
pid {wd}/nginx.pid;
error_log {wd}/nginx.err warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {wd}/nginx-body;
    proxy_temp_path {wd}/nginx-proxy;
    fastcgi_temp_path {wd}/nginx-fastcgi;
    uwsgi_temp_path {wd}/nginx-uwsgi;
    scgi_temp_path {wd}/nginx-scgi;
    keepalive_requests 1000000;
    server {{
        listen {port} backlog=4096 reuseport;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


class BenchLab(netlab.Lab):
    """eb-cli / eb-srv with the plain SOCKS core and the bench's servers.

    A context manager like ``netlab.Lab``: every process and both namespaces
    are gone after the block, also on an exception or Ctrl-C.
    """

    def __init__(self, prefix: str = "eb", workdir: str | None = None, repo: str = REPO,
                 workers: int = 1):
        super().__init__(prefix=prefix, workdir=workdir, files={}, start=False)
        self.repo = os.path.abspath(repo)     # the checkout whose tun2xray runs
        self.workers = workers                # TUN2XRAY_WORKERS for tun2xray run
        self.tun = f"{prefix}tun0"
        self.ctl = os.path.join(self.workdir, "ctl.sock")
        self.tunnel_mtu = None
        self.peer = "tun2xray"                # the process name of what serves the TUN now

    # -- network ---------------------------------------------------------

    def _make_network(self) -> None:
        super()._make_network()
        self.ip(self.srv_ns, "addr", "add", f"{DIRECT_TARGET}/32", "dev", "lo")
        self.ip(self.cli_ns, "route", "replace", DIRECT_NET, "via", VETH_SRV4, "dev", self.veth_cli)
        for ns in (self.cli_ns, self.srv_ns):
            # many short connections: wide port range, reuse TIME_WAIT ports
            self._sysctl(ns, "net.ipv4.ip_local_port_range", "1024 65000")
            self._sysctl(ns, "net.ipv4.tcp_tw_reuse", "1")
            self._sysctl(ns, "net.core.somaxconn", "4096")
            self._sysctl(ns, "net.ipv4.tcp_max_syn_backlog", "4096")

    def set_veth_mtu(self, mtu: int) -> None:
        self.ip(self.cli_ns, "link", "set", self.veth_cli, "mtu", str(mtu))
        self.ip(self.srv_ns, "link", "set", self.veth_srv, "mtu", str(mtu))

    def setup(self) -> None:
        super().setup()
        self.start_bench_servers()

    # -- servers in eb-srv ---------------------------------------------------

    def start_bench_servers(self) -> None:
        for tag, addr in (("tun", TUN_TARGET), ("direct", DIRECT_TARGET)):
            p = self.spawn(f"iperf3-{tag}", self.srv_ns,
                           ["iperf3", "-s", "-B", addr, "-p", str(IPERF_PORT)])
        wait_until(lambda: self._listeners("tcp", IPERF_PORT) >= 2, 10, "two iperf3 servers")
        wd = self.workdir
        conf = os.path.join(wd, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(wd=wd, port=HTTP_PORT))
        p = self.spawn("nginx", self.srv_ns, ["nginx", "-c", conf, "-p", wd + "/"])
        wait_port(self.srv_ns, HTTP_PORT, "tcp", proc=p)
        p = self.spawn("hold", self.srv_ns, [sys.executable, os.path.abspath(__file__), "hold",
                                             "--port", str(HOLD_PORT)])
        wait_port(self.srv_ns, HOLD_PORT, "tcp", proc=p)
        cfg = self._write_config("v2ray.json", socks_core_config(wd))
        p = self.spawn("v2ray", self.srv_ns, netlab.core_cmd(self.core, cfg))
        wait_port(self.srv_ns, SOCKS_PORT, "tcp", proc=p)
        wait_port(self.srv_ns, SOCKS_PORT, "udp", proc=p)

    def _listeners(self, proto: str, port: int) -> int:
        with netlab.netns(self.srv_ns):
            with open(f"/proc/thread-self/net/{proto}") as f:
                rows = f.read().splitlines()[1:]
        want = f":{port:04X}"
        return sum(1 for r in rows if r.split()[1].endswith(want) and r.split()[3] == "0A")

    def iperf_busy(self) -> int:
        """Connections the iperf3 servers still hold open (established,
        being opened, or closed by the peer and not yet by the server). A server runs one test at a time: until a stopped
        tunnel's last test is over at the server (its final message and
        close may still be in the core, or lost with the tunnel and then
        ended by the core's idle timeout), the next client is told "the
        server is busy"."""
        with netlab.netns(self.srv_ns):
            with open("/proc/thread-self/net/tcp") as f:
                rows = f.read().splitlines()[1:]
        want = f":{IPERF_PORT:04X}"
        return sum(1 for r in rows if r.split()[1].endswith(want) and r.split()[3] in ("01", "03", "08"))

    def wait_iperf_idle(self, timeout: float = 30) -> None:
        wait_until(lambda: self.iperf_busy() == 0, timeout, "the iperf3 servers to finish the last test",
                   interval=0.1)

    # -- the tunnel ------------------------------------------------------------

    @property
    def tunnel(self):
        return self.procs.get(self.peer)

    def start_tunnel(self, mtu: int = 1500, query: str = "", ready_timeout: float = 20,
                     workers: int | None = 0) -> int:
        """Start tun2xray on ebtun0, route the tunnel target through it, wait
        until a TCP echo works; returns its pid. ``workers``: 0 takes the
        lab's, None the program's default (one per core), else that many."""
        self.stop_tunnel()
        url = f"tun://{self.tun}" + (f"?{query}" if query else "")
        argv = [sys.executable, "-m", "tun2xray.cli", "run", "--device", url,
                "--proxy", f"socks5://{SOCKS_ADDR}:{SOCKS_PORT}", "--mtu", str(mtu),
                "--control", f"unix://{self.ctl}", "--log-level", "warning"]
        env = dict(os.environ, PYTHONPATH=self.repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
        workers = self.workers if workers == 0 else workers
        env.pop("TUN2XRAY_WORKERS", None)
        if workers is not None:
            env["TUN2XRAY_WORKERS"] = str(workers)
        self.peer = "tun2xray"
        p = self.spawn("tun2xray", self.cli_ns, argv, cwd=self.repo, env=env)
        return self._serving(p, mtu, ready_timeout)

    def start_hev(self, binary: str, mtu: int = 1500, ready_timeout: float = 20) -> int:
        """hev-socks5-tunnel on the same TUN name and route, to the same
        SOCKS inbound (a peer measured in the same run); returns its pid."""
        self.stop_tunnel()
        conf = os.path.join(self.workdir, "hev.yml")
        with open(conf, "w") as f:
            f.write(HEV_CONFIG.format(tun=self.tun, mtu=mtu, port=SOCKS_PORT, addr=SOCKS_ADDR))
        self.peer = "hev"
        p = self.spawn("hev", self.cli_ns, [os.path.abspath(binary), conf])
        return self._serving(p, mtu, ready_timeout)

    def echo_through_tun(self) -> bool:
        """Does a TCP echo from the client namespace cross the tunnel now?"""
        try:
            with self.in_cli():
                s = socket.socket()
            s.settimeout(2)
            with s:
                s.connect((TUN_TARGET, HOLD_PORT))
                s.sendall(b"ready?")
                return s.recv(16) == b"ready?"
        except OSError:
            return False

    def _serving(self, p, mtu: int, ready_timeout: float) -> int:
        name = self.peer
        wait_until(lambda: p.poll() is not None or netlab.link_exists(self.cli_ns, self.tun),
                   15, f"{self.tun} to appear")
        if p.poll() is not None:
            raise RuntimeError(f"{name} exited with {p.returncode}: {self.log(name)[-2000:]}")
        netlab.wait_link(self.cli_ns, self.tun)
        self.ip(self.cli_ns, "route", "replace", TUN_NET, "dev", self.tun)

        def echo_ok():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}: "
                                   f"{self.log(name)[-2000:]}")
            return self.echo_through_tun()
        wait_until(echo_ok, ready_timeout, "a TCP echo through the TUN", interval=0.2)
        self.tunnel_mtu = mtu
        return p.pid

    def stop_tunnel(self) -> None:
        self.stop(self.peer)
        # the kernel deletes the TUN (and its route) when tun2xray's fd closes
        wait_until(lambda: not netlab.link_exists(self.cli_ns, self.tun), 5, f"{self.tun} gone")
        self.tunnel_mtu = None

    def status(self) -> dict:
        """tun2xray's JSON status over its control socket (a filesystem unix
        socket: reachable from any namespace)."""
        # the protocol is one line in, JSON out (tun2xray/control.py); spoken
        # here so the bench does not import the checkout under test
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(self.ctl)
            s.sendall(b"status\n")
            chunks = []
            while True:
                b = s.recv(1 << 16)
                if not b:
                    break
                chunks.append(b)
            return json.loads(b"".join(chunks))
        except (OSError, ValueError) as e:
            raise RuntimeError(f"tun2xray status: {e}") from None
        finally:
            s.close()


# --------------------------------------------------------------------------
# the hold/echo server (eb-srv): keeps any number of idle connections

async def _hold_main(port: int) -> None:
    async def handle(reader, writer):
        with contextlib.suppress(OSError):
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, host="0.0.0.0", port=port, backlog=4096,
                                        reuse_address=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchlab")
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hold", help="(internal) TCP echo that holds idle connections")
    h.add_argument("--port", type=int, default=HOLD_PORT)
    args = p.parse_args(argv)
    if args.cmd == "hold":
        asyncio.run(_hold_main(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
