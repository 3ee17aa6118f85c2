"""tun2xray.workers without processes: channel framing, status aggregation,
restart backoff, --workers parsing, and both ends of the channel (the
supervisor's blocking requests against a worker's loop in a thread)."""

from __future__ import annotations

import argparse
import os
import asyncio
import socket
import threading

import pytest

from tun2xray import workers
from tun2xray.workers import WorkerError
from tun2xray.workers import (BACKOFF_FIRST, BACKOFF_MAX, STABLE_AFTER, WorkerChannel,
                              WorkerHandle, aggregate, frame, multiqueue_url, next_backoff,
                              unframe, worker_count)


# --- framing -------------------------------------------------------------------

def test_frame_roundtrip_in_pieces():
    msgs = [{"id": 1, "cmd": "status"}, {"ready": 42}, {"id": 2, "status": {"flows": [1] * 100}}]
    wire = b"".join(frame(m) for m in msgs)
    buf = bytearray()
    got = []
    for i in range(0, len(wire), 7):         # arrives in odd-sized chunks
        buf += wire[i:i + 7]
        got += unframe(buf)
    assert got == msgs
    assert buf == b""


def test_unframe_keeps_a_partial_message():
    wire = frame({"a": 1})
    buf = bytearray(wire[:-1])
    assert unframe(buf) == []
    assert len(buf) == len(wire) - 1
    buf += wire[-1:]
    assert unframe(buf) == [{"a": 1}]


def test_spec_then_an_early_request_in_one_read():
    # the supervisor may ask a restarted worker for its status before that
    # worker has read its spec: the request must not be lost
    a, b = socket.socketpair()
    try:
        a.sendall(frame({"id": 0, "fd": 5}) + frame({"id": 1, "cmd": "status"}) + frame({"id": 2})[:3])
        spec, rest = workers.worker._read_spec(b)
        assert spec == {"id": 0, "fd": 5}
        rest = bytearray(rest)
        assert unframe(rest) == [{"id": 1, "cmd": "status"}]
        assert len(rest) == 3
    finally:
        a.close()
        b.close()


def test_unframe_refuses_a_huge_length():
    buf = bytearray(b"\xff\xff\xff\xff" + b"x" * 10)
    with pytest.raises(ValueError):
        unframe(buf)


# --- aggregation ---------------------------------------------------------------

def engine_status(tcp_opened, flows, rx, drops, states, assocs=0):
    return {
        "uptime": 5.0,
        "device": {"name": "wk0", "mtu": 1500, "rx_packets": rx, "tx_packets": rx * 2},
        "stack": {"tcp_flows": len(flows), "drops": drops, "tcp_states": states, "pending": 0},
        "engine": {"tcp_opened": tcp_opened, "udp_opened": 1},
        "udp_associations": assocs,
        "flows": [{"proto": "tcp", "src": f"198.18.0.1:{p}", "dst": "10.0.0.1:80"} for p in flows],
    }


def test_aggregate_sums_counters_and_tags_flows():
    w = [
        {"id": 0, "pid": 100, "alive": True, "restarts": 0,
         "status": engine_status(3, [1000, 1001], 10, {"bad_checksum": 1}, {"ESTABLISHED": 2}, 1)},
        {"id": 1, "pid": 101, "alive": True, "restarts": 2,
         "status": engine_status(5, [2000], 7, {"bad_checksum": 2, "no_flow": 4},
                                 {"ESTABLISHED": 1, "TIME_WAIT": 3}, 2)},
    ]
    st = aggregate(w, uptime=9.5, device_name="wk0", mtu=1500)
    assert st["device"] == {"name": "wk0", "mtu": 1500, "rx_packets": 17, "tx_packets": 34}
    assert st["engine"] == {"tcp_opened": 8, "udp_opened": 2}
    assert st["stack"]["drops"] == {"bad_checksum": 3, "no_flow": 4}
    assert st["stack"]["tcp_states"] == {"ESTABLISHED": 3, "TIME_WAIT": 3}
    assert st["stack"]["tcp_flows"] == 3
    assert st["udp_associations"] == 3
    assert [(f["src"], f["worker"]) for f in st["flows"]] == [
        ("198.18.0.1:1000", 0), ("198.18.0.1:1001", 0), ("198.18.0.1:2000", 1)]
    assert [(r["id"], r["pid"], r["flows"], r["tcp_opened"], r["restarts"]) for r in st["workers"]] == [
        (0, 100, 2, 3, 0), (1, 101, 1, 5, 2)]
    assert st["worker_restarts"] == 2
    assert st["uptime"] == 9.5
    # the inputs are not modified (flows are copied before tagging)
    assert "worker" not in w[0]["status"]["flows"][0]


