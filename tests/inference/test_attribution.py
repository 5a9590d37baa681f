"""A step's measured time and energy are split by tokens and always add up to what was measured."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from inference.engine.attribution import attribute_step_time


@given(measured=st.floats(0, 1e4, allow_nan=False), tokens=st.lists(st.integers(0, 10_000), min_size=1, max_size=64))
def test_shares_add_up_to_the_measured_amount(measured: float, tokens: list[int]) -> None:
    shares = attribute_step_time(measured, tokens)
    assert len(shares) == len(tokens)
    assert all(s >= 0 for s in shares)
    assert math.fsum(shares) == pytest.approx(measured, rel=1e-12, abs=1e-12)


@given(measured=st.floats(0.001, 100), tokens=st.lists(st.integers(1, 1000), min_size=2, max_size=16))
def test_shares_are_proportional_to_tokens(measured: float, tokens: list[int]) -> None:
    shares = attribute_step_time(measured, tokens)
    for share, count in zip(shares, tokens, strict=True):
        assert share == pytest.approx(measured * count / sum(tokens), rel=1e-9, abs=1e-12)


def test_a_prefill_of_many_tokens_carries_most_of_a_mixed_step() -> None:
    assert attribute_step_time(1.0, [90, 10]) == pytest.approx([0.9, 0.1])


def test_no_tokens_splits_evenly_and_no_sequences_gets_nothing() -> None:
    assert attribute_step_time(1.0, [0, 0]) == [0.5, 0.5]
    assert attribute_step_time(1.0, []) == []


def test_negative_inputs_are_refused() -> None:
    with pytest.raises(ValueError):
        attribute_step_time(-1.0, [1])
    with pytest.raises(ValueError):
        attribute_step_time(1.0, [-1])
