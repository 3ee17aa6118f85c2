"""`tun2xray run --record FILE.pcap`: the options and, with workers, the parts.

- ``--record-max-mb N`` (default 256, fractions allowed, 0 = no cap): the
  capture never grows past N MB.  When the next packet would take it past
  the cap it is rotated: FILE.pcap becomes FILE.pcap.1 (replacing the one
  kept before) and a new FILE.pcap starts, with a log line each time.  So
  the newest traffic is always there and the disk holds at most 2 × N MB.
- ``--record-wire``: write wire-sized packets.  An offload-mode TUN (the
  default ``tun://``) passes TCP super-segments of up to 64 KB both ways;
  without this flag they are recorded as they are (said at start), with it
  they are cut into MTU-sized segments with full checksums
  (`tun2xray.device.pcap.wire_segments`), as a NIC would have sent them.
- With workers (``--workers N``, or one per two cores by default) each worker
  records its own flows to a part, ``FILE.pcap.w0`` ... (cap / N each,
  rotated to ``FILE.pcap.w0.1`` ...); when ``run`` ends the supervisor
  merges the parts by timestamp into FILE.pcap (and the rotated ones into
  FILE.pcap.1), streaming, and removes them.  Only a supervisor killed
  with SIGKILL leaves the parts behind (each is a pcap of its own).
"""

from __future__ import annotations

import glob
import heapq
import logging
import os

from .device.pcap import FILE_HEADER as _file_header
from .device.pcap import RECORD_HEADER as _record_header

DEFAULT_MAX_MB = 256.0
MB = 1_000_000

log = logging.getLogger("tun2xray.record")


class RecordOptions:
    """--record FILE, --record-wire, --record-max-mb, checked."""

    __slots__ = ("path", "wire", "max_bytes")

    def __init__(self, path: str, wire: bool = False, max_mb: float | None = None):
        self.path = path
        self.wire = wire
        mb = DEFAULT_MAX_MB if max_mb is None else max_mb
        self.max_bytes = int(mb * MB)

    @classmethod
    def from_args(cls, args):
        """None without --record; raises ValueError with a one-line reason."""
        path = getattr(args, "record", None)
        wire = bool(getattr(args, "record_wire", False))
        max_mb = getattr(args, "record_max_mb", None)
        if not path:
            if wire:
                raise ValueError("--record-wire needs --record FILE.pcap")
            if max_mb is not None:
                raise ValueError("--record-max-mb needs --record FILE.pcap")
            return None
        if max_mb is not None and not (max_mb == max_mb and 0 <= max_mb < 1e7):
            raise ValueError(f"--record-max-mb {max_mb:g}: must be 0 (no cap) or a positive size in MB")
        if max_mb is not None and 0 < max_mb * MB < 4096:
            raise ValueError(f"--record-max-mb {max_mb:g}: below 4 KB no packet fits")
        return cls(path, wire, max_mb)

    def cap_text(self) -> str:
        if not self.max_bytes:
            return "no size cap"
        return f"rotated at {self.max_bytes / MB:g} MB (one previous file kept as .1)"


def recorder(opts: RecordOptions, mtu: int, *, path: str | None = None, max_bytes: int | None = None,
             append: bool = False):
    """The PcapRecorder for opts (path and cap overridable for a worker's part)."""
    from .device.pcap import PcapRecorder

    return PcapRecorder(path or opts.path, max_bytes=opts.max_bytes if max_bytes is None else max_bytes,
                        wire_mtu=mtu if opts.wire else None, append=append)


def notice(opts: RecordOptions, offload: bool, workers: int = 1) -> None:
    """The start-up log lines: what the capture will hold."""
    log.info("--record: writing %s (%s)", opts.path, opts.cap_text())
    if offload and not opts.wire:
        log.info("--record: this offload-mode device carries TCP super-segments of up to 64 KB; the "
                 "capture holds them as they are (Wireshark shows them as large packets). For "
                 "wire-sized packets add --record-wire (or use tun://NAME?offload=0)")
    elif offload:
        log.info("--record-wire: TCP super-segments are recorded as wire-sized segments with full checksums")
    if workers > 1:
        log.info("--record: %d workers each record their own flows to %s.w0 ... %s.w%d (%s each); "
                 "merged into %s at exit", workers, opts.path, opts.path, workers - 1,
                 "no cap" if not opts.max_bytes else f"{opts.max_bytes / workers / MB:g} MB",
                 opts.path)


