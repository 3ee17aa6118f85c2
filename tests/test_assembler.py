"""Out-of-order assembler: runs, merging, bounds and SACK block order."""

from hypothesis import given, settings
from hypothesis import strategies as st

from netstack.assembler import Assembler


def test_merge_and_take():
    a = Assembler()
    assert a.add(10, b"abc") and a.add(20, b"xy")
    assert [(r[0], bytes(r[1])) for r in a.runs] == [(10, b"abc"), (20, b"xy")]
    assert a.add(13, b"defghij")             # fills 13..20 exactly: one run
    assert [(r[0], bytes(r[1])) for r in a.runs] == [(10, b"abcdefghijxy")]
    assert a.nbytes == 12
    assert a.take(9) is None                 # a hole at 9
    assert a.take(12) == b"cdefghijxy"       # overlap with what the caller has
    assert not a and a.nbytes == 0


def test_overlap_keeps_stored_bytes_and_counts():
    a = Assembler()
    a.add(5, b"AAAAA")                       # 5..10
    a.add(3, b"bbbbbbbbbbbb")                # 3..15 covers it
    assert [(r[0], bytes(r[1])) for r in a.runs] == [(3, b"bbAAAAAbbbbb")]
    assert a.nbytes == 12


def test_run_limit_refuses():
    a = Assembler(max_runs=2)
    assert a.add(10, b"a") and a.add(20, b"b")
    assert not a.add(30, b"c")               # would need a third run
    assert a.add(11, b"x")                   # touching an existing run is fine
    assert len(a) == 2 and a.nbytes == 3


def test_blocks_most_recent_first():
    a = Assembler()
    a.add(100, b"x" * 10)
    a.add(200, b"y" * 10)
    a.add(300, b"z" * 10)
    assert a.blocks() == [(300, 310), (200, 210), (100, 110)]
    a.add(110, b"w" * 5)                     # grows the first run: it becomes the newest
    assert a.blocks(2) == [(100, 115), (300, 310)]


@settings(max_examples=200)
@given(st.lists(st.tuples(st.integers(1, 200), st.integers(1, 30)), max_size=30))
def test_matches_a_byte_model(segs):
    stream = bytes((i * 7 + 3) & 255 for i in range(300))
    a = Assembler(max_runs=1000)
    have = set()
    for start, n in segs:
        a.add(start, stream[start:start + n])
        have.update(range(start, min(start + n, 300)))
    # runs are sorted, disjoint, non-adjacent and hold the right bytes
    prev_end = -1
    for s, buf, _ in a.runs:
        assert s > prev_end
        assert bytes(buf) == stream[s:s + len(buf)]
        prev_end = s + len(buf)
    assert a.nbytes == len(have) == sum(len(r[1]) for r in a.runs)
    # everything contiguous from 0 comes out once position 0 is filled
    a.add(0, stream[0:1])
    have.add(0)
    got = a.take(0)
    k = 0
    while k in have:
        k += 1
    assert got == stream[:k]
