"""fd:// devices with a socketpair standing in for the host.

The host end frames packets exactly as the real hosts do: Android's VpnService
fd carries bare IP packets; Darwin's utun puts a 4-byte big-endian address
family (AF_INET=2, AF_INET6=30) in front of each one.
"""

from __future__ import annotations

import os
import socket
import tempfile

import pytest

from tun2xray.device import DeviceError, open_device

# Minimal but well-formed headers are enough: the device looks at the version
# nibble only, never deeper.
UDP8 = bytes.fromhex("1388138900080000")  # 5000 -> 5001, empty payload
V4 = bytes.fromhex("4500001c000100004011f9d40a0000010a000002") + UDP8
V6 = bytes.fromhex("6000000000081140" + "fd00" + "00" * 13 + "01" + "fd00" + "00" * 13 + "02") + UDP8

AF4 = (2).to_bytes(4, "big")
AF6_DARWIN = (30).to_bytes(4, "big")
AF6_LINUX = (10).to_bytes(4, "big")


@pytest.fixture
def pair():
    """(device-side fd, host socket) over a datagram socketpair."""
    a, host = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    host.settimeout(2)
    fd = a.detach()  # the device owns it from now on
    try:
        yield fd, host
    finally:
        host.close()
        try:
            os.close(fd)
        except OSError:
            pass  # closed by the device, as it should be


def test_packet_headers_are_what_they_claim():
    assert len(V4) == 28 and V4[0] >> 4 == 4
    assert len(V6) == 48 and V6[0] >> 4 == 6


def test_raw_fd_moves_packets_both_ways_unchanged(pair):
    fd, host = pair
    dev = open_device(f"fd://{fd}")
    assert (dev.name, dev.mtu, dev.trusted_checksums) == (f"fd{fd}", 1500, False)
    assert os.get_blocking(fd) is False
    host.send(V4)
    host.send(V6)
    assert dev.read_batch() == [V4, V6]
    assert dev.read_batch() == []
    assert dev.write_batch([V6, V4, bytearray(V4), memoryview(V6)]) == 4
    assert [host.recv(100) for _ in range(4)] == [V6, V4, V4, V6]
    s = dev.stats
    assert (s["rx_packets"], s["rx_bytes"], s["tx_packets"], s["tx_bytes"]) == (2, 76, 4, 152)
    dev.close()


def test_raw_fd_mtu_and_max_packets(pair):
    fd, host = pair
    dev = open_device(f"fd://{fd}", mtu=1280)
    assert dev.mtu == 1280
    for i in range(7):
        host.send(V4[:-1] + bytes([i]))
    assert [p[-1] for p in dev.read_batch(max_packets=3)] == [0, 1, 2]
    assert [p[-1] for p in dev.read_batch(max_packets=3)] == [3, 4, 5]
    assert [p[-1] for p in dev.read_batch(max_packets=3)] == [6]
    dev.close()


def test_big_packets_are_not_truncated(pair):
    fd, host = pair
    host.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    dev = open_device(f"fd://{fd}", mtu=65535)
    big = V4[:20] + bytes(range(256)) * 255 + bytes(65535 - 20 - 256 * 255)
    assert len(big) == 65535
    host.send(big)
    assert dev.read_batch() == [big]
    dev.close()


def test_darwin_af_header_is_stripped_on_read_and_added_on_write(pair):
    fd, host = pair
    dev = open_device(f"fd://{fd}?header=af")
    host.send(AF4 + V4)
    host.send(AF6_DARWIN + V6)
    host.send(AF6_LINUX + V6)  # either numbering is understood on read
    assert dev.read_batch() == [V4, V6, V6]
    assert dev.stats["rx_bytes"] == 28 + 48 + 48
    assert dev.write_batch([V4, V6]) == 2
    assert host.recv(100) == AF4 + V4
    assert host.recv(100) == AF6_DARWIN + V6
    assert dev.stats["tx_bytes"] == 28 + 48
    dev.close()


def test_linux_af_numbering_on_write(pair):
    fd, host = pair
    dev = open_device(f"fd://{fd}?header=af&af6=10")
    assert dev.write_batch([V6, V4]) == 2
    assert host.recv(100) == AF6_LINUX + V6
    assert host.recv(100) == AF4 + V4
    host.send(AF6_DARWIN + V6)
    assert dev.read_batch() == [V6]
    dev.close()


def test_af_header_mismatches_are_dropped_and_counted(pair):
    fd, host = pair
    dev = open_device(f"fd://{fd}?header=af")
    host.send(AF4 + V6)  # says IPv4, is IPv6
    host.send(AF6_DARWIN + V4)  # says IPv6, is IPv4
    host.send((24).to_bytes(4, "big") + V6)  # OpenBSD's AF_INET6: not ours
    host.send(AF4)  # a header and nothing else
    host.send(AF4 + b"\x50" + V4[1:])  # IP version 5
    host.send(V4)  # raw packet on a framed fd: its first bytes are no AF
    host.send(AF4 + V4)  # finally a good one
    assert dev.read_batch() == [V4]
    assert dev.stats["rx_bad_header"] == 6
    assert dev.stats["rx_packets"] == 1
    dev.close()


def test_af_header_write_rejects_packets_without_an_ip_version(pair):
    fd, host = pair
    dev = open_device(f"fd://{fd}?header=af")
    assert dev.write_batch([b"", b"\x00" * 20, V4]) == 3
    assert host.recv(100) == AF4 + V4
    s = dev.stats
    assert (s["tx_packets"], s["tx_errors"], s["tx_dropped"]) == (1, 2, 2)
    dev.close()


