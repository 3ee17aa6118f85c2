"""pcap files: record raw IP packets (LINKTYPE_RAW) and read captures back.

Writing is a few lines of struct packing (classic libpcap format, microsecond
timestamps, native byte order), so recording costs one ``Struct.pack`` and two
buffered writes per packet. Reading uses dpkt, which also understands pcapng
and nanosecond files, and unwraps the link layers a TUN capture is likely to
carry (raw IP, Ethernet, Linux cooked v1/v2, BSD loopback/NULL).
"""

from __future__ import annotations

import logging
import os
import struct
from typing import Iterator

_log = logging.getLogger("tun2xray.record")

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

    ``max_bytes`` (0: no cap) bounds the file: a packet that would take it
    past the cap first rotates it (``path`` becomes ``path.1``, replacing
    the previous one, and a new ``path`` starts), so the file and the one
    kept before it each stay at or below the cap.  ``wire_mtu`` (None: off)
    cuts TCP super-segments larger than it into wire-sized segments
    (`wire_segments`).  ``append`` continues an existing file of ours (a
    restarted worker's part) instead of truncating it.
    """

    def __init__(self, path: str, *, snaplen: int = SNAPLEN, max_bytes: int = 0,
                 wire_mtu: int | None = None, append: bool = False):
        self.path = path
        self.snaplen = snaplen
        self.max_bytes = max_bytes
        self.wire_mtu = wire_mtu
        self.packets = 0
        self.dropped = 0
        self.rotations = 0
        self.error: str | None = None
        self._pack = _record_header.pack
        self._f = None
        self._write = None
        self.size = 0
        if append and _our_pcap_size(path):
            self._open("ab")
            self.size = _our_pcap_size(path)
        else:
            self._open("wb")

    def _open(self, mode: str) -> None:
        self._f = open(self.path, mode, buffering=1 << 20)
        self._write = self._f.write
        if mode == "wb":
            self._f.write(_file_header.pack(PCAP_MAGIC_US, 2, 4, 0, 0, self.snaplen, LINKTYPE_RAW))
            self.size = _file_header.size

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
        mtu = self.wire_mtu
        if mtu is not None and len(packet) > mtu:
            for seg in wire_segments(packet, mtu):
                self._put(seg, sec, usec)
        else:
            self._put(packet, sec, usec)

    def _put(self, packet, sec: int, usec: int) -> None:
        if self._f is None:
            self.dropped += 1
            return
        n = len(packet)
        cap = n if n <= self.snaplen else self.snaplen
        rec = 16 + cap
        if self.max_bytes and self.size + rec > self.max_bytes and self.size > _file_header.size:
            if not self._rotate():
                self.dropped += 1
                return
        try:
            self._write(self._pack(sec, usec, cap, n))
            self._write(packet if cap == n else packet[:cap])
        except OSError as exc:
            self._fail(exc)
            self.dropped += 1
            return
        self.size += rec
        self.packets += 1

    def _rotate(self) -> bool:
        """path -> path.1 (replacing it), a new path; False if that failed."""
        try:
            self._f.close()
            os.replace(self.path, self.path + ".1")
            self._open("wb")
        except OSError as exc:
            self._fail(exc)
            return False
        self.rotations += 1
        _log.info("--record: %s reached its cap of %s; moved to %s.1 (replacing the previous one), "
                  "recording goes on in a new %s", self.path, _mb(self.max_bytes), self.path, self.path)
        return True

    def write_batch(self, packets, ts: float) -> None:
        for p in packets:
            self.write(p, ts)

    def _fail(self, exc: OSError) -> None:
        self.error = f"{self.path}: {exc.strerror or exc}"
        _log.error("--record: stopped: %s", self.error)
        f, self._f = self._f, None
        if f is None:
            return
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


def _mb(n: float) -> str:
    return f"{n / 1e6:g} MB"


def _our_pcap_size(path: str) -> int:
    """The size of an existing pcap this module wrote (native order, µs,
    raw IP), else 0."""
    try:
        with open(path, "rb") as f:
            head = f.read(_file_header.size)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return 0
    if len(head) < _file_header.size:
        return 0
    magic, _, _, _, _, _, linktype = _file_header.unpack(head)
    return size if magic == PCAP_MAGIC_US and linktype == LINKTYPE_RAW else 0


# ------------------------------------------------------- wire-sized segments


def wire_segments(p, mtu: int) -> list:
    """A TCP super-segment (IPv4, or IPv6 with TCP right after the fixed
    header) cut into the segments a NIC's TSO would have sent: at most
    ``mtu`` bytes each, the same headers with the sequence number advanced,
    IP total/payload length set, IPv4 IDs counting up, CWR on the first
    segment only, FIN and PSH on the last only, and full IP and TCP
    checksums.  Anything else comes back as it is, alone."""
    n = len(p)
    if n <= mtu or n < 40:
        return [p]
    v = p[0] >> 4
    if v == 4:
        iphl = (p[0] & 15) * 4
        if iphl < 20 or p[9] != 6 or (p[6] & 0x3F) or p[7]:
            return [p]
        end = int.from_bytes(p[2:4], "big") or n   # a TSO packet may carry 0 here
        ipid = int.from_bytes(p[4:6], "big")
    elif v == 6:
        iphl = 40
        if n < 60 or p[6] != 6:
            return [p]
        end = 40 + int.from_bytes(p[4:6], "big")
        if end == 40:
            end = n                                   # jumbo/TSO: the buffer is the packet
    else:
        return [p]
    end = min(end, n)
    tcphl = (p[iphl + 12] >> 4) * 4
    hdr_len = iphl + tcphl
    mss = mtu - hdr_len
    if tcphl < 20 or end <= hdr_len or mss < 8:
        return [p]
    from netstack.wire import checksum as ck

    ip_hdr = bytearray(p[:iphl])
    tcp_hdr = bytearray(p[iphl:hdr_len])
    seq0 = int.from_bytes(tcp_hdr[4:8], "big")
    flags = tcp_hdr[13]
    last_only = flags & 0x09          # FIN, PSH
    payload = memoryview(p)[hdr_len:end]
    src, dst = (bytes(p[12:16]), bytes(p[16:20])) if v == 4 else (bytes(p[8:24]), bytes(p[24:40]))
    pseudo = ck.pseudo4 if v == 4 else ck.pseudo6
    out = []
    total = len(payload)
    for i, off in enumerate(range(0, total, mss)):
        chunk = payload[off:off + mss]
        last = off + mss >= total
        f = flags & ~0x09 | (last_only if last else 0)
        if i:
            f &= ~0x80                    # CWR only on the first segment
        tcp_hdr[4:8] = ((seq0 + off) & 0xFFFFFFFF).to_bytes(4, "big")
        tcp_hdr[13] = f
        tcp_hdr[16:18] = b"\x00\x00"
        seg_len = tcphl + len(chunk)
        csum = ck.checksum(bytes(tcp_hdr) + chunk, pseudo(src, dst, 6, seg_len))
        tcp_hdr[16:18] = csum.to_bytes(2, "big")
        if v == 4:
            ip_hdr[2:4] = (iphl + seg_len).to_bytes(2, "big")
            ip_hdr[4:6] = ((ipid + i) & 0xFFFF).to_bytes(2, "big")
            ip_hdr[10:12] = b"\x00\x00"
            ip_hdr[10:12] = ck.checksum(ip_hdr).to_bytes(2, "big")
        else:
            ip_hdr[4:6] = seg_len.to_bytes(2, "big")
        out.append(bytes(ip_hdr) + bytes(tcp_hdr) + chunk)
    return out


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
        n = 0
        try:
            for ts, buf in reader:
                n += 1
                ip = _ip_payload(linktype, buf)
                if ip is not None:
                    yield float(ts), ip
        except (dpkt.dpkt.Error, struct.error) as exc:
            # a malformed record or block further in (dpkt raises its own errors)
            raise ValueError(f"{path}: malformed capture after packet {n} ({' '.join(str(exc).split())})") from None


__all__ = ["PcapRecorder", "read_pcap", "wire_segments", "LINKTYPE_RAW"]
