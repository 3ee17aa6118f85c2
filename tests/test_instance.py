"""One instance per device: the lock, its takeover after a kill, and how
status/doctor/node find the running instance (tun2xray/instance.py).

Locks here live in a temporary TUN2XRAY_RUN_DIR and are held by real child
processes (flock is per open file, so a holder must be another process for
the lock to mean anything); the end-to-end tests use the real /run/tun2xray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tun2xray import instance, state
from tun2xray.instance import InstanceError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLDER = r"""
import sys, time
from tun2xray import instance
lock, url, ctl = instance.claim(sys.argv[1], None)
print("ready", flush=True)
time.sleep(60)
"""


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TUN2XRAY_RUN_DIR", str(tmp_path))
    monkeypatch.setattr(instance, "_netns_tag", lambda: None)
    return str(tmp_path)


def hold(device: str, run_dir: str) -> subprocess.Popen:
    """A child process that claims ``device`` (unix:// or an absent tun://) and sleeps."""
    env = dict(os.environ, TUN2XRAY_RUN_DIR=run_dir,
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-c", HOLDER, device], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.strip() == "ready", p.stderr.read()
    return p


@pytest.fixture
def holders():
    procs = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(5)
        p.stdout.close()
        p.stderr.close()


def test_second_claim_names_the_first(run_dir, holders):
    p = hold("tun://isnone0", run_dir)
    holders.append(p)
    with pytest.raises(InstanceError) as ei:
        instance.claim("tun://isnone0", None)
    msg = str(ei.value)
    assert "\n" not in msg
    assert f"pid {p.pid}" in msg
    assert f"control unix://{run_dir}/isnone0.sock" in msg
    assert msg.startswith("tun://isnone0 is already served by another tun2xray")


def test_lock_of_a_killed_run_is_taken_over(run_dir, holders):
    p = hold("tun://isnone1", run_dir)
    holders.append(p)
    path = os.path.join(run_dir, "isnone1.lock")
    assert read_json(path)["pid"] == p.pid
    assert [i["pid"] for i in instance.list_instances()] == [p.pid]
    p.send_signal(signal.SIGKILL)
    p.wait(5)
    assert os.path.exists(path)                      # left behind by the killed run ...
    assert instance.list_instances() == []           # ... and seen as stale
    assert instance.find_instance() is None
    lock, _, ctl = instance.claim("tun://isnone1", None)
    try:
        assert read_json(path)["pid"] == os.getpid()
        assert ctl == f"unix://{run_dir}/isnone1.sock"
    finally:
        lock.release()
    assert not os.path.exists(path)                  # removed by a clean exit


def test_find_one_several_none(run_dir, holders):
    with pytest.raises(InstanceError, match="no running tun2xray found"):
        instance.find_control()
    a = hold("tun://isnone2", run_dir)
    holders.append(a)
    assert instance.find_control() == f"unix://{run_dir}/isnone2.sock"
    assert instance.find_instance()["pid"] == a.pid
    b = hold("unix:///tmp/is-packets.sock", run_dir)
    holders.append(b)
    with pytest.raises(InstanceError) as ei:
        instance.find_control()
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("2 tun2xray instances run here:")
    assert f"isnone2 (pid {a.pid}" in msg and f"unix-tmp_is-packets.sock (pid {b.pid}" in msg
    assert "--control URL or --device NAME" in msg
    # --device picks one (NAME or tun://NAME); --control wins over discovery
    assert instance.find_control(device="isnone2") == f"unix://{run_dir}/isnone2.sock"
    assert instance.find_control(device="tun://isnone2") == f"unix://{run_dir}/isnone2.sock"
    assert instance.find_control(control="unix:///x.sock") == "unix:///x.sock"
    with pytest.raises(InstanceError, match="no running tun2xray on isnone9"):
        instance.find_control(device="isnone9")


def test_control_none_and_explicit(run_dir):
    lock, _, ctl = instance.claim("tun://isnone3", "none")
    try:
        assert ctl is None and lock.info["control"] is None
        with pytest.raises(InstanceError, match="serves no control socket"):
            instance.find_control()
    finally:
        lock.release()
    lock, _, ctl = instance.claim("tun://isnone3", "unix:///tmp/is-elsewhere.sock")
    try:
        assert ctl == "unix:///tmp/is-elsewhere.sock"
        assert instance.find_control() == "unix:///tmp/is-elsewhere.sock"
    finally:
        lock.release()


def test_device_names(run_dir):
    assert instance.device_name("tun://tx0?offload=0") == ("tx0", "tun://tx0?offload=0")
    name, url = instance.device_name("tun://?multiqueue=1")
    assert name.startswith("tun") and url == f"tun://{name}?multiqueue=1"
    assert not instance._link_exists(name)
    r, w = os.pipe()
    try:                                   # not a TUN: a name of its own
        assert instance.device_name(f"fd://{r}")[0] == f"fd{r}-{os.getpid()}"
    finally:
        os.close(r)
        os.close(w)
    assert instance.device_name("unix:///run/pkt.sock")[0] == "unix-run_pkt.sock"
    assert instance.device_name("unix://@host")[0] == "unix-@host"


def test_a_default_socket_path_that_cannot_be_bound_is_refused(tmp_path, monkeypatch):
    deep = tmp_path / ("d" * 90)
    monkeypatch.setenv("TUN2XRAY_RUN_DIR", str(deep))
    monkeypatch.setattr(instance, "_netns_tag", lambda: None)
    with pytest.raises(InstanceError, match="longer than a socket path"):
        instance.claim("tun://isnone4", None)


def test_status_carries_the_instance():
    lc = state.Lifecycle()
    info = {"pid": 7, "name": "tx0", "device": "tun://tx0", "control": "unix:///run/tun2xray/tx0.sock"}
    st = state.compose(lc, None, info)
    assert st["instance"] == info and st["state"] == "disconnected"
    assert "instance" not in state.compose(lc, None)


def test_where_for_root_other_users_and_the_override(monkeypatch):
    monkeypatch.delenv("TUN2XRAY_RUN_DIR", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert instance.base_dir() == "/run/tun2xray"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert instance.base_dir() == "/run/user/1000/tun2xray"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert instance.base_dir() == "/tmp/tun2xray-1000"
    monkeypatch.setenv("TUN2XRAY_RUN_DIR", "/srv/t2x")
    assert instance.base_dir() == "/srv/t2x"


def test_doctor_checks_the_config_the_core_runs(tmp_path):
    from tun2xray.xray.doctor import config_to_check
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    (nodes / "a.json").write_text("{}")
    link = tmp_path / "config.json"
    link.symlink_to("nodes/a.json")
    runtime = str(tmp_path / ".config.tun2xray.json")
    xst = {"config": str(link), "node": str(nodes / "a.json"), "runtime_config": runtime,
           "core": {"config": runtime}}
    assert config_to_check(None, xst) == runtime                     # no flag: what runs
    assert config_to_check(str(link), xst) == runtime                # the instance's own link
    assert config_to_check(str(nodes / "a.json"), xst) == runtime    # ... or its node
    other = str(tmp_path / "other.json")
    assert config_to_check(other, xst) == other                      # another config: as given
    assert config_to_check(None, {}) is None                         # no instance, no flag
    assert config_to_check(other, {}) == other


@pytest.mark.skipif(os.geteuid() != 0, reason="TUN devices need root")
def test_a_tun_fd_is_named_by_its_interface_and_its_holder_is_seen():
    from tun2xray.device import tunfd
    t = tunfd.TunFd.open("isfd0", tunfd.IFF_TUN | tunfd.IFF_NO_PI | tunfd.IFF_MULTI_QUEUE)
    try:
        assert instance.device_name(f"fd://{t.fileno()}")[0] == "isfd0"
        # another process looking for holders of isfd0 finds us (and only us)
        code = "from tun2xray import instance; print(instance.tun_holders('isfd0'))"
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             timeout=20, check=True).stdout
        assert out.strip() == f"[{os.getpid()}]"
        assert instance.tun_holders("isfd0") == []       # ourselves excluded
    finally:
        t.close()
