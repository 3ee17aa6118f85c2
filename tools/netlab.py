#!/usr/bin/env python3
"""netlab: the end-to-end world tun2xray runs in (two network namespaces).

Layout (prefix ``e2`` by default; every name below starts with it)::

    netns e2-cli                                   netns e2-srv
    ┌──────────────────────────────────┐           ┌──────────────────────────────────┐
    │ clients (curl, dig, iperf3, ...) │           │ lo: 10.99.0.10/32 10.99.0.53/32  │
    │ [TUN + tun2xray, routed by       │           │     fd99::10/128  fd99::53/128   │
    │  Lab.route_via(tun)]             │           │ servers (one ``netlab serve``):  │
    │ local v2ray:                     │   veth    │   HTTP :80 (files, PUT upload)   │
    │   socks  127.0.0.1:10808 (udp)   │ e2v0-e2v1 │   TCP echo :7, UDP echo :7       │
    │   dokodemo 127.0.0.1:10853 ──────┼──────────►│   late-reply :8 (half-close)     │
    │     -> 10.99.0.53:53             │10.200.0.1 │ iperf3 -s :5201, dnsmasq :53     │
    │   outbound VMess -> 10.200.0.2   │ .2 / ULA  │ far v2ray: VMess/VLESS in, direct│
    └──────────────────────────────────┘           └──────────────────────────────────┘

e2-cli has no route to the targets (10.99.0.0/24, fd99::/64) until
``Lab.route_via(tun)`` adds one through a TUN, so anything that reaches a
target from e2-cli went through the SOCKS/dokodemo inbounds (or the TUN).
The local core's own traffic goes to 10.200.0.2 over the veth: no loop.
The hop is VMess by default. Its anti-replay filter rejects a small share
of new connections under load (docs/reliability.md), so tests that count
every flow use ``Lab(hop="vless")``. v2ray's VLESS outbound tears a
connection down with a reset when the client closes first, so tests that
judge how flows end (the --record replays) keep VMess.

Use it from Python::

    with Lab() as lab:                      # everything is gone after the block,
        lab.cli_run(["curl", ...])          # also on an exception or Ctrl-C
        with lab.in_cli():                  # sockets made here live in e2-cli
            s = socket.create_connection(("127.0.0.1", 10808))

or by hand: ``python3 tools/netlab.py up`` (leaves it running, prints how to
use it), ``python3 tools/netlab.py down``.  ``serve`` is the internal server
process started in e2-srv.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import http.server
import ipaddress
import json
import os
import random
import shutil
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuid_mod

# --------------------------------------------------------------------------
# constants of the lab (tests import these)

TARGET4 = "10.99.0.10"          # HTTP, echo, late-reply, iperf3
TARGET6 = "fd99::10"
DNS4 = "10.99.0.53"             # dnsmasq
DNS6 = "fd99::53"
TARGET_NET4 = "10.99.0.0/24"
TARGET_NET6 = "fd99::/64"
VETH_CLI4, VETH_SRV4 = "10.200.0.1", "10.200.0.2"
VETH_CLI6, VETH_SRV6 = "fdc8:e2::1", "fdc8:e2::2"

SOCKS_PORT = 10808
DOKODEMO_PORT = 10853
VMESS_PORT = 10086
VLESS_PORT = 10087              # the local core's hop to the far core (see far_core_config)
HTTP_PORT = 80
ECHO_PORT = 7
LATE_PORT = 8                   # read "N\n", wait, send N bytes, close
CLOSED_PORT = 9                 # nothing listens there
IPERF_PORT = 5201
DNS_PORT = 53

# names dnsmasq answers (A and AAAA)
DNS_NAMES = {
    "web.e2.test": (TARGET4, TARGET6),
    "dns.e2.test": (DNS4, DNS6),
}

# generated files served over HTTP: name -> (size, seed)
DEFAULT_FILES = {
    "small.bin": (100_000, 1),
    "50M.bin": (50 << 20, 2),
}

CLONE_NEWNET = 0x40000000
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def blob(size: int, seed: int) -> bytes:
    """The deterministic content of a generated file (same on both sides)."""
    return random.Random(seed).randbytes(size)


def blob_sha256(size: int, seed: int) -> str:
    return hashlib.sha256(blob(size, seed)).hexdigest()


def late_reply_payload(n: int) -> bytes:
    """What the late-reply service (port 8) sends for a request of n bytes."""
    return blob(n, 8)


# --------------------------------------------------------------------------
# namespaces

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "setns: " + os.strerror(err))


@contextlib.contextmanager
def netns(name: str):
    """Run the block with this thread in network namespace ``name``.

    Sockets created inside stay in that namespace after the block. Only the
    calling thread moves; it is moved back on exit, also on an exception.
    """
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        there = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(there)
        finally:
            os.close(there)
        try:
            yield
        finally:
            _setns(here)
    finally:
        os.close(here)


def _run(cmd, check=True, timeout=20, **kw):
    return subprocess.run(cmd, check=check, timeout=timeout, capture_output=True, text=True, **kw)


def netns_exists(name: str) -> bool:
    return os.path.exists(f"/var/run/netns/{name}")


def netns_pids(name: str) -> list[int]:
    if not netns_exists(name):
        return []
    r = _run(["ip", "netns", "pids", name], check=False)
    return [int(x) for x in r.stdout.split()]


def _kill_netns_processes(name: str, grace: float = 2.0) -> None:
    pids = netns_pids(name)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p)]
        if pids:
            time.sleep(0.02)
    for pid in netns_pids(name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False


def delete_netns(name: str) -> None:
    """Kill what runs in ``name`` and delete it (its veth end and TUNs go too)."""
    if not netns_exists(name):
        return
    _kill_netns_processes(name)
    deadline = time.monotonic() + 5
    while True:
        r = _run(["ip", "netns", "del", name], check=False)
        if r.returncode == 0 or not netns_exists(name):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"cannot delete netns {name}: {r.stderr.strip()}")
        time.sleep(0.05)


# --------------------------------------------------------------------------
# readiness polls

def quiet_server(lsock: socket.socket, stop: threading.Event, after: float) -> None:
    """Serve a listening socket until *stop*: accept, send nothing, close
    each connection *after* seconds (an upstream that accepts, then ends the
    stream without a byte).  Run it in a thread."""
    lsock.settimeout(0.2)
    while not stop.is_set():
        try:
            c, _ = lsock.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        threading.Timer(after, c.close).start()


def wait_until(pred, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def _proc_listening(ns: str, proto: str, port: int) -> bool:
    """True when something in ``ns`` listens on ``proto`` (tcp/udp) ``port``."""
    with netns(ns):
        rows = []
        for fam in ("", "6"):
            try:
                with open(f"/proc/thread-self/net/{proto}{fam}") as f:
                    rows.extend(f.read().splitlines()[1:])
            except FileNotFoundError:
                pass
    want = f":{port:04X}"
    for row in rows:
        parts = row.split()
        # TCP: state 0A is LISTEN; UDP: 07 is the unconnected (bound) state
        if parts[1].endswith(want) and parts[3] == ("0A" if proto == "tcp" else "07"):
            return True
    return False


def wait_port(ns: str, port: int, proto: str = "tcp", timeout: float = 10.0, proc=None) -> None:
    def ready():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before "
                               f"listening on {proto}/{port}")
        return _proc_listening(ns, proto, port)
    wait_until(ready, timeout, f"{proto}/{port} listening in {ns}")


def wait_link(ns: str, ifname: str, timeout: float = 10.0) -> None:
    """Wait until interface ``ifname`` exists in ``ns`` and is up."""
    def up():
        r = _run(["ip", "-n", ns, "-o", "link", "show", "dev", ifname], check=False)
        return r.returncode == 0 and ("state UP" in r.stdout or ",UP" in r.stdout or "<UP" in r.stdout)
    wait_until(up, timeout, f"link {ifname} up in {ns}", interval=0.05)


def link_exists(ns: str, ifname: str) -> bool:
    if not netns_exists(ns):
        return False
    return _run(["ip", "-n", ns, "link", "show", "dev", ifname], check=False).returncode == 0


# --------------------------------------------------------------------------
# SOCKS5 client bits for tests (the lab itself needs no SOCKS)

def _socks_addr(host: str, port: int) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode()
        return b"\x03" + bytes([len(name)]) + name + struct.pack("!H", port)
    if ip.version == 4:
        return b"\x01" + ip.packed + struct.pack("!H", port)
    return b"\x04" + ip.packed + struct.pack("!H", port)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"SOCKS server closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _socks_read_reply(sock: socket.socket) -> tuple[str, int]:
    ver, rep, _, atyp = _recv_exact(sock, 4)
    if ver != 5 or rep != 0:
        raise ConnectionError(f"SOCKS reply ver={ver} rep={rep}")
    if atyp == 1:
        host = socket.inet_ntop(socket.AF_INET, _recv_exact(sock, 4))
    elif atyp == 4:
        host = socket.inet_ntop(socket.AF_INET6, _recv_exact(sock, 16))
    else:
        host = _recv_exact(sock, _recv_exact(sock, 1)[0]).decode()
    (port,) = struct.unpack("!H", _recv_exact(sock, 2))
    return host, port


def socks_handshake(sock: socket.socket, cmd: int, host: str, port: int) -> tuple[str, int]:
    """No-auth SOCKS5 greeting + request on a connected socket; returns BND."""
    sock.sendall(b"\x05\x01\x00")
    if _recv_exact(sock, 2) != b"\x05\x00":
        raise ConnectionError("SOCKS server refused no-auth")
    sock.sendall(b"\x05" + bytes([cmd]) + b"\x00" + _socks_addr(host, port))
    return _socks_read_reply(sock)


def socks_connect(proxy: tuple[str, int], host: str, port: int, timeout: float = 10.0) -> socket.socket:
    """A TCP socket CONNECTed through the SOCKS5 proxy (in the caller's netns)."""
    s = socket.create_connection(proxy, timeout=timeout)
    try:
        socks_handshake(s, 1, host, port)
    except BaseException:
        s.close()
        raise
    return s


class SocksUdp:
    """A SOCKS5 UDP ASSOCIATE session: ``sendto(data, (host, port))``, ``recvfrom()``."""

    def __init__(self, proxy: tuple[str, int], timeout: float = 5.0):
        self.ctl = socket.create_connection(proxy, timeout=timeout)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.settimeout(timeout)
        self.udp.bind((proxy[0], 0))
        try:
            host, port = socks_handshake(self.ctl, 3, *self.udp.getsockname())
        except BaseException:
            self.close()
            raise
        if host in ("0.0.0.0", "::"):
            host = proxy[0]
        self.relay = (host, port)

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.udp.sendto(b"\x00\x00\x00" + _socks_addr(*addr) + data, self.relay)

    def recvfrom(self) -> tuple[bytes, tuple[str, int]]:
        pkt, _ = self.udp.recvfrom(65535)
        if pkt[2] != 0:
            raise ValueError("fragmented SOCKS UDP datagram")
        atyp = pkt[3]
        if atyp == 1:
            host, off = socket.inet_ntop(socket.AF_INET, pkt[4:8]), 8
        elif atyp == 4:
            host, off = socket.inet_ntop(socket.AF_INET6, pkt[4:20]), 20
        else:
            n = pkt[4]
            host, off = pkt[5:5 + n].decode(), 5 + n
        (port,) = struct.unpack_from("!H", pkt, off)
        return pkt[off + 2:], (host, port)

    def close(self) -> None:
        self.udp.close()
        self.ctl.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------
# v2ray configs

DOWNLINK_ONLY = 30


def _policy(downlink_only: int = DOWNLINK_ONLY) -> dict:
    # the core never forwards a half-close; after the uplink ends it keeps
    # the downlink for downlinkOnly seconds, so give replies time. A flow
    # whose client has closed first lives that long in both cores (and in
    # tun2xray's flow table): a lab whose clients always read their reply
    # before closing can ask for less (Lab(downlink_only=...)) and wait less
    # for its flows to end.
    return {"levels": {"0": {"handshake": 4, "connIdle": 300, "uplinkOnly": 1,
                             "downlinkOnly": downlink_only, "bufferSize": 512}}}


def _hop(user_id: str, hop: str) -> dict:
    """The local core's outbound to the far core."""
    if hop == "vless":
        return {"tag": "far", "protocol": "vless",
                "settings": {"vnext": [{"address": VETH_SRV4, "port": VLESS_PORT,
                                        "users": [{"id": user_id, "encryption": "none"}]}]}}
    return {"tag": "far", "protocol": "vmess",
            "settings": {"vnext": [{"address": VETH_SRV4, "port": VMESS_PORT,
                                    "users": [{"id": user_id, "alterId": 0,
                                               "security": "aes-128-gcm"}]}]}}


def local_core_config(user_id: str, log_dir: str, hop: str = "vmess",
                      downlink_only: int = DOWNLINK_ONLY) -> dict:
    return {
        "log": {"loglevel": "warning", "error": os.path.join(log_dir, "v2ray-local.err"),
                "access": os.path.join(log_dir, "v2ray-local.access")},
        "policy": _policy(downlink_only),
        "inbounds": [
            {"tag": "socks", "listen": "127.0.0.1", "port": SOCKS_PORT, "protocol": "socks",
             "settings": {"auth": "noauth", "udp": True, "ip": "127.0.0.1"}},
            {"tag": "dns", "listen": "127.0.0.1", "port": DOKODEMO_PORT,
             "protocol": "dokodemo-door",
             "settings": {"address": DNS4, "port": DNS_PORT, "network": "tcp,udp"}},
        ],
        "outbounds": [_hop(user_id, hop)],
    }


def far_core_config(user_id: str, log_dir: str, downlink_only: int = DOWNLINK_ONLY) -> dict:
    # Two ways in from the local core (Lab(hop=...)): VMess, and VLESS for
    # tests that count every flow: a VMess (AEAD) inbound rejects a small
    # share of new connections as "replayed" (its anti-replay window is a
    # cuckoo filter, whose false positives grow with the connections of the
    # last minutes; docs/reliability.md).
    return {
        "log": {"loglevel": "warning", "error": os.path.join(log_dir, "v2ray-far.err"),
                "access": os.path.join(log_dir, "v2ray-far.access")},
        "policy": _policy(downlink_only),
        "inbounds": [
            {"tag": "vmess", "listen": VETH_SRV4, "port": VMESS_PORT, "protocol": "vmess",
             "settings": {"clients": [{"id": user_id, "alterId": 0}]}},
            {"tag": "vless", "listen": VETH_SRV4, "port": VLESS_PORT, "protocol": "vless",
             "settings": {"clients": [{"id": user_id}], "decryption": "none"}},
        ],
        "outbounds": [{"tag": "direct", "protocol": "freedom", "settings": {}}],
    }


def find_core() -> str:
    for name in ("xray", "v2ray"):
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError("no xray or v2ray on PATH (tools/install.sh installs v2ray)")


def core_cmd(binary: str, config: str) -> list[str]:
    # xray and v2ray 4.x both take -config; v2ray 5 wants "run -c"
    if os.path.basename(binary) == "xray":
        return [binary, "run", "-c", config]
    return [binary, "-config", config]


# --------------------------------------------------------------------------
# the lab

class Lab:
    """Two namespaces, a veth, a far and a local core, and real servers.

    A context manager; ``close()`` (also on an exception or KeyboardInterrupt)
    stops every process it started and deletes both namespaces.
    """

    def __init__(self, prefix: str = "e2", workdir: str | None = None,
                 files: dict | None = None, start: bool = True, hop: str = "vmess",
                 downlink_only: int = DOWNLINK_ONLY):
        self.prefix = prefix
        self.hop = hop                  # the local core's protocol to the far core
        self.downlink_only = downlink_only  # both cores' policy (see _policy)
        self.cli_ns = f"{prefix}-cli"
        self.srv_ns = f"{prefix}-srv"
        self.veth_cli = f"{prefix}v0"
        self.veth_srv = f"{prefix}v1"
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix=f"{prefix}-netlab-")
        self.files_spec = dict(DEFAULT_FILES if files is None else files)
        self.files: dict[str, tuple[str, int, str]] = {}   # name -> (path, size, sha256)
        self.user_id = str(uuid_mod.uuid4())
        self.core = find_core()
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, object] = {}
        self._start = start
        self._closed = False
        self._lock_fd: int | None = None

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self):
        try:
            self.setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _lock(self, timeout: float) -> None:
        """Hold the prefix's lock for the lab's life, so two test runs on one
        machine queue for the same names instead of tearing each other's lab
        down. The kernel drops the lock when the holder dies."""
        path = os.path.join(tempfile.gettempdir(), f"netlab-{self.prefix}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise TimeoutError(f"lab {self.prefix!r} is in use by another process "
                                       f"(lock {path}) for more than {timeout:g}s") from None
                time.sleep(0.1)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)         # closing the fd releases the flock
            self._lock_fd = None

    def setup(self, lock_timeout: float = 600.0) -> None:
        if os.geteuid() != 0:
            raise PermissionError("netlab needs root (network namespaces, veth, TUN)")
        self._lock(lock_timeout)
        # holding the lock, a lab of this prefix is one a killed run left: remove it
        for ns in (self.cli_ns, self.srv_ns):
            delete_netns(ns)
        self._make_network()
        self._make_files()
        if self._start:
            self.start_servers()
            self.start_far_core()
            self.start_local_core()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._lock_fd is None:
            # never got the lock: the namespaces (if any) are another lab's
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            return
        errors = []
        for name in list(self.procs):
            try:
                self.stop(name)
            except Exception as e:     # keep tearing down; report at the end
                errors.append(f"stop {name}: {e}")
        for ns in (self.cli_ns, self.srv_ns):
            try:
                delete_netns(ns)
            except Exception as e:
                errors.append(str(e))
        for f in self._logs.values():
            with contextlib.suppress(Exception):
                f.close()
        if self._own_workdir and not os.environ.get("NETLAB_KEEP"):
            shutil.rmtree(self.workdir, ignore_errors=True)
        self._unlock()
        if errors:
            raise RuntimeError("netlab teardown: " + "; ".join(errors))

    # -- network -------------------------------------------------------------

    def ip(self, ns: str | None, *args: str) -> str:
        cmd = ["ip"] + (["-n", ns] if ns else []) + list(args)
        r = _run(cmd, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
        return r.stdout

    def _sysctl(self, ns: str, key: str, value: str) -> None:
        _run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}"])

    def _make_network(self) -> None:
        for ns in (self.cli_ns, self.srv_ns):
            self.ip(None, "netns", "add", ns)
            self.ip(ns, "link", "set", "lo", "up")
            self._sysctl(ns, "net.ipv6.conf.all.disable_ipv6", "0")
            self._sysctl(ns, "net.ipv6.conf.default.disable_ipv6", "0")
            self._sysctl(ns, "net.ipv6.conf.lo.disable_ipv6", "0")
        self.ip(None, "link", "add", self.veth_cli, "netns", self.cli_ns,
                "type", "veth", "peer", "name", self.veth_srv, "netns", self.srv_ns)
        for ns, dev, a4, a6 in ((self.cli_ns, self.veth_cli, VETH_CLI4, VETH_CLI6),
                                (self.srv_ns, self.veth_srv, VETH_SRV4, VETH_SRV6)):
            self.ip(ns, "addr", "add", f"{a4}/30", "dev", dev)
            self.ip(ns, "-6", "addr", "add", f"{a6}/64", "dev", dev, "nodad")
            self.ip(ns, "link", "set", dev, "up")
        for a in (TARGET4, DNS4):
            self.ip(self.srv_ns, "addr", "add", f"{a}/32", "dev", "lo")
        for a in (TARGET6, DNS6):
            self.ip(self.srv_ns, "-6", "addr", "add", f"{a}/128", "dev", "lo", "nodad")

    def route_via(self, tun: str, timeout: float = 10.0) -> None:
        """Route the targets (10.99.0.0/24, fd99::/64) from e2-cli through ``tun``."""
        wait_link(self.cli_ns, tun, timeout)
        self.ip(self.cli_ns, "route", "replace", TARGET_NET4, "dev", tun)
        self.ip(self.cli_ns, "-6", "route", "replace", TARGET_NET6, "dev", tun)

    def unroute(self) -> None:
        for args in (("route", "del", TARGET_NET4), ("-6", "route", "del", TARGET_NET6)):
            with contextlib.suppress(RuntimeError):
                self.ip(self.cli_ns, *args)

    # -- files -------------------------------------------------------------

    def _make_files(self) -> None:
        d = os.path.join(self.workdir, "www")
        os.makedirs(d, exist_ok=True)
        for name, (size, seed) in self.files_spec.items():
            data = blob(size, seed)
            path = os.path.join(d, name)
            with open(path, "wb") as f:
                f.write(data)
            self.files[name] = (path, size, hashlib.sha256(data).hexdigest())

    def url(self, name: str, v6: bool = False) -> str:
        host = f"[{TARGET6}]" if v6 else TARGET4
        return f"http://{host}:{HTTP_PORT}/{name}"

    def upload_url(self, v6: bool = False) -> str:
        return self.url("upload", v6)

    # -- processes ---------------------------------------------------------

    def spawn(self, name: str, ns: str, argv: list[str], **kw) -> subprocess.Popen:
        """Start ``argv`` in ``ns`` as its own process group; output to a log file."""
        if name in self.procs and self.procs[name].poll() is None:
            raise RuntimeError(f"{name} already running")
        log = open(os.path.join(self.workdir, f"{name}.log"), "ab")
        old = self._logs.pop(name, None)
        if old:
            old.close()
        self._logs[name] = log
        p = subprocess.Popen(["ip", "netns", "exec", ns] + argv, stdin=subprocess.DEVNULL,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kw)
        self.procs[name] = p
        return p

    def stop(self, name: str, timeout: float = 3.0) -> int | None:
        p = self.procs.pop(name, None)
        if p is None:
            return None
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        # anything the process left in its group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        return p.returncode

    def log(self, name: str) -> str:
        path = os.path.join(self.workdir, f"{name}.log")
        try:
            with open(path, "rb") as f:
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def start_servers(self) -> None:
        www = os.path.join(self.workdir, "www")
        p = self.spawn("servers", self.srv_ns,
                       [sys.executable, os.path.abspath(__file__), "serve", "--www", www,
                        "--addr4", TARGET4, "--addr6", TARGET6])
        for proto, port in (("tcp", HTTP_PORT), ("tcp", ECHO_PORT), ("tcp", LATE_PORT),
                            ("udp", ECHO_PORT)):
            wait_port(self.srv_ns, port, proto, proc=p)
        p = self.spawn("iperf3", self.srv_ns, ["iperf3", "-s", "-p", str(IPERF_PORT)])
        wait_port(self.srv_ns, IPERF_PORT, "tcp", proc=p)
        hosts = []
        for name, (a4, a6) in DNS_NAMES.items():
            hosts += [f"--host-record={name},{a4},{a6}"]
        p = self.spawn("dnsmasq", self.srv_ns,
                       ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null",
                        "--no-resolv", "--no-hosts", "--bind-interfaces",
                        f"--listen-address={DNS4}", "--interface=lo", f"--port={DNS_PORT}",
                        "--user=root", "--pid-file=", "--log-facility=-",
                        "--local=/e2.test/"] + hosts)
        wait_port(self.srv_ns, DNS_PORT, "udp", proc=p)
        wait_port(self.srv_ns, DNS_PORT, "tcp", proc=p)

    def _write_config(self, name: str, cfg: dict) -> str:
        path = os.path.join(self.workdir, name)
        with open(path, "w") as f:
            json.dump(cfg, f, indent=1)
        return path

    def start_far_core(self) -> None:
        cfg = self._write_config("far.json", far_core_config(self.user_id, self.workdir, self.downlink_only))
        p = self.spawn("far-core", self.srv_ns, core_cmd(self.core, cfg))
        wait_port(self.srv_ns, VMESS_PORT, "tcp", proc=p)
        wait_port(self.srv_ns, VLESS_PORT, "tcp", proc=p)

    @property
    def local_core_config_path(self) -> str:
        return os.path.join(self.workdir, "local.json")

    def start_local_core(self) -> subprocess.Popen:
        cfg = self._write_config("local.json", local_core_config(self.user_id, self.workdir, self.hop,
                                                                      self.downlink_only))
        p = self.spawn("local-core", self.cli_ns, core_cmd(self.core, cfg))
        wait_port(self.cli_ns, SOCKS_PORT, "tcp", proc=p)
        wait_port(self.cli_ns, SOCKS_PORT, "udp", proc=p)
        wait_port(self.cli_ns, DOKODEMO_PORT, "tcp", proc=p)
        wait_port(self.cli_ns, DOKODEMO_PORT, "udp", proc=p)
        return p

    def stop_local_core(self) -> None:
        self.stop("local-core")
        wait_until(lambda: not _proc_listening(self.cli_ns, "tcp", SOCKS_PORT), 5,
                   "socks port closed")

    def restart_local_core(self) -> subprocess.Popen:
        self.stop_local_core()
        return self.start_local_core()

    # -- running things in e2-cli -----------------------------------------

    def cli_run(self, argv: list[str], timeout: float = 60, check: bool = False,
                input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` in e2-cli, capture bytes stdout/stderr (its own group;
        killed on timeout)."""
        return self._run_in(self.cli_ns, argv, timeout, check, input)

    def srv_run(self, argv: list[str], timeout: float = 60, check: bool = False,
                input: bytes | None = None) -> subprocess.CompletedProcess:
        return self._run_in(self.srv_ns, argv, timeout, check, input)

    def _run_in(self, ns, argv, timeout, check, input):
        p = subprocess.Popen(["ip", "netns", "exec", ns] + list(argv),
                             stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
        try:
            out, err = p.communicate(input, timeout=timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            raise
        cp = subprocess.CompletedProcess(p.args, p.returncode, out, err)
        if check:
            cp.check_returncode()
        return cp

    def cli_popen(self, name: str, argv: list[str], **kw) -> subprocess.Popen:
        """Start a long-running process in e2-cli (stopped by ``stop`` or close)."""
        return self.spawn(name, self.cli_ns, argv, **kw)

    def in_cli(self):
        """``with lab.in_cli():`` — sockets created in the block live in e2-cli."""
        return netns(self.cli_ns)

    def in_srv(self):
        return netns(self.srv_ns)

    def start_tun2xray(self, tun: str | None = None, args=(), name: str = "tun2xray",
                       timeout: float = 20.0) -> subprocess.Popen:
        """Start ``tun2xray run`` on TUN ``tun`` (default PREFIXtun0) in e2-cli,
        socks to the local core and udp/53 to its dokodemo inbound (see
        run_tun2xray). For benchmarks and manual runs; the acceptance tests
        spell their own command line out."""
        tun = tun or f"{self.prefix}tun0"
        argv = [sys.executable, "-m", "tun2xray.cli", "run", "--device", f"tun://{tun}",
                "--proxy", f"socks5://127.0.0.1:{SOCKS_PORT}",
                "--map", f"udp:53=dokodemo://127.0.0.1:{DOKODEMO_PORT}", *args]
        return self.run_tun2xray(argv, tun, name=name, timeout=timeout)

    def run_tun2xray(self, argv: list[str], tun: str, *, name: str = "tun2xray", env=None,
                     timeout: float = 20.0, describe=None, cwd: str = REPO) -> subprocess.Popen:
        """Start ``argv`` (a ``tun2xray run`` command line) in e2-cli, wait for
        TUN ``tun``, route the targets through it and wait until a TCP echo
        crosses it. On failure the process is stopped, the routes are removed
        and the error says why, with ``describe()`` (default: the log's tail)."""
        if env is None:
            env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        p = self.cli_popen(name, argv, cwd=cwd, env=env)

        def alive():
            if p.poll() is not None:
                why = describe() if describe is not None else self.log(name).strip()[-500:]
                raise RuntimeError(f"tun2xray exited with {p.returncode}: {why}")
            return True

        def echo():
            alive()
            try:
                with self.in_cli():
                    s = socket.socket()
                with s:
                    s.settimeout(2)
                    s.connect((TARGET4, ECHO_PORT))
                    s.sendall(b"ping")
                    return s.recv(4) == b"ping"
            except OSError:
                return False

        try:
            wait_until(lambda: alive() and link_exists(self.cli_ns, tun), timeout, f"TUN {tun}")
            self.route_via(tun, timeout)
            wait_until(echo, timeout, f"a TCP echo through {tun}", interval=0.2)
        except BaseException:
            self.stop(name)
            self.unroute()
            raise
        return p

    def state(self) -> dict:
        return {"prefix": self.prefix, "workdir": self.workdir,
                "pids": {k: p.pid for k, p in self.procs.items()},
                "files": {k: {"path": v[0], "size": v[1], "sha256": v[2]}
                          for k, v in self.files.items()}}


# --------------------------------------------------------------------------
# the servers that run in e2-srv (``netlab.py serve``)

class _DualStackMixin:
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class _HttpServer(_DualStackMixin, http.server.ThreadingHTTPServer):
    pass


class _TcpServer(_DualStackMixin, socketserver.ThreadingTCPServer):
    pass


def _make_http_handler(www: str):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "netlab"

        def log_message(self, fmt, *args):
            pass

        def _reply(self, code: int, body: bytes, headers=()):
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

        def do_GET(self):
            name = self.path.split("?", 1)[0].lstrip("/")
            path = os.path.join(www, os.path.basename(name))
            if not name or not os.path.isfile(path):
                self._reply(404, b"not found\n")
                return
            size = os.path.getsize(path)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.flush()
            with open(path, "rb") as f:
                self.connection.sendfile(f)
            self.close_connection = True

        def _body_chunks(self):
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                while True:
                    n = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if n == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return
                    left = n
                    while left:
                        chunk = self.rfile.read(min(left, 1 << 18))
                        if not chunk:
                            raise ConnectionError("short chunk")
                        left -= len(chunk)
                        yield chunk
                    self.rfile.readline()
            else:
                left = int(self.headers.get("Content-Length", "0"))
                while left:
                    chunk = self.rfile.read(min(left, 1 << 18))
                    if not chunk:
                        raise ConnectionError("short body")
                    left -= len(chunk)
                    yield chunk

        def do_PUT(self):
            h = hashlib.sha256()
            n = 0
            for chunk in self._body_chunks():
                h.update(chunk)
                n += len(chunk)
            self._reply(200, f"{h.hexdigest()} {n}\n".encode(),
                        [("X-Sha256", h.hexdigest()), ("X-Received-Bytes", str(n))])

        do_POST = do_PUT

    return Handler


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self):
        s = self.request
        while True:
            data = s.recv(1 << 16)
            if not data:
                break
            s.sendall(data)
        # mirror the half-close, then finish
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)


class _LateReplyHandler(socketserver.BaseRequestHandler):
    """Reads ``N\\n``, waits 0.3 s (the client half-closes meanwhile), sends
    ``late_reply_payload(N)`` and closes. It replies without waiting for the
    client's FIN, since a v2ray core never forwards one (NOTES.md)."""

    def handle(self):
        s = self.request
        line = b""
        while not line.endswith(b"\n") and len(line) < 32:
            c = s.recv(1)
            if not c:
                return
            line += c
        try:
            n = min(int(line.strip() or b"0"), 64 << 20)
        except ValueError:
            return                      # not a request: just close
        time.sleep(0.3)
        s.sendall(late_reply_payload(n))
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)


def _udp_echo(sock: socket.socket) -> None:
    while True:
        data, addr = sock.recvfrom(65535)
        with contextlib.suppress(OSError):
            sock.sendto(data, addr)


def serve(args) -> int:
    servers = [
        _HttpServer(("::", HTTP_PORT), _make_http_handler(args.www)),
        _TcpServer(("::", ECHO_PORT), _EchoHandler),
        _TcpServer(("::", LATE_PORT), _LateReplyHandler),
    ]
    for srv in servers:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    # UDP echo bound to each target address (NOTES.md: an any-address UDP
    # server answers from the wrong source)
    for fam, addr in ((socket.AF_INET, args.addr4), (socket.AF_INET6, args.addr6)):
        u = socket.socket(fam, socket.SOCK_DGRAM)
        u.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        u.bind((addr, ECHO_PORT))
        threading.Thread(target=_udp_echo, args=(u,), daemon=True).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(3600):
        pass
    return 0


# --------------------------------------------------------------------------
# CLI

STATE_DIR = "/tmp/{prefix}-netlab"


def _cmd_up(args) -> int:
    workdir = STATE_DIR.format(prefix=args.prefix)
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    lab = Lab(prefix=args.prefix, workdir=workdir)
    try:
        lab.setup()
    except BaseException:
        lab.close()
        raise
    if args.tun2xray is not None:
        try:
            lab.start_tun2xray(args=args.tun2xray.split())
        except BaseException:
            lab.close()
            raise
    with open(os.path.join(workdir, "state.json"), "w") as f:
        json.dump(lab.state(), f, indent=1)
    print(f"lab {args.prefix} is up; workdir {workdir}")
    if args.tun2xray is not None:
        print(f"  tun2xray     : on {args.prefix}tun0, targets routed through it; "
              f"log {workdir}/tun2xray.log")
    print(f"  client shell : ip netns exec {lab.cli_ns} bash")
    print(f"  socks        : 127.0.0.1:{SOCKS_PORT} (udp), dokodemo DNS 127.0.0.1:{DOKODEMO_PORT}")
    print(f"  targets      : {TARGET4} {TARGET6} (http :80, echo :7 tcp+udp, iperf3 :5201), "
          f"dns {DNS4}")
    for name, (_, size, sha) in lab.files.items():
        print(f"  file         : {lab.url(name)} {size} B sha256 {sha}")
    print(f"  route a TUN  : python3 {sys.argv[0]} route TUN")
    print(f"  tear down    : python3 {sys.argv[0]} down")
    return 0


def _cmd_down(args) -> int:
    # killing everything in our namespaces stops every process the lab started
    for ns in (f"{args.prefix}-cli", f"{args.prefix}-srv"):
        delete_netns(ns)
    shutil.rmtree(STATE_DIR.format(prefix=args.prefix), ignore_errors=True)
    print(f"lab {args.prefix} is down")
    return 0


def _cmd_route(args) -> int:
    ns = f"{args.prefix}-cli"
    wait_link(ns, args.tun)
    for fam, net in (("-4", TARGET_NET4), ("-6", TARGET_NET6)):
        _run(["ip", "-n", ns, fam, "route", "replace", net, "dev", args.tun])
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="netlab", description=__doc__.split("\n", 1)[0])
    p.add_argument("--prefix", default="e2")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build the lab and leave it running")
    up.add_argument("--tun2xray", nargs="?", const="", metavar="'EXTRA ARGS'",
                    help="also run tun2xray on PREFIXtun0 and route the targets through it")
    sub.add_parser("down", help="stop everything and delete the namespaces")
    rp = sub.add_parser("route", help="route the targets in PREFIX-cli through a TUN")
    rp.add_argument("tun")
    sp = sub.add_parser("serve", help="(internal) the servers run in PREFIX-srv")
    sp.add_argument("--www", required=True)
    sp.add_argument("--addr4", default=TARGET4)
    sp.add_argument("--addr6", default=TARGET6)
    args = p.parse_args(argv)
    try:
        return {"up": _cmd_up, "down": _cmd_down, "route": _cmd_route, "serve": serve}[args.cmd](args)
    except (OSError, RuntimeError, TimeoutError, subprocess.SubprocessError) as e:
        print(f"netlab: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
