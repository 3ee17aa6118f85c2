"""pcap files: record raw IP packets (LINKTYPE_RAW) and read captures back.

Writing is a few lines of struct packing (classic libpcap format, microsecond
timestamps, native byte order), so recording costs one ``Struct.pack`` and two
buffered writes per packet. Reading handles classic pcap in either byte order
with µs or ns timestamps itself and pcapng through dpkt, and unwraps the link
layers a TUN capture is likely to carry (raw IP, Ethernet, Linux cooked v1/v2,
BSD loopback/NULL).  This is the one pcap reader: `tun2xray replay` reads its
captures here (strict), and the file and record layouts below are the ones
`tun2xray.record` merges worker parts with.
"""

from __future__ import annotations

import logging
import os
import struct
import sys
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
# record header (ts_sec, ts_frac, caplen, origlen) in either byte order; ours are native
_REC = {"<": struct.Struct("<IIII"), ">": struct.Struct(">IIII")}
_record_header = _REC["<" if sys.byteorder == "little" else ">"]
FILE_HEADER = _file_header       # for tun2xray.record's merge
RECORD_HEADER = _record_header


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
    """A TCP super-segment (IPv4 or IPv6, parsed with netstack.wire) cut
    into the segments a NIC's TSO would have sent: at most ``mtu`` bytes
    each, the same headers with the sequence number advanced, IP
    total/payload length set, IPv4 IDs counting up, CWR on the first
    segment only, FIN and PSH on the last only, and full IP and TCP
    checksums.  Anything else comes back as it is, alone."""
    n = len(p)
    if n <= mtu or n < 40:
        return [p]
    from netstack.wire import checksum as ck
    from netstack.wire import ip as wip
    from netstack.wire import tcp as wtcp
    from netstack.wire.errors import WireError

    whole = _with_length(p)
    try:
        family, proto, iphl, end, src, dst = wip.transport(whole)
        if proto != 6:
            return [p]
        _sp, _dp, seq0, _ack, tcphl, flags, _w = wtcp.unpack(memoryview(whole)[:end], iphl)
    except WireError:
        return [p]
    hdr_len = iphl + tcphl
    mss = mtu - hdr_len
    if end <= hdr_len or mss < 8:
        return [p]
    ip_hdr = bytearray(whole[:iphl])
    tcp_hdr = bytearray(whole[iphl:hdr_len])
    last_only = flags & 0x09          # FIN, PSH
    payload = memoryview(whole)[hdr_len:end]
    ipid = int.from_bytes(ip_hdr[4:6], "big") if family == 4 else 0
    out = []
    total = len(payload)
    for i, off in enumerate(range(0, total, mss)):
        chunk = payload[off:off + mss]
        last = off + mss >= total
        f = flags & ~0x09 | (last_only if last else 0)
        if i:
            f &= ~0x80                    # CWR only on the first segment
        tcp_hdr[wtcp.OFF_SEQ:wtcp.OFF_SEQ + 4] = ((seq0 + off) & 0xFFFFFFFF).to_bytes(4, "big")
        tcp_hdr[wtcp.OFF_FLAGS] = f
        tcp_hdr[16:18] = b"\x00\x00"
        seg_len = tcphl + len(chunk)
        csum = ck.checksum(bytes(tcp_hdr) + chunk, ck.pseudo(src, dst, 6, seg_len))
        tcp_hdr[16:18] = csum.to_bytes(2, "big")
        if family == 4:
            ip_hdr[2:4] = (iphl + seg_len).to_bytes(2, "big")
            ip_hdr[4:6] = ((ipid + i) & 0xFFFF).to_bytes(2, "big")
            ip_hdr[10:12] = b"\x00\x00"
            ip_hdr[10:12] = ck.checksum(ip_hdr).to_bytes(2, "big")
        else:
            ip_hdr[4:6] = (iphl - 40 + seg_len).to_bytes(2, "big")
        out.append(bytes(ip_hdr) + bytes(tcp_hdr) + chunk)
    return out


def _with_length(p):
    """*p*, or a copy whose IP length field says the buffer's length when a
    TSO packet left it 0 (the buffer is the packet)."""
    from netstack.wire import ipv4, ipv6

    v = p[0] >> 4
    if v == 4:
        off, length = ipv4.OFF_TOTAL_LEN, len(p)
    elif v == 6:
        off, length = ipv6.OFF_PAYLOAD_LEN, len(p) - ipv6.HEADER_LEN
    else:
        return p
    if p[off] or p[off + 1]:
        return p
    b = bytearray(p)
    b[off:off + 2] = min(length, 0xFFFF).to_bytes(2, "big")
    return bytes(b)