def closed(rec) -> None:
    """The log line when a single-process run's capture is closed."""
    extra = f", {rec.rotations} rotations (previous file: {rec.path}.1)" if rec.rotations else ""
    if rec.dropped:
        extra += f", {rec.dropped} packets not written ({rec.error})"
    log.info("--record: %d packets written to %s%s", rec.packets, rec.path, extra)


# ------------------------------------------------------------ worker parts

def part_path(path: str, wid: int) -> str:
    return f"{path}.w{wid}"


def part_cap(opts: RecordOptions, workers: int) -> int:
    return opts.max_bytes // workers if opts.max_bytes else 0


def start_parts(opts: RecordOptions) -> None:
    """Before the workers start: the capture can be written (it is created
    empty now, so an unwritable path fails before any worker runs), and no
    part of an earlier run is left to be appended to.  Raises OSError."""
    for stale in _parts(opts.path):
        os.unlink(stale)
    from .device.pcap import PcapRecorder

    PcapRecorder(opts.path).close()


def _parts(path: str) -> list:
    pat = glob.escape(path) + ".w[0-9]*"
    return [p for p in glob.glob(pat) if _is_part(path, p)]


def _is_part(path: str, p: str) -> bool:
    rest = p[len(path) + 2:]
    num, _, tail = rest.partition(".")
    return num.isdigit() and tail in ("", "1")


def merge_parts(opts: RecordOptions, workers: int) -> None:
    """At exit: the workers' current parts into opts.path, their rotated
    parts into opts.path + ".1"; the parts are removed.  Logs what it did."""
    for suffix, target in (("", opts.path), (".1", opts.path + ".1")):
        parts = [part_path(opts.path, i) + suffix for i in range(workers)]
        parts = [p for p in parts if os.path.exists(p)]
        if not parts:
            continue
        try:
            n = merge(parts, target)
        except (OSError, ValueError) as e:
            log.error("--record: cannot merge %s into %s: %s (the parts are kept)", ", ".join(parts), target, e)
            continue
        for p in parts:
            try:
                os.unlink(p)
            except OSError:
                pass
        log.info("--record: merged %d packets from %d worker parts into %s", n, len(parts), target)


def _records(path: str):
    """(ts, header bytes, data) of every record of one of our pcaps, read
    as it goes (a truncated last record, from a killed worker, ends it)."""
    with open(path, "rb", buffering=1 << 20) as f:
        head = f.read(_file_header.size)
        if len(head) < _file_header.size or _file_header.unpack(head)[0] != 0xA1B2C3D4:
            raise ValueError(f"{path}: not a capture written by tun2xray")
        while True:
            rh = f.read(16)
            if len(rh) < 16:
                return
            sec, usec, cap, _orig = _record_header.unpack(rh)
            data = f.read(cap)
            if len(data) < cap:
                return
            yield sec * 1_000_000 + usec, rh, data


def merge(parts: list, target: str) -> int:
    """Merge pcaps of ours by timestamp into target (streaming: one record
    per part in memory).  Returns the number of packets written."""
    snaplen = 0
    for p in parts:
        with open(p, "rb") as f:
            head = f.read(_file_header.size)
        if len(head) == _file_header.size:
            snaplen = max(snaplen, _file_header.unpack(head)[5])
    tmp = target + ".merging"
    n = 0
    try:
        with open(tmp, "wb", buffering=1 << 20) as out:
            out.write(_file_header.pack(0xA1B2C3D4, 2, 4, 0, 0, snaplen or 262144, 101))
            for _ts, rh, data in heapq.merge(*(_records(p) for p in parts), key=lambda r: r[0]):
                out.write(rh)
                out.write(data)
                n += 1
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return n
