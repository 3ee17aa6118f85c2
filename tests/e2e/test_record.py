"""`tun2xray run --record F.pcap`: every packet crossing the device, both
directions, in a capture that tcpdump reads and `tun2xray replay` replays
(with offloads the kernel hands over partial checksums: the recorded copies
are completed so the capture still verifies)."""

from __future__ import annotations

import os
import re
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


# ---------------------------------------------------------------------------
# --record with workers, --record-wire, --record-max-mb (lab prefix rr, TUN rrtun0)

RR_TUN = "rrtun0"
RR_CTL = "/tmp/rr-ctl.sock"
RR_FILES = {"small.bin": (100_000, 1), "5M.bin": (5 << 20, 3)}


def _rr_argv(pcap, *extra):
    return [sys.executable, "-m", "tun2xray.cli", "run", "--device", f"tun://{RR_TUN}",
            "--proxy", f"socks5://127.0.0.1:{netlab.SOCKS_PORT}",
            "--map", f"udp:53=dokodemo://127.0.0.1:{netlab.DOKODEMO_PORT}",
            "--control", f"unix://{RR_CTL}", "--record", str(pcap), *extra]


def _rr_env():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TUN2XRAY_WORKERS", None)
    return env


def _status():
    from tun2xray.control import query
    return query(f"unix://{RR_CTL}")


def _replay(pcap):
    return subprocess.run([sys.executable, "-m", "tun2xray", "replay", str(pcap)], capture_output=True,
                          text=True, timeout=300, cwd=REPO)