def test_aggregate_with_a_dead_worker():
    w = [
        {"id": 0, "pid": 100, "alive": True, "restarts": 1,
         "status": engine_status(3, [1000], 10, {}, {"ESTABLISHED": 1})},
        {"id": 1, "pid": 101, "alive": False, "restarts": 1, "status": None},
    ]
    st = aggregate(w, device_name="wk0", mtu=9000)
    assert st["engine"]["tcp_opened"] == 3
    assert st["device"]["mtu"] == 9000 and st["device"]["rx_packets"] == 10
    assert st["workers"][1] == {"id": 1, "pid": 101, "alive": False, "restarts": 1, "responding": False}
    assert st["worker_restarts"] == 2
    assert len(st["flows"]) == 1


def test_aggregate_of_nothing_has_the_engine_shape():
    st = aggregate([], device_name="wk0", mtu=1500)
    from tun2xray.state import empty_engine_status
    for key in empty_engine_status():
        assert key in st
    assert st["flows"] == [] and st["engine"] == {} and st["closed_flows"] == []
    assert st["rate"] == {"up": 0.0, "down": 0.0}


def test_aggregate_sums_rates_and_merges_closed_flows():
    def closed(port, ended):
        return {"src": f"198.18.0.1:{port}", "reason": "client FIN", "ended_epoch": ended}

    a = dict(engine_status(1, [1000], 1, {}, {}), rate={"up": 10.5, "down": 2000.0},
             closed_flows=[closed(1, 5.0), closed(2, 7.0)])
    b = dict(engine_status(1, [2000], 1, {}, {}), rate={"up": 1.5, "down": 500.0},
             closed_flows=[closed(3, 6.0)] + [closed(10 + i, 8.0 + i) for i in range(workers.CLOSED_HISTORY)])
    st = aggregate([{"id": 0, "pid": 1, "alive": True, "status": a},
                    {"id": 1, "pid": 2, "alive": True, "status": b}])
    assert st["rate"] == {"up": 12.0, "down": 2500.0}
    assert [r["rate"] for r in st["workers"]] == [{"up": 10.5, "down": 2000.0}, {"up": 1.5, "down": 500.0}]
    # the newest CLOSED_HISTORY of both (as many as one engine keeps), oldest first, each with its worker
    from tun2xray.engine import CLOSED_HISTORY
    assert workers.CLOSED_HISTORY == CLOSED_HISTORY
    c = st["closed_flows"]
    assert len(c) == workers.CLOSED_HISTORY
    assert [f["ended_epoch"] for f in c] == sorted(f["ended_epoch"] for f in c)
    assert c[0]["ended_epoch"] == 8.0 and {f["worker"] for f in c} == {1}
    st = aggregate([{"id": 0, "pid": 1, "alive": True, "status": a},
                    {"id": 1, "pid": 2, "alive": True, "status": dict(b, closed_flows=[closed(3, 6.0)])}])
    assert [(f["src"], f["worker"]) for f in st["closed_flows"]] == [
        ("198.18.0.1:1", 0), ("198.18.0.1:3", 1), ("198.18.0.1:2", 0)]


# --- restart backoff -----------------------------------------------------------

def test_backoff_doubles_caps_and_resets():
    d = next_backoff(0.0, 0.1)
    assert d == BACKOFF_FIRST
    seen = [d]
    for _ in range(12):
        d = next_backoff(d, 0.1)
        seen.append(d)
    assert seen[1] == 2 * BACKOFF_FIRST
    assert max(seen) == BACKOFF_MAX and seen[-1] == BACKOFF_MAX
    assert next_backoff(BACKOFF_MAX, STABLE_AFTER) == BACKOFF_FIRST


# --- flags ---------------------------------------------------------------------

