"""One memory budget for every byte the stack and its host hold.

A MemoryBudget is a plain counter: the places that buffer bytes add what they
take in and subtract what they let go (`budget.used += n`), at the points
where their buffers grow and shrink, never per byte and never through a
method call on the per-segment path.  What counts:

  TCP   each connection's receive buffer, its out-of-order runs and its send
        buffer (netstack.tcp), released in full when the connection leaves
        the table;
  out   with a limit set, the data segments a flush built for the device,
        until the host takes the output (Stack.take_output);
  host  what the host holds for a flow on top (the engine's held upstream
        chunk and the datagrams queued while a UDP upstream opens).

With a limit set, every window a connection advertises and every write
the host makes into a send buffer is clamped to a share of what is left
(`clamp`): a quarter of the headroom while less than half the budget is
used, an eighth above that, so buffers stop growing as the budget fills.
Every flow may still hold two segments, so none stalls for good waiting for
a window that no event would reopen.  A window already advertised is
honoured (RFC 9293 asks a receiver not to shrink it): the budget can be
passed by what was offered before it filled, which the shares keep small.
At the limit (`full`) new flows are refused and counted by the stack
(drops["memory_budget"]).  A limit of 0 means no budget: callers test
`limit` and skip the clamp.
"""

from __future__ import annotations

class MemoryBudget:
    __slots__ = ("limit", "half", "used", "peak", "out")

    def __init__(self, limit: int = 0):
        self.limit = limit if limit > 0 else 0
        self.half = self.limit >> 1
        self.used = 0
        self.peak = 0
        self.out = 0        # of `used`: data packets built for the device, not yet taken

    @property
    def full(self) -> bool:
        """At (or over) the limit: new flows are refused."""
        return self.used >= self.limit > 0

    def clamp(self, free: int, held: int, seg: int) -> int:
        """*free* (window or send space a flow would offer) cut to its share
        of what is left (a quarter, an eighth above half the budget), but at
        least enough for the flow to hold two segments of *seg* bytes (it
        already holds *held*)."""
        used = self.used
        left = self.limit - used
        if left <= 0:
            room = 0
        elif used < self.half:
            room = left >> 2
        else:
            room = left >> 3
        floor = 2 * seg - held
        if room < floor:
            room = floor
        if room < 0:
            room = 0
        return free if free < room else room

    def sample(self) -> None:
        if self.used > self.peak:
            self.peak = self.used

    def status(self) -> dict:
        return {"budget": self.limit, "used": self.used, "peak": self.peak}