def _tcpdump_count(pcap) -> int:
    r = subprocess.run(["tcpdump", "-nn", "-r", str(pcap)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return len(r.stdout.splitlines())


def _curls(lab, n, name="small.bin"):
    """n concurrent curls of one file from the client namespace: [(status, [code, size])]."""
    procs = [subprocess.Popen(["ip", "netns", "exec", lab.cli_ns, "curl", "-sS", "-o", "/dev/null",
                               "-w", "%{http_code} %{size_download}", lab.url(name)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(n)]
    out = []
    try:
        for p in procs:
            o, _ = p.communicate(timeout=60)
            out.append((p.returncode, o.split()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def test_record_with_two_workers_gives_one_capture(tmp_path):
    pcap = tmp_path / "two.pcap"
    with netlab.Lab(prefix="rr", files=RR_FILES) as lab:
        lab.run_tun2xray(_rr_argv(pcap, "--workers", "2"), RR_TUN, env=_rr_env())
        res = _curls(lab, 12)
        assert all(rc == 0 and o == [b"200", b"100000"] for rc, o in res), (res, lab.log("tun2xray")[-3000:])
        d = lab.cli_run(["dig", "+short", "+time=3", "+tries=2", f"@{netlab.DNS4}", "web.e2.test"], timeout=20)
        assert d.stdout.strip() == netlab.TARGET4.encode(), d
        # a worker busy with its own flows may miss one status request (its row
        # then says "responding": false): ask until both answer
        def both_answer():
            ws = _status()["workers"]
            return ws if len(ws) == 2 and all(w["responding"] for w in ws) else None
        workers = netlab.wait_until(both_answer, 20, "both workers' status")
        assert all(w["tcp_opened"] > 0 for w in workers), workers
        opened = sum(w["tcp_opened"] for w in workers)
        assert lab.stop("tun2xray", timeout=30) == 0, lab.log("tun2xray")[-3000:]
        log = lab.log("tun2xray")
    # one file at the requested path, the parts merged and gone
    assert sorted(os.listdir(tmp_path)) == ["two.pcap"], os.listdir(tmp_path)
    assert "merged" in log and "from 2 worker parts into" in log, log[-3000:]
    # said at start: the offload device's super-segments, and how to get wire-sized packets
    assert "super-segments" in log and "--record-wire" in log
    assert _tcpdump_count(pcap) > 12 * 10
    rp = _replay(pcap)
    assert rp.returncode == 0, rp.stdout[-3000:] + rp.stderr
    http = [ln for ln in rp.stdout.splitlines() if f"{netlab.TARGET4}:80 " in ln]
    # every connection either worker opened (the curls and the lab's echo probe) is in the capture
    assert len(http) == 12 and all("  completed  " in ln for ln in http), rp.stdout
    assert sum(1 for ln in rp.stdout.splitlines() if re.match(r"\s+\d+ tcp ", ln)) == opened
    assert f"{netlab.DNS4}:53 " in rp.stdout


def _check_wire_capture(pcap, mtu=1500):
    """Every packet at most the MTU, every IP/TCP/UDP checksum right."""
    from netstack.wire import checksum as ck
    from tun2xray.device.pcap import read_pcap
    n = 0
    for _ts, p in read_pcap(str(pcap)):
        n += 1
        assert len(p) <= mtu, len(p)
        if p[0] >> 4 == 4:
            hl = (p[0] & 15) * 4
            assert ck.sum16(p[:hl]) == 0xFFFF
            proto, ps = p[9], ck.pseudo4(p[12:16], p[16:20], p[9], len(p) - hl)
        else:
            hl, proto = 40, p[6]
            ps = ck.pseudo6(p[8:24], p[24:40], proto, len(p) - hl)
        if proto in (6, 17):
            assert ck.sum16(p[hl:], ps) == 0xFFFF, p[:60].hex()
    return n


def test_record_wire_with_offloads(tmp_path):
    pcap = tmp_path / "wire.pcap"
    with netlab.Lab(prefix="rr", files=RR_FILES) as lab:
        argv = _rr_argv(pcap, "--workers", "1", "--record-wire")
        argv[argv.index("--device") + 1] = f"tun://{RR_TUN}?offload=1"
        lab.run_tun2xray(argv, RR_TUN, env=_rr_env())
        res = _curls(lab, 2)
        assert all(rc == 0 for rc, _ in res), (res, lab.log("tun2xray")[-3000:])
        up = lab.cli_run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--data-binary",
                          "@" + lab.files["small.bin"][0], lab.upload_url()], timeout=30)
        assert up.returncode == 0 and up.stdout == b"200", up
        dev = _status()["device"]
        # the device did carry super-segments both ways: there was something to cut
        assert dev.get("tx_gso", 0) > 0 and dev.get("rx_gso", 0) > 0, dev
        assert lab.stop("tun2xray", timeout=30) == 0, lab.log("tun2xray")[-3000:]
        log = lab.log("tun2xray")
    assert "--record-wire: TCP super-segments are recorded as wire-sized segments" in log
    n = _check_wire_capture(pcap)
    assert n > 3 * 100_000 // 1500
    # the summary at exit counts what is in the file
    assert f"--record: {n} packets written to {pcap}\n" in log, log[-2000:]
    rp = _replay(pcap)
    assert rp.returncode == 0, rp.stdout[-3000:] + rp.stderr
    assert rp.stdout.count("  completed  ") >= 3


def test_record_max_mb_caps_the_files(tmp_path):
    pcap = tmp_path / "cap.pcap"
    cap = 200_000
    with netlab.Lab(prefix="rr", files=RR_FILES) as lab:
        lab.run_tun2xray(_rr_argv(pcap, "--workers", "2", "--record-max-mb", "0.2"), RR_TUN, env=_rr_env())
        r = lab.cli_run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                         lab.url("5M.bin")], timeout=60)
        assert r.returncode == 0 and r.stdout.split() == [b"200", str(5 << 20).encode()], r
        # while it runs, each worker's part stays within its share
        for name in os.listdir(tmp_path):
            assert os.path.getsize(tmp_path / name) <= cap // 2, name
        assert lab.stop("tun2xray", timeout=30) == 0, lab.log("tun2xray")[-3000:]
        log = lab.log("tun2xray")
    names = sorted(os.listdir(tmp_path))
    assert names == ["cap.pcap", "cap.pcap.1"], names
    for name in names:
        assert os.path.getsize(tmp_path / name) <= cap, (name, os.path.getsize(tmp_path / name))
        assert _tcpdump_count(tmp_path / name) > 0
    # one worker carried the download: its part (0.1 MB) was rotated at
    # least once per 0.1 MB of it, each time with a log line
    rotations = re.findall(r"reached its cap of 0\.1 MB; moved to \S+\.1", log)
    assert len(rotations) >= (5 << 20) // (cap // 2) - 1, log[-3000:]
    assert "rotated at 0.2 MB" in log
