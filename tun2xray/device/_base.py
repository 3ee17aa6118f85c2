"""Device base: the interface, its capabilities, counters, close, and the
batched read/write loops over one fd.

Every device is a ``Device``: ``read_batch``, ``write_batch``, ``fileno``,
``close``, ``stats`` and ``capabilities`` (a ``Capabilities`` record the
engine reads instead of probing attributes). The one write loop lives here;
a device frames and sends one packet in its ``_send`` hook (raw write, AF
header, vnet header, sendto) and the loop classifies the errors the same way
for all of them.

The loops are the hot path: one ``os.read`` / ``os.write`` per packet, no
per-packet logging or formatting, counters summed per batch. Measured on a
real TUN (2-core VM, 48-byte packets): ``os.read(fd, 65536)`` in a loop drains
about 1.2 M packets/s; ``os.readv`` / ``readinto`` into a preallocated buffer
plus a copy out is slower (0.9-1.0 M/s), so every read allocates its packet.
"""

from __future__ import annotations

import errno
import functools
import os
from dataclasses import dataclass

# Errors that mean "the device cannot take more right now": stop the batch.
_FULL = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS})
# Errors that mean "this one packet is unacceptable": skip it, keep going.
_REJECTED = frozenset({errno.EINVAL, errno.EMSGSIZE, errno.EFAULT})

