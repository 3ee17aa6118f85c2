"""Out-of-order receive data as sorted, disjoint runs (smoltcp's assembler idea).

Positions are absolute stream offsets (plain, unwrapped ints: byte k of the
peer's stream is offset k), so nothing is ever shifted when data is taken.
The receiver stores a segment that starts beyond its next expected offset
with add(); when the gap fills, take(pos) hands back the run that now starts
at (or before) pos.  Each run remembers when it last grew, which orders the
SACK blocks (RFC 2018 §4: the block holding the newest segment first).

Bounded: at most `max_runs` runs; a segment that would need another run is
refused (the caller counts the drop), so a hostile peer cannot make the list
grow without limit.  Total bytes are bounded by the receive window, which
the caller checks before add().
"""

from __future__ import annotations


class Assembler:
    __slots__ = ("runs", "max_runs", "nbytes", "_stamp")

    def __init__(self, max_runs: int = 32):
        self.runs: list = []        # [start, bytearray, stamp] sorted by start, disjoint, non-adjacent
        self.max_runs = max_runs
        self.nbytes = 0
        self._stamp = 0

    def __len__(self) -> int:
        return len(self.runs)

    def __bool__(self) -> bool:
        return bool(self.runs)

    def add(self, start: int, data) -> bool:
        """Store data at stream offset *start*.  Overlaps with stored runs keep
        the stored bytes.  Returns False (nothing stored) when the run limit
        would be exceeded."""
        n = len(data)
        if n == 0:
            return True
        end = start + n
        runs = self.runs
        self._stamp += 1
        stamp = self._stamp
        # first run whose end reaches start (touching or overlapping)
        i = 0
        nr = len(runs)
        while i < nr and runs[i][0] + len(runs[i][1]) < start:
            i += 1
        # runs i..j-1 overlap or touch [start, end]
        j = i
        while j < nr and runs[j][0] <= end:
            j += 1
        if i == j:
            if nr >= self.max_runs:
                return False
            runs.insert(i, [start, bytearray(data), stamp])
            self.nbytes += n
            return True
        first = runs[i]
        last = runs[j - 1]
        new_start = start if start < first[0] else first[0]
        lend = last[0] + len(last[1])
        new_end = end if end > lend else lend
        buf = bytearray()
        pos = new_start
        old = 0
        for k in range(i, j):
            rs, rb = runs[k][0], runs[k][1]
            old += len(rb)
            if pos < rs:                       # new bytes fill the gap before this run
                buf += data[pos - start:rs - start]
                pos = rs
            buf += rb
            pos = rs + len(rb)
        if pos < new_end:
            buf += data[pos - start:]
        runs[i:j] = [[new_start, buf, stamp]]
        self.nbytes += len(buf) - old
        return True

    def take(self, pos: int):
        """If the first run starts at or before *pos*, remove it and return the
        bytes from *pos* on (possibly empty); else None.  Runs entirely
        before pos are discarded."""
        runs = self.runs
        while runs:
            rs, rb, _ = runs[0]
            if rs > pos:
                return None
            del runs[0]
            self.nbytes -= len(rb)
            if rs + len(rb) > pos:
                return bytes(rb[pos - rs:]) if rs < pos else bytes(rb)
        return None

    def blocks(self, limit: int = 4):
        """(start, end) stream offsets of up to *limit* runs, most recently
        grown first (the SACK order of RFC 2018)."""
        runs = self.runs
        if len(runs) <= 1:
            return [(r[0], r[0] + len(r[1])) for r in runs]
        order = sorted(runs, key=lambda r: -r[2])[:limit]
        return [(r[0], r[0] + len(r[1])) for r in order]

    def clear(self) -> None:
        self.runs.clear()
        self.nbytes = 0
