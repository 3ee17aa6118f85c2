"""Device throughput: ``python3 tools/bench/device_bench.py [--packets N]`` (root).

Runs itself inside a private network namespace (``dv-bench-PID``, removed on
exit) and measures, in packets per second:

- tun read: the kernel queues N UDP packets on the TUN (txqueuelen raised so
  none are dropped), then ``read_batch`` drains them;
- tun write: ``write_batch`` hands N crafted UDP packets to the kernel, which
  delivers them to a bound UDP socket (checked by counting what arrives);
- fd raw / fd header=af: the same over a SOCK_DGRAM socketpair (the host end
  pre-fills the queue; ``net.unix.max_dgram_qlen`` is raised in the namespace).

Only ``read_batch``/``write_batch`` are timed, not the filling or draining on
the other side. Numbers go to stdout as one line per case plus JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = int.from_bytes(data, "big")
    # fold the big integer 16 bits at a time (RFC 1071 by modulus)
    s = s % 0xFFFF or 0xFFFF if s else 0
    return ~s & 0xFFFF


def _udp4(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    ulen = 8 + len(payload)
    pseudo = src + dst + b"\0\x11" + ulen.to_bytes(2, "big")
    udp = sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + ulen.to_bytes(2, "big") + b"\0\0" + payload
    c = _csum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + c.to_bytes(2, "big") + udp[8:]
    total = 20 + ulen
    hdr = b"\x45\x00" + total.to_bytes(2, "big") + b"\x00\x01\x40\x00\x40\x11\x00\x00" + src + dst
    hdr = hdr[:10] + _csum(hdr).to_bytes(2, "big") + hdr[12:]
    return hdr + udp


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def bench_tun(n: int, size: int) -> dict:
    from tun2xray.device import open_device

    dev = open_device("tun://dvbench0", mtu=1500, addresses=["10.88.0.1/24"])
    try:
        subprocess.run(["ip", "link", "set", "dvbench0", "txqueuelen", str(n + 1000)], check=True)
        dev.read_batch(10000)
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        payload = b"x" * size
        for i in range(n):
            tx.sendto(payload, ("10.88.0.2", 9000 + (i & 15)))
        got = 0
        t0 = time.perf_counter()
        while got < n:
            batch = dev.read_batch(256)
            if not batch:
                break
            got += len(batch)
        t_read = time.perf_counter() - t0

        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.setsockopt(socket.SOL_SOCKET, 33, 1 << 30)  # SO_RCVBUFFORCE
        rx.bind(("10.88.0.1", 7000))
        rx.setblocking(False)
        pkt = _udp4(bytes([10, 88, 0, 2]), bytes([10, 88, 0, 1]), 4000, 7000, payload)
        packets = [pkt] * 256
        sent = 0
        t0 = time.perf_counter()
        while sent < n:
            sent += dev.write_batch(packets if n - sent >= 256 else packets[: n - sent])
        t_write = time.perf_counter() - t0
        delivered = 0
        try:
            while True:
                rx.recv(2048)
                delivered += 1
        except BlockingIOError:
            pass
        return {
            "read_pps": round(_rate(got, t_read)),
            "read_packets": got,
            "write_pps": round(_rate(sent, t_write)),
            "write_delivered": delivered,
            "stats": dev.stats,
        }
    finally:
        dev.close()


def bench_fd(n: int, size: int, query: str) -> dict:
    from tun2xray.device import open_device

    a, host = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (a, host):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 26)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 26)
    dev = open_device(f"fd://{a.detach()}{query}")
    try:
        pkt = _udp4(bytes([10, 88, 0, 2]), bytes([10, 88, 0, 1]), 4000, 7000, b"x" * size)
        framed = ((2).to_bytes(4, "big") + pkt) if query else pkt
        host.setblocking(False)
        t_read = 0.0
        got = 0
        while got < n:
            queued = 0
            try:
                while queued < min(n - got, 20000):
                    host.send(framed)
                    queued += 1
            except BlockingIOError:
                pass
            t0 = time.perf_counter()
            while True:
                batch = dev.read_batch(256)
                if not batch:
                    break
                got += len(batch)
            t_read += time.perf_counter() - t0
        t_write = 0.0
        sent = 0
        packets = [pkt] * 256
        while sent < n:
            t0 = time.perf_counter()
            k = dev.write_batch(packets)
            t_write += time.perf_counter() - t0
            sent += k
            try:
                while True:
                    host.recv(4096)
            except BlockingIOError:
                pass
        return {"read_pps": round(_rate(got, t_read)), "write_pps": round(_rate(sent, t_write))}
    finally:
        dev.close()
        host.close()


def inside(n: int) -> dict:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with open("/proc/sys/net/unix/max_dgram_qlen", "w") as f:
        f.write("100000")
    out = {}
    for size in (20, 1400):
        out[f"tun/{size}B"] = bench_tun(n, size)
        out[f"fd-raw/{size}B"] = bench_fd(n, size, "")
        out[f"fd-af/{size}B"] = bench_fd(n, size, "?header=af")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=100000)
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inside:
        print(json.dumps(inside(args.packets)))
        return 0
    ns = f"dv-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        r = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), "--inside", "--packets", str(args.packets)],
            capture_output=True, text=True, env=env,
        )
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            return r.returncode
        res = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    for case, v in res.items():
        extra = f"  (delivered {v['write_delivered']}/{args.packets})" if "write_delivered" in v else ""
        print(f"{case:14s} read {v['read_pps'] / 1e3:8.0f} kpps   write {v['write_pps'] / 1e3:8.0f} kpps{extra}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
