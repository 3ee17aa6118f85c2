"""tun://NAME (offload on by default): a Linux TUN with IFF_VNET_HDR and TCP segmentation offload.

Every packet on the fd is preceded by a 10-byte ``struct virtio_net_hdr``
(host byte order, little-endian here)::

    u8 flags        1 = NEEDS_CSUM: checksum from csum_start, field holds the
                        pseudo-header sum; 2 = DATA_VALID
    u8 gso_type     0 none, 1 TCPv4, 4 TCPv6, 0x80 ECN bit
    u16 hdr_len     IP + TCP header bytes of a super-segment
    u16 gso_size    payload bytes per wire segment
    u16 csum_start  where the transport header starts
    u16 csum_offset where its checksum field sits, from csum_start

With ``TUNSETOFFLOAD(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)`` the kernel hands
over TCP super-segments (up to 64 KB, one header) and packets whose
transport checksum is only partial. This device strips the header and passes
both on as they are: the stack must accept TCP segments larger than the MTU
and must not verify checksums (``trusted_checksums`` is True). Super-segments
read are counted in ``stats["rx_gso"]``.

Writing: packets up to the MTU get an all-zero header (complete packet,
checksums as built). A TCP packet larger than the MTU becomes a GSO packet
(gso_size = MTU - headers, NEEDS_CSUM with the checksum field rewritten to the
pseudo-header sum) so the kernel cuts it into wire-sized segments wherever it
goes; the stack may therefore emit segments of up to ``Device.gso_max``
payload bytes (``StackConfig.gso_max``). Other packets larger than the MTU
are written plainly; locally delivered, the kernel takes them whole.

With ``tx_csum_partial`` (set by the engine together with
``StackConfig.checksum_offload``) the stack leaves every TCP/UDP checksum
to the kernel: those packets go out NEEDS_CSUM (the field already holds the
pseudo-header sum), super-segments with gso_size = the segment size the
stack chose (``GsoSegment.gso_size``: the client's MSS less options), with
no copy and no checksum work in Python.

The stack's super-segments (``netstack.wire.templates.GsoSegment``) carry
their family, TCP offset, header length and segment size, so the header
is built from those without reading the packet; any other packet larger
than the MTU is parsed with ``netstack.wire``.  A packet up to the MTU is
classified by its version/IHL and protocol bytes alone (which cached
NEEDS_CSUM header, if any): tagging every packet instead would cost a copy.

Packets read may carry partial transport checksums (NEEDS_CSUM), so a pcap
recorded from this device shows "bad" checksums for them: replay such a
capture with checksum verification off.
"""

from __future__ import annotations

import fcntl
import os
import struct

from netstack.wire import checksum as _ck
from netstack.wire import ip as _ip
from netstack.wire import tcp as _tcp
from netstack.wire.errors import WireError
from netstack.wire.templates import GsoSegment

from ._base import _FULL, READ_SIZE
from .linux_tun import TunDevice

VNET_HDR_LEN = 10
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_TCPV6 = 4

TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04

GSO_MAX = 65535 - 120  # payload bytes per TCP super-segment we accept from the stack

_vnet = struct.Struct("<BBHHHH")
_ZERO = bytes(VNET_HDR_LEN)


def enable_offloads(fd: int) -> None:
    fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)


def _layout(p):
    """(family, l4_off, hdr_len, end) of a TCP packet: from the packet
    itself when the stack built it (GsoSegment), else parsed (netstack.wire;
    a packet from a host, or built elsewhere).  None for anything but an
    unfragmented TCP packet with a whole header."""
    if type(p) is GsoSegment and p.hdr_len:
        return p.family, p.l4_off, p.hdr_len, len(p)
    try:
        family, proto, l4, end, _src, _dst = _ip.transport(p)
        if proto != 6:
            return None
        tcp_hl = _tcp.unpack(memoryview(p)[:end], l4)[4]
    except WireError:
        return None
    return family, l4, l4 + tcp_hl, end


def gso_header(p, mtu: int):
    """The vnet header for one outgoing packet larger than the MTU, or None if
    it is not a TCP packet the kernel can segment (then it is sent plainly).
    Also returns the packet with its TCP checksum field set as NEEDS_CSUM wants."""
    lay = _layout(p)
    if lay is None:
        return None
    family, l4, hdr_len, end = lay
    gso_size = mtu - hdr_len
    if end <= hdr_len or gso_size < 8:
        return None
    src, dst = _ip.addresses(p, family)
    csum = _ck.partial(src, dst, 6, end - l4)
    buf = bytearray(p)
    buf[l4 + 16] = csum >> 8
    buf[l4 + 17] = csum & 0xFF
    gso_type = VIRTIO_NET_HDR_GSO_TCPV4 if family == 4 else VIRTIO_NET_HDR_GSO_TCPV6
    hdr = _vnet.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, hdr_len, gso_size, l4, 16)
    return hdr, buf


