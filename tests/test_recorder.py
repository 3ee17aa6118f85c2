"""`run --record` pieces without a TUN: the recorder's size cap (rotation),
wire-sized segments cut from super-segments, the workers' part files merged
by timestamp, and the flags' checks.  The end-to-end runs are in
tests/e2e/test_record.py."""

from __future__ import annotations

import argparse
import logging
import os
import random
import struct

import dpkt
import pytest

from tun2xray import record
from tun2xray.device.pcap import PcapRecorder, read_pcap, wire_segments


def _packets(path):
    with open(path, "rb") as f:
        return [(ts, bytes(buf)) for ts, buf in dpkt.pcap.Reader(f)]


def _ip(n: int, i: int) -> bytes:
    """An IPv4/UDP packet of n bytes (content i)."""
    u = dpkt.udp.UDP(sport=1000, dport=2000, data=bytes([i & 0xFF]) * (n - 28))
    ip = dpkt.ip.IP(src=b"\x0a\x00\x00\x01", dst=b"\x0a\x00\x00\x02", p=17, data=u, id=i & 0xFFFF)
    ip.len = n
    return bytes(ip)


# ---------------------------------------------------------------- the cap

def test_recorder_rotates_at_the_cap_and_keeps_one_previous_file(tmp_path, caplog):
    path = str(tmp_path / "cap.pcap")
    cap = 10_000
    rec = PcapRecorder(path, max_bytes=cap)
    sent = [_ip(random.Random(i).randrange(40, 1500), i) for i in range(100)]
    with caplog.at_level(logging.INFO, logger="tun2xray.record"):
        for i, p in enumerate(sent):
            rec.write(p, 1000.0 + i)
        rec.close()
    assert os.path.getsize(path) <= cap and os.path.getsize(path + ".1") <= cap
    assert not os.path.exists(path + ".2")
    newest = _packets(path)
    previous = _packets(path + ".1")
    # the two files hold the newest packets, in order, without a gap
    assert [p for _, p in previous + newest] == sent[len(sent) - len(previous) - len(newest):]
    assert rec.rotations >= 5 and rec.packets == len(sent) and rec.dropped == 0
    lines = [r.getMessage() for r in caplog.records if "reached its cap" in r.getMessage()]
    assert len(lines) == rec.rotations and "moved to" in lines[0] and path in lines[0]


def test_recorder_without_cap_never_rotates(tmp_path):
    path = str(tmp_path / "all.pcap")
    rec = PcapRecorder(path, max_bytes=0)
    for i in range(300):
        rec.write(_ip(1400, i), 1.0 + i)
    rec.close()
    assert rec.rotations == 0 and len(_packets(path)) == 300 and not os.path.exists(path + ".1")


def test_recorder_appends_to_its_own_file(tmp_path):
    path = str(tmp_path / "part")
    a = PcapRecorder(path, append=True)
    a.write(_ip(100, 1), 1.0)
    a.close()
    b = PcapRecorder(path, append=True)
    b.write(_ip(100, 2), 2.0)
    b.close()
    assert [p for _, p in _packets(path)] == [_ip(100, 1), _ip(100, 2)]
    (tmp_path / "junk").write_bytes(b"not a pcap at all, longer than a header")
    c = PcapRecorder(str(tmp_path / "junk"), append=True)   # not ours: started afresh
    c.close()
    assert _packets(str(tmp_path / "junk")) == []


# ----------------------------------------------------------- wire segments

