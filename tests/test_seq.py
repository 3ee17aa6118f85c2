"""Wrapping sequence-number helpers, tested across 2**32."""

from hypothesis import given
from hypothesis import strategies as st

from netstack.seq import in_window, seq_add, seq_ge, seq_gt, seq_le, seq_lt, seq_max, seq_min, seq_sub

M = 2**32


def test_plain_order():
    assert seq_lt(1, 2) and seq_le(1, 2) and seq_le(2, 2) and not seq_lt(2, 2)
    assert seq_gt(2, 1) and seq_ge(2, 1) and seq_ge(2, 2) and not seq_gt(2, 2)


def test_across_the_wrap():
    a = M - 10
    b = 5                     # 15 ahead of a, after wrapping
    assert seq_lt(a, b) and seq_le(a, b) and seq_gt(b, a) and seq_ge(b, a)
    assert not seq_lt(b, a) and not seq_gt(a, b)
    assert seq_add(a, 15) == b and seq_sub(b, a) == 15 and seq_sub(a, b) == -15
    assert seq_max(a, b) == b and seq_min(a, b) == a
    assert in_window(M - 1, a, 15) and in_window(0, a, 15) and in_window(4, a, 15)
    assert not in_window(5, a, 15) and not in_window(a - 1, a, 15)
    assert not in_window(a, a, 0)


@given(st.integers(0, M - 1), st.integers(1, 2**31 - 1))
def test_ahead_is_greater(a, d):
    b = (a + d) % M
    assert seq_lt(a, b) and seq_gt(b, a) and seq_le(a, b) and seq_ge(b, a)
    assert not seq_lt(b, a) and not seq_ge(a, b)
    assert seq_sub(b, a) == d and seq_sub(a, b) == -d
    assert in_window(b, a, d + 1) and not in_window(b, a, d)


@given(st.integers(0, M - 1))
def test_equal(a):
    assert seq_le(a, a) and seq_ge(a, a) and not seq_lt(a, a) and not seq_gt(a, a)
    assert seq_sub(a, a) == 0


@given(st.integers(0, M - 1))
def test_half_way_round_is_negative(a):
    # the one ambiguous distance: TCP's window arithmetic reads it as behind
    b = (a + 2**31) % M
    assert seq_sub(b, a) == -2**31 and seq_sub(a, b) == -2**31
    assert not seq_lt(a, b) and not seq_gt(b, a)
