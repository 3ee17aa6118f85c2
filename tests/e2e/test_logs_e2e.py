"""What `tun2xray run` writes on stderr, with real curl through a real TUN
in its own lab (prefix lg: lg-cli / lg-srv, TUN lgtun0).

- ``--log-level debug``: a curl's flow shows up as an accept line with the
  rule and the upstream, the SOCKS reply line and a close line whose byte
  counts match the transfer; with ``--workers 2`` every engine line carries
  its worker's tag.
- ``--log-level info``: none of those lines.
- ``--log-format json``: every stderr line is one JSON object with
  ts/level/logger/msg, and the flow's lines carry the same facts as fields.
- SIGTERM: exactly one summary line (one for all workers too) whose numbers
  match the last status the control socket gave.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys

import pytest

import netlab
from netlab import DOKODEMO_PORT, SOCKS_PORT, TARGET4

pytestmark = pytest.mark.e2e

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TUN = "lgtun0"
CTL = "/tmp/lg-ctl.sock"
PROXY = f"socks5://127.0.0.1:{SOCKS_PORT}"
ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
ENV.pop("TUN2XRAY_WORKERS", None)
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture(scope="module")
def lglab():
    if os.geteuid() != 0:
        pytest.skip("e2e tests need root (network namespaces, veth, TUN); CI runs them as root")
    lab = netlab.Lab(prefix="lg", files={"small.bin": (300_000, 7)})
    with lab:
        yield lab
    assert not netlab.netns_exists(lab.cli_ns) and not netlab.netns_exists(lab.srv_ns)


@pytest.fixture
def run(lglab):
    """start(*flags) -> the running tun2xray; stopped and unrouted afterwards."""
    lab = lglab

    def start(*flags):
        # each run's log on its own (the lab appends to the file of a name)
        open(os.path.join(lab.workdir, "tun2xray.log"), "wb").close()
        argv = [sys.executable, "-m", "tun2xray.cli", "run", "--device", f"tun://{TUN}",
                "--proxy", PROXY, "--map", f"udp:53=dokodemo://127.0.0.1:{DOKODEMO_PORT}",
                "--control", f"unix://{CTL}", *flags]
        return lab.run_tun2xray(argv, TUN, env=ENV)

    yield start
    lab.stop("tun2xray")
    lab.unroute()


def tail(lab) -> str:
    return "\n--- tun2xray log (tail) ---\n" + lab.log("tun2xray")[-4000:]


def curl(lab):
    """Fetch small.bin through the TUN; (local port, bytes received)."""
    _, size, _ = lab.files["small.bin"]
    r = lab.cli_run(["curl", "-sS", "--fail", "--max-time", "20", "-o", "/dev/null",
                     "-w", "%{local_port} %{size_download} %{size_request}", lab.url("small.bin")],
                    timeout=30)
    assert r.returncode == 0, r.stderr.decode() + tail(lab)
    port, got, sent = (int(x) for x in r.stdout.split())
    assert got == size
    return port, size, sent


def status(lab) -> dict:
    from tun2xray.control import query
    return query(f"unix://{CTL}")


def sigterm(lab, p) -> str:
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(20) == 0, tail(lab)
    return lab.log("tun2xray")


def flow_lines(text: str, port: int) -> dict:
    """The debug lines of the TCP flow from local port ``port`` to TARGET4:80:
    accept / socks / close (text format), keyed by kind."""
    src = rf"\S+:{port}"
    dial = re.search(rf"tcp flow (\d+) {src} -> {re.escape(TARGET4)}:80: rule (.+?) -> (\S+); dialing", text)
    if dial is None:
        return {}
    fid = dial.group(1)
    out = {"dial": dial}
    for kind, pat in (("accept", rf"tcp flow {fid} accepted \(SYN-ACK sent\): {src} -> \S+ via (\S+)"),
                      ("socks", rf"tcp flow {fid}: socks reply (\d+) \(([^)]*)\), bound (\S+)"),
                      ("close", rf"tcp flow {fid} closed \((\w+)\): {src} -> \S+ up=(\d+) down=(\d+) bytes")):
        m = re.search(pat, text)
        if m:
            out[kind] = m
    return out


def summary_lines(text: str) -> list:
    return [ln for ln in text.splitlines() if "summary: " in ln]


def check_summary(line_or_fields, st: dict, workers=None):
    """The exit summary against the last status: the same flows and bytes
    (nothing moved in between; an idle flow may still be open)."""
    eng = st["engine"]
    if isinstance(line_or_fields, dict):
        f = line_or_fields
        got = (f["tcp_flows"], f["udp_flows"], f["bytes_up"], f["bytes_down"], f["reason"],
               f.get("workers"))
    else:
        m = re.search(r"flows tcp=(\d+) udp=(\d+), bytes up=(\d+) down=(\d+), refused=\d+, drops=\d+"
                      r"(?:, workers=(\d+) restarts=0)?; exit: (\S+)$", line_or_fields)
        assert m, line_or_fields
        got = (int(m[1]), int(m[2]), int(m[3]), int(m[4]), m[6], int(m[5]) if m[5] else None)
    want = (eng.get("tcp_opened", 0), eng.get("udp_opened", 0), eng.get("bytes_up", 0),
            eng.get("bytes_down", 0), "SIGTERM", workers)
    assert got == want, (line_or_fields, eng)


# --- text, debug, two workers -------------------------------------------------

@pytest.mark.deadline(120)
def test_debug_shows_a_flows_life_with_worker_tags_and_one_summary(lglab, run):
    lab = lglab
    p = run("--log-level", "debug", "--workers", "2")
    port, size, sent = curl(lab)
    found = {}

    def complete():
        found.update(flow_lines(lab.log("tun2xray"), port))
        return "close" in found

    netlab.wait_until(complete, 10, "the flow's close line")
    assert found["dial"].group(2) == "default" and found["dial"].group(3) == PROXY
    assert found["accept"].group(1) == PROXY, found
    assert found["socks"].group(1) == "0" and found["socks"].group(2) == "succeeded", found
    reason, up, down = found["close"].group(1), int(found["close"].group(2)), int(found["close"].group(3))
    # the HTTP request went up, the body (and its headers) came down
    assert up == sent and size < down < size + 1000, (up, sent, down, size)
    assert reason == "closed", found["close"].group(0)
    text = lab.log("tun2xray")
    for ln in text.splitlines():
        assert re.match(STAMP + r" (debug|info|warning|error) \S+: ", ln), ln
        assert len(re.findall(STAMP, ln)) == 1, ln
    # the flow's lines come from the worker that served it, and say which
    engine_lines = [ln for ln in text.splitlines() if re.search(rf"tcp flow \d+ \S+:{port} ", ln)]
    assert engine_lines and all(re.search(r" engine\[w[01]\]: ", ln) for ln in engine_lines), engine_lines
    last = status(lab)
    text = sigterm(lab, p)
    lines = summary_lines(text)
    assert len(lines) == 1, lines
    assert re.match(STAMP + r" info tun2xray: summary: uptime", lines[0]), lines[0]
    check_summary(lines[0], last, workers=2)


# --- text, info ---------------------------------------------------------------

@pytest.mark.deadline(90)
def test_info_has_no_flow_lines_and_a_summary_on_sigterm(lglab, run):
    lab = lglab
    p = run("--log-level", "info", "--workers", "1")
    port, _, _ = curl(lab)
    last = status(lab)
    text = sigterm(lab, p)
    assert flow_lines(text, port) == {}, tail(lab)
    for word in ("tcp flow", "socks reply", "drops: "):
        assert word not in text, tail(lab)
    lines = summary_lines(text)
    assert len(lines) == 1, lines
    check_summary(lines[0], last)
    assert last["engine"]["bytes_down"] > lab.files["small.bin"][1]


# --- JSON ---------------------------------------------------------------------

@pytest.mark.deadline(120)
def test_json_lines_with_flow_fields_and_one_summary(lglab, run):
    lab = lglab
    p = run("--log-level", "debug", "--log-format", "json", "--workers", "2")
    port, size, sent = curl(lab)

    def records():
        return [json.loads(ln) for ln in lab.log("tun2xray").splitlines()]

    def ours(recs):
        return [r for r in recs if str(r.get("src", "")).endswith(f":{port}")]

    netlab.wait_until(lambda: any(r.get("reason") == "closed" for r in ours(records())), 10,
                      "the flow's close record")
    recs = ours(records())
    for r in records():
        assert {"ts", "level", "logger", "msg"} <= set(r), r
        assert re.fullmatch(STAMP, r["ts"]), r
    (dial,) = [r for r in recs if "dialing" in r["msg"]]
    (accept,) = [r for r in recs if "accepted" in r["msg"]]
    (reply,) = [r for r in recs if "socks_reply" in r]
    (close,) = [r for r in recs if "closed" in r["msg"]]
    fid = dial["flow"]
    assert all(r["flow"] == fid and r["proto"] == "tcp" and r["dst"] == f"{TARGET4}:80" for r in recs)
    assert dial["rule"] == "default" and dial["upstream"] == PROXY and accept["upstream"] == PROXY
    assert reply["socks_reply"] == 0 and "bound" in reply
    assert close["bytes_up"] == sent and size < close["bytes_down"] < size + 1000, close
    assert {r["worker"] for r in recs} <= {0, 1} and len({r["worker"] for r in recs}) == 1
    last = status(lab)
    text = sigterm(lab, p)
    recs = [json.loads(ln) for ln in text.splitlines()]
    summaries = [r for r in recs if "summary" in r]
    assert len(summaries) == 1, summaries
    assert summaries[0]["logger"] == "tun2xray" and "worker" not in summaries[0]
    check_summary(summaries[0]["summary"], last, workers=2)


# --- the core's lines ----------------------------------------------------------

@pytest.mark.deadline(120)
def test_core_lines_go_through_the_same_json_format(lglab):
    """With --xray-config the core's own output is forwarded as records of
    the ``core`` logger: in JSON mode those lines are JSON too."""
    lab = lglab
    cfg = netlab.local_core_config(lab.user_id, lab.workdir)
    del cfg["log"]["error"]                 # the core's log on its stdout, as users have it
    path = lab._write_config("lg-node.json", cfg)
    argv = [sys.executable, "-m", "tun2xray.cli", "run", "--device", f"tun://{TUN}",
            "--xray-config", path, "--control", f"unix://{CTL}", "--workers", "1",
            "--log-format", "json"]
    open(os.path.join(lab.workdir, "tun2xray.log"), "wb").close()
    lab.stop_local_core()                   # the node's inbounds take its ports
    try:
        p = lab.run_tun2xray(argv, TUN, env=ENV)
        curl(lab)
        netlab.wait_until(lambda: any('"logger": "core"' in ln for ln in lab.log("tun2xray").splitlines()),
                          10, "a line from the core")
        last = status(lab)
        text = sigterm(lab, p)
        recs = [json.loads(ln) for ln in text.splitlines()]
        core = [r for r in recs if r["logger"] == "core"]
        assert core and all({"ts", "level", "msg"} <= set(r) for r in core), recs
        (summary,) = [r["summary"] for r in recs if "summary" in r]
        assert summary["core_restarts"] == 0
        check_summary(summary, last)
    finally:
        lab.stop("tun2xray")
        lab.unroute()
        lab.start_local_core()


@pytest.mark.deadline(60)
def test_summary_names_the_error_that_ended_the_run(lglab, run):
    """The TUN deleted under a single-process run: it exits non-zero, and
    its summary says why (the device error), not a signal."""
    lab = lglab
    p = run("--log-level", "info", "--workers", "1")
    curl(lab)
    lab.ip(lab.cli_ns, "link", "del", TUN)
    assert p.wait(20) == 1, tail(lab)
    lines = summary_lines(lab.log("tun2xray"))
    assert len(lines) == 1, tail(lab)
    assert re.search(rf"flows tcp=2 .*; exit: device {TUN}: ", lines[0]), lines[0]
