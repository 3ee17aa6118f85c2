"""Fuzz target "pcap": capture files through the pcap readers and `replay`.

The input is a whole capture file (classic pcap in either byte order,
micro- or nanosecond, or pcapng; seeds: the captures in pcaps/, cut short,
and the same packets under other link types).  Invariants:
  * tun2xray.device.pcap.read_pcap raises nothing but its documented
    ValueError with a one-line reason;
  * tun2xray.replay.read_pcap raises nothing but ReplayError (one line);
  * what it reads replays: Replay(...).run(), the text report and the
    JSON flow records raise nothing (a replay of a fuzzed capture may well
    end in "not completed", but never in an exception), and every flow is
    judged.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile

from tun2xray.device import pcap as devpcap
from tun2xray import replay

from .common import check, one_line

_PATH = os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(),
                     f"tun2xray-fuzz-{os.getpid()}.pcap")


def TestOneInput(data: bytes) -> None:
    with open(_PATH, "wb") as f:
        f.write(data)
    try:
        try:
            for _ts, pkt in devpcap.read_pcap(_PATH):
                check(isinstance(pkt, (bytes, bytearray, memoryview)), "device reader yields no bytes")
        except ValueError as e:
            one_line(e)
        try:
            packets = replay.read_pcap(_PATH)
        except replay.ReplayError as e:
            one_line(e)
            return
        r = replay.Replay(packets[:400]).run(drain_for=120.0)
        out = io.StringIO()
        replay.report(_PATH, r, out=out)
        json.dumps([replay.flow_dict(f, i) for i, f in enumerate(r.flows, 1)], default=str)
        json.dumps(r.stack.status(), default=str)
        for f in r.flows:
            check(f.outcome is not None, "a flow was not judged")
    finally:
        try:
            os.unlink(_PATH)
        except OSError:
            pass


# ---------------------------------------------------------------- seeds

def _pcap(packets, linktype=101, order="<", nano=False) -> bytes:
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = [struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 262144, linktype)]
    for ts, p in packets:
        sec = int(ts)
        frac = int((ts - sec) * (1e9 if nano else 1e6))
        out.append(struct.pack(order + "IIII", sec, frac, len(p), len(p)) + p)
    return b"".join(out)


def seeds() -> list:
    import glob

    import dpkt
    root = os.path.join(os.path.dirname(__file__), "..", "..", "pcaps")
    out = []
    for path in sorted(glob.glob(os.path.join(root, "*.pcap"))):
        try:
            packets = [(ts, bytes(p)) for ts, p in replay.read_pcap(path)]
        except replay.ReplayError:
            continue
        few = []
        size = 24
        for ts, p in packets:
            if size + 16 + len(p) > 40000:
                break
            few.append((ts, p))
            size += 16 + len(p)
        out.append(_pcap(few))
        if "dns" in path or "refused" in path:
            out.append(_pcap(few, order=">", nano=True))
            eth = [(ts, b"\0" * 12 + (b"\x08\x00" if p[0] >> 4 == 4 else b"\x86\xdd") + p) for ts, p in few]
            out.append(_pcap(eth, linktype=1))
            out.append(_pcap([(ts, b"\0" * 14 + b"\x08\x00" + p) for ts, p in few], linktype=113))
            out.append(_pcap([(ts, struct.pack("<I", 2) + p) for ts, p in few], linktype=0))
            buf = io.BytesIO()
            w = dpkt.pcapng.Writer(buf, linktype=101)
            for ts, p in few:
                w.writepkt(p, ts=ts)
            out.append(buf.getvalue())
    return out
