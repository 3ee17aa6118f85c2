#!/usr/bin/env python3
"""Memory of an engine driven through tun2xray.bridge: idle, and per idle TCP flow.

A synthetic client submits handshakes (SYN, then the ACK of each SYN-ACK)
through the bridge, as a packet-flow host would; the upstream is a local
SOCKS5 server in a separate process (so its memory is not counted) that
answers CONNECT and holds the connection open.  Figures are this process's
RSS (VmRSS) after a gc:

    python3 tools/bench/bridge_mem.py [--flows 1000] [--loop auto|asyncio|uvloop]

Targets (issue): idle under 30 MB, under 10 KB more per idle TCP flow.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import struct
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

SOCKS_SERVER = r"""
import asyncio, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

async def handle(r, w):
    try:
        head = await r.readexactly(2)
        await r.readexactly(head[1])
        w.write(b"\x05\x00")
        req = await r.readexactly(4)
        atyp = req[3]
        n = 4 if atyp == 1 else 16 if atyp == 4 else (await r.readexactly(1))[0]
        await r.readexactly(n + 2)
        w.write(b"\x05\x00\x00\x01" + bytes(6))
        while True:
            data = await r.read(65536)
            if not data:
                break
            w.write(data)
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        w.close()

async def main():
    srv = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
    print(srv.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""

_IP4 = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")
CLIENT = bytes([198, 18, 0, 1])
SERVER = bytes([10, 1, 0, 1])


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def segment(ck, sport, seq, ack, flags, opts=b"") -> bytes:
    hl = 20 + len(opts)
    tcp = _TCP.pack(sport, 80, seq, ack, (hl // 4) << 4, flags, 65535, 0, 0) + opts
    c = ck.checksum(tcp, ck.pseudo4(CLIENT, SERVER, 6, hl))
    tcp = tcp[:16] + struct.pack("!H", c) + tcp[18:]
    ip = _IP4.pack(0x45, 0, 20 + hl, 0, 0x4000, 64, 6, 0, CLIENT, SERVER)
    return ip[:10] + struct.pack("!H", ck.checksum(ip)) + ip[12:] + tcp


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flows", type=int, default=1000)
    ap.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"])
    ap.add_argument("--batch", type=int, default=100, help="handshakes submitted per burst")
    args = ap.parse_args(argv)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.flows + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))

    srv = subprocess.Popen([sys.executable, "-c", SOCKS_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(srv.stdout.readline())
        gc.collect()
        base = rss_kb()
        from netstack.wire import checksum as ck
        from tun2xray import bridge

        synacks = {}
        cv = threading.Condition()

        def on_outbound(packets, protocols):
            with cv:
                for p in packets:
                    ihl = (p[0] & 15) * 4
                    if p[9] != 6:
                        continue
                    _sport, dport, seq, _ack, _off, flags, *_ = _TCP.unpack_from(p, ihl)
                    if flags & 0x12 == 0x12:
                        synacks[dport] = seq
                cv.notify_all()

        cfg = '{"proxy": "socks5://127.0.0.1:%d", "max_flows": %d}' % (port, args.flows + 1000)
        h = bridge.start(cfg, on_outbound, loop=args.loop)
        tunnel = bridge._get(h)
        time.sleep(0.5)
        gc.collect()
        idle = rss_kb()

        mss = struct.pack("!BBH", 2, 4, 1400)
        t0 = time.monotonic()
        for lo in range(0, args.flows, args.batch):
            ports = range(20000 + lo, 20000 + min(lo + args.batch, args.flows))
            bridge.submit_inbound_batch(h, [segment(ck, p, 1000, 0, 0x02, mss) for p in ports],
                                        [2] * len(ports))
            with cv:
                ok = cv.wait_for(lambda: all(p in synacks for p in ports), 30)
            if not ok:
                print(f"only {len(synacks)} SYN-ACKs after 30 s", file=sys.stderr)
                return 1
            bridge.submit_inbound_batch(
                h, [segment(ck, p, 1001, (synacks[p] + 1) & 0xFFFFFFFF, 0x10) for p in ports],
                [2] * len(ports))
        stack = tunnel.engine.stack

        def established():
            return sum(1 for c in list(stack.tcp.values()) if str(c.state).endswith("ESTABLISHED"))
        deadline = time.monotonic() + 30
        while established() < args.flows and time.monotonic() < deadline:
            time.sleep(0.05)
        n = established()
        dt = time.monotonic() - t0
        time.sleep(0.5)
        gc.collect()
        loaded = rss_kb()
        kind = bridge.loop_kind(h)
        st = bridge.status(h)
        bridge.stop(h)
        gc.collect()
        after = rss_kb()
    finally:
        srv.kill()
        srv.wait()

    per_flow = (loaded - idle) * 1024 / max(n, 1)
    print(f"loop                      {kind}")
    print(f"interpreter, no tun2xray  {base / 1024:7.1f} MB")
    print(f"engine idle (bridge)      {idle / 1024:7.1f} MB   (target < 30 MB)")
    print(f"with {n} idle TCP flows  {loaded / 1024:7.1f} MB   ({dt:.1f} s to open them)")
    print(f"per idle TCP flow         {per_flow / 1024:7.2f} KB   (target < 10 KB)")
    print(f"after stop                {after / 1024:7.1f} MB")
    print(f"engine counters           tcp_opened={st['engine'].get('tcp_opened', 0)} "
          f"upstream_connect_failed={st['engine'].get('upstream_connect_failed', 0)}")
    ok = n == args.flows and idle < 30 * 1024 and per_flow < 10 * 1024
    print("within targets" if ok else "NOT within targets")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