@pytest.mark.parametrize("query", ["", "?header=af"])
def test_full_host_queue_stops_the_batch_and_counts_drops(pair, query):
    fd, host = pair
    dev = open_device(f"fd://{fd}{query}")
    packets = [V4[:-1] + bytes([i % 256]) for i in range(5000)]
    n = dev.write_batch(packets)
    assert 0 < n < len(packets)
    assert dev.stats["tx_packets"] == n
    assert dev.stats["tx_dropped"] == len(packets) - n
    assert dev.stats["tx_errors"] == 0
    # the host drains; the engine retries what was left
    got = []
    host.setblocking(False)
    try:
        while True:
            got.append(host.recv(100))
    except BlockingIOError:
        pass
    assert len(got) == n
    m = dev.write_batch(packets[n:])
    assert m > 0
    last = host.recv(100)
    assert last[-1] == packets[n][-1]
    dev.close()


def test_empty_datagram_is_a_counted_runt_not_eof(pair):
    fd, host = pair
    dev = open_device(f"fd://{fd}")
    host.send(b"")
    host.send(V4)
    assert dev.read_batch() == [V4]
    assert dev.stats["rx_dropped"] == 1
    dev.close()


def test_host_hangup_is_a_device_error_after_pending_packets():
    a, host = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dev = open_device(f"fd://{a.detach()}")
    try:
        host.send(V4)
        host.close()
        assert dev.read_batch() == [V4]  # what came before the hangup
        with pytest.raises(DeviceError, match="end of file"):
            dev.read_batch()
        with pytest.raises(DeviceError, match="end of file"):
            dev.write_batch([V4])
    finally:
        dev.close()


def test_write_to_a_vanished_host_is_a_device_error(pair):
    fd, host = pair
    dev = open_device(f"fd://{fd}")
    host.close()
    with pytest.raises(DeviceError, match=r"^fd://\d+: write failed: Connection refused$"):
        dev.write_batch([V4, V4])
    assert dev.stats["tx_packets"] == 0
    dev.close()


def test_close_closes_the_fd_once(pair):
    fd, host = pair
    dev = open_device(f"fd://{fd}")
    assert dev.fileno() == fd
    dev.close()
    dev.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(DeviceError, match="closed"):
        dev.fileno()
    with pytest.raises(DeviceError, match="closed"):
        dev.write_batch([V4])


def test_context_manager_closes(pair):
    fd, host = pair
    with open_device(f"fd://{fd}") as dev:
        host.send(V6)
        assert dev.read_batch() == [V6]
    assert dev.closed


def test_bad_fd_urls():
    with tempfile.TemporaryFile() as f:
        regular = f.fileno()
        cases = {
            "fd://": "expected fd://N",
            "fd://-1": "expected fd://N",
            "fd://abc": "expected fd://N",
            "fd://3/x": "expected fd://N",
            "fd://987654": "987654 is not an open file descriptor (Bad file descriptor)",
            f"fd://{regular}": "is a regular file or directory",
            "fd://0?header=utun": "header='utun' is not one of: none, af",
            "fd://0?af6=10": "af6= only applies with header=af",
            "fd://0?header=af&af6=28": "af6='28' is not 10 (Linux) or 30 (Darwin)",
            "fd://0?header=af&header=af": "given more than once",
            "fd://0?mode=x": "unknown option 'mode'",
        }
        for url, why in cases.items():
            with pytest.raises(DeviceError) as ei:
                open_device(url)
            msg = str(ei.value)
            assert why in msg, (url, msg)
            assert msg.startswith(url) and "\n" not in msg


def test_stream_socket_is_refused():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        with pytest.raises(DeviceError, match="stream socket"):
            open_device(f"fd://{a.fileno()}")
        assert a.getblocking() is True  # left untouched


def test_generic_bad_urls_and_arguments():
    cases = [
        ("", {}, "not a device URL"),
        ("eth0", {}, "not a device URL"),
        ("http://x", {}, "unknown device scheme 'http'"),
        ("fd://0", {"mtu": 10}, "MTU 10 is not in 68..65535"),
        ("fd://0", {"mtu": 70000}, "MTU 70000 is not in 68..65535"),
    ]
    for url, kw, why in cases:
        with pytest.raises(DeviceError) as ei:
            open_device(url, **kw)
        assert why in str(ei.value), (url, str(ei.value))
        assert "\n" not in str(ei.value)


def test_addresses_are_ignored_for_host_configured_devices(pair):
    # The CLI passes its default addresses whatever the device; the host owns
    # an fd:// or unix:// interface's addressing.
    fd, host = pair
    with open_device(f"fd://{fd}", mtu=1280, addresses=["198.18.0.1/15", None]) as dev:
        assert dev.mtu == 1280
        host.send(V4)
        assert dev.read_batch() == [V4]


def test_malformed_packets_count_toward_the_batch_bound(pair):
    # A flood of junk cannot keep read_batch busy: at most max_packets reads.
    fd, host = pair
    dev = open_device(f"fd://{fd}?header=af")
    for _ in range(5):
        host.send(b"junk-junk")
    host.send(AF4 + V4)
    assert dev.read_batch(max_packets=3) == []
    assert dev.stats["rx_bad_header"] == 3
    assert dev.read_batch(max_packets=3) == [V4]
    assert dev.stats["rx_bad_header"] == 5
    dev.close()