# Big enough for any IP packet (and a 4-byte AF header, and a GSO super-
# segment). Allocation size does not matter much: os.read shrinks the result.
READ_SIZE = 65536 + 64


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a device declares about itself; the engine reads it once.

    offload          TCP super-segments both ways (a TUN with IFF_VNET_HDR)
    gso_max          largest TCP payload per packet it takes (0: the MTU's)
    vouches_for_checksums  its packets were built by a kernel that checked
                     them: the stack need not verify checksums
    checksum_offload it can complete TCP/UDP checksums the stack leaves
                     partial (``Device.use_checksum_offload()`` turns it on)
    multiqueue       more queues can be attached (``open_queue``)
    pollable         ``fileno()`` is a pollable fd; False: packets are pushed
                     (``Engine.feed``)
    batch_size       packets the engine asks for per ``read_batch``
    framing          what surrounds a packet on the wire: "raw", "af"
                     (4-byte address family), "vnet" (virtio-net header),
                     "datagram" (one per AF_UNIX datagram), "memory"
    """

    offload: bool = False
    gso_max: int = 0
    vouches_for_checksums: bool = False
    checksum_offload: bool = False
    multiqueue: bool = False
    pollable: bool = True
    batch_size: int = 256
    framing: str = "raw"


class DeviceError(Exception):
    """A device could not be opened or is no longer usable (one-line reason)."""


def new_stats() -> dict:
    return {
        "rx_packets": 0,
        "rx_bytes": 0,
        "tx_packets": 0,
        "tx_bytes": 0,
        "tx_dropped": 0,
        "tx_errors": 0,
        "rx_bad_header": 0,
        "rx_dropped": 0,
    }


class Device:
    """A non-blocking packet device over one file descriptor.

    This base class moves raw IP packets, one per read()/write(), which is
    what a Linux TUN with IFF_NO_PI and an Android VpnService fd do.
    Subclasses add framing (fd.py: AF header) or addressing (unix.py).
    """

    # Subclasses that may see a zero-length datagram set this False: for them
    # an empty read is a runt, not end-of-file.
    empty_read_is_eof = True
    # errno values that reject one packet (skip it, count it) rather than end
    # the device; a TUN adds EIO (its link is down).
    rejected_errnos = _REJECTED
    # TUN offloads (offload.py): super-segments in and out. gso_max is the
    # largest TCP payload per packet the device takes (StackConfig.gso_max).
    offload = False
    gso_max = 0
    # what surrounds each packet on the fd (Capabilities.framing)
    framing = "raw"
    # errno values after which nothing in the batch can arrive (the peer is
    # gone): the rest of the batch is rejected at once
    drop_rest_errnos: frozenset = frozenset()

    def __init__(self, fd: int, *, name: str, mtu: int, url: str, trusted_checksums: bool = False):
        self.name = name
        self.mtu = mtu
        self.url = url
        self.trusted_checksums = trusted_checksums
        self.stats = new_stats()
        self._fd = fd
        self._closed = False
        self._pending_error: DeviceError | None = None
        # the per-device framing hooks: frame and send one packet (OSError on
        # failure); read one frame; a frame -> a packet (None: dropped, counted)
        self._send = functools.partial(os.write, fd)
        self._recv = functools.partial(os.read, fd, READ_SIZE)
        self._unframe = None

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(offload=self.offload, gso_max=self.gso_max,
                            vouches_for_checksums=self.trusted_checksums,
                            checksum_offload=False, multiqueue=False, framing=self.framing)

    def use_checksum_offload(self) -> bool:
        """Leave TCP/UDP checksums to the device from now on, if it can
        (``capabilities.checksum_offload``); returns whether it does."""
        return False

    # -- plumbing -------------------------------------------------------------

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._fd}"
        return f"<{type(self).__name__} {self.url} mtu={self.mtu} {state}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        if self._closed:
            raise DeviceError(f"{self.url}: device is closed")
        return self._fd

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._release()
        finally:
            self._fd = -1

    def _release(self) -> None:
        """Give back what open took (fd, interface, socket file)."""
        os.close(self._fd)

    def _gone(self, what: str) -> DeviceError:
        return DeviceError(f"{self.url}: {what}")

    def _check_usable(self) -> None:
        if self._closed:
            raise DeviceError(f"{self.url}: device is closed")
        err = self._pending_error
        if err is not None:
            raise err

    def _read_failed(self, exc: OSError | None, out: list) -> list:
        """Fatal read error (or EOF when exc is None): keep it for the next call
        if some packets were read, else raise now."""
        if exc is None:
            err = self._gone("end of file (the host closed its end)")
        else:
            err = self._gone(f"read failed: {os.strerror(exc.errno) if exc.errno else exc}")
        self._pending_error = err
        if out:
            return out
        raise err

    # -- hot path ---------------------------------------------------------------

    def read_batch(self, max_packets: int = 256) -> list[bytes]:
        """Read up to ``max_packets`` packets, stopping early at EAGAIN.
        ``self._recv`` reads one frame; ``self._unframe`` (None for raw
        packets) turns it into a packet, or None for a frame it dropped and
        counted."""
        self._check_usable()
        out: list[bytes] = []
        append = out.append
        recv = self._recv
        unframe = self._unframe
        nbytes = 0
        try:
            for _ in range(max_packets):
                p = recv()
                if not p:
                    if self.empty_read_is_eof:
                        return self._read_failed(None, self._count_rx(out, nbytes))
                    self.stats["rx_dropped"] += 1
                    continue
                if unframe is not None:
                    p = unframe(p)
                    if p is None:
                        continue
                append(p)
                nbytes += len(p)
        except BlockingIOError:
            pass
        except OSError as exc:
            return self._read_failed(exc, self._count_rx(out, nbytes))
        return self._count_rx(out, nbytes)

    def _count_rx(self, out: list, nbytes: int) -> list:
        stats = self.stats
        stats["rx_packets"] += len(out)
        stats["rx_bytes"] += nbytes
        return out

    def write_batch(self, packets) -> int:
        """Write packets in order without blocking; see the package docstring
        for the return value and counters. ``self._send`` frames and writes
        one packet; its errors are classified here for every device."""
        self._check_usable()
        send = self._send
        done = 0
        total = len(packets)
        try:
            # the common case, every packet taken: nothing to classify or count per packet
            for p in packets:
                send(p)
                done += 1
        except OSError as exc:
            failed = exc            # packets[done] was not taken: classified below, not sent again
        else:
            return self._count_tx(total, total, total, sum(map(len, packets)), 0, None)
        written = done
        nbytes = sum(map(len, packets[:done])) if done else 0
        rejected = 0
        fatal: OSError | None = None
        rejected_errnos = self.rejected_errnos
        while done < total:
            p = packets[done]
            try:
                if failed is not None:
                    exc, failed = failed, None
                    raise exc
                send(p)
            except OSError as exc:
                code = exc.errno
                if code in _FULL:
                    break
                if code in rejected_errnos:
                    rejected += 1
                    done += 1
                    continue
                if code in self.drop_rest_errnos:
                    rejected += total - done
                    done = total
                    break
                fatal = exc
                break
            written += 1
            nbytes += len(p)
            done += 1
        return self._count_tx(total, done, written, nbytes, rejected, fatal)

    def _count_tx(self, total, done, written, nbytes, rejected, fatal) -> int:
        stats = self.stats
        stats["tx_packets"] += written
        stats["tx_bytes"] += nbytes
        stats["tx_errors"] += rejected
        stats["tx_dropped"] += rejected + (total - done)
        if fatal is not None:
            err = self._gone(f"write failed: {os.strerror(fatal.errno) if fatal.errno else fatal}")
            self._pending_error = err
            raise err
        return done