def args(device="tun://wk0", workers=None, record=None):
    return argparse.Namespace(device=device, workers=workers, record=record)


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.delenv("TUN2XRAY_WORKERS", raising=False)
    monkeypatch.setattr(workers.count, "_cores", lambda: 2)
    flags = {}                                  # interface name -> TUN flags (absent: no such interface)
    monkeypatch.setattr(workers.count, "_tun_flags", lambda name: flags.get(name))
    return flags


def test_default_is_one_worker_per_two_cores_where_possible(two_cores, monkeypatch):
    flags = two_cores
    assert worker_count(args()) == 1                       # two cores: one process
    monkeypatch.setattr(workers.count, "_cores", lambda: 4)
    assert worker_count(args()) == 2                       # a TUN we create
    assert worker_count(args(device="tun://")) == 2        # the kernel names it
    assert worker_count(args(device="TUN://wk0?offload=1")) == 2
    assert worker_count(args(device="tun://wk0?multiqueue=0")) == 1
    assert worker_count(args(device="fd://3")) == 1
    assert worker_count(args(device="unix:///tmp/x")) == 1
    assert worker_count(args(record="x.pcap")) == 2         # workers record too (parts, merged)
    flags["wk0"] = 0x0001 | 0x1000                         # an existing single-queue TUN
    assert worker_count(args()) == 1
    flags["wk0"] = 0x0001 | 0x1000 | 0x0100                # an existing multi-queue one
    assert worker_count(args()) == 2
    flags["wk0"] = -1                                      # a name taken by something else
    assert worker_count(args()) == 1
    monkeypatch.setattr(workers.count, "_cores", lambda: 1)
    flags.clear()
    assert worker_count(args()) == 1
    monkeypatch.setattr(workers.count, "_cores", lambda: 5)
    assert worker_count(args()) == 2
    monkeypatch.setattr(workers.count, "_cores", lambda: 500)
    assert worker_count(args()) == workers.MAX_WORKERS


def test_worker_count_flag(two_cores):
    assert worker_count(args(workers=3)) == 3
    assert worker_count(args(workers=1)) == 1
    assert worker_count(args(device="unix:///tmp/x", workers=1)) == 1
    for bad, needle in ((args(workers=0), "between"), (args(workers=65), "between"),
                        (args(device="fd://3", workers=2), "tun://"),
                        (args(device="tun://wk0?multiqueue=0", workers=2), "multiqueue=0")):
        with pytest.raises(WorkerError, match=needle):
            worker_count(bad)
    assert worker_count(args(workers=2, record="x.pcap")) == 2


def test_worker_count_from_environment(two_cores, monkeypatch):
    monkeypatch.setenv("TUN2XRAY_WORKERS", "3")
    assert worker_count(args()) == 3
    assert worker_count(args(workers=1)) == 1                 # the flag wins
    assert worker_count(args(device="unix:///tmp/x")) == 1    # a default only where it applies
    assert worker_count(args(record="x.pcap")) == 3
    monkeypatch.setenv("TUN2XRAY_WORKERS", "1")
    assert worker_count(args()) == 1
    monkeypatch.setenv("TUN2XRAY_WORKERS", "two")
    with pytest.raises(WorkerError, match="TUN2XRAY_WORKERS"):
        worker_count(args())


def test_tun_flags_of_real_interfaces():
    assert workers.count._tun_flags("wk-no-such-if") is None
    assert workers.count._tun_flags("lo") == -1                     # exists, not a TUN


def test_multiqueue_url():
    assert multiqueue_url("tun://wk0") == "tun://wk0?multiqueue=1"
    assert multiqueue_url("tun://wk0?offload=1") == "tun://wk0?offload=1&multiqueue=1"
    assert multiqueue_url("tun://wk0?multiqueue=0&offload=1") == "tun://wk0?offload=1&multiqueue=1"


def test_cli_accepts_workers_flag():
    from tun2xray.cli import build_parser
    a = build_parser().parse_args(["run", "--device", "tun://wk0", "--proxy", "socks5://127.0.0.1:1",
                                   "--workers", "2"])
    assert a.workers == 2


# --- the channel, both ends ----------------------------------------------------

class FakeEngine:
    def __init__(self):
        self.router = "old"
        self.stopped = threading.Event()
        self.resets = 0

    def status(self):
        return {"engine": {"tcp_opened": 7}, "flows": []}

    def reset_flows(self):
        self.resets += 1
        return 5

    def stop(self):
        self.stopped.set()


