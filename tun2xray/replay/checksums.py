"""The checksums of a capture: what the replay does about the client's
TCP/UDP checksums (ChecksumReport, prepare_checksums: detect checksum
offload and complete them as --checksums says) and the checks of the
packets the stack puts on the wire (_checksum_ok) and of the client
packets the replay rewrites (_fix_tcp_checksum)."""

from __future__ import annotations

import ipaddress

from netstack.wire import checksum as ck
from netstack.wire import ip as wip
from netstack.wire import ipv4 as wip4

# ------------------------------------------------------------------ checksums

CHECKSUM_MODES = ("auto", "verify", "ignore")


class ChecksumReport:
    """What the replay did about the client's TCP/UDP checksums.

    A capture taken on the sending host with checksum offload on (the
    default on most NICs and on veth) holds the client's packets as the
    kernel handed them to the driver: the TCP/UDP checksum field carries
    only the pseudo-header sum ("partial"), the NIC finishes it on the wire.
    The IP header checksum is always complete there.  Modes:

    - verify: feed the packets as captured (the stack drops bad ones);
    - ignore: complete every client TCP/UDP checksum that is wrong while
      the IP header checksum is right;
    - auto (default): do that for a client address whose packets look
      offloaded: at least one carries exactly the partial sum, or at least
      half of its TCP/UDP packets are wrong with a right IP header.  Stray
      damage elsewhere is fed as captured (and dropped by the stack).
    """

    __slots__ = ("mode", "bad_tcp", "bad_udp", "partial", "completed", "offloaded")

    def __init__(self, mode: str):
        self.mode = mode
        self.bad_tcp = 0          # client TCP packets with a wrong checksum (IP header right)
        self.bad_udp = 0
        self.partial = 0          # ... of them carrying exactly the pseudo-header sum
        self.completed = 0        # checksums completed before feeding the stack
        self.offloaded = []       # client addresses treated as offloaded (auto)

    def as_dict(self) -> dict:
        return {"mode": self.mode, "bad_tcp": self.bad_tcp, "bad_udp": self.bad_udp,
                "partial": self.partial, "completed": self.completed,
                "offloaded_clients": [str(ipaddress.ip_address(a)) for a in self.offloaded]}

    def text(self) -> str | None:
        """One line for the report, None when every checksum was right."""
        bad = self.bad_tcp + self.bad_udp
        if not bad:
            return None
        what = _count_text(self.bad_tcp, "TCP") + (" and " if self.bad_tcp and self.bad_udp else "") + \
            _count_text(self.bad_udp, "UDP")
        if self.completed:
            how = ("offloaded (pseudo-header sum only)" if self.partial == bad else
                   f"wrong ({self.partial} pseudo-header sum only)")
            return (f"checksums ({self.mode}): {what} client packets had {how} checksums; "
                    f"{self.completed} completed before the replay"
                    + (" (--checksums verify to refuse them)" if self.mode == "auto" else ""))
        return f"checksums ({self.mode}): {what} client packets had bad checksums, fed as captured"


def _count_text(n, proto) -> str:
    return f"{n} {proto}" if n else ""


def _l4_checksum(p):
    """(field, correct value, pseudo-header sum) of a TCP/UDP packet's
    checksum, or None (UDP over IPv4 without a checksum, bad IPv4 header)."""
    raw = p.raw
    off = p.l4 + ck.CSUM_OFFSET[p.proto]
    field = int.from_bytes(raw[off:off + 2], "big")
    if p.family == 4 and not wip4.header_ok(raw, p.l4):
        return None
    end = p.end
    ps = ck.pseudo(p.src, p.dst, p.proto, end - p.l4)
    if p.proto == 17 and field == 0:
        return None if p.family == 4 else (field, -1, ps)
    seg = bytearray(raw[p.l4:end])
    seg[off - p.l4:off - p.l4 + 2] = b"\x00\x00"
    good = ck.checksum(seg, ps)
    if p.proto == 17 and good == 0:
        good = 0xFFFF
    return field, good, ck.fold(ps)


def prepare_checksums(sequence, rep: ChecksumReport) -> None:
    """Count the client's bad TCP/UDP checksums and, as the mode says,
    complete them in place (Pkt.raw) before the replay feeds them."""
    bad_by_src: dict = {}
    total_by_src: dict = {}
    for p, f, from_client in sequence:
        if f is None or not from_client or p.proto not in (6, 17):
            continue
        total_by_src[p.src] = total_by_src.get(p.src, 0) + 1
        c = _l4_checksum(p)
        if c is None or c[0] == c[1]:
            continue
        field, good, ps = c
        partial = field == ps or field == (~ps & 0xFFFF)
        if p.proto == 6:
            rep.bad_tcp += 1
        else:
            rep.bad_udp += 1
        rep.partial += partial
        p.csum_bad = True
        entry = bad_by_src.setdefault(p.src, [0, []])
        entry[0] += partial
        entry[1].append((p, good))
    if rep.mode == "verify":
        return
    for src, (partial, pkts) in bad_by_src.items():
        if rep.mode == "auto":
            if not partial and 2 * len(pkts) < total_by_src[src]:
                continue
            rep.offloaded.append(bytes(src))
        for p, good in pkts:
            if good < 0:
                continue          # IPv6 UDP without a checksum: not ours to invent
            buf = bytearray(p.raw)
            off = p.l4 + ck.CSUM_OFFSET[p.proto]
            buf[off:off + 2] = good.to_bytes(2, "big")
            p.raw = bytes(buf)
            p.csum_bad = False
            rep.completed += 1


def _fix_tcp_checksum(buf, family, l4):
    """Recompute the TCP checksum of the packet in *buf* (a bytearray) in
    place (family and l4 are the packet's own; kept for the callers)."""
    wip.fill(buf)


def _checksum_ok(p) -> bool:
    raw = p.raw
    if p.family == 4 and not wip4.header_ok(raw, p.l4):
        return False
    seg = memoryview(raw)[p.l4:p.end]
    if p.proto == 1:
        return ck.sum16(seg) == 0xFFFF
    if p.proto == 17 and raw[p.l4 + 6:p.l4 + 8] == b"\x00\x00":
        return p.family == 4      # no UDP checksum: allowed over IPv4 only
    return ck.sum16(seg, ck.pseudo(p.src, p.dst, p.proto, p.end - p.l4)) == 0xFFFF
