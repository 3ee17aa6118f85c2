"""PcapRecorder output read back by dpkt and tcpdump; read_pcap over link types."""

from __future__ import annotations

import shutil
import subprocess

import dpkt
import pytest

from tun2xray.device.pcap import LINKTYPE_RAW, PcapRecorder, read_pcap

UDP8 = bytes.fromhex("1388138900080000")
V4 = bytes.fromhex("4500001c000100004011f9d40a0000010a000002") + UDP8
V6 = bytes.fromhex("6000000000081140" + "fd00" + "00" * 13 + "01" + "fd00" + "00" * 13 + "02") + UDP8


def test_recorded_file_reads_back_with_dpkt(tmp_path):
    path = str(tmp_path / "rec.pcap")
    with PcapRecorder(path) as rec:
        rec.write(V4, 1700000000.25)
        rec.write(bytearray(V6), 1700000000.5000004)
        rec.write_batch([V4, V6], 1700000001.0)
        assert rec.packets == 4
    with open(path, "rb") as f:
        r = dpkt.pcap.Reader(f)
        assert r.datalink() == LINKTYPE_RAW == 101
        assert r.snaplen == 262144
        got = [(ts, bytes(buf)) for ts, buf in r]
    assert [buf for _, buf in got] == [V4, V6, V4, V6]
    assert [round(float(ts), 6) for ts, _ in got] == [1700000000.25, 1700000000.5, 1700000001.0, 1700000001.0]
    ip = dpkt.ip.IP(got[0][1])
    assert ip.dst == bytes([10, 0, 0, 2]) and ip.data.dport == 5001


def test_microsecond_rounding_carries_into_seconds(tmp_path):
    path = str(tmp_path / "carry.pcap")
    with PcapRecorder(path) as rec:
        rec.write(V4, 99.9999996)
    raw = open(path, "rb").read()
    import struct

    sec, usec, incl, orig = struct.unpack_from("=IIII", raw, 24)
    assert (sec, usec, incl, orig) == (100, 0, len(V4), len(V4))


