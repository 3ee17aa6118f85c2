"""An idle `tun2xray run` keeps only what it runs: the modules that serve
other commands or options (node/doctor, the Xray core's supervision,
--record, the workers' supervisor) are imported on first use, and argparse's
help formatter does not bring shutil (zlib, bz2, lzma). Each costs RSS in
every process (docs/performance.md, "Memory of one process").

The run is real: `cli.main` with an fd:// device (a socketpair standing in
for the host) and a listening socket as the proxy, on the event loop `run`
uses; once the control socket answers a status request, the process lists
sys.modules and stops itself with SIGTERM."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# imported by an idle one-process run before these modules were made lazy
LAZY = {
    "tun2xray.xray.doctor", "tun2xray.xray.nodes", "tun2xray.xray.session", "tun2xray.xray.core",
    "tun2xray.xray.config", "tun2xray.xray.probe", "tun2xray.xray.reader", "ctypes",
    "tun2xray.record", "tun2xray.device.pcap", "tun2xray.workers.supervisor", "tun2xray.workers.worker",
    "shutil", "bz2", "lzma", "tempfile", "pickle",
}

SCRIPT = r"""
import json, os, signal, socket, sys, threading, time
before = set(sys.modules)                      # what the interpreter loaded by itself
from tun2xray import cli
from tun2xray.control import query

out, ctl = sys.argv[1], sys.argv[2]
proxy = socket.socket()
proxy.bind(("127.0.0.1", 0))
proxy.listen()
host, dev = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)

def watch():
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            status = query("unix://" + ctl, timeout=2)
        except (OSError, ValueError):
            time.sleep(0.05)
            continue
        loaded = sorted(set(sys.modules) - before)
        with open(out, "w") as f:
            json.dump({"loaded": loaded, "status_keys": sorted(status)}, f)
        break
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=watch, daemon=True).start()
sys.exit(cli.main(["run", "--device", "fd://%d" % dev.fileno(), "--proxy",
                   "socks5://127.0.0.1:%d" % proxy.getsockname()[1], "--control", "unix://" + ctl,
                   "--log-level", "warning"]))
"""


def test_an_idle_run_does_not_import_what_it_does_not_use(tmp_path):
    out, ctl = tmp_path / "modules.json", tmp_path / "ctl.sock"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TUN2XRAY_RUN_DIR=str(tmp_path / "run"))
    env.pop("TUN2XRAY_WORKERS", None)
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(out), str(ctl)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    loaded = set(got["loaded"])
    # it did serve: the engine, the host shell and the loop are there, and status answered
    assert {"tun2xray.engine.core", "tun2xray.host", "netstack.stack"} <= loaded
    assert "flows" in got["status_keys"]
    assert sorted(LAZY & loaded) == []


def test_the_run_parser_still_knows_node_and_doctor():
    # the run's parser leaves node/doctor unfilled; asking for them fills them
    from tun2xray.cli import build_parser
    sub = build_parser(["run"])._subparsers._group_actions[0].choices
    assert set(sub) == {"run", "status", "replay", "node", "doctor"}
    full = build_parser(["doctor"])._subparsers._group_actions[0].choices
    assert any("--control" in a.option_strings for a in full["doctor"]._actions)