def _super(v6=False, payload=20_000, flags=dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH | dpkt.tcp.TH_FIN | dpkt.tcp.TH_CWR):
    opts = b"\x01\x01\x08\x0a" + struct.pack("!II", 123, 456)
    data = random.Random(5).randbytes(payload)
    tcp = dpkt.tcp.TCP(sport=443, dport=50000, seq=0xFFFFF000, ack=77, flags=flags, win=501, opts=opts, data=data)
    tcp.off = (20 + len(opts)) // 4
    if v6:
        ip = dpkt.ip6.IP6(src=b"\xfd" + b"\x00" * 14 + b"\x01", dst=b"\xfd" + b"\x00" * 14 + b"\x02", nxt=6,
                          hlim=64, data=tcp)
        ip.plen = len(bytes(tcp))
    else:
        ip = dpkt.ip.IP(src=b"\xc6\x12\x00\x01", dst=b"\x0a\x00\x00\x02", p=6, id=0xFFFE, data=tcp)
        ip.df = 1
        ip.len = 20 + len(bytes(tcp))
    return bytes(ip), data


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_wire_segments_look_like_what_a_nic_sends(v6):
    raw, data = _super(v6)
    mtu = 1500
    segs = wire_segments(raw, mtu)
    hdr = (40 if v6 else 20) + 32
    assert len(segs) == -(-len(data) // (mtu - hdr))
    got = b""
    for i, s in enumerate(segs):
        assert len(s) <= mtu
        ip = dpkt.ip6.IP6(s) if v6 else dpkt.ip.IP(s)
        tcp = ip.data
        last = i == len(segs) - 1
        assert tcp.seq == (0xFFFFF000 + len(got)) & 0xFFFFFFFF        # wraps past 2**32
        assert tcp.ack == 77 and tcp.win == 501 and tcp.opts == _super(v6)[0][(40 if v6 else 20) + 20:hdr]
        assert bool(tcp.flags & dpkt.tcp.TH_FIN) == last and bool(tcp.flags & dpkt.tcp.TH_PUSH) == last
        assert bool(tcp.flags & dpkt.tcp.TH_CWR) == (i == 0) and tcp.flags & dpkt.tcp.TH_ACK
        if not v6:
            assert ip.id == (0xFFFE + i) & 0xFFFF and ip.len == len(s) and ip.df == 1 and ip.offset == 0
        else:
            assert ip.plen == len(s) - 40
        _assert_checksums(s, v6)
        got += bytes(tcp.data)
    assert got == data


def _assert_checksums(s: bytes, v6: bool):
    from netstack.wire import checksum as ck
    if not v6:
        assert ck.sum16(s[:20]) == 0xFFFF
        ps = ck.pseudo4(s[12:16], s[16:20], 6, len(s) - 20)
        assert ck.sum16(s[20:], ps) == 0xFFFF
    else:
        ps = ck.pseudo6(s[8:24], s[24:40], 6, len(s) - 40)
        assert ck.sum16(s[40:], ps) == 0xFFFF


def test_wire_segments_leave_other_packets_alone():
    small, _ = _super(payload=100)
    assert wire_segments(small, 1500) == [small]
    udp = _ip(1400, 3)
    assert wire_segments(udp, 1000) == [udp]               # not TCP: as it is


def test_recorder_wire_mode_writes_segments(tmp_path):
    raw, data = _super()
    path = str(tmp_path / "w.pcap")
    rec = PcapRecorder(path, wire_mtu=1500)
    rec.write(raw, 5.0)
    rec.close()
    pk = _packets(path)
    assert len(pk) > 10 and all(len(p) <= 1500 for _, p in pk)
    assert b"".join(bytes(dpkt.ip.IP(p).data.data) for _, p in pk) == data


# ------------------------------------------------------------ worker parts

def test_parts_are_merged_by_timestamp(tmp_path):
    path = str(tmp_path / "run.pcap")
    opts = record.RecordOptions(path, max_mb=0)
    (tmp_path / "run.pcap.w7").write_bytes(b"stale part of an earlier run")
    record.start_parts(opts)
    assert not (tmp_path / "run.pcap.w7").exists() and os.path.getsize(path) == 24
    r0 = PcapRecorder(record.part_path(path, 0), append=True)
    r1 = PcapRecorder(record.part_path(path, 1), append=True)
    want = []
    for i in range(200):
        ts = 100.0 + i * 0.001
        (r0 if i % 3 else r1).write(_ip(60 + i, i), ts)
        want.append(_ip(60 + i, i))
    r0.close()
    # a killed worker's last record is cut short: the merge stops that part there
    r1.close()
    with open(record.part_path(path, 1), "ab") as f:
        f.write(struct.pack("=IIII", 999, 0, 500, 500) + b"x" * 10)
    record.merge_parts(opts, 2)
    assert [p for _, p in read_pcap(path)] == want
    assert not [n for n in os.listdir(tmp_path) if ".w" in n]


def test_rotated_parts_merge_into_the_previous_file(tmp_path):
    path = str(tmp_path / "run.pcap")
    opts = record.RecordOptions(path, max_mb=0.004)       # 4,000 bytes: 2,000 per worker
    record.start_parts(opts)
    recs = [PcapRecorder(record.part_path(path, i), max_bytes=record.part_cap(opts, 2), append=True)
            for i in range(2)]
    for i in range(60):
        recs[i % 2].write(_ip(200, i), 10.0 + i)
    for r in recs:
        r.close()
    record.merge_parts(opts, 2)
    assert os.path.getsize(path) <= 4000 and os.path.getsize(path + ".1") <= 4000
    newest = [p for _, p in read_pcap(path)]
    assert newest == [_ip(200, i) for i in range(60)][-len(newest):]


# ------------------------------------------------------------------- flags

def _args(**kw):
    d = {"record": None, "record_wire": False, "record_max_mb": None}
    d.update(kw)
    return argparse.Namespace(**d)


def test_record_options():
    assert record.RecordOptions.from_args(_args()) is None
    o = record.RecordOptions.from_args(_args(record="x.pcap"))
    assert o.max_bytes == 256_000_000 and not o.wire
    assert record.RecordOptions.from_args(_args(record="x.pcap", record_max_mb=0)).max_bytes == 0
    assert record.RecordOptions.from_args(_args(record="x.pcap", record_max_mb=0.2)).max_bytes == 200_000
    for bad, needle in ((_args(record_wire=True), "--record-wire needs --record"),
                        (_args(record_max_mb=5), "--record-max-mb needs --record"),
                        (_args(record="x", record_max_mb=-1), "must be 0"),
                        (_args(record="x", record_max_mb=float("nan")), "must be 0"),
                        (_args(record="x", record_max_mb=0.001), "below 4 KB")):
        with pytest.raises(ValueError, match=needle):
            record.RecordOptions.from_args(bad)


@pytest.mark.parametrize("extra,needle", [
    (["--record-wire"], "--record-wire needs --record FILE.pcap"),
    (["--record-max-mb", "3"], "--record-max-mb needs --record FILE.pcap"),
    (["--record", "/tmp/rr-never.pcap", "--record-max-mb", "-2"], "--record-max-mb -2: must be 0"),
    (["--record", "/tmp/rr-never.pcap", "--record-max-mb", "lots"], "invalid float value"),
])
def test_run_rejects_record_flags_in_one_line(extra, needle):
    import subprocess
    import sys
    # checked before anything is opened or dialled (the proxy here does not exist)
    r = subprocess.run([sys.executable, "-m", "tun2xray", "run", "--device", "tun://rrnever0",
                        "--proxy", "socks5://127.0.0.1:9", *extra], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not os.path.exists("/tmp/rr-never.pcap")