class OffloadTunDevice(TunDevice):
    """TUN with a virtio-net header on every packet (see module docstring)."""

    offload = True
    gso_max = GSO_MAX
    # Set by the engine when the stack leaves TCP/UDP checksums to the device
    # (StackConfig.checksum_offload): every TCP/UDP packet then goes out
    # NEEDS_CSUM, super-segments without a copy.
    tx_csum_partial = False

    def __init__(self, tun, *, name: str, mtu: int, url: str, created: bool, flags: int = 0):
        super().__init__(tun, name=name, mtu=mtu, url=url, created=created, flags=flags)
        self.stats["rx_gso"] = 0
        self.stats["tx_gso"] = 0

    def read_batch(self, max_packets: int = 256) -> list[bytes]:
        self._check_usable()
        out: list[bytes] = []
        append = out.append
        read = os.read
        fd = self._fd
        nbytes = 0
        gso = 0
        runts = 0
        try:
            for _ in range(max_packets):
                p = read(fd, READ_SIZE)
                if len(p) <= VNET_HDR_LEN:
                    runts += 1
                    if not p:
                        break
                    continue
                if p[1]:
                    gso += 1
                append(p[VNET_HDR_LEN:])
                nbytes += len(p) - VNET_HDR_LEN
        except BlockingIOError:
            pass
        except OSError as exc:
            self.stats["rx_gso"] += gso
            self.stats["rx_dropped"] += runts
            return self._read_failed(exc, self._count_rx(out, nbytes))
        self.stats["rx_gso"] += gso
        self.stats["rx_dropped"] += runts
        return self._count_rx(out, nbytes)

    def write_batch(self, packets) -> int:
        self._check_usable()
        writev = os.writev
        fd = self._fd
        mtu = self.mtu
        zero = _ZERO
        partial = self.tx_csum_partial
        csum_hdrs = _CSUM_HDRS
        done = written = nbytes = rejected = gso = 0
        total = len(packets)
        fatal = None
        rejected_errnos = self.rejected_errnos
        while done < total:
            p = packets[done]
            n = len(p)
            hdr = zero
            if partial:
                # transport checksums hold the pseudo-header sum: the kernel
                # completes them (NEEDS_CSUM); fragments and ICMP are complete
                b0 = p[0]
                if b0 == 0x45:
                    key = (20, p[9]) if not ((p[6] & 0x3F) or p[7]) else None
                elif b0 >> 4 == 6:
                    key = (40, p[6])
                else:
                    key = ((b0 & 15) * 4, p[9]) if b0 >> 4 == 4 and not ((p[6] & 0x3F) or p[7]) else None
                if key is not None:
                    if n > mtu and key[1] == 6:
                        g = _gso_partial(p, mtu)
                        if g is not None:
                            hdr = g
                    else:
                        hdr = csum_hdrs.get(key, zero)
            elif n > mtu:
                g = gso_header(p, mtu)
                if g is not None:
                    hdr, p = g
            try:
                writev(fd, (hdr, p))
            except OSError as exc:
                code = exc.errno
                if code in _FULL:
                    break
                if code in rejected_errnos:
                    rejected += 1
                    done += 1
                    continue
                fatal = exc
                break
            written += 1
            nbytes += n
            done += 1
            if hdr[1]:
                gso += 1
        self.stats["tx_gso"] += gso
        return self._count_tx(total, done, written, nbytes, rejected, fatal)


# NEEDS_CSUM headers by (IP header length, protocol): TCP field at +16, UDP at +6
_CSUM_HDRS = {}
for _iphl in range(20, 64, 4):
    _CSUM_HDRS[(_iphl, 6)] = _vnet.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, _iphl, 16)
    _CSUM_HDRS[(_iphl, 17)] = _vnet.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, _iphl, 6)


def _gso_partial(p, mtu: int):
    """vnet header for a TCP super-segment whose checksum field already holds
    the pseudo-header sum (the stack's checksum offload): no copy, no sum.
    gso_size is the segment size the stack chose (the client's MSS less
    options) when it says, else what the MTU leaves."""
    lay = _layout(p)
    if lay is None:
        return None
    family, l4, hdr_len, end = lay
    gso_size = getattr(p, "gso_size", 0) or mtu - hdr_len
    if hdr_len + gso_size > mtu:
        gso_size = mtu - hdr_len
    if end <= hdr_len or gso_size < 8:
        return None
    gso_type = VIRTIO_NET_HDR_GSO_TCPV6 if family == 6 else VIRTIO_NET_HDR_GSO_TCPV4
    return _vnet.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, hdr_len, gso_size, l4, 16)