def _ip_from_ethernet(buf: bytes) -> bytes | None:
    off = 12
    ethertype = int.from_bytes(buf[off : off + 2], "big")
    while ethertype in (0x8100, 0x88A8) and len(buf) >= off + 6:  # VLAN tags
        off += 4
        ethertype = int.from_bytes(buf[off : off + 2], "big")
    if ethertype in (0x0800, 0x86DD):
        return buf[off + 2 :]
    return None


_RAW_TYPES = frozenset((LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6) + _RAW_ALIASES)
_KNOWN_TYPES = _RAW_TYPES | {LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2, LINKTYPE_NULL,
                             LINKTYPE_LOOP}


def _ip_payload(linktype: int, buf: bytes, strict: bool = False) -> bytes | None:
    """The IP packet inside one captured frame, or None if it carries none.
    strict: a raw-IP frame is returned as captured even when it is not
    IPv4/IPv6 (the caller counts it)."""
    if linktype in _RAW_TYPES:
        ip = buf
        if strict:
            return bytes(ip)
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
        if strict:
            return None if ip is None else bytes(ip)
    else:
        return None
    if not ip or (ip[0] >> 4) not in (4, 6):
        return None
    return bytes(ip)


_MAGICS = {b"\xd4\xc3\xb2\xa1": ("<", 1e6), b"\x4d\x3c\xb2\xa1": ("<", 1e9),
           b"\xa1\xb2\xc3\xd4": (">", 1e6), b"\xa1\xb2\x3c\x4d": (">", 1e9)}


def read_pcap(path: str, *, strict: bool = False) -> Iterator[tuple[float, bytes]]:
    """Yield ``(timestamp, ip_packet)`` for every IP packet in a pcap/pcapng file.

    Classic pcap (either byte order, µs or ns timestamps) is read here,
    pcapng through dpkt.  Frames that carry no IPv4/IPv6 packet (ARP,
    unknown link types) are skipped.  Raises ValueError with a one-line
    reason if the file is not a capture or a record is cut short.

    strict (tools that must see every packet as captured, such as replay):
    also a link type this reader does not know, a packet cut by the
    snapshot length and an implausible record are errors, and raw-IP or
    loopback frames are passed on as they are even when they hold no IP
    packet."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from None
    if len(data) < 4:
        raise ValueError(f"{path}: not a pcap/pcapng file (only {len(data)} bytes)")
    magic = data[:4]
    if magic == b"\x0a\x0d\x0d\x0a":
        yield from _read_pcapng(path, data, strict)
        return
    if magic not in _MAGICS:
        raise ValueError(f"{path}: not a pcap/pcapng file (magic {magic.hex()})")
    order, div = _MAGICS[magic]
    if len(data) < 24:
        raise ValueError(f"{path}: truncated pcap header")
    linktype = int.from_bytes(data[20:24], "little" if order == "<" else "big") & 0x0FFFFFFF
    if linktype not in _KNOWN_TYPES:
        if strict:
            raise ValueError(f"{path}: unsupported link type {linktype}")
        return
    rec = _REC[order]
    off, n, i = 24, len(data), 0
    while off < n:
        i += 1
        if off + 16 > n:
            raise ValueError(f"{path}: truncated record header (packet {i}, offset {off})")
        sec, frac, caplen, origlen = rec.unpack_from(data, off)
        off += 16
        if caplen > SNAPLEN:
            raise ValueError(f"{path}: packet {i}: implausible length {caplen}")
        if off + caplen > n:
            raise ValueError(f"{path}: truncated packet {i} ({n - off} of {caplen} bytes)")
        frame = data[off:off + caplen]
        off += caplen
        if strict and caplen < origlen:
            raise ValueError(f"{path}: packet {i} was cut to {caplen} of {origlen} bytes (snaplen)")
        ip = _ip_payload(linktype, frame, strict)
        if ip is not None:
            yield sec + frac / div, ip


def _read_pcapng(path, data, strict):
    import io

    import dpkt
    try:
        rd = dpkt.pcapng.Reader(io.BytesIO(data))
        linktype = rd.datalink()
        if strict and linktype not in _KNOWN_TYPES:
            raise ValueError(f"{path}: unsupported link type {linktype}")
        out = [(float(ts), _ip_payload(linktype, buf, strict)) for ts, buf in rd]
    except ValueError as e:
        if str(e).startswith(path):
            raise
        raise ValueError(f"{path}: malformed pcapng ({' '.join(str(e).split())})") from None
    except Exception as e:   # dpkt raises assorted errors on malformed blocks
        raise ValueError(f"{path}: malformed pcapng ({type(e).__name__}: {e})") from None
    for ts, ip in out:
        if ip is not None:
            yield ts, ip


__all__ = ["PcapRecorder", "read_pcap", "wire_segments", "LINKTYPE_RAW"]
