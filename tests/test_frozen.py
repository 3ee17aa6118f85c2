"""tun2xray.frozen: how the standalone binary starts its workers and keeps
the bundle's library path away from the programs it runs (the binary itself
is tested end to end in tests/e2e/test_binary_e2e.py)."""

from __future__ import annotations

import glob
import os
import sys

import pytest

from tun2xray import entry, frozen

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def bundle(monkeypatch):
    """A fresh record of the bootloader's variables."""
    monkeypatch.setattr(frozen, "_bundle_env", {})
    return frozen._bundle_env


def test_unfrozen_worker_is_python_m_on_this_tree(monkeypatch, bundle):
    monkeypatch.delattr(sys, "frozen", raising=False)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    argv, env = frozen.worker_command(["--channel", "5", "--parent", "1"])
    assert argv == [sys.executable, "-m", "tun2xray.workers", "--channel", "5", "--parent", "1"]
    assert env["PYTHONPATH"].split(os.pathsep) == [REPO, "/elsewhere"]


def test_frozen_worker_is_the_binary_with_the_bundle_library_path(monkeypatch, bundle):
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setenv("LD_LIBRARY_PATH", "/tmp/_MEIabc:/opt/lib")
    monkeypatch.setenv("LD_LIBRARY_PATH_ORIG", "/opt/lib")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    frozen._restore_user_environment()
    assert os.environ["LD_LIBRARY_PATH"] == "/opt/lib"          # what the core and ip see
    assert "LD_LIBRARY_PATH_ORIG" not in os.environ
    argv, env = frozen.worker_command(["--channel", "5"])
    assert argv == [sys.executable, frozen.WORKER_ARG, "--channel", "5"]
    assert env["LD_LIBRARY_PATH"] == "/tmp/_MEIabc:/opt/lib"
    assert env["LD_LIBRARY_PATH_ORIG"] == "/opt/lib"
    assert "PYTHONPATH" not in env          # the bundle holds the code


def test_bundle_path_without_a_user_path_is_dropped(monkeypatch, bundle):
    monkeypatch.setenv("LD_LIBRARY_PATH", "/tmp/_MEIabc")
    monkeypatch.delenv("LD_LIBRARY_PATH_ORIG", raising=False)
    frozen._restore_user_environment()
    assert "LD_LIBRARY_PATH" not in os.environ
    assert bundle == {"LD_LIBRARY_PATH": "/tmp/_MEIabc"}


def test_bootloader_variables_go_to_the_workers_only(monkeypatch, bundle):
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setenv("_PYI_APPLICATION_HOME_DIR", "/tmp/_MEIabc")
    monkeypatch.setenv("_PYI_PARENT_PROCESS_LEVEL", "1")
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    frozen._restore_user_environment()
    assert not [k for k in os.environ if k.startswith("_PYI_")]
    _, env = frozen.worker_command([])
    assert env["_PYI_APPLICATION_HOME_DIR"] == "/tmp/_MEIabc" and env["_PYI_PARENT_PROCESS_LEVEL"] == "1"


def test_no_library_path_is_left_alone(monkeypatch, bundle):
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    frozen._restore_user_environment()
    assert "LD_LIBRARY_PATH" not in os.environ and bundle == {}


def test_main_dispatches_the_hidden_worker_argument(capsys):
    with pytest.raises(SystemExit) as e:
        entry.main([frozen.WORKER_ARG, "--help"])
    assert e.value.code == 0
    assert "--channel" in capsys.readouterr().out


def test_main_runs_the_command_line(capsys):
    pcap = sorted(glob.glob(os.path.join(REPO, "pcaps", "*.pcap")))[0]
    assert entry.main(["replay", pcap]) == 0
    assert pcap in capsys.readouterr().out
