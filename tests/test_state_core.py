"""The proxy watch against a real core (xray, else Debian's v2ray) on
loopback: its probe answers without an access-log line, and a supervised
core's health follows a SIGKILL and the restart."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import time

import pytest

from tun2xray import state, xray
from tun2xray.xray.config import _free_loopback_port


def _core_binary():
    try:
        return xray.find_binary()
    except xray.CoreError:
        pytest.fail("no xray/v2ray on PATH: tools/install.sh installs v2ray (CI has it)")


def _config(tmp_path, udp=True):
    port = _free_loopback_port()
    cfg = {"log": {"loglevel": "warning"},     # access lines go to stdout, which Core forwards
           "inbounds": [{"tag": "socks", "listen": "127.0.0.1", "port": port, "protocol": "socks",
                         "settings": {"auth": "noauth", "udp": udp}}],
           "outbounds": [{"protocol": "freedom"}]}
    p = tmp_path / "core.json"
    p.write_text(json.dumps(cfg))
    return str(p), port


def wait(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def core(tmp_path):
    path, port = _config(tmp_path)
    c = xray.Core(_core_binary(), path, xray.derive(path).ready_checks(), min_backoff=2.0, max_backoff=4.0)
    c.start()
    try:
        yield c, port
    finally:
        c.stop()


def test_probe_answers_without_an_access_log_line(core, caplog):
    c, port = core
    caplog.set_level(logging.INFO, logger="tun2xray.core")

    async def probes():
        return [await state.socks_probe("127.0.0.1", port) for _ in range(5)]

    assert asyncio.run(probes()) == [None] * 5
    # a bare connect and close, as a control: the core logs that one
    socket.create_connection(("127.0.0.1", port)).close()
    rejected = lambda: [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]  # noqa: E731
    wait(lambda: rejected(), 10, "the control's rejected line")
    assert len(rejected()) == 1, rejected()


def test_health_follows_a_killed_core(core, tmp_path):
    c, _ = core
    xs = xray.XraySession(str(tmp_path / "core.json"))
    xs.core = c
    assert xs.health() == (True, None)
    pid = c.proc.pid
    os.kill(pid, signal.SIGKILL)
    seen = []
    wait(lambda: seen.append(xs.health()) or not seen[-1][0], 10, "the core's death in its health")
    wait(lambda: seen.append(xs.health()) or seen[-1][0], 15, "the core back")
    reasons = {why for ok, why in seen if not ok}
    assert reasons and all(r.startswith("core exited: killed by SIGKILL, restarting") for r in reasons), reasons
    # the backoff countdown shows while the restart waits
    assert any(r.startswith("core exited: killed by SIGKILL, restarting in ") for r in reasons), reasons
    assert c.alive and c.proc.pid != pid and xs.health() == (True, None)
