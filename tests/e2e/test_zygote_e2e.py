"""Workers forked from the zygote (tun2xray/workers/zygote.py), in a real lab
(prefix sh: namespaces sh-cli / sh-srv, TUN shtun0).

`tun2xray run --workers 2` forks a template process after the imports and
forks every worker from it; the supervisor is the workers' parent (a child
subreaper). These tests check what users get from that: the workers share
the supervisor's pages (their anonymous memory is mostly shared, and the
tree's PSS is far below its summed RSS), a restarted worker is forked the
same way and serves, the zygote holds none of the supervisor's files, a
killed supervisor leaves no process and no TUN, and a lost zygote leaves a
run that still restarts workers (as new programs).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

import pytest

import netlab
from netlab import ECHO_PORT, TARGET4

pytestmark = pytest.mark.e2e

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TUN = "shtun0"
CTL = "/tmp/sh-ctl.sock"
ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
ENV.pop("TUN2XRAY_WORKERS", None)
ARGV = [sys.executable, "-m", "tun2xray.cli", "run", "--device", f"tun://{TUN}",
        "--proxy", "socks5://127.0.0.1:10808", "--control", f"unix://{CTL}", "--workers", "2"]


def logs(lab) -> str:
    return "\n--- tun2xray log (tail) ---\n" + lab.log("tun2xray")[-3000:]


def status(lab) -> dict:
    r = lab.cli_run([sys.executable, "-m", "tun2xray.cli", "status", "--control", f"unix://{CTL}"],
                    timeout=20)
    assert r.returncode == 0, r.stderr.decode() + logs(lab)
    return json.loads(r.stdout)


def children(pid: int) -> list:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out += [int(c) for c in f.read().split()]
    return sorted(out)


def ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def rollup(pid: int) -> dict:
    """smaps_rollup in kB."""
    kb = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                kb[parts[0].rstrip(":")] = int(parts[1])
    return kb


def echo(lab, payload: bytes) -> bytes:
    with lab.in_cli():
        s = socket.socket()
    with s:
        s.settimeout(5)
        s.connect((TARGET4, ECHO_PORT))
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(len(payload) - len(got))
            if not chunk:
                break
            got += chunk
        return got


def assert_forked_worker(sup: int, pid: int) -> None:
    """pid is the supervisor's child and shares the template's pages: most of
    its anonymous memory is shared (an exec'd worker shares none)."""
    assert ppid(pid) == sup
    kb = rollup(pid)
    assert kb["Shared_Dirty"] >= 5 * 1024 and kb["Shared_Dirty"] > kb["Private_Dirty"], kb


@pytest.fixture(scope="module")
def zlab():
    if os.geteuid() != 0:
        pytest.skip("e2e tests need root (network namespaces, veth, TUN); CI runs them as root")
    lab = netlab.Lab(prefix="sh", hop="vless")
    with lab:
        yield lab
    assert not netlab.netns_exists(lab.cli_ns), "sh-cli left behind"


@pytest.fixture
def run(zlab):
    """A fresh `run --workers 2` (supervisor pid), stopped after the test."""
    p = zlab.run_tun2xray(ARGV, TUN, env=ENV, describe=lambda: logs(zlab))
    try:
        yield zlab, p.pid
    finally:
        zlab.stop("tun2xray")
        zlab.unroute()
        if os.path.exists(CTL):
            os.unlink(CTL)


def zygote_of(sup: int, workers: list) -> int:
    rest = [c for c in children(sup) if c not in workers]
    assert len(rest) == 1, (children(sup), workers)
    return rest[0]


@pytest.mark.deadline(60)
def test_workers_are_the_supervisors_children_and_share_its_pages(run):
    lab, sup = run
    workers = [w["pid"] for w in status(lab)["workers"]]
    assert len(workers) == 2
    zyg = zygote_of(sup, workers)
    for w in workers:
        assert_forked_worker(sup, w)
    tree = [sup, zyg, *workers]
    pss = sum(rollup(p)["Pss"] for p in tree)
    rss = sum(rollup(p)["Rss"] for p in tree)
    print(f"\nrun --workers 2: PSS of the tree {pss / 1024:.1f} MB, RSS summed {rss / 1024:.1f} MB")
    assert pss < 0.6 * rss, (pss, rss)
    for i in range(20):                    # and they serve
        assert echo(lab, b"z%d" % i) == b"z%d" % i, logs(lab)


@pytest.mark.deadline(60)
def test_zygote_holds_none_of_the_supervisors_files(run):
    lab, sup = run
    workers = [w["pid"] for w in status(lab)["workers"]]
    zyg = zygote_of(sup, workers)
    fds = {int(n): os.readlink(f"/proc/{zyg}/fd/{n}") for n in os.listdir(f"/proc/{zyg}/fd")}
    sockets = [fd for fd, target in fds.items() if target.startswith("socket:")]
    # stdin/stdout/stderr, its one socket to the supervisor, /dev/null in place of the rest
    others = {fd: t for fd, t in fds.items() if fd > 2 and fd not in sockets and t != "/dev/null"}
    assert len([fd for fd in sockets if fd > 2]) == 1 and not others, fds


@pytest.mark.deadline(60)
def test_restarted_worker_is_forked_from_the_zygote(run):
    lab, sup = run
    victim = status(lab)["workers"][0]
    os.kill(victim["pid"], signal.SIGKILL)

    def replaced():
        w = status(lab)["workers"][0]
        return w["alive"] and w["responding"] and w["pid"] != victim["pid"] and w

    w = netlab.wait_until(replaced, 20, "worker 0 restarted", interval=0.2)
    assert_forked_worker(sup, w["pid"])
    for i in range(30):
        assert echo(lab, b"r%d" % i) == b"r%d" % i, logs(lab)
    assert status(lab)["workers"][0]["tcp_opened"] > 0, "the restarted worker carried no flow"


@pytest.mark.deadline(60)
def test_lost_zygote_leaves_restarts_working(run):
    lab, sup = run
    st = status(lab)
    workers = [w["pid"] for w in st["workers"]]
    zyg = zygote_of(sup, workers)
    os.kill(zyg, signal.SIGKILL)
    netlab.wait_until(lambda: not alive(zyg), 10, "the zygote gone")
    os.kill(workers[1], signal.SIGKILL)

    def replaced():
        w = status(lab)["workers"][1]
        return w["alive"] and w["responding"] and w["pid"] != workers[1] and w

    w = netlab.wait_until(replaced, 20, "worker 1 restarted", interval=0.2)
    with open(f"/proc/{w['pid']}/cmdline", "rb") as f:
        assert b"tun2xray.workers" in f.read()       # started as a new program
    assert "starting workers as new programs" in lab.log("tun2xray"), logs(lab)
    for i in range(20):
        assert echo(lab, b"l%d" % i) == b"l%d" % i, logs(lab)


@pytest.mark.deadline(60)
def test_killed_supervisor_leaves_no_zygote_worker_or_tun(run):
    lab, sup = run
    workers = [w["pid"] for w in status(lab)["workers"]]
    tree = [sup, zygote_of(sup, workers), *workers]
    os.kill(sup, signal.SIGKILL)
    lab.procs["tun2xray"].wait(5)
    # PR_SET_PDEATHSIG in the zygote and in every worker
    netlab.wait_until(lambda: not any(alive(p) for p in tree), 10, "every process of the run gone")
    netlab.wait_until(lambda: not netlab.link_exists(lab.cli_ns, TUN), 5, f"{TUN} gone")
