"""Fuzz target "bridge": the host-facing submit path of tun2xray.bridge.

One bridge handle per fuzz process (atheris runs in-process; starting an
engine thread per input would measure thread start-up, not the bridge):
the profile's proxy is a closed loopback port, so every TCP dial is
refused and every UDP association fails -- the paths a host hits when the
core is down.  An input is a list of host calls:
  SUBMIT  submit_inbound(packet, protocol)
  BATCH   submit_inbound_batch(packets, protocols), lengths sometimes unequal
  ODD     a packet of the wrong type (str, None, int, list) or a bytearray /
          memoryview the host reuses afterwards
  POLL    poll_outbound with good and bad arguments
  STATUS  status()
Packets get their checksums fixed (so they reach the stack's flows) unless
the input says otherwise; protocols are 2, 10, 30 or garbage (0, 23, -1,
2**40, "2", None).

Invariants: a call raises nothing, or BridgeError where the arguments are
bad; after each input, once the inbound queue has drained (waited for
with a deadline), the device accounting holds
    rx_packets == rx_delivered + rx_queued + rx_dropped,
    rx_dropped == the sum of the drop reasons,
    rx_delivered == the stack's rx_packets,
no engine error was counted (a stack exception inside the engine shows up
there), the stack's own accounting rule holds, the status is JSON, and
every outbound packet is well formed, tagged with the family the host
used.  stop() at exit (and in tests) must end the engine thread.
"""

from __future__ import annotations

import atexit
import json
import socket
import threading
import time

import tun2xray.engine  # noqa: F401  (the bridge loads it on its engine thread: load it now, instrumented)
from tun2xray import bridge

from .common import InvariantError, Provider, check, check_output_packet, fix_checksums, one_line

SUBMIT, BATCH, ODD, POLL, STATUS = range(5)
PROTOCOLS = (2, 10, 30, 2, 10, 30, 0, 23, -1, 2**40, "2", None, 2.0)
MTU = 1500
DRAIN_DEADLINE = 5.0

_handle = None
_threads_before = None
_AF6_USED: set = set()          # IPv6 family numbers this process has submitted


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def setup() -> int:
    """Start the process's one bridge handle (idempotent)."""
    global _handle, _threads_before
    if _handle is None:
        _threads_before = threading.active_count()
        profile = {"proxy": f"socks5://127.0.0.1:{_closed_port()}", "mtu": MTU, "tcp_connect_timeout": 0.5,
                   "udp_timeout": 1, "max_flows": 64}
        _handle = bridge.start(json.dumps(profile))
        atexit.register(teardown)
    return _handle


def teardown() -> None:
    """Stop the handle; its engine thread must be gone."""
    global _handle
    h, _handle = _handle, None
    if h is None:
        return
    bridge.stop(h)
    check(h not in bridge.handles(), "handle still listed after stop()")
    try:
        bridge.status(h)
    except bridge.InvalidHandle:
        pass
    else:
        raise InvariantError("a stopped handle still answers")
    deadline = time.monotonic() + 5.0
    while threading.active_count() > _threads_before and time.monotonic() < deadline:
        time.sleep(0.01)
    check(threading.active_count() <= _threads_before,
          lambda: f"threads after stop: {[t.name for t in threading.enumerate()]}")


def _packet(fdp: Provider) -> bytes:
    raw = fdp.blob(MTU + 100)
    return raw if fdp.u8() & 0x80 else fix_checksums(raw)


def _expect_bridge_error(fn, *args) -> None:
    try:
        fn(*args)
    except bridge.BridgeError as e:
        one_line(e)
    else:
        raise InvariantError(f"{fn.__name__}{args!r} accepted bad arguments")


def _good_proto(p) -> bool:
    return type(p) is int and p in (2, 10, 30)


def _settle(h) -> dict:
    """Status once every submitted packet has left the inbound queue."""
    deadline = time.monotonic() + DRAIN_DEADLINE
    while True:
        s = bridge.status(h)
        json.dumps(s)
        if s["device"]["rx_queued"] == 0 or time.monotonic() > deadline:
            return s
        time.sleep(0.0005)


