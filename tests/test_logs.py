"""tun2xray.logs: the one log format (text and JSON), the rate-limited drop
summary (fake clock, packets through a real Engine + Stack), the exit
summary's numbers, and the bridge's level setting that leaves the host's
root logger alone."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re

import pytest
from helpers import addr, build_packet

from tun2xray import bridge, logs
from tun2xray.engine import Engine
from tun2xray.rules import Router, parse_map
from tun2xray.upstream.url import parse_upstream

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    t2x = logging.getLogger("tun2xray")
    saved = (list(root.handlers), root.level, t2x.level, logs.current_format())
    yield
    for h in list(root.handlers):
        if h not in saved[0]:
            root.removeHandler(h)
    root.setLevel(saved[1])
    t2x.setLevel(saved[2])
    logs._state["format"] = saved[3]


def lines_of(buf: io.StringIO) -> list:
    return buf.getvalue().splitlines()


# --- formats ----------------------------------------------------------------

def test_text_line_has_one_timestamp_level_and_short_logger(restore_logging):
    buf = io.StringIO()
    logs.setup("info", "text", stream=buf)
    logging.getLogger("tun2xray.engine").info("tcp flow %d accepted", 7, extra={"flow": 7})
    logging.getLogger("tun2xray.engine").debug("not at info")
    logging.getLogger("tun2xray.core").warning("[Warning] core said so")
    out = lines_of(buf)
    assert len(out) == 2, out
    assert re.fullmatch(STAMP + r" info engine: tcp flow 7 accepted", out[0]), out[0]
    assert re.fullmatch(STAMP + r" warning core: \[Warning\] core said so", out[1]), out[1]
    assert len(re.findall(r"\d\d:\d\d:\d\d", out[1])) == 1


def test_worker_tag_in_text_and_field_in_json(restore_logging):
    buf = io.StringIO()
    logs.setup("debug", "text", worker=3, stream=buf)
    logging.getLogger("tun2xray.engine").debug("hello")
    assert re.fullmatch(STAMP + r" debug engine\[w3\]: hello", lines_of(buf)[0])
    buf = io.StringIO()
    logs.setup("debug", "json", worker=3, stream=buf)
    logging.getLogger("tun2xray.engine").debug("hello", extra={"flow": 9, "dst": "10.0.0.1:80"})
    rec = json.loads(lines_of(buf)[0])
    assert rec["worker"] == 3 and rec["flow"] == 9 and rec["dst"] == "10.0.0.1:80"
    assert rec["level"] == "debug" and rec["logger"] == "engine" and rec["msg"] == "hello"
    assert re.fullmatch(STAMP, rec["ts"])


def test_json_every_line_parses_even_with_a_traceback(restore_logging):
    buf = io.StringIO()
    logs.setup("info", "json", stream=buf)
    log = logging.getLogger("tun2xray")
    log.info("plain")
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        log.exception("failed")
    logs.error_line("--device tun://x: gone")
    recs = [json.loads(ln) for ln in lines_of(buf)]
    assert [r["msg"] for r in recs] == ["plain", "failed", "--device tun://x: gone"]
    assert "RuntimeError" in recs[1]["exc"] and recs[2]["level"] == "error"
    assert set(recs[0]) == {"ts", "level", "logger", "msg"}


def test_setup_replaces_its_own_handler_only(restore_logging):
    root = logging.getLogger()
    foreign = logging.NullHandler()
    root.addHandler(foreign)
    logs.setup("info", "text", stream=io.StringIO())
    logs.setup("debug", "json", stream=io.StringIO())
    ours = [h for h in root.handlers if isinstance(h, logs._Handler)]
    assert len(ours) == 1 and foreign in root.handlers
    # debug for tun2xray's records, not for every library in the process
    assert logging.getLogger("tun2xray.engine").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("asyncio").isEnabledFor(logging.DEBUG)
    assert logging.getLogger("pyroute2").isEnabledFor(logging.INFO)
    root.removeHandler(foreign)
    with pytest.raises(ValueError):
        logs.setup("info", "xml")
    with pytest.raises(ValueError):
        logs.setup("loud", "text")


def test_bridge_set_log_level_leaves_the_root_logger_alone(restore_logging):
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    bridge.set_log_level("debug")
    assert logging.getLogger("tun2xray.engine").isEnabledFor(logging.DEBUG)
    assert (list(root.handlers), root.level) == before
    bridge.set_log_level("warning")
    assert not logging.getLogger("tun2xray.engine").isEnabledFor(logging.INFO)
    with pytest.raises(bridge.BridgeError):
        bridge.set_log_level("chatty")


# --- drop summary -----------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_drop_summary_limits_lines_and_keeps_every_count():
    clock = FakeClock()
    cap = Capture()
    log = logging.getLogger("test.drops")
    log.addHandler(cap)
    log.setLevel(logging.DEBUG)
    try:
        ds = logs.DropSummary(log, interval=1.0, clock=clock)
        counts = {}
        pending = []
        for i in range(100):                 # 100 checks over 2.5 s of fake time
            counts["bad_tcp_checksum"] = counts.get("bad_tcp_checksum", 0) + 3
            if i % 10 == 0:
                counts["flow_limit"] = counts.get("flow_limit", 0) + 1
            pending.append(ds.check(counts))
            clock.t += 0.025
        assert pending[-1] is not None      # the last counts wait for the next interval
        clock.t = pending[-1]
        assert ds.check(counts) is None     # ... and go out then
        assert ds.check(counts) is None     # nothing new: no line
    finally:
        log.removeHandler(cap)
    lines = [r.getMessage() for r in cap.records]
    assert 2 <= len(lines) <= 4, lines
    assert all(ln.startswith("drops: ") for ln in lines)
    total = {}
    for r in cap.records:
        for k, v in r.drops.items():
            total[k] = total.get(k, 0) + v
    assert total == {"bad_tcp_checksum": 300, "flow_limit": 10}
    assert lines[0] == "drops: bad_tcp_checksum=3 flow_limit=1"


class PushDevice:
    """An engine device without an fd (packets pushed with engine.feed)."""

    pollable = False
    name = "test0"
    mtu = 1500
    url = "test://"

    def __init__(self):
        self.stats = {}
        self.out = []

    def write_batch(self, packets):
        self.out.extend(packets)
        return len(packets)

    def fileno(self):
        raise OSError("no fd")

    def close(self):
        pass


def test_engine_flood_of_bad_checksums_gives_few_summary_lines(restore_logging):
    """5,000 SYNs with a bad TCP checksum in 50 batches over 4.9 s of fake
    time: a handful of drop lines whose counts add up to 5,000, no line per
    packet."""
    clock = FakeClock()
    cap = Capture()
    elog = logging.getLogger("tun2xray.engine")
    elog.addHandler(cap)
    logs.set_level("debug")
    src, dst = addr("10.0.0.2"), addr("10.99.0.10")
    bad = [build_packet(4, src, dst, 40000 + i % 1000, 80, 1000, 0, "S", 65535, bad_checksum=True)
           for i in range(100)]
    router = Router(default=parse_upstream("socks5://127.0.0.1:1"), default_url="socks5://127.0.0.1:1")
    engine = Engine(PushDevice(), router, log_clock=clock)

    async def main():
        task = asyncio.ensure_future(engine.run())
        await asyncio.sleep(0)
        for _ in range(50):
            engine.feed(bad)
            clock.t += 0.098
        engine.stop()
        await task

    try:
        asyncio.run(main())
    finally:
        elog.removeHandler(cap)
    drops = [r for r in cap.records if r.getMessage().startswith("drops: ")]
    assert engine.stack.drops["bad_tcp_checksum"] == 5000
    assert sum(r.drops.get("bad_tcp_checksum", 0) for r in drops) == 5000
    # at most one line per second of (fake) time, plus the rest at exit
    assert 5 <= len(drops) <= 6, [r.getMessage() for r in drops]
    assert len(cap.records) < 20


def test_engine_at_info_writes_no_flow_or_drop_lines(restore_logging):
    cap = Capture()
    elog = logging.getLogger("tun2xray.engine")
    elog.addHandler(cap)
    logs.set_level("info")
    src, dst = addr("10.0.0.2"), addr("10.99.0.10")
    bad = [build_packet(4, src, dst, 40000, 80, 1000, 0, "S", 65535, bad_checksum=True)] * 50
    router = Router(default=parse_upstream("socks5://127.0.0.1:1"), default_url="socks5://127.0.0.1:1")
    engine = Engine(PushDevice(), router)

    async def main():
        task = asyncio.ensure_future(engine.run())
        await asyncio.sleep(0)
        engine.feed(bad)
        engine.stop()
        await task

    try:
        asyncio.run(main())
    finally:
        elog.removeHandler(cap)
    assert engine.stack.drops["bad_tcp_checksum"] == 50
    assert cap.records == []


# --- rules and the exit summary ----------------------------------------------

def test_route_rule_names_the_rule_that_decided():
    r = Router(default=parse_upstream("socks5://127.0.0.1:10808"), default_url="socks5://127.0.0.1:10808",
               rules=[parse_map("udp:53=dokodemo://127.0.0.1:10853"),
                      parse_map("tcp:1000-2000=socks5://127.0.0.1:10809")])
    assert r.route_rule("udp", addr("10.0.0.1"), 53)[1:] == ("dokodemo://127.0.0.1:10853",
                                                              "rules[0] (udp port 53)")
    assert r.route_rule("tcp", addr("10.0.0.1"), 1500)[2] == "rules[1] (tcp port 1000-2000)"
    assert r.route_rule("tcp", addr("10.0.0.1"), 80)[1:] == ("socks5://127.0.0.1:10808", "default")
    assert r.route_rule("tcp", addr("10.0.0.1"), 80)[:2] == r.route("tcp", addr("10.0.0.1"), 80)


def test_exit_summary_numbers_from_a_status():
    cap = Capture()
    log = logging.getLogger("test.summary")
    log.addHandler(cap)
    log.setLevel(logging.INFO)
    st = {"uptime": 12.34, "engine": {"tcp_opened": 5, "udp_opened": 2, "bytes_up": 100,
                                      "bytes_down": 2000, "upstream_connect_failed": 1,
                                      "upstream_closed_empty": 2},
          "stack": {"drops": {"bad_tcp_checksum": 3, "flow_limit": 4}},
          "xray": {"core": {"restarts": 1}},
          "workers": [{}, {}], "worker_restarts": 0}
    try:
        f = logs.exit_summary(log, st, "SIGTERM")
    finally:
        log.removeHandler(cap)
    assert f == {"uptime": 12.3, "tcp_flows": 5, "udp_flows": 2, "bytes_up": 100, "bytes_down": 2000,
                 "refused": 3, "drops": 7, "reason": "SIGTERM", "core_restarts": 1, "workers": 2,
                 "worker_restarts": 0}
    (rec,) = cap.records
    assert rec.getMessage() == ("summary: uptime 12.3s, flows tcp=5 udp=2, bytes up=100 down=2000, "
                                "refused=3, drops=7, core restarts=1, workers=2 restarts=0; exit: SIGTERM")
    assert rec.summary == f


def test_run_log_flags_are_checked():
    from tun2xray.cli import apply_profile, build_parser
    args = build_parser().parse_args(["run", "--device", "tun://x", "--log-format", "json"])
    apply_profile(args)                 # unset flags take the profile's keys, else the defaults
    assert args.log_format == "json" and args.log_level == "info"
    args = build_parser().parse_args(["run", "--device", "tun://x"])
    apply_profile(args)
    assert args.log_format == "text"
    for bad in (["--log-format", "xml"], ["--log-level", "loud"]):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(["run", "--device", "tun://x", *bad])
        assert e.value.code == 2


# --- SOCKS replies in the debug lines (a strict SOCKS5 server, the bridge) ----

@pytest.fixture
def strict():
    import threading

    from upstream_fixtures import StrictSocks
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    srv = asyncio.run_coroutine_threadsafe(StrictSocks().start(), loop).result(5)
    try:
        yield srv
    finally:
        asyncio.run_coroutine_threadsafe(srv.stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
        loop.close()


def dial_once(proxy_url, sport):
    """One SYN through a bridge at debug level; the engine's records once
    the flow's fate (SYN-ACK or RST) is out."""
    import queue

    from helpers import parse_packet, tcp_options
    out = queue.Queue()
    cap = Capture()
    elog = logging.getLogger("tun2xray.engine")
    elog.addHandler(cap)
    bridge.set_log_level("debug")
    h = bridge.start(json.dumps({"proxy": proxy_url, "tcp_connect_timeout": 2}),
                     lambda pkts, _: [out.put(p) for p in pkts])
    try:
        bridge.submit_inbound(h, build_packet(4, addr("10.0.0.2"), addr("93.184.216.34"), sport, 80, 1000, 0,
                                              "S", 65535, tcp_options(mss=1400)), bridge.AF_INET)
        while True:
            s = parse_packet(out.get(timeout=5))
            if s.dport == sport and s.flags & 0x06:
                break
    finally:
        bridge.stop(h)
        elog.removeHandler(cap)
    return s, [r for r in cap.records if getattr(r, "flow", None) is not None]


