#!/usr/bin/env python3
"""A reference packet-flow host for tun2xray.bridge, on Linux.

It does what a NEPacketTunnelProvider does with its packetFlow, with a Linux
TUN standing in for the utun the system gives an iOS/macOS extension:

- applies the profile's tunnel settings to the interface (addresses, MTU,
  up; routes only with --routes), as NEPacketTunnelNetworkSettings would;
- reads packets in batches (like packetFlow.readPackets) and hands each batch
  to the bridge with Darwin's address-family numbers (AF_INET 2, AF_INET6 30);
- writes back what the bridge emits (like packetFlow.writePackets): from the
  on_outbound callback on the engine thread (default), or from a writer
  thread calling poll_outbound (--poll);
- checks that every outbound protocol number matches its packet's IP version
  in the numbering it used (counted in host.tx_family_mismatch).

    python3 tools/reference_host.py --tun brtun0 --config profile.json [--poll] [--no-ssl] [--fixed-mmap-threshold]

SIGTERM/SIGINT stop it: bridge.stop(), close the TUN, print the final status
(JSON, one line, with the host's own counters under "host") on stdout.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if "--no-ssl" in sys.argv[1:]:
    # before anything imports asyncio (tun2xray.lean says why)
    from tun2xray.lean import without_ssl  # noqa: E402
    without_ssl()
if "--fixed-mmap-threshold" in sys.argv[1:]:
    from tun2xray.lean import fixed_mmap_threshold  # noqa: E402
    fixed_mmap_threshold()

from tun2xray import bridge  # noqa: E402
from tun2xray.profile import ProfileError, load_profile  # noqa: E402

AF_INET, AF_INET6 = bridge.AF_INET, bridge.AF_INET6_DARWIN   # what utun hands over
READ_SIZE = 65536


class TunHost:
    def __init__(self, args, profile_text: str):
        self.args = args
        self.profile = load_profile(profile_text)
        self.profile_text = profile_text
        self.stats = {"rx_packets": 0, "rx_batches": 0, "rx_unknown_version": 0,
                      "tx_packets": 0, "tx_dropped": 0, "tx_family_mismatch": 0,
                      "write_errors": 0}
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        self.tun = None
        self.fd = -1
        self.handle = None
        self._rpipe, self._wpipe = os.pipe()

    # ------------------------------------------------------------- interface

    def open_tun(self) -> None:
        from tun2xray.device.tunfd import IFF_NO_PI, IFF_TUN, TunFd
        p = self.profile
        self.tun = TunFd.open(self.args.tun, IFF_TUN | IFF_NO_PI)
        self.fd = self.tun.fileno()
        os.set_blocking(self.fd, False)
        name = self.tun.name
        _ip("link", "set", "dev", name, "mtu", str(p.mtu))
        _ip("addr", "add", p.ipv4.address, "dev", name)
        _ip("-6", "addr", "add", p.ipv6.address, "dev", name, "nodad")
        _ip("link", "set", "dev", name, "up")
        if self.args.routes:
            for r in p.ipv4.routes:
                _ip("route", "replace", r, "dev", name)
            for r in p.ipv6.routes:
                _ip("-6", "route", "replace", r, "dev", name)

    # --------------------------------------------------------------- outbound

    def _write(self, packets, protocols) -> None:
        fd = self.fd
        sent = dropped = mismatch = 0
        for p, proto in zip(packets, protocols):
            want = AF_INET if p[0] >> 4 == 4 else AF_INET6
            if proto != want:
                mismatch += 1
            try:
                os.write(fd, p)
                sent += 1
            except BlockingIOError:
                dropped += 1
            except OSError as e:
                if e.errno in (errno.EINVAL, errno.EMSGSIZE):
                    dropped += 1
                else:
                    raise
        with self._lock:
            s = self.stats
            s["tx_packets"] += sent
            s["tx_dropped"] += dropped
            s["tx_family_mismatch"] += mismatch

    def on_outbound(self, packets, protocols) -> None:
        """Callback mode: called on the engine thread, like writePackets."""
        self._write(packets, protocols)

    def _poll_writer(self) -> None:
        while not self.stopping.is_set():
            try:
                items = bridge.poll_outbound(self.handle, self.args.batch, 0.5)
            except bridge.InvalidHandle:
                return
            if items:
                self._write([p for p, _ in items], [proto for _, proto in items])

    # ---------------------------------------------------------------- inbound

    def _read_batch(self) -> tuple[list, list]:
        packets, protocols = [], []
        fd = self.fd
        unknown = 0
        while len(packets) < self.args.batch:
            try:
                p = os.read(fd, READ_SIZE)
            except BlockingIOError:
                break
            if not p:
                break
            v = p[0] >> 4
            if v == 4:
                protocols.append(AF_INET)
            elif v == 6:
                protocols.append(AF_INET6)
            else:
                unknown += 1
                continue
            packets.append(p)
        with self._lock:
            self.stats["rx_packets"] += len(packets)
            self.stats["rx_batches"] += 1 if packets else 0
            self.stats["rx_unknown_version"] += unknown
        return packets, protocols

    # -------------------------------------------------------------------- run

    def status(self) -> dict:
        s = bridge.status(self.handle) if self.handle is not None else {}
        with self._lock:
            s["host"] = dict(self.stats, mode="poll" if self.args.poll else "callback")
        return s

    def _write_status_file(self) -> None:
        path = self.args.status_file
        if not path:
            return
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.status(), f)
        os.replace(tmp, path)

    def stop(self) -> None:
        self.stopping.set()
        try:
            os.write(self._wpipe, b"x")
        except OSError:
            pass

    def run(self) -> int:
        self.open_tun()
        cb = None if self.args.poll else self.on_outbound
        self.handle = bridge.start(self.profile_text, cb, loop=self.args.loop)
        writer = None
        if self.args.poll:
            writer = threading.Thread(target=self._poll_writer, name="host-writer", daemon=True)
            writer.start()
        logging.info("reference host: %s (mtu %d) -> bridge handle %d (%s mode, %s loop)",
                     self.tun.name, self.profile.mtu, self.handle,
                     "poll" if self.args.poll else "callback", bridge.loop_kind(self.handle))
        next_status = 0.0
        try:
            while not self.stopping.is_set():
                r, _, _ = select.select([self.fd, self._rpipe], [], [], 0.5)
                if self.fd in r:
                    while True:
                        packets, protocols = self._read_batch()
                        if packets:
                            bridge.submit_inbound_batch(self.handle, packets, protocols)
                        if len(packets) < self.args.batch:
                            break
                now = time.monotonic()
                if now >= next_status:
                    next_status = now + 0.5
                    self._write_status_file()
        finally:
            self.stopping.set()
            final = self.status()
            bridge.stop(self.handle)
            if writer is not None:
                writer.join(5)
            self.tun.close()
            os.close(self._rpipe)
            os.close(self._wpipe)
            if self.args.status_file:
                with open(self.args.status_file, "w") as f:
                    json.dump(final, f)
            print(json.dumps(final), flush=True)
        return 0


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"reference_host: ip {' '.join(args)}: {r.stderr.strip()}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tun", required=True, help="TUN interface name to create")
    ap.add_argument("--config", required=True, help="profile JSON (the bridge's config_json)")
    ap.add_argument("--poll", action="store_true", help="take output with poll_outbound (default: callback)")
    ap.add_argument("--batch", type=int, default=64, help="packets per read / poll batch")
    ap.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"])
    ap.add_argument("--no-ssl", action="store_true", help="keep asyncio from loading ssl (about 4 MB of RSS; "
                    "see tun2xray.lean), as a host that embeds Python only for tun2xray would")
    ap.add_argument("--fixed-mmap-threshold", action="store_true", help="glibc: large blocks always mmapped "
                    "and returned when freed (see tun2xray.lean)")
    ap.add_argument("--routes", action="store_true", help="also route the profile's routes into the TUN")
    ap.add_argument("--status-file", help="keep the bridge status (JSON) in this file")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bridge.set_log_level(args.log_level)     # the host's logging, tun2xray's level
    try:
        with open(args.config) as f:
            text = f.read()
        host = TunHost(args, text)
    except (OSError, ProfileError) as e:
        print(f"reference_host: {args.config}: {e}", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: host.stop())
    return host.run()


if __name__ == "__main__":
    sys.exit(main())