def _check_status(s: dict) -> None:
    d = s["device"]
    check(d["rx_queued"] == 0, "inbound queue did not drain")
    check(d["rx_packets"] == d["rx_delivered"] + d["rx_queued"] + d["rx_dropped"],
          lambda: f"bridge accounting: {d}")
    check(d["rx_dropped"] == sum(d[k] for k in bridge._RX_DROPS), lambda: f"bridge drop reasons: {d}")
    check(d["engine_errors"] == 0, "the engine raised while feeding packets (see the log)")
    st = s["stack"]
    if st:
        check(st["rx_packets"] == d["rx_delivered"], lambda: f"stack saw {st['rx_packets']}, bridge "
                                                             f"delivered {d['rx_delivered']}")
        check(st["rx_packets"] == sum(st["drops"].values()) + st["delivered"] + st["frag_held"],
              lambda: f"stack accounting: {st}")


def _drain_outbound(h, af6_seen) -> None:
    _AF6_USED.update(af6_seen)
    for pkt, proto in bridge.poll_outbound(h, 4096):
        check_output_packet(pkt, MTU, False)
        if pkt[0] >> 4 == 4:
            check(proto == 2, lambda: f"IPv4 packet tagged {proto}")
        else:
            # tagged with the number the host had used last when the packet
            # was emitted (it may have been queued during an earlier input)
            check(proto == bridge.AF_INET6_NATIVE or proto in _AF6_USED,
                  lambda: f"IPv6 packet tagged {proto}; the host used {sorted(_AF6_USED)}")


def TestOneInput(data: bytes) -> None:
    h = setup()
    fdp = Provider(data)
    af6_seen = []
    steps = 0
    while fdp.remaining() and steps < 64:
        steps += 1
        op = fdp.u8() % 5
        if op == SUBMIT:
            pkt, proto = _packet(fdp), fdp.pick(PROTOCOLS)
            bridge.submit_inbound(h, pkt, proto)
            if type(proto) is int and proto in (10, 30):
                af6_seen.append(proto)
        elif op == BATCH:
            n = fdp.u8() % 16
            pkts = [_packet(fdp) for _ in range(n)]
            protos = [fdp.pick(PROTOCOLS) for _ in range(n)]
            if fdp.u8() % 8 == 0:
                _expect_bridge_error(bridge.submit_inbound_batch, h, pkts, protos + [2])
                continue
            bridge.submit_inbound_batch(h, pkts, protos)
            af6_seen += [p for p in protos if type(p) is int and p in (10, 30)]
        elif op == ODD:
            kind = fdp.u8() % 5
            if kind == 0:
                buf = bytearray(_packet(fdp))
                bridge.submit_inbound(h, buf, 2)
                buf[:] = bytes(len(buf))          # the host reuses its buffer at once
            elif kind == 1:
                bridge.submit_inbound(h, memoryview(_packet(fdp)), 10)
                af6_seen.append(10)
            else:
                bridge.submit_inbound(h, ("x" * 40, None, 12345)[kind - 2], 2)
        elif op == POLL:
            bad = fdp.u8() % 4
            if bad == 1:
                _expect_bridge_error(bridge.poll_outbound, h, 0)
            elif bad == 2:
                _expect_bridge_error(bridge.poll_outbound, h, 1, -1.0)
            else:
                _drain_outbound(h, af6_seen)
        else:
            json.dumps(bridge.status(h))
    # handles that are not ours are refused, whatever they are
    _expect_bridge_error(bridge.submit_inbound, h + 1000, b"", 2)
    _expect_bridge_error(bridge.status, "1")
    _check_status(_settle(h))
    _drain_outbound(h, af6_seen)


def seeds() -> list:
    from .common import put_blob
    from .wire import seeds as wire_seeds
    out = []
    # the first packets of each capture, as single submits and as one batch
    for w in wire_seeds():
        if w[0] == 0 and len(w) < MTU:
            p = w[1:]
            proto = 2 if p[0] >> 4 == 4 else 10
            out.append(bytes([SUBMIT]) + put_blob(p) + b"\0" + bytes([PROTOCOLS.index(proto)]) + bytes([POLL, 0]))
    batch = [w[1:] for w in wire_seeds() if w[0] == 0 and len(w) < MTU][:12]
    b = bytes([BATCH, len(batch)])
    for p in batch:
        b += put_blob(p) + b"\0"
    b += bytes(PROTOCOLS.index(2 if p[0] >> 4 == 4 else 30) for p in batch)
    out.append(b + bytes([POLL, 0, STATUS]))
    out.append(bytes([ODD, 0]) + put_blob(batch[0]) + b"\0" + bytes([ODD, 2, ODD, 3, ODD, 4, POLL, 1, POLL, 2]))
    return out
