"""Arbitrary bytes from a host never raise out of a device: counted, not crashed."""

from __future__ import annotations

import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from tun2xray.device import open_device
from tun2xray.device.offload import gso_header

datagrams = st.lists(st.binary(min_size=0, max_size=80), min_size=1, max_size=8)


def _expected_af(d: bytes) -> bool:
    if len(d) < 5:
        return False
    af = int.from_bytes(d[:4], "big")
    v = d[4] >> 4
    return (v == 4 and af == 2) or (v == 6 and af in (10, 30))


@settings(max_examples=200, deadline=None)
@given(datagrams)
def test_af_header_read_keeps_exactly_the_well_framed(dgrams):
    a, host = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    dev = open_device(f"fd://{a.detach()}?header=af")
    try:
        for d in dgrams:
            host.send(d)
        got = dev.read_batch()
        want = [d[4:] for d in dgrams if _expected_af(d)]
        assert got == want
        s = dev.stats
        assert s["rx_packets"] == len(want)
        assert s["rx_bad_header"] + s["rx_dropped"] + len(want) == len(dgrams)
        assert s["rx_dropped"] == sum(1 for d in dgrams if not d)
    finally:
        dev.close()
        host.close()


@settings(max_examples=200, deadline=None)
@given(datagrams)
def test_af_header_write_frames_ip_and_rejects_the_rest(packets):
    a, host = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    host.setblocking(False)
    dev = open_device(f"fd://{a.detach()}?header=af&af6=10")
    try:
        assert dev.write_batch(packets) == len(packets)
        ip = [p for p in packets if p and p[0] >> 4 in (4, 6)]
        for p in ip:
            af = 2 if p[0] >> 4 == 4 else 10
            assert host.recv(200) == af.to_bytes(4, "big") + p
        assert dev.stats["tx_packets"] == len(ip)
        assert dev.stats["tx_errors"] == len(packets) - len(ip)
    finally:
        dev.close()
        host.close()


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.integers(min_value=68, max_value=150))
def test_gso_header_never_raises_and_is_self_consistent(p, mtu):
    g = gso_header(p, mtu)
    if g is None:
        return
    hdr, buf = g
    assert len(hdr) == 10 and len(buf) == len(p)
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = (
        hdr[0], hdr[1], int.from_bytes(hdr[2:4], "little"), int.from_bytes(hdr[4:6], "little"),
        int.from_bytes(hdr[6:8], "little"), int.from_bytes(hdr[8:10], "little"))
    assert flags == 1 and gso_type in (1, 4) and csum_offset == 16
    assert csum_start >= 20 and hdr_len + gso_size == mtu and hdr_len < len(p)
    # only the checksum field differs
    assert buf[: csum_start + 16] == p[: csum_start + 16] and buf[csum_start + 18 :] == p[csum_start + 18 :]