class AliveProc:
    pid = 1

    def poll(self):
        return None


@pytest.fixture
def channel():
    """A worker channel on a loop in a thread, and the supervisor's handle."""
    ours, theirs = socket.socketpair()
    eng = FakeEngine()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box = {}

    def run():
        asyncio.set_event_loop(loop)
        box["ch"] = WorkerChannel(theirs, eng, loop)
        ready.set()
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    ready.wait(5)
    w = WorkerHandle(0)
    w.proc = AliveProc()
    w.chan = ours
    try:
        yield w, eng, box["ch"], loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
        loop.close()
        ours.close()
        theirs.close()


def test_status_and_router_requests(channel):
    w, eng, ch, loop = channel
    rep = w.request({"cmd": "status"}, timeout=5)
    assert rep == {"id": 1, "status": {"engine": {"tcp_opened": 7}, "flows": []}}
    rep = w.request({"cmd": "router", "router": "new"}, timeout=5)
    assert rep == {"id": 2, "reset": 5}
    assert eng.router == "new" and eng.resets == 1
    rep = w.request({"cmd": "bogus"}, timeout=5)
    assert rep["id"] == 3 and "unknown command" in rep["error"]


def test_unsolicited_and_late_messages_are_skipped(channel):
    w, eng, ch, loop = channel
    # a restart's "ready" and a reply to a request that timed out earlier
    loop.call_soon_threadsafe(ch.send, {"ready": 99})
    loop.call_soon_threadsafe(ch.send, {"id": 0, "status": "stale"})
    rep = w.request({"cmd": "status"}, timeout=5)
    assert rep["id"] == 1 and rep["status"]["engine"] == {"tcp_opened": 7}


def test_request_to_a_dead_worker_is_none(channel):
    w, eng, ch, loop = channel

    class Dead:
        pid = 1

        def poll(self):
            return 1
    w.proc = Dead()
    assert w.request({"cmd": "status"}, timeout=1) is None


def test_request_times_out_without_a_reply():
    ours, theirs = socket.socketpair()
    try:
        w = WorkerHandle(0)
        w.proc = AliveProc()
        w.chan = ours
        assert w.request({"cmd": "status"}, timeout=0.2) is None
        # the worker answers late: the next request skips that reply
        theirs.sendall(frame({"id": 1, "status": "late"}) + frame({"id": 2, "status": "fresh"}))
        assert w.request({"cmd": "status"}, timeout=1) == {"id": 2, "status": "fresh"}
    finally:
        ours.close()
        theirs.close()


def test_a_request_that_came_with_the_spec_is_answered():
    ours, theirs = socket.socketpair()
    loop = asyncio.new_event_loop()
    try:
        eng = FakeEngine()
        WorkerChannel(theirs, eng, loop, pending=frame({"id": 7, "cmd": "status"}))
        # run the loop until the answer arrives (an event, not a fixed wait)
        ours.setblocking(False)
        buf = bytearray(loop.run_until_complete(asyncio.wait_for(loop.sock_recv(ours, 65536), 5)))
        assert unframe(buf) == [{"id": 7, "status": eng.status()}]
    finally:
        loop.close()
        ours.close()
        theirs.close()


def test_worker_stops_when_the_supervisor_goes(channel):
    w, eng, ch, loop = channel
    w.chan.close()
    w.chan = None
    assert eng.stopped.wait(5), "EOF on the channel did not stop the engine"


def test_a_worker_dial_failure_pokes_the_supervisors_proxy_watch():
    """Workers write to a shared pipe when a dial fails; the supervisor's
    reader drains it and asks its proxy watch to check at once."""
    import types

    from tun2xray.workers import Supervisor
    from tun2xray.workers.worker import _poker

    sup = Supervisor(types.SimpleNamespace(name="lo", url="tun://lo"), settings=None, n=1)
    try:
        assert sup.ifindex > 0 and not sup.device_gone()
        poke = _poker(sup.poke_w)
        for _ in range(100_000):            # more than the pipe holds: never blocks, never raises
            poke()
        pokes = []
        sup._on_poke(types.SimpleNamespace(poke=lambda: pokes.append(1)))
        assert pokes == [1]
        with pytest.raises(BlockingIOError):
            os.read(sup.poke_r, 1)          # drained
    finally:
        sup.close_poke()
    assert _poker(None) is None