def test_snaplen_truncates_but_keeps_original_length(tmp_path):
    path = str(tmp_path / "snap.pcap")
    with PcapRecorder(path, snaplen=20) as rec:
        rec.write(V4, 1.0)
    with open(path, "rb") as f:
        raw = f.read()
    import struct

    assert struct.unpack_from("=IIII", raw, 24)[2:] == (20, 28)
    assert raw[40:] == V4[:20]


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump is part of the test environment (apt install tcpdump)")
def test_tcpdump_reads_the_recording(tmp_path):
    path = str(tmp_path / "td.pcap")
    with PcapRecorder(path) as rec:
        rec.write(V4, 1700000000.0)
        rec.write(V6, 1700000000.1)
    r = subprocess.run(["tcpdump", "-nn", "-r", path], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    assert "link-type RAW" in r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2
    assert "10.0.0.1.5000 > 10.0.0.2.5001: UDP, length 0" in lines[0]
    assert "fd00::1.5000 > fd00::2.5001: UDP, length 0" in lines[1]


def test_write_after_close_is_an_error(tmp_path):
    rec = PcapRecorder(str(tmp_path / "c.pcap"))
    rec.close()
    rec.close()
    with pytest.raises(ValueError, match="closed"):
        rec.write(V4, 0.0)


def _write_with_dpkt(path, linktype, frames, nano=False):
    with open(path, "wb") as f:
        w = dpkt.pcap.Writer(f, linktype=linktype, nano=nano)
        for i, fr in enumerate(frames):
            w.writepkt(fr, ts=10.0 + i)


def test_read_pcap_unwraps_link_layers(tmp_path):
    eth_v4 = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + V4
    eth_vlan_v6 = b"\x02" * 6 + b"\x04" * 6 + b"\x81\x00\x00\x05\x86\xdd" + V6
    eth_arp = b"\xff" * 6 + b"\x04" * 6 + b"\x08\x06" + bytes(28)
    p = str(tmp_path / "eth.pcap")
    _write_with_dpkt(p, dpkt.pcap.DLT_EN10MB, [eth_v4, eth_arp, eth_vlan_v6])
    assert list(read_pcap(p)) == [(10.0, V4), (12.0, V6)]

    sll = b"\x00\x00\x00\x01\x00\x06" + b"\x02" * 6 + b"\x00\x00" + b"\x08\x00" + V4
    p = str(tmp_path / "sll.pcap")
    _write_with_dpkt(p, 113, [sll])
    assert list(read_pcap(p)) == [(10.0, V4)]

    sll2 = b"\x86\xdd\x00\x00" + b"\x00\x00\x00\x03" + b"\x00\x01\x00\x06" + b"\x02" * 6 + b"\x00\x00" + V6
    p = str(tmp_path / "sll2.pcap")
    _write_with_dpkt(p, 276, [sll2])
    assert list(read_pcap(p)) == [(10.0, V6)]

    null = (30).to_bytes(4, "little") + V6  # BSD loopback, host byte order
    p = str(tmp_path / "null.pcap")
    _write_with_dpkt(p, dpkt.pcap.DLT_NULL, [null, b"\x02\x00\x00\x00" + V4])
    assert list(read_pcap(p)) == [(10.0, V6), (11.0, V4)]

    p = str(tmp_path / "raw-nano.pcap")
    _write_with_dpkt(p, LINKTYPE_RAW, [V4, b"\x00junk", V6], nano=True)
    assert list(read_pcap(p)) == [(10.0, V4), (12.0, V6)]


def test_read_pcap_roundtrips_our_recording_and_pcapng(tmp_path):
    p = str(tmp_path / "ours.pcap")
    with PcapRecorder(p) as rec:
        rec.write(V6, 5.5)
        rec.write(V4, 6.25)
    assert list(read_pcap(p)) == [(5.5, V6), (6.25, V4)]

    ng = str(tmp_path / "x.pcapng")
    with open(ng, "wb") as f:
        w = dpkt.pcapng.Writer(f, linktype=LINKTYPE_RAW)
        w.writepkt(V4, ts=7.0)
    assert list(read_pcap(ng)) == [(7.0, V4)]


def test_read_pcap_rejects_other_files(tmp_path):
    p = tmp_path / "not.pcap"
    p.write_bytes(b"this is not a capture at all, not even close")
    with pytest.raises(ValueError, match="not a pcap/pcapng file"):
        list(read_pcap(str(p)))


def test_full_disk_stops_recording_without_raising():
    rec = PcapRecorder("/dev/full")  # every flush fails with ENOSPC
    big = V4 + bytes(60000)
    for _ in range(40):  # > the 1 MB buffer
        rec.write(big, 1.0)
    assert rec.error == "/dev/full: No space left on device"
    assert rec.dropped >= 1 and rec.packets + rec.dropped == 40
    rec.write(V4, 2.0)
    rec.flush()
    rec.close()
    assert rec.dropped >= 2


def test_read_pcap_strict_mode_is_what_replay_reads(tmp_path):
    # one reader for the device and for replay: strict refuses what a
    # replay cannot use (unknown link type, a packet cut by the snaplen)
    # and passes raw frames on as captured; a damaged file is an error in
    # both modes, with the path in the one-line reason
    p = str(tmp_path / "snap.pcap")
    with PcapRecorder(p, snaplen=20) as rec:
        rec.write(V4, 1.0)
    assert list(read_pcap(p)) == [(1.0, V4[:20])]
    with pytest.raises(ValueError, match="cut to 20 of 28 bytes"):
        list(read_pcap(p, strict=True))

    other = str(tmp_path / "other.pcap")
    _write_with_dpkt(other, 147, [V4])
    assert list(read_pcap(other)) == []
    with pytest.raises(ValueError, match="unsupported link type 147"):
        list(read_pcap(other, strict=True))

    raw = str(tmp_path / "raw.pcap")
    _write_with_dpkt(raw, LINKTYPE_RAW, [b"\x00junk", V4])
    assert list(read_pcap(raw)) == [(11.0, V4)]
    assert list(read_pcap(raw, strict=True)) == [(10.0, b"\x00junk"), (11.0, V4)]

    cut = tmp_path / "cut.pcap"
    cut.write_bytes(open(raw, "rb").read()[:-5])
    for strict in (False, True):
        with pytest.raises(ValueError, match=r"cut\.pcap: truncated packet 2"):
            list(read_pcap(str(cut), strict=strict))