@pytest.mark.parametrize("auth", [False, True], ids=["pipelined", "handshake"])
def test_socks_success_reply_names_the_bound_address(strict, restore_logging, auth):
    strict.bnd = b"\x01" + bytes([192, 0, 2, 7]) + (4321).to_bytes(2, "big")
    url = f"socks5://127.0.0.1:{strict.port}"
    if auth:
        strict.auth = ("u", "p")
        url = f"socks5://u:p@127.0.0.1:{strict.port}"
    seg, recs = dial_once(url, 42000)
    assert seg.flags & 0x12 == 0x12
    (reply,) = [r for r in recs if hasattr(r, "socks_reply")]
    assert reply.getMessage().endswith("socks reply 0 (succeeded), bound 192.0.2.7:4321")
    assert reply.bound == "192.0.2.7:4321" and reply.src == "10.0.0.2:42000"
    (dial,) = [r for r in recs if "dialing" in r.getMessage()]
    assert dial.rule == "default" and dial.upstream == url
    assert ("greeting and request in one write" in dial.getMessage()) is not auth


@pytest.mark.parametrize("auth", [False, True], ids=["pipelined", "handshake"])
def test_socks_failure_reply_code_and_the_refusal(strict, restore_logging, auth):
    strict.reply = 5
    url = f"socks5://127.0.0.1:{strict.port}"
    if auth:
        strict.auth = ("u", "p")
        url = f"socks5://u:p@127.0.0.1:{strict.port}"
    seg, recs = dial_once(url, 42001)
    assert seg.flags & 0x04
    (reply,) = [r for r in recs if hasattr(r, "socks_reply")]
    assert reply.socks_reply == 5 and "socks reply 5 (connection refused)" in reply.getMessage()
    (refused,) = [r for r in recs if r.levelno == logging.INFO]
    assert "refused" in refused.getMessage() and "reply 5" in refused.reason
    assert not [r for r in recs if "accepted" in r.getMessage()]
