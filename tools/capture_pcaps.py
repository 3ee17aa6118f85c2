#!/usr/bin/env python3
"""Capture the pcap fixtures in pcaps/: real clients talking to real servers
through two TUN devices in two network namespaces (run as root).

    python3 tools/capture_pcaps.py [--out pcaps] [--only NAME ...]

Layout (every name starts with "rp"):

    netns rp-cli                      this process                 netns rp-srv
    curl, iperf3, dig                 forwarder + pcap writer      http server, iperf3 -s, dnsmasq
    rptun0 10.77.1.2/24  <-- read/write -->  <-- read/write -->    rptun1 10.77.0.10/24
           fd77:1::2/64                                                   fd77::10/64
    route 10.77.0.0/24, fd77::/64 dev rptun0      route 10.77.1.0/24, fd77:1::/64 dev rptun1

Both TUNs are opened here (plain IFF_TUN | IFF_NO_PI, so no offloads: every
packet is at most the MTU and carries its full checksums) and then moved into
their namespaces.  The forwarder copies packets between them and writes each
one, as the client's TUN sees it, to the current scenario's pcap (linktype
RAW, 101).  Only packets between the two test prefixes are forwarded and
recorded, so router solicitations and MLD reports stay out of the fixtures.

One scenario is recorded differently, the way a user records on an ordinary
host: `offload-v4` runs curl and dig across a veth pair (namespaces rp-vcli
and rp-vsrv, veth rpv0/rpv1) with the veth's checksum and segmentation
offloads left ON, and tcpdump captures on the client's veth.  The client's
packets then carry only the pseudo-header sum in their TCP/UDP checksum
field (the NIC, here the veth, would finish it) and TCP segments may be
larger than the MTU: what `tun2xray replay --checksums auto` must recognise.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import dpkt

CLI_NS, SRV_NS = "rp-cli", "rp-srv"
CLI_TUN, SRV_TUN = "rptun0", "rptun1"
CLI4, SRV4 = "10.77.1.2", "10.77.0.10"
CLI6, SRV6 = "fd77:1::2", "fd77::10"
NETS = [ipaddress.ip_network(n) for n in ("10.77.0.0/16", "fd77::/16")]
HTTP_PORT, CLOSED_PORT, IPERF_PORT = 8080, 81, 5201
LINKTYPE_RAW = 101
LOSSES = {"http-post-loss-v4": (10, 11, 30)}
MAX_PACKETS = 20000          # per scenario: a routing loop must not fill the disk


def sh(cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, shell=True, check=check, **kw)


def in_ns(ns: str, cmd: str) -> str:
    return f"ip netns exec {ns} {cmd}"


def _in_test_nets(pkt: bytes) -> bool:
    if not pkt:
        return False
    v = pkt[0] >> 4
    try:
        if v == 4 and len(pkt) >= 20:
            src, dst = ipaddress.IPv4Address(pkt[12:16]), ipaddress.IPv4Address(pkt[16:20])
        elif v == 6 and len(pkt) >= 40:
            src, dst = ipaddress.IPv6Address(pkt[8:24]), ipaddress.IPv6Address(pkt[24:40])
        else:
            return False
    except ValueError:
        return False
    return any(src in n for n in NETS) and any(dst in n for n in NETS)


def _tcp_payload_len(pkt: bytes) -> int:
    if pkt[0] >> 4 == 4:
        ihl, proto, total = (pkt[0] & 15) * 4, pkt[9], int.from_bytes(pkt[2:4], "big")
    else:
        ihl, proto, total = 40, pkt[6], 40 + int.from_bytes(pkt[4:6], "big")
    if proto != 6 or len(pkt) < ihl + 20:
        return 0
    return total - ihl - (pkt[ihl + 12] >> 4) * 4


class Forwarder(threading.Thread):
    """Copies packets between the two TUNs and records them to a pcap."""

    def __init__(self, cli_tun, srv_tun):
        super().__init__(daemon=True)
        self.cli, self.srv = cli_tun, srv_tun
        self.lock = threading.Lock()
        self.writer = None
        self.file = None
        self.count = 0
        self.stopping = False
        self.drop = frozenset()   # indices of client TCP data segments to lose (not forwarded, not recorded)
        self.data_segments = 0
        self.dropped = 0

    def start_capture(self, path: str, drop=()) -> None:
        with self.lock:
            self.drop = frozenset(drop)
            self.data_segments = self.dropped = 0
            self.file = open(path, "wb")
            self.writer = dpkt.pcap.Writer(self.file, snaplen=65535, linktype=LINKTYPE_RAW)
            self.count = 0

    def stop_capture(self) -> int:
        with self.lock:
            n = self.count
            if self.file is not None:
                self.file.close()
            self.file = self.writer = None
            return n

    def run(self) -> None:
        cfd, sfd = self.cli.fileno(), self.srv.fileno()
        while not self.stopping:
            r, _, _ = select.select([cfd, sfd], [], [], 0.2)
            for fd in r:
                pkt = os.read(fd, 65535)
                if not _in_test_nets(pkt):
                    continue
                if fd == cfd and self.drop and _tcp_payload_len(pkt) > 0:
                    i = self.data_segments
                    self.data_segments += 1
                    if i in self.drop:
                        self.dropped += 1
                        continue      # lost before the server side, so not in the capture either
                with self.lock:
                    if self.writer is not None and self.count < MAX_PACKETS:
                        self.writer.writepkt(pkt, ts=time.time())
                        self.count += 1
                try:
                    os.write(sfd if fd == cfd else cfd, pkt)
                except OSError:
                    pass


# ------------------------------------------------------------------ servers

HTTP_SERVER = r'''
import http.server, socket, sys
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        n = int(self.path.rsplit("=", 1)[1]) if "size=" in self.path else 1000
        body = b"".join(b"%07d\n" % i for i in range((n + 7) // 8))[:n]
        self.send_response(200)
        self.send_header("Content-Length", str(n))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        got = 0
        while got < n:
            chunk = self.rfile.read(min(65536, n - got))
            if not chunk:
                break
            got += len(chunk)
        body = b"received %d bytes\n" % got
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
class S(http.server.HTTPServer):
    address_family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
S((sys.argv[1], int(sys.argv[2])), H).serve_forever()
'''


def start_servers(tmp: str) -> list:
    procs = []
    script = os.path.join(tmp, "http_server.py")
    with open(script, "w") as f:
        f.write(HTTP_SERVER)
    for addr in (SRV4, SRV6):
        procs.append(subprocess.Popen(in_ns(SRV_NS, f"{sys.executable} {script} {addr} {HTTP_PORT}").split(),
                                      stderr=subprocess.DEVNULL))
    procs.append(subprocess.Popen(in_ns(SRV_NS, (
        "dnsmasq --no-daemon --no-resolv --no-hosts --bind-interfaces --user=root "
        f"--pid-file --listen-address={SRV4} --listen-address={SRV6} "
        "--host-record=www.example.test,10.77.0.99,fd77::99 "
        "--host-record=mail.example.test,10.77.0.98")).split(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    procs.append(subprocess.Popen(in_ns(SRV_NS, f"iperf3 -s -B {SRV4} -p {IPERF_PORT}").split(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def wait_tcp(ns: str, addr: str, port: int, timeout: float = 5.0) -> None:
    probe = (f"{sys.executable} -c \"import socket,sys; s=socket.create_connection(('{addr}',{port}),1)\"")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if sh(in_ns(ns, probe), check=False, stderr=subprocess.DEVNULL).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"server {addr}:{port} did not come up")


# ---------------------------------------------------------------- scenarios

# A client that reads the start of a reply and then aborts (SO_LINGER 0:
# the kernel sends a RST instead of a FIN).
ABORTING_CLIENT = r'''
import socket, struct, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.sendall(b"GET /blob?size=300000 HTTP/1.0\r\nHost: x\r\n\r\n")
got = 0
while got < 20000:
    got += len(s.recv(65536))
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
'''


def scenarios(tmp: str) -> dict:
    aborting = os.path.join(tmp, "aborting_client.py")
    with open(aborting, "w") as f:
        f.write(ABORTING_CLIENT)
    upload = os.path.join(tmp, "upload.bin")
    with open(upload, "wb") as f:
        f.write(bytes((i * 7 + (i >> 8)) & 0xFF for i in range(100_000)))
    curl = "curl -sS --max-time 10 -o /dev/null"
    return {
        "http-get-v4": [f"{curl} http://{SRV4}:{HTTP_PORT}/blob?size=200000"],
        "http-get-v6": [f"{curl} http://[{SRV6}]:{HTTP_PORT}/blob?size=120000"],
        "http-post-v4": [f"{curl} -H Expect: --data-binary @{upload} http://{SRV4}:{HTTP_PORT}/upload"],
        # the same upload, with three of the client's data segments lost on
        # the way (the 10th, 11th and 30th): the capture shows the holes and
        # the client's retransmissions, so a replay sees out-of-order data
        "http-post-loss-v4": [f"{curl} -H Expect: --data-binary @{upload} http://{SRV4}:{HTTP_PORT}/upload"],
        "http-post-v6": [f"{curl} -H Expect: --data-binary @{upload} http://[{SRV6}]:{HTTP_PORT}/upload"],
        "tcp-client-reset-v4": [f"{sys.executable} {aborting} {SRV4} {HTTP_PORT}"],
        "iperf3-v4": [f"iperf3 -c {SRV4} -p {IPERF_PORT} -n 512K"],
        "iperf3-reverse-v4": [f"iperf3 -c {SRV4} -p {IPERF_PORT} -n 512K -R"],
        "dns-v4": [f"dig +tries=1 +time=2 @{SRV4} www.example.test A",
                   f"dig +tries=1 +time=2 @{SRV4} www.example.test AAAA"],
        "dns-v6": [f"dig +tries=1 +time=2 @{SRV6} www.example.test AAAA",
                   f"dig +tries=1 +time=2 @{SRV6} mail.example.test A"],
        "udp-closed": [f"dig +tries=1 +time=1 -p {CLOSED_PORT} @{SRV4} www.example.test A",
                       f"dig +tries=1 +time=1 -p {CLOSED_PORT} @{SRV6} www.example.test AAAA"],
        "tcp-refused": [f"curl -sS --max-time 3 http://{SRV4}:{CLOSED_PORT}/",
                        f"curl -sS --max-time 3 http://[{SRV6}]:{CLOSED_PORT}/"],
    }


# ------------------------------------------------ a capture with offloads on

V_CLI_NS, V_SRV_NS = "rp-vcli", "rp-vsrv"
V_CLI_IF, V_SRV_IF = "rpv0", "rpv1"
V_CLI4, V_SRV4 = "10.78.1.2", "10.78.1.10"
OFFLOAD_MAX_PACKETS = 2000


def capture_offloaded(tmp: str, path: str) -> int:
    """The `offload-v4` scenario: curl (GET of 60,000 bytes) and dig over a
    veth pair with tx checksum offload and TSO on, captured with tcpdump on
    the client's veth.  Returns the number of packets written."""
    script = os.path.join(tmp, "http_server.py")
    with open(script, "w") as f:
        f.write(HTTP_SERVER)
    procs = []
    _veth_cleanup()
    try:
        sh(f"ip netns add {V_CLI_NS} && ip netns add {V_SRV_NS}")
        sh(f"ip link add {V_CLI_IF} netns {V_CLI_NS} type veth peer name {V_SRV_IF} netns {V_SRV_NS}")
        for ns, dev, addr in ((V_CLI_NS, V_CLI_IF, V_CLI4), (V_SRV_NS, V_SRV_IF, V_SRV4)):
            sh(f"ip -n {ns} link set lo up && ip -n {ns} link set {dev} up")
            sh(f"ip -n {ns} addr add {addr}/24 dev {dev}")
            # the point of this capture: offloads as a stock host has them
            sh(in_ns(ns, f"ethtool -K {dev} tx on tso on gso on"), stdout=subprocess.DEVNULL)
        procs.append(subprocess.Popen(in_ns(V_SRV_NS, f"{sys.executable} {script} {V_SRV4} {HTTP_PORT}").split(),
                                      stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen(in_ns(V_SRV_NS, (
            "dnsmasq --no-daemon --no-resolv --no-hosts --bind-interfaces --user=root "
            f"--pid-file --listen-address={V_SRV4} --host-record=www.example.test,10.78.0.99")).split(),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_tcp(V_CLI_NS, V_SRV4, HTTP_PORT)
        time.sleep(0.5)     # the probe's closing packets are over before the capture starts
        dump = subprocess.Popen(in_ns(V_CLI_NS, (
            f"tcpdump -i {V_CLI_IF} --immediate-mode -U -n -s 0 -c {OFFLOAD_MAX_PACKETS} -w {path} "
            f"host {V_SRV4} and (tcp port {HTTP_PORT} or udp port 53)")).split(),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(dump)
        _wait_listening(dump)
        for cmd in (f"curl -sS --max-time 10 -o /dev/null http://{V_SRV4}:{HTTP_PORT}/blob?size=60000",
                    f"dig +tries=1 +time=2 @{V_SRV4} www.example.test A"):
            sh(in_ns(V_CLI_NS, cmd), stdout=subprocess.DEVNULL)
        time.sleep(0.5)     # closing handshakes
        dump.send_signal(signal.SIGINT)
        dump.wait(5)
        return sum(1 for _ in dpkt.pcap.Reader(open(path, "rb")))
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(3)
            except subprocess.TimeoutExpired:
                p.kill()
        _veth_cleanup()


def _wait_listening(dump, timeout: float = 5.0) -> None:
    """tcpdump says "listening on" on stderr once it captures."""
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(dump.stderr, selectors.EVENT_READ)
    deadline = time.time() + timeout
    seen = b""
    while time.time() < deadline and b"listening on" not in seen:
        if sel.select(deadline - time.time()):
            chunk = os.read(dump.stderr.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
    if b"listening on" not in seen:
        raise RuntimeError(f"tcpdump did not start: {seen.decode(errors='replace').strip()}")


def _veth_cleanup() -> None:
    for ns in (V_CLI_NS, V_SRV_NS):
        sh(f"ip netns del {ns}", check=False, stderr=subprocess.DEVNULL)


def setup(tmp: str):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tun2xray.device.tunfd import IFF_NO_PI, IFF_TUN, TunFd

    cleanup()
    tuns = []
    for name in (CLI_TUN, SRV_TUN):
        tuns.append(TunFd.open(name, IFF_TUN | IFF_NO_PI))
        sh(f"ip link set {name} mtu 1500")
    sh(f"ip netns add {CLI_NS} && ip netns add {SRV_NS}")
    for ns, tun, a4, a6, r4, r6 in ((CLI_NS, CLI_TUN, CLI4, CLI6, "10.77.0.0/24", "fd77::/64"),
                                    (SRV_NS, SRV_TUN, SRV4, SRV6, "10.77.1.0/24", "fd77:1::/64")):
        sh(f"ip link set {tun} netns {ns}")
        sh(f"ip -n {ns} link set lo up && ip -n {ns} link set {tun} up")
        sh(f"ip -n {ns} addr add {a4}/24 dev {tun}")
        sh(f"ip -n {ns} -6 addr add {a6}/64 dev {tun} nodad")
        sh(f"ip -n {ns} route add {r4} dev {tun}")
        sh(f"ip -n {ns} -6 route add {r6} dev {tun}")
        # a TUN has no offloads unless asked (TUNSETOFFLOAD); say so explicitly anyway
        sh(in_ns(ns, f"ethtool -K {tun} tx off rx off tso off gso off gro off"), check=False,
           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return tuns


def cleanup() -> None:
    for ns in (CLI_NS, SRV_NS):
        sh(f"ip netns del {ns}", check=False, stderr=subprocess.DEVNULL)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "pcaps"))
    ap.add_argument("--only", nargs="*", default=None, help="scenario names (default: all)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("capture_pcaps: must run as root (TUN devices, network namespaces)", file=sys.stderr)
        return 2
    for tool in ("curl", "iperf3", "dig", "dnsmasq", "ethtool", "tcpdump"):
        if shutil.which(tool) is None:
            print(f"capture_pcaps: {tool} not found (bash tools/install.sh)", file=sys.stderr)
            return 2
    os.makedirs(args.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="rp-capture-")
    if args.only is None or "offload-v4" in args.only:
        path = os.path.join(args.out, "offload-v4.pcap")
        try:
            n = capture_offloaded(tmp, path)
        finally:
            if args.only is not None and not set(args.only) - {"offload-v4"}:
                shutil.rmtree(tmp, ignore_errors=True)
        print(f"offload-v4: {n} packets, {os.path.getsize(path)} bytes -> {os.path.relpath(path)}")
        if args.only is not None and not set(args.only) - {"offload-v4"}:
            return 0
    procs, tuns, fwd = [], [], None
    old_term = signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))
    try:
        tuns = setup(tmp)
        fwd = Forwarder(*tuns)
        fwd.start()
        procs = start_servers(tmp)
        wait_tcp(CLI_NS, SRV4, HTTP_PORT)
        wait_tcp(CLI_NS, SRV6, HTTP_PORT)
        wait_tcp(CLI_NS, SRV4, IPERF_PORT)
        time.sleep(0.3)     # probes' TIME_WAIT noise is not recorded, but let stray packets pass
        for name, cmds in scenarios(tmp).items():
            if args.only and name not in args.only:
                continue
            path = os.path.join(args.out, name + ".pcap")
            fwd.start_capture(path, LOSSES.get(name, ()))
            for cmd in cmds:
                r = sh(in_ns(CLI_NS, cmd), check=False, stdout=subprocess.DEVNULL)
                if r.returncode != 0 and "refused" not in name and "closed" not in name:
                    raise RuntimeError(f"{name}: {cmd!r} exited {r.returncode}")
                time.sleep(0.3)
            time.sleep(0.5)   # let closing handshakes finish
            n = fwd.stop_capture()
            lost = f" ({fwd.dropped} client segments lost on purpose)" if fwd.dropped else ""
            print(f"{name}: {n} packets, {os.path.getsize(path)} bytes -> {os.path.relpath(path)}{lost}")
        return 0
    finally:
        if fwd is not None:
            fwd.stopping = True
            fwd.stop_capture()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(3)
            except subprocess.TimeoutExpired:
                p.kill()
        if fwd is not None:
            fwd.join(1)
        for t in tuns:
            t.close()
        cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
        signal.signal(signal.SIGTERM, old_term)


if __name__ == "__main__":
    sys.exit(main())
