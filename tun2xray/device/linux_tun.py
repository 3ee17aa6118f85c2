"""tun://NAME: a Linux TUN device (ioctls for the fd, see tunfd.py, and for setup).

Opening: ``TUNSETIFF`` with ``IFF_TUN | IFF_NO_PI`` on NAME attaches to an
existing TUN of that name (a persistent one made by ``ip tuntap add``) or
creates a new one. Which of the two happened is decided by looking the name up
in this network namespace first (``if_nametoindex``). A TUN we created is not
persistent, so closing its fd makes the kernel delete it; ``close()`` checks
and deletes it over netlink if it is somehow still there. A pre-existing TUN
is left as it was (addresses we added stay; it is not brought down).

Setup with interface ioctls (SIOCSIFMTU, SIOCSIFADDR, ...): MTU, addresses
(IPv6 without duplicate address detection, so they are usable at once), a
transmit queue of TX_QUEUE_LEN packets on a TUN we create (the default 500
drops bursts of several plain-TUN flows), link up.  No netlink library stays
in the process: pyroute2 costs ~20 MB of RSS.  The rare netlink deletion in
close() imports it then; pyroute2 0.9's synchronous ``IPRoute`` drives its
own asyncio loop and fails inside a running one (the engine's), so that
work runs in a short-lived thread.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import threading

from ._base import _REJECTED, Device, DeviceError
from .tunfd import IFF_MULTI_QUEUE, IFF_NO_PI, IFF_TUN, IFF_VNET_HDR, TunFd

IFNAMSIZ = 16
TX_QUEUE_LEN = 4096     # packets the kernel queues for us on a TUN we create


def _in_thread(fn):
    """Run fn() in a fresh thread and return its result (or raise its error)."""
    box: dict = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=run, name="tun2xray-netlink", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("result")


def _ifindex(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return 0


def _parse_addresses(url: str, addresses) -> list:
    out = []
    for a in addresses:
        try:
            iface = ipaddress.ip_interface(a)
        except (ValueError, TypeError):
            raise DeviceError(f"{url}: {a!r} is not an address/prefix (e.g. 198.18.0.1/15, fd00:7478::1/64)") from None
        out.append(iface)
    return out


def _quiet_ipv6(name: str) -> None:
    """No IPv6 router solicitations from a TUN we created: nobody answers
    them there and they would only show up as drops in the stack."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/router_solicitations", "w") as f:
            f.write("0")
    except OSError:
        pass  # IPv6 off, or /proc/sys read-only: harmless


SIOCSIFFLAGS, SIOCGIFFLAGS = 0x8914, 0x8913
SIOCSIFMTU, SIOCSIFTXQLEN = 0x8922, 0x8943
SIOCSIFADDR, SIOCSIFNETMASK = 0x8916, 0x891C
IFF_UP = 0x1


