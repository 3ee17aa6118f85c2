"""Open a Linux TUN queue: /dev/net/tun and one TUNSETIFF ioctl.

The whole of what tun2xray needs from the kernel's TUN driver to get a
packet fd, written with ``fcntl.ioctl`` so that installing tun2xray needs no
C compiler (the constants are those of <linux/if_tun.h>, the layout is
``struct ifreq``: a 16-byte name and a short of flags, 40 bytes in all)::

    q = TunFd.open("t0", IFF_TUN | IFF_NO_PI)
    q.name, q.flags, q.fileno()     # the name the kernel used, its flags
    q.close()

Errors are ``OSError`` with the kernel's errno (``ValueError`` for a name the
kernel could not hold); ``linux_tun`` checks names first and turns the
errnos into one-line ``DeviceError`` messages.
"""

from __future__ import annotations

import os
import struct

IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000

TUNSETIFF = 0x400454CA      # _IOW('T', 202, int)
TUNGETIFF = 0x800454D2      # _IOR('T', 210, unsigned int)

TUN_PATH = "/dev/net/tun"
IFNAMSIZ = 16
_IFREQ = struct.Struct("16sH22x")     # ifr_name, ifr_flags, rest of the union


class TunFd:
    """One queue of a TUN: the fd, the interface name and its flags."""

    __slots__ = ("fd", "name", "flags")

    def __init__(self, fd: int, name: str, flags: int):
        self.fd = fd
        self.name = name
        self.flags = flags

    @classmethod
    def open(cls, name: str, flags: int) -> "TunFd":
        """TUNSETIFF on NAME ("" lets the kernel pick tunN): attach to that
        TUN, or create it. OSError (errno set) when the kernel refuses."""
        import fcntl

        raw = name.encode()
        if len(raw) >= IFNAMSIZ:   # struct packing would cut it short silently
            raise ValueError(f"interface name {name!r} is longer than {IFNAMSIZ - 1} bytes")
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
        try:
            req = _IFREQ.pack(raw, flags & 0xFFFF)
            got = fcntl.ioctl(fd, TUNSETIFF, req)
            real = got[:16].split(b"\0", 1)[0].decode()
            _, kflags = _IFREQ.unpack(fcntl.ioctl(fd, TUNGETIFF, _IFREQ.pack(b"", 0)))
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, real, kflags)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
