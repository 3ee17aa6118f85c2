"""fd://N: an inherited packet file descriptor (Android VpnService, Darwin utun).

Raw mode (``fd://N``): one IP packet per read()/write(), as a Linux/Android
TUN fd with IFF_NO_PI delivers them.

AF-header mode (``fd://N?header=af``): each packet is preceded by the address
family as a 4-byte big-endian integer, as Darwin's utun (and the BSDs' tun
with TUNSIFHEAD) frame them. Outgoing packets get AF_INET=2 or AF_INET6=30
(Darwin) / 10 (Linux, ``af6=10``) from their IP version; incoming headers may
use either AF_INET6 numbering, and must agree with the packet's version
nibble, else the packet is dropped and counted in ``rx_bad_header``.

The fd may be anything that keeps packet boundaries: a TUN, a SOCK_DGRAM or
SOCK_SEQPACKET socket, a packet-mode pipe (O_DIRECT). For a datagram socket a
zero-length read is an empty datagram (counted in ``rx_dropped``); for
anything else it is end-of-file.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

from ._base import Device, DeviceError

AF_INET = 2
AF_INET6_DARWIN = 30
AF_INET6_LINUX = 10
# Accepted on read whatever we write: Linux and Darwin numbering.
_AF6_ACCEPTED = (AF_INET6_LINUX, AF_INET6_DARWIN)


def _af_header(af: int) -> bytes:
    return af.to_bytes(4, "big")


def _af_sender(fd: int, hdr4: bytes, hdr6: bytes):
    """The write framing hook: the AF header for the packet's IP version,
    then the packet, in one writev. A packet that is neither IPv4 nor IPv6
    has no address family to carry: rejected (EINVAL) without reaching the
    fd. (A closure: the loop calls it per packet.)"""
    writev = os.writev

    def send(p) -> None:
        version = p[0] >> 4 if p else 0
        if version == 4:
            writev(fd, (hdr4, p))
        elif version == 6:
            writev(fd, (hdr6, p))
        else:
            raise OSError(errno.EINVAL, "not an IPv4 or IPv6 packet")

    return send


class FdDevice(Device):
    """Raw IP packets over an inherited fd."""

    def __init__(self, fd: int, *, name: str, mtu: int, url: str, empty_is_eof: bool):
        super().__init__(fd, name=name, mtu=mtu, url=url, trusted_checksums=False)
        self.empty_read_is_eof = empty_is_eof


class AfHeaderFdDevice(FdDevice):
    """IP packets with a 4-byte address-family header (Darwin utun framing)."""

    framing = "af"

    def __init__(self, fd: int, *, name: str, mtu: int, url: str, empty_is_eof: bool, af6: int):
        super().__init__(fd, name=name, mtu=mtu, url=url, empty_is_eof=empty_is_eof)
        self.af6 = af6
        self._hdr4 = _af_header(AF_INET)
        self._hdr6 = _af_header(af6)
        self._send = _af_sender(fd, self._hdr4, self._hdr6)
        self._unframe = self._strip_af
        # A good packet starts with one of these 5 bytes: the AF header and
        # a first IP byte whose version agrees with it.
        self._valid_prefixes = frozenset(
            [self._hdr4 + bytes([0x40 | low]) for low in range(16)]
            + [_af_header(af) + bytes([0x60 | low]) for af in _AF6_ACCEPTED for low in range(16)]
        )

    def _strip_af(self, p):
        """The read framing hook: header and version nibble checked in one
        set lookup (short frames miss too); disagreements are counted."""
        if p[:5] in self._valid_prefixes:
            return p[4:]
        self.stats["rx_bad_header"] += 1
        return None

def open_fd(url: str, number: str, opts: dict, *, mtu: int | None) -> FdDevice:
    if not number.isdigit():
        raise DeviceError(f"{url}: expected fd://N with N a file descriptor number")
    fd = int(number)
    header = opts.get("header", "none")
    if header not in ("none", "af"):
        raise DeviceError(f"{url}: header={header!r} is not one of: none, af")
    af6_text = opts.get("af6")
    if af6_text is not None:
        if header != "af":
            raise DeviceError(f"{url}: af6= only applies with header=af")
        if af6_text not in ("10", "30"):
            raise DeviceError(f"{url}: af6={af6_text!r} is not 10 (Linux) or 30 (Darwin)")
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise DeviceError(f"{url}: {fd} is not an open file descriptor ({os.strerror(exc.errno)})") from None
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        raise DeviceError(f"{url}: {fd} is a regular file or directory, not a packet device")
    empty_is_eof = True
    if stat.S_ISSOCK(st.st_mode):
        try:
            with socket.socket(fileno=os.dup(fd)) as s:
                kind = s.type
        except OSError as exc:
            raise DeviceError(f"{url}: cannot inspect socket {fd} ({os.strerror(exc.errno)})") from None
        if kind == socket.SOCK_STREAM:
            raise DeviceError(f"{url}: {fd} is a stream socket; packets need a datagram or seqpacket socket")
        empty_is_eof = kind != socket.SOCK_DGRAM
    try:
        os.set_blocking(fd, False)
    except OSError as exc:
        raise DeviceError(f"{url}: cannot make {fd} non-blocking ({os.strerror(exc.errno)})") from None
    mtu = 1500 if mtu is None else mtu
    name = f"fd{fd}"
    if header == "af":
        af6 = int(af6_text) if af6_text is not None else AF_INET6_DARWIN
        return AfHeaderFdDevice(fd, name=name, mtu=mtu, url=url, empty_is_eof=empty_is_eof, af6=af6)
    return FdDevice(fd, name=name, mtu=mtu, url=url, empty_is_eof=empty_is_eof)


__all__ = ["FdDevice", "AfHeaderFdDevice", "open_fd", "AF_INET", "AF_INET6_DARWIN", "AF_INET6_LINUX"]