def _configure(name: str, mtu: int | None, addrs: list, created: bool = False) -> None:
    """MTU, queue length, addresses and link up with plain ioctls: no netlink
    library in the long-running process (pyroute2 alone costs ~20 MB RSS,
    which a Network-Extension-sized budget cannot spare)."""
    import fcntl
    import struct

    if created:
        _quiet_ipv6(name)
    ifn = name.encode()

    def ioctl(sock, req, arg, what):
        try:
            return fcntl.ioctl(sock.fileno(), req, arg)
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                raise DeviceError(f"tun://{name}: interface vanished during setup") from None
            raise DeviceError(f"tun://{name}: cannot set {what}: {exc.strerror}") from None

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s4:
        if mtu is not None:
            ioctl(s4, SIOCSIFMTU, struct.pack("16si", ifn, mtu), f"MTU {mtu}")
        if created:
            # the kernel's queue towards us: 500 packets overflow as soon as a
            # few plain-TUN flows each have a 1 MB window in flight (measured:
            # 4 iperf3 streams lost 10% of their packets there, and 30% of
            # their throughput to the retransmissions)
            ioctl(s4, SIOCSIFTXQLEN, struct.pack("16si", ifn, TX_QUEUE_LEN), "the queue length")
        for iface in addrs:
            if iface.version != 4:
                continue
            sin = struct.pack("16sHH4s8x", ifn, socket.AF_INET, 0, iface.ip.packed)
            ioctl(s4, SIOCSIFADDR, sin, f"address {iface}")
            mask = struct.pack("16sHH4s8x", ifn, socket.AF_INET, 0, iface.network.netmask.packed)
            ioctl(s4, SIOCSIFNETMASK, mask, f"netmask of {iface}")
        v6 = [i for i in addrs if i.version == 6]
        if v6:
            # no duplicate address detection: the address is usable at once
            # (netlink's IFA_F_NODAD has no ioctl spelling)
            try:
                with open(f"/proc/sys/net/ipv6/conf/{name}/accept_dad", "w") as f:
                    f.write("0")
            except OSError:
                pass
            index = _ifindex(name)
            try:
                s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            except OSError as exc:
                raise DeviceError(f"tun://{name}: cannot add {v6[0]}: IPv6 unavailable ({exc.strerror})") from None
            with s6:
                for iface in v6:
                    req = struct.pack("16sIi", iface.ip.packed, iface.network.prefixlen, index)
                    try:
                        fcntl.ioctl(s6.fileno(), SIOCSIFADDR, req)
                    except OSError as exc:
                        if exc.errno != errno.EEXIST:  # already there: fine
                            raise DeviceError(f"tun://{name}: cannot add address {iface}: {exc.strerror}") from None
        flags = struct.unpack("16sh", ioctl(s4, SIOCGIFFLAGS, struct.pack("16sh", ifn, 0), "flags"))[1]
        ioctl(s4, SIOCSIFFLAGS, struct.pack("16sh", ifn, flags | IFF_UP), "link up")


IFA_F_TENTATIVE = 0x40


def _tentative(name: str, addrs: list) -> bool:
    """Is any of our IPv6 addresses on NAME still tentative (/proc/net/if_inet6)?"""
    ours = {i.ip.packed.hex() for i in addrs if i.version == 6}
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                # address ifindex prefixlen scope flags name
                parts = line.split()
                if len(parts) >= 6 and parts[5] == name and parts[0] in ours \
                        and int(parts[4], 16) & IFA_F_TENTATIVE:
                    return True
    except (OSError, ValueError):
        pass
    return False


def _wait_ipv6_usable(name: str, addrs: list, timeout: float = 2.0) -> None:
    """Even without duplicate address detection the kernel clears an
    address's tentative flag from a work queue after link up, and binding to
    it fails until then (seen under load). Wait for that, bounded, so the
    addresses are usable when the device is handed out."""
    import time

    deadline = time.monotonic() + timeout
    while _tentative(name, addrs) and time.monotonic() < deadline:
        time.sleep(0.005)


def _delete_link(name: str) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if found:
            ipr.link("del", index=found[0])


def _read_mtu(name: str) -> int:
    import fcntl
    import struct

    SIOCGIFMTU = 0x8921
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16si", name.encode(), 0)
        return struct.unpack("16si", fcntl.ioctl(s.fileno(), SIOCGIFMTU, req))[1]


class TunDevice(Device):
    """A local Linux TUN: packets are built by this kernel, checksums trusted."""

    # EIO: the link is down (someone ran `ip link set NAME down`); packets are
    # dropped and counted until it is up again, the device stays usable.
    rejected_errnos = _REJECTED | {errno.EIO}
    # why the kernel refused offloads when they were only wanted (tun:// default)
    offload_refused = None

    def __init__(self, tun, *, name: str, mtu: int, url: str, created: bool, flags: int = 0):
        super().__init__(tun.fileno(), name=name, mtu=mtu, url=url, trusted_checksums=True)
        self._tun = tun
        self._flags = flags
        self.created = created

    @property
    def multiqueue(self) -> bool:
        return bool(self._flags & IFF_MULTI_QUEUE)

    def open_queue(self) -> "TunDevice":
        """Attach one more queue of this multiqueue TUN (``?multiqueue=1``).

        The kernel spreads flows over the queues by hash; each queue is a
        device of its own (one per worker process, opened before forking or
        by opening the same URL in each worker). The interface goes away when
        the last queue of a TUN we created is closed.
        """
        self._check_usable()
        if not self.multiqueue:
            raise DeviceError(f"{self.url}: not a multiqueue TUN (use ?multiqueue=1)")
        tun = _attach(self.url, self.name, self._flags, existed=True)
        try:
            os.set_blocking(tun.fileno(), False)
            if self.offload:
                from .offload import enable_offloads

                enable_offloads(tun.fileno())
        except OSError as exc:
            tun.close()
            raise DeviceError(f"{self.url}: cannot set up another queue: {os.strerror(exc.errno)}") from None
        return type(self)(tun, name=self.name, mtu=self.mtu, url=self.url, created=False, flags=self._flags)

    def _release(self) -> None:
        self._tun.close()
        if self.created and not self.multiqueue and _ifindex(self.name):
            # Normally gone with its last fd; only a persist flag set by
            # someone else keeps it. We made it, so we remove it. (Not for
            # multiqueue: other queues may still be open; the kernel removes
            # it with the last one.)
            try:
                _in_thread(lambda: _delete_link(self.name))
            except Exception:
                pass


