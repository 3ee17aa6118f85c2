"""An asyncio loop on a virtual clock, and an engine on the in-memory device.

``VirtualClockLoop`` is a plain selector loop whose ``time()`` is a number
the loop moves itself: whenever nothing is ready (no callback queued, no fd
readable on a zero-timeout select), the clock jumps to the next timer. Real
sockets still work (loopback delivers at once, so a zero-timeout select sees
what a peer on the same loop sent), but no test waits for the wall clock: a
1 s connect timeout fires as soon as everything else is idle. A test that
waits for something that never comes fails when the virtual deadline
passes, not after minutes of real time. Everything the test runs must live
on this loop (no threads, no executor).

``EngineHarness`` runs a real Engine on a ``memory_pair()`` device inside such a
loop: ``send`` puts packets into the device, ``expect(pred)`` runs the loop
until the engine writes a matching packet (or the virtual deadline passes).
"""

from __future__ import annotations

import asyncio
import selectors

from helpers import parse_packet

from tun2xray.device import memory_pair
from tun2xray.engine import Engine
from tun2xray.rules import Router
from tun2xray.upstream.url import parse_upstream


class _VirtualSelector(selectors.DefaultSelector):
    """Never blocks: a select with nothing ready moves the loop's clock to
    the timeout (the next timer) instead of sleeping."""

    def __init__(self):
        super().__init__()
        self.loop = None
        self.jumps = 0

    def select(self, timeout=None):
        events = super().select(0)
        if events or timeout is None or timeout <= 0:
            if not events and timeout is None:
                # nothing scheduled and nothing ready: only a real fd can wake
                # us; wait for it (a test's deadline timer is always scheduled)
                return super().select(timeout)
            return events
        self.loop._vnow += timeout
        self.jumps += 1
        return events


class VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self, start: float = 1000.0):
        sel = _VirtualSelector()
        super().__init__(sel)
        sel.loop = self
        self._vnow = start
        self.selector = sel

    def time(self) -> float:
        return self._vnow


def run_virtual(coro_fn):
    """Run ``coro_fn(loop)`` to completion on a fresh VirtualClockLoop."""
    loop = VirtualClockLoop()
    try:
        return loop.run_until_complete(coro_fn(loop))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


class EngineHarness:
    """A real Engine on the in-memory device, on the running (virtual) loop."""

    def __init__(self, proxy_url: str, *, connect_timeout: float = 1.0, capacity=None,
                 stack_config=None, **dev):
        self.dev, self.host = memory_pair(capacity=capacity, **dev)
        router = Router(default=parse_upstream(proxy_url), default_url=proxy_url, rules=[])
        self.engine = Engine(self.dev, router, connect_timeout=connect_timeout, stack_config=stack_config)
        self.written = asyncio.Event()
        self.host_notify()
        self.task = None
        self._backlog = []        # packets read from the device, not yet matched

    def host_notify(self) -> None:
        """Wake expect() whenever the engine writes a packet."""
        send = self.dev._send

        def send_and_wake(p):
            send(p)
            self.written.set()

        self.dev._send = send_and_wake

    async def start(self):
        self.task = asyncio.ensure_future(self.engine.run())
        await asyncio.sleep(0)
        return self

    async def stop(self):
        self.engine.stop()
        await self.task
        self.dev.close()

    def send(self, *packets) -> None:
        self.host.write(packets)

    async def expect(self, pred, timeout: float = 5.0):
        """The first TCP/IPv4 packet from the engine that satisfies pred
        (packets before it are dropped, packets after it kept for the next
        call), or AssertionError at the virtual deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self._backlog += self.host.read()
            while self._backlog:
                p = self._backlog.pop(0)
                if p[0] >> 4 == 4 and p[9] == 6:
                    s = parse_packet(p)
                    if pred(s):
                        return s
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError("no matching packet from the engine")
            self.written.clear()
            try:
                await asyncio.wait_for(self.written.wait(), left)
            except (asyncio.TimeoutError, TimeoutError):
                pass

    def status(self) -> dict:
        return self.engine.status()
