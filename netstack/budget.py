"""One memory budget for every byte the stack and its host hold.

A MemoryBudget is a plain counter: the places that buffer bytes add what they
take in and subtract what they let go (`budget.used += n`), at the points
where their buffers grow and shrink, never per byte and never through a
method call on the per-segment path.  What counts:

  TCP   each connection's receive buffer, its out-of-order runs and its send
        buffer (netstack.tcp), released in full when the connection leaves
        the table;
  host  what the host holds for a flow on top (the engine's held upstream
        chunk and the datagrams queued while a UDP upstream opens).

Above `soft` (half the limit) a flow's advertised window and its send space
are clamped to an eighth of what is left (`clamp`), so buffers stop growing
as the budget fills; every flow may still hold two segments, so none stalls
for good waiting for a window that no event would reopen.  At the limit
(`full`) new flows are refused and counted by the stack
(drops["memory_budget"]).  A limit of 0 means no budget: `soft` is then
out of reach and the clamp never runs.
"""

from __future__ import annotations

_NEVER = 1 << 62


class MemoryBudget:
    __slots__ = ("limit", "soft", "used", "peak")

    def __init__(self, limit: int = 0):
        self.limit = limit if limit > 0 else 0
        self.soft = self.limit >> 1 if self.limit else _NEVER
        self.used = 0
        self.peak = 0

    @property
    def full(self) -> bool:
        """At (or over) the limit: new flows are refused."""
        return self.used >= self.limit > 0

    def clamp(self, free: int, held: int, seg: int) -> int:
        """*free* (window or send space a flow would offer) cut to its share
        of what is left: an eighth of the headroom, but at least enough for
        the flow to hold two segments of *seg* bytes (it already holds *held*)."""
        left = self.limit - self.used
        room = left >> 3 if left > 0 else 0
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