def _attach(url: str, name: str, flags: int, *, existed: bool):
    """TUNSETIFF on NAME with flags: a TunFd, or DeviceError with why."""
    try:
        return TunFd.open(name, flags)
    except OSError as exc:
        code = exc.errno
        if code == errno.EPERM or code == errno.EACCES:
            why = "permission denied (needs root or CAP_NET_ADMIN)"
        elif code == errno.EBUSY:
            why = "busy (another process holds this TUN)"
        elif code == errno.EINVAL and existed:
            why = "an interface with this name exists and is not a TUN (or its multiqueue setting differs)"
        elif code == errno.ENOENT:
            why = "/dev/net/tun is missing (no TUN support)"
        else:
            why = exc.strerror or str(exc)
        raise DeviceError(f"{url}: cannot open TUN: {why}") from None


class _OffloadRefused(Exception):
    """TUNSETOFFLOAD failed while offloads were only wanted, not required."""


def open_tun(url: str, name: str, *, mtu: int | None, addresses: list, offload=False,
             multiqueue: bool = False) -> TunDevice:
    """Open tun://NAME. ``offload``: True (required: an error when the kernel
    refuses), False (plain TUN) or "auto" (offloads when the kernel takes
    them, else a plain TUN whose ``offload_refused`` says why)."""
    if len(name.encode()) >= IFNAMSIZ or any(c in name for c in "/: \t\n%"):
        raise DeviceError(f"{url}: {name!r} is not a valid interface name (1-15 characters, no '/', ':', '%' or spaces)")
    addrs = _parse_addresses(url, addresses)
    if offload == "auto":
        try:
            return _open(url, name, mtu, addrs, True, multiqueue, required=False)
        except _OffloadRefused as exc:
            dev = _open(url, name, mtu, addrs, False, multiqueue, required=False)
            dev.offload_refused = str(exc)
            return dev
    return _open(url, name, mtu, addrs, bool(offload), multiqueue, required=True)


def _open(url, name, mtu, addrs, offload, multiqueue, *, required):
    existed = bool(name) and _ifindex(name) != 0
    flags = IFF_TUN | IFF_NO_PI
    if offload:
        flags |= IFF_VNET_HDR
    if multiqueue:
        flags |= IFF_MULTI_QUEUE
    tun = _attach(url, name, flags, existed=existed)
    real_name = tun.name
    created = not existed
    try:
        os.set_blocking(tun.fileno(), False)
        if offload:
            from .offload import enable_offloads

            try:
                enable_offloads(tun.fileno())
            except OSError as exc:
                why = f"the kernel refused TUN offloads: {os.strerror(exc.errno)}"
                if not required:
                    raise _OffloadRefused(why) from None
                raise DeviceError(f"{url}: {why}") from None
        _configure(real_name, mtu, addrs, created)
        _wait_ipv6_usable(real_name, addrs)
        dev_mtu = _read_mtu(real_name)
    except (DeviceError, _OffloadRefused):
        tun.close()
        raise
    except Exception as exc:
        tun.close()
        raise DeviceError(f"{url}: cannot configure {real_name}: {' '.join(str(exc).split())}") from None
    cls = TunDevice
    if offload:
        from .offload import OffloadTunDevice as cls
    return cls(tun, name=real_name, mtu=dev_mtu, url=url, created=created, flags=flags)
