"""The device interface: declared capabilities, the engine's settings derived
from them, and the in-memory device's two ends (no threads, no TUN)."""

from __future__ import annotations

import os
import socket

import pytest
from helpers import addr, build_packet

from netstack import StackConfig
from tun2xray.device import Capabilities, DeviceError, memory_pair, open_device
from tun2xray.engine import Engine
from tun2xray.rules import Router
from tun2xray.upstream.url import parse_upstream

V4 = build_packet(4, addr("10.0.0.2"), addr("10.0.0.1"), 1000, 80, 1, 0, "S", 100)
URL = "socks5://127.0.0.1:1080"


def _router():
    return Router(default=parse_upstream(URL), default_url=URL, rules=[])


def test_memory_pair_moves_packets_both_ways_and_counts_them():
    dev, host = memory_pair(mtu=1400)
    try:
        assert dev.read_batch() == []
        host.write([V4, bytearray(V4)])
        assert dev.read_batch(1) == [V4]
        assert dev.read_batch() == [V4]
        assert dev.write_batch([V4, V4[:20]]) == 2
        assert host.read() == [V4, V4[:20]] and host.read() == []
        st = dev.stats
        assert (st["rx_packets"], st["rx_bytes"], st["tx_packets"], st["tx_bytes"]) == (2, 2 * len(V4), 2, len(V4) + 20)
    finally:
        dev.close()


def test_the_fd_is_readable_exactly_while_packets_wait():
    import select

    dev, host = memory_pair()
    try:
        assert select.select([dev.fileno()], [], [], 0)[0] == []
        host.write([V4, V4, V4])
        assert select.select([dev.fileno()], [], [], 0)[0] == [dev.fileno()]
        dev.read_batch(2)
        assert select.select([dev.fileno()], [], [], 0)[0] == [dev.fileno()]
        dev.read_batch(2)
        assert select.select([dev.fileno()], [], [], 0)[0] == []
    finally:
        dev.close()


def test_a_full_host_end_stops_the_batch_and_counts_the_rest():
    dev, host = memory_pair(capacity=2)
    try:
        assert dev.write_batch([V4] * 5) == 2           # the engine may retry packets[2:]
        assert dev.stats["tx_packets"] == 2 and dev.stats["tx_dropped"] == 3
        assert len(host.read()) == 2
        assert dev.write_batch([V4]) == 1
    finally:
        dev.close()


def test_the_host_hanging_up_is_a_device_error_after_what_was_queued():
    dev, host = memory_pair()
    try:
        host.write([V4])
        host.close()
        assert dev.read_batch() == [V4]
        with pytest.raises(DeviceError, match="end of file"):
            dev.read_batch()
        with pytest.raises(DeviceError):
            dev.write_batch([V4])
    finally:
        dev.close()
    dev.close()                                          # idempotent


def test_engine_settings_follow_the_declared_capabilities_and_leave_the_callers_config():
    caps = Capabilities(offload=True, gso_max=30000, vouches_for_checksums=True, checksum_offload=True)
    given = StackConfig(mtu=1500)
    before = (given.gso_max, given.checksum_offload, given.verify_checksums)
    dev, _host = memory_pair(caps=caps)
    try:
        e = Engine(dev, _router(), stack_config=given)
        cfg = e.stack.config
        assert (cfg.gso_max, cfg.checksum_offload, cfg.verify_checksums) == (30000, True, False)
        assert dev.checksum_offload_on
        assert (given.gso_max, given.checksum_offload, given.verify_checksums) == before
    finally:
        dev.close()


def test_recording_keeps_checksums_in_python_and_a_plain_device_changes_nothing():
    caps = Capabilities(offload=True, gso_max=30000, vouches_for_checksums=True, checksum_offload=True)
    dev, _host = memory_pair(caps=caps)
    try:
        e = Engine(dev, _router(), recorder=object())   # only stored: never written to here
        cfg = e.stack.config
        assert (cfg.gso_max, cfg.checksum_offload, cfg.verify_checksums) == (30000, False, False)
        assert not dev.checksum_offload_on
    finally:
        dev.close()
    dev, _host = memory_pair()
    try:
        cfg = Engine(dev, _router()).stack.config
        default = StackConfig(mtu=dev.mtu)
        assert (cfg.gso_max, cfg.checksum_offload, cfg.verify_checksums) == \
            (default.gso_max, False, True)
    finally:
        dev.close()


def test_fd_and_unix_devices_declare_their_framing(tmp_path):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    raw = open_device(f"fd://{os.dup(a.fileno())}")
    af = open_device(f"fd://{os.dup(c.fileno())}?header=af")
    ux = open_device(f"unix://{tmp_path}/dev.sock")
    try:
        assert raw.capabilities == Capabilities(framing="raw")
        assert af.capabilities == Capabilities(framing="af")
        assert ux.capabilities == Capabilities(framing="datagram")
        assert not any(x.use_checksum_offload() for x in (raw, af, ux))
    finally:
        for x in (raw, af, ux):
            x.close()
        for s in (a, b, c, d):
            s.close()


def test_the_engine_reads_in_batches_of_the_declared_size_until_the_device_is_drained():
    import asyncio

    from vclock import run_virtual

    dev, host = memory_pair(caps=Capabilities(batch_size=3))
    asked = []
    read = dev.read_batch
    dev.read_batch = lambda n: (asked.append(n), read(n))[1]
    bad = build_packet(4, addr("10.0.0.2"), addr("10.0.0.1"), 1000, 80, 1, 0, "S", 100, bad_checksum=True)
    e = Engine(dev, _router())

    async def main(loop):
        task = asyncio.ensure_future(e.run())
        await asyncio.sleep(0)
        host.write([bad] * 10)
        for _ in range(100):            # loop turns, not time: the pipe wakes the reader at once
            if e.stack.rx_packets >= 10:
                break
            await asyncio.sleep(0)
        e.stop()
        await task

    try:
        run_virtual(main)
    finally:
        dev.close()
    assert e.stack.drops["bad_tcp_checksum"] == 10
    assert asked == [3, 3, 3, 3]          # 3+3+3+1: the short batch ends the wake-up
