"""unix:// devices: one IP packet per datagram with a host process."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from tun2xray.device import DeviceError, open_device

V4 = bytes.fromhex("4500001c000100004011f9d40a0000010a000002" "1388138900080000")
V6 = bytes.fromhex("6000000000081140" + "fd00" + "00" * 13 + "01" + "fd00" + "00" * 13 + "02" + "1388138900080000")


@pytest.fixture
def paths(tmp_path):
    return str(tmp_path / "tun2xray.sock"), str(tmp_path / "host.sock")


@pytest.fixture
def host(paths):
    """The host process's socket, bound to its own path."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(paths[1])
    s.settimeout(2)
    yield s
    s.close()


def test_packets_both_ways_and_reply_goes_to_last_sender(paths, host):
    dev_path, host_path = paths
    dev = open_device(f"unix://{dev_path}")
    try:
        assert os.path.exists(dev_path)
        assert dev.peer is None
        # nobody heard from yet: replies have nowhere to go
        assert dev.write_batch([V4]) == 1
        assert dev.stats["tx_dropped"] == 1 and dev.stats["tx_packets"] == 0

        host.sendto(V4, dev_path)
        host.sendto(V6, dev_path)
        assert dev.read_batch() == [V4, V6]
        assert dev.peer == host_path
        assert dev.write_batch([V6, V4]) == 2
        assert host.recv(100) == V6
        assert host.recv(100) == V4

        # a second host socket takes over by sending
        other = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        other.bind(host_path + "2")
        other.settimeout(2)
        with other:
            other.sendto(V4, dev_path)
            assert dev.read_batch() == [V4]
            dev.write_batch([V6])
            assert other.recv(100) == V6
        s = dev.stats
        assert (s["rx_packets"], s["rx_bytes"], s["tx_packets"], s["tx_bytes"]) == (3, 104, 3, 124)
    finally:
        dev.close()
    assert not os.path.exists(dev_path)


def test_connected_host_socket_works_too(paths, host):
    dev_path, host_path = paths
    with open_device(f"unix://{dev_path}") as dev:
        host.connect(dev_path)
        host.send(V6)
        assert dev.read_batch() == [V6]
        dev.write_batch([V4])
        assert host.recv(100) == V4


def test_fixed_peer(paths, host):
    dev_path, host_path = paths
    with open_device(f"unix://{dev_path}?peer={host_path}") as dev:
        assert dev.peer == host_path
        assert dev.write_batch([V4]) == 1  # before hearing anything
        assert host.recv(100) == V4
        stranger = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with stranger:
            stranger.bind(host_path + "x")
            stranger.sendto(V6, dev_path)
            assert dev.read_batch() == [V6]
        dev.write_batch([V6])
        assert host.recv(100) == V6  # still to the fixed peer


def test_unbound_sender_is_read_but_cannot_be_answered(paths):
    dev_path, _ = paths
    with open_device(f"unix://{dev_path}") as dev:
        anon = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with anon:
            anon.sendto(V4, dev_path)
            assert dev.read_batch() == [V4]
        assert dev.peer is None
        assert dev.write_batch([V4, V6]) == 2
        assert dev.stats["tx_dropped"] == 2


def test_abstract_names():
    tag = uuid.uuid4().hex[:12]
    host = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    host.bind(f"\0dv-host-{tag}")
    host.settimeout(2)
    with host, open_device(f"unix://@dv-dev-{tag}") as dev:
        host.sendto(V4, f"\0dv-dev-{tag}")
        assert dev.read_batch() == [V4]
        dev.write_batch([V6])
        assert host.recv(100) == V6
    with open_device(f"unix://@dv-dev2-{tag}?peer=@dv-nobody-{tag}") as dev:
        assert dev.write_batch([V4]) == 1
        assert dev.stats["tx_errors"] == 1  # no such peer: counted, no exception


def test_host_gone_counts_errors_and_keeps_running(paths, host):
    dev_path, host_path = paths
    with open_device(f"unix://{dev_path}") as dev:
        host.sendto(V4, dev_path)
        dev.read_batch()
        host.close()
        assert dev.write_batch([V4, V6, V4]) == 3
        s = dev.stats
        assert (s["tx_packets"], s["tx_errors"], s["tx_dropped"]) == (0, 3, 3)
        # the host comes back at the same address
        back = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        os.unlink(host_path)
        back.bind(host_path)
        back.settimeout(2)
        with back:
            assert dev.write_batch([V6]) == 1
            assert back.recv(100) == V6


def test_host_not_reading_stops_the_batch(paths, host):
    dev_path, _ = paths
    with open_device(f"unix://{dev_path}") as dev:
        host.sendto(V4, dev_path)
        dev.read_batch()
        packets = [V4] * 3000
        n = dev.write_batch(packets)
        assert 0 < n < len(packets)
        assert dev.stats["tx_packets"] == n
        assert dev.stats["tx_dropped"] == len(packets) - n
        assert dev.stats["tx_errors"] == 0


def test_stale_socket_replaced_other_files_refused(paths):
    dev_path, _ = paths
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(dev_path)
    stale.close()  # leaves the file behind, like a crashed run
    with open_device(f"unix://{dev_path}") as dev:
        assert dev.read_batch() == []
    assert not os.path.exists(dev_path)
    with open(dev_path, "w") as f:
        f.write("not a socket")
    with pytest.raises(DeviceError, match="exists and is not a socket"):
        open_device(f"unix://{dev_path}")
    assert open(dev_path).read() == "not a socket"


def test_empty_datagram_is_a_counted_runt(paths, host):
    dev_path, _ = paths
    with open_device(f"unix://{dev_path}") as dev:
        host.sendto(b"", dev_path)
        host.sendto(V4, dev_path)
        assert dev.read_batch() == [V4]
        assert dev.stats["rx_dropped"] == 1


def test_bad_unix_urls(tmp_path):
    long_path = "/" + "x" * 120
    cases = {
        "unix://relative/path": "expected unix:///absolute/path",
        "unix://@": "empty abstract socket name",
        f"unix://{long_path}": "longer than 107 bytes",
        f"unix://{tmp_path}/a?peer=relative": "is not an absolute path or @abstract-name",
        f"unix://{tmp_path}/a?who=1": "unknown option 'who'",
        f"unix://{tmp_path}/no/such/dir/sock": "cannot bind: No such file or directory",
    }
    for url, why in cases.items():
        with pytest.raises(DeviceError) as ei:
            open_device(url)
        assert why in str(ei.value), (url, str(ei.value))
        assert str(ei.value).startswith(url)
