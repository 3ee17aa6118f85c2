"""ForkedWorker (tun2xray/workers/zygote.py): Popen's poll / wait /
send_signal on real forked children the caller did not exec."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from tun2xray.workers.zygote import ForkedWorker


def fork(body) -> ForkedWorker:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.write(w, b"!")
            code = body()
        finally:
            os._exit(code)
    os.close(w)
    assert os.read(r, 1) == b"!"        # the child runs
    os.close(r)
    return ForkedWorker(pid)


def test_exit_status_as_popen_gives_it():
    p = fork(lambda: 3)
    assert p.wait(10) == 3
    assert p.poll() == 3 and p.returncode == 3


def test_killed_child_reports_minus_the_signal():
    p = fork(lambda: signal.pause() or 0)
    assert p.poll() is None
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == -signal.SIGTERM


def test_wait_with_a_timeout_raises_while_it_runs():
    p = fork(lambda: signal.pause() or 0)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            p.wait(0.05)
        assert p.poll() is None
    finally:
        p.kill()
        assert p.wait() == -signal.SIGKILL
    p.send_signal(signal.SIGTERM)       # gone: no signal to a recycled pid
