"""`tun2xray run --record F.pcap`: every packet crossing the device, both
directions, in a capture that tcpdump reads and `tun2xray replay` replays
(with offloads the kernel hands over partial checksums: the recorded copies
are completed so the capture still verifies)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import netlab

pytestmark = pytest.mark.e2e

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TUN = "rctun0"


@pytest.mark.parametrize("offload", ["0", "1"])
def test_record_is_readable_and_replays(tmp_path, offload):
    pcap = tmp_path / "run.pcap"
    with netlab.Lab(prefix="rc") as lab:
        argv = [sys.executable, "-m", "tun2xray.cli", "run", "--device", f"tun://{TUN}?offload={offload}",
                "--proxy", f"socks5://127.0.0.1:{netlab.SOCKS_PORT}",
                "--map", f"udp:53=dokodemo://127.0.0.1:{netlab.DOKODEMO_PORT}", "--record", str(pcap)]
        lab.run_tun2xray(argv, TUN)
        r = lab.cli_run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                         lab.url("small.bin")], timeout=30)
        assert r.returncode == 0 and r.stdout.split() == [b"200", b"100000"], (r, lab.log("tun2xray"))
        d = lab.cli_run(["dig", "+short", "+time=3", "+tries=2", f"@{netlab.DNS4}", "web.e2.test"], timeout=20)
        assert d.stdout.strip() == netlab.TARGET4.encode(), d
        assert lab.stop("tun2xray") == 0, lab.log("tun2xray")
    assert pcap.stat().st_size > 100_000
    # tcpdump reads it: the HTTP flow appears in both directions
    out = subprocess.run(["tcpdump", "-nn", "-r", str(pcap), "tcp port 80"], capture_output=True,
                         text=True, timeout=30).stdout
    assert f"> {netlab.TARGET4}.80:" in out and f"{netlab.TARGET4}.80 >" in out, out[-2000:]
    # and the stack replays it: the curl and dig flows complete
    rp = subprocess.run([sys.executable, "-m", "tun2xray", "replay", str(pcap)], capture_output=True,
                        text=True, timeout=120, cwd=REPO)
    assert rp.returncode == 0, rp.stdout + rp.stderr
    assert f"{netlab.TARGET4}:80 " in rp.stdout and f"{netlab.DNS4}:53 " in rp.stdout, rp.stdout
