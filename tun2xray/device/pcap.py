"""pcap files: record raw IP packets (LINKTYPE_RAW) and read captures back.

Writing is a few lines of struct packing (classic libpcap format, microsecond
timestamps, native byte order), so recording costs one ``Struct.pack`` and two
buffered writes per packet. Reading uses dpkt, which also understands pcapng
and nanosecond files, and unwraps the link layers a TUN capture is likely to
carry (raw IP, Ethernet, Linux cooked v1/v2, BSD loopback/NULL).
"""

from __future__ import annotations

import struct
from typing import Iterator

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276
# DLT_RAW's numbers that leak into files from some systems.
_RAW_ALIASES = (12, 14)

PCAP_MAGIC_US = 0xA1B2C3D4
SNAPLEN = 262144

_file_header = struct.Struct("=IHHiIII")
_record_header = struct.Struct("=IIII")


class PcapRecorder:
    """Append raw IP packets to a new pcap file (LINKTYPE_RAW).

    Recording must never take the tunnel down: if the file cannot be written
    (disk full, I/O error) the recorder stops, keeps the reason in ``error``
    and counts later packets in ``dropped``; ``write`` does not raise then.
    Writing after ``close()`` is a programming error (ValueError).
    """

    def __init__(self, path: str, *, snaplen: int = SNAPLEN):
        self.path = path
        self.snaplen = snaplen
        self.packets = 0
        self.dropped = 0
        self.error: str | None = None
        self._f = open(path, "wb", buffering=1 << 20)
        self._f.write(_file_header.pack(PCAP_MAGIC_US, 2, 4, 0, 0, snaplen, LINKTYPE_RAW))
        self._pack = _record_header.pack
        self._write = self._f.write

    def write(self, packet, ts: float) -> None:
        """Record one packet seen at ``ts`` (seconds since the epoch)."""
        if self._f is None:
            if self.error is not None:
                self.dropped += 1
                return
            raise ValueError(f"{self.path}: recorder is closed")
        sec = int(ts)
        usec = int((ts - sec) * 1_000_000 + 0.5)
        if usec >= 1_000_000:
            sec += 1
            usec -= 1_000_000
        n = len(packet)
        try:
            if n > self.snaplen:
                self._write(self._pack(sec, usec, self.snaplen, n))
                self._write(packet[: self.snaplen])
            else:
                self._write(self._pack(sec, usec, n, n))
                self._write(packet)
        except OSError as exc:
            self._fail(exc)
            self.dropped += 1
            return
        self.packets += 1

    def write_batch(self, packets, ts: float) -> None:
        for p in packets:
            self.write(p, ts)

    def _fail(self, exc: OSError) -> None:
        self.error = f"{self.path}: {exc.strerror or exc}"
        f, self._f = self._f, None
        try:
            f.close()
        except OSError:
            pass

    def flush(self) -> None:
        if self._f is not None:
            try:
                self._f.flush()
            except OSError as exc:
                self._fail(exc)

    def close(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except OSError as exc:
                self.error = f"{self.path}: {exc.strerror or exc}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _ip_from_ethernet(buf: bytes) -> bytes | None:
    off = 12
    ethertype = int.from_bytes(buf[off : off + 2], "big")
    while ethertype in (0x8100, 0x88A8) and len(buf) >= off + 6:  # VLAN tags
        off += 4
        ethertype = int.from_bytes(buf[off : off + 2], "big")
    if ethertype in (0x0800, 0x86DD):
        return buf[off + 2 :]
    return None


def _ip_payload(linktype: int, buf: bytes) -> bytes | None:
    """The IP packet inside one captured frame, or None if it carries none."""
    if linktype == LINKTYPE_RAW or linktype in _RAW_ALIASES or linktype in (LINKTYPE_IPV4, LINKTYPE_IPV6):
        ip = buf
    elif linktype == LINKTYPE_ETHERNET:
        if len(buf) < 14:
            return None
        ip = _ip_from_ethernet(buf)
    elif linktype == LINKTYPE_LINUX_SLL:
        if len(buf) < 16 or int.from_bytes(buf[14:16], "big") not in (0x0800, 0x86DD):
            return None
        ip = buf[16:]
    elif linktype == LINKTYPE_LINUX_SLL2:
        if len(buf) < 20 or int.from_bytes(buf[0:2], "big") not in (0x0800, 0x86DD):
            return None
        ip = buf[20:]
    elif linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        ip = buf[4:] if len(buf) >= 4 else None
    else:
        return None
    if not ip or (ip[0] >> 4) not in (4, 6):
        return None
    return bytes(ip)


def read_pcap(path: str) -> Iterator[tuple[float, bytes]]:
    """Yield ``(timestamp, ip_packet)`` for every IP packet in a pcap/pcapng file.

    Frames that carry no IPv4/IPv6 packet (ARP, unknown link types) are skipped.
    Raises ValueError with a one-line reason if the file is not a capture.
    """
    import dpkt

    with open(path, "rb") as f:
        magic = f.read(4)
        f.seek(0)
        try:
            if magic == b"\x0a\x0d\x0d\x0a":
                reader = dpkt.pcapng.Reader(f)
            else:
                reader = dpkt.pcap.Reader(f)
        except (ValueError, dpkt.dpkt.Error) as exc:
            raise ValueError(f"{path}: not a pcap/pcapng file ({' '.join(str(exc).split())})") from None
        linktype = reader.datalink()
        for ts, buf in reader:
            ip = _ip_payload(linktype, buf)
            if ip is not None:
                yield float(ts), ip


__all__ = ["PcapRecorder", "read_pcap", "LINKTYPE_RAW"]
