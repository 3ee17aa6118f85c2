"""memory_pair(): an in-memory device for tests, with two ends and no threads.

The engine gets ``MemoryDevice``, an ordinary ``Device`` (the same
``read_batch`` / ``write_batch`` / ``fileno`` the engine uses on a TUN); the
test keeps ``MemoryHost``, the other end::

    dev, host = memory_pair(mtu=1500)
    engine = Engine(dev, router)
    host.write([syn])            # packets the engine will read
    ...                          # run the engine's loop
    replies = host.read()        # packets the engine wrote, in order

Readiness is a real fd (the read end of a pipe holds one byte while packets
wait), so the engine polls this device exactly as it polls a TUN and runs on
any event loop, including one with a virtual clock. ``host.capacity`` bounds
how many written packets the host end holds before ``write_batch`` sees the
device full (EAGAIN), for backpressure tests; ``host.close()`` is the host
hanging up (the engine's next read fails, as with a TUN whose peer went
away). Capabilities are whatever the test declares (``memory_pair(caps=)``),
so one test can stand in for an offload TUN and another for a plain one.
"""

from __future__ import annotations

import errno
import os
from collections import deque

from ._base import Capabilities, Device


class MemoryHost:
    """The test's end: write packets in, read what the engine wrote."""

    __slots__ = ("_dev", "out", "capacity", "closed")

    def __init__(self, dev: "MemoryDevice", capacity: int | None):
        self._dev = dev
        self.out: list[bytes] = []     # written by the engine, not yet read
        self.capacity = capacity       # None: unbounded
        self.closed = False

    def write(self, packets) -> None:
        """Queue packets for the engine to read (the fd becomes readable)."""
        dev = self._dev
        if not dev._inq and packets:
            os.write(dev._wake_w, b"\x01")
        dev._inq.extend(bytes(p) for p in packets)

    def read(self) -> list[bytes]:
        """Every packet the engine wrote since the last read, in order."""
        out, self.out = self.out, []
        return out

    def close(self) -> None:
        """The host hangs up: the engine's next read_batch fails."""
        if not self.closed:
            self.closed = True
            if not self._dev._inq:
                os.write(self._dev._wake_w, b"\x01")


class MemoryDevice(Device):
    """The engine's end of memory_pair()."""

    framing = "memory"

    def __init__(self, *, name: str, mtu: int, caps: Capabilities, capacity: int | None):
        r, w = os.pipe()
        os.set_blocking(r, False)
        super().__init__(r, name=name, mtu=mtu, url=f"memory://{name}",
                         trusted_checksums=caps.vouches_for_checksums)
        self._wake_w = w
        self._inq: deque = deque()
        self._caps = caps
        self.checksum_offload_on = False
        self.host = MemoryHost(self, capacity)
        self._send = self._to_host

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    def use_checksum_offload(self) -> bool:
        self.checksum_offload_on = self._caps.checksum_offload
        return self.checksum_offload_on

    def _release(self) -> None:
        os.close(self._fd)
        os.close(self._wake_w)

    def read_batch(self, max_packets: int = 256) -> list[bytes]:
        self._check_usable()
        inq = self._inq
        out = [inq.popleft() for _ in range(min(max_packets, len(inq)))]
        if not inq:
            try:
                os.read(self._fd, 64)     # no more waiting: not readable now
            except BlockingIOError:
                pass
            if self.host.closed:
                return self._read_failed(None, self._count_rx(out, sum(map(len, out))))
        return self._count_rx(out, sum(map(len, out)))

    def _to_host(self, p) -> None:
        host = self.host
        if host.closed:
            raise OSError(errno.EPIPE, "the host end is closed")
        if host.capacity is not None and len(host.out) >= host.capacity:
            raise BlockingIOError(errno.EAGAIN, "the host end is full")
        host.out.append(bytes(p))


def memory_pair(*, mtu: int = 1500, name: str = "mem0", caps: Capabilities | None = None,
                capacity: int | None = None) -> tuple[MemoryDevice, MemoryHost]:
    """A connected (device, host) pair; see the module docstring."""
    dev = MemoryDevice(name=name, mtu=mtu, caps=caps or Capabilities(framing="memory"),
                       capacity=capacity)
    return dev, dev.host
