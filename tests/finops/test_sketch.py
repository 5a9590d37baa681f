"""The latency sketch: every quantile within ALPHA of the exact one, and merging sketches is the
same as sketching the concatenated values (so rollups can add them across minutes and tenants)."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from finops.telemetry import sketch

latency = st.floats(min_value=sketch.MIN_MS, max_value=sketch.MAX_MS, allow_nan=False)
latencies = st.lists(latency, min_size=1, max_size=300)
quantiles = st.floats(min_value=0.0, max_value=1.0)
TOLERANCE = sketch.ALPHA * (1 + 1e-9)  # the bound, plus room for the last bit of a float


def sketch_of(values: list[float]) -> dict[int, int]:
    return dict(Counter(sketch.bucket_index(v) for v in values))


def exact_quantile(values: list[float], q: float) -> float:
    """The order statistic the sketch estimates: the value at rank floor(q * (n - 1))."""
    return sorted(values)[math.floor(q * (len(values) - 1))]


@given(value=latency)
def test_a_bucket_reports_every_value_in_it_within_alpha(value: float) -> None:
    reported = sketch.bucket_value(sketch.bucket_index(value))
    assert abs(reported - value) <= TOLERANCE * value


@given(values=latencies, q=quantiles)
def test_every_quantile_is_within_alpha_of_the_exact_one(values: list[float], q: float) -> None:
    estimate = sketch.quantile(sketch_of(values), q)
    exact = exact_quantile(values, q)
    assert estimate is not None
    assert abs(estimate - exact) <= TOLERANCE * exact


@given(parts=st.lists(latencies, min_size=1, max_size=6), q=quantiles)
def test_merging_sketches_is_sketching_the_concatenation(parts: list[list[float]], q: float) -> None:
    concatenated = [v for part in parts for v in part]
    # Sketches come back from a JSON column with string keys; merge takes either.
    stored = [json.loads(json.dumps(sketch_of(part))) for part in parts]

    merged = sketch.merge(stored)

    assert merged == sketch_of(concatenated)
    assert sketch.merge(reversed(stored)) == merged
    assert sketch.quantile(merged, q) == sketch.quantile(sketch_of(concatenated), q)
    assert abs(sketch.quantile(merged, q) - exact_quantile(concatenated, q)) <= TOLERANCE * exact_quantile(
        concatenated, q)


def test_values_outside_the_range_land_in_the_end_buckets() -> None:
    assert sketch.bucket_index(0.0) == sketch.bucket_index(sketch.MIN_MS / 10) == sketch.MIN_INDEX
    assert sketch.bucket_index(sketch.MAX_MS * 10) == sketch.MAX_INDEX
    assert sketch.bucket_index(None) is None
    assert sketch.bucket_index(float("nan")) is None


def test_one_millisecond_to_ten_minutes_needs_about_330_buckets() -> None:
    assert sketch.bucket_index(600_000) - sketch.bucket_index(1.0) + 1 <= 340


def test_an_empty_sketch_has_no_quantile_and_q_must_be_a_fraction() -> None:
    assert sketch.quantile({}, 0.5) is None
    assert sketch.quantile({"5": 0}, 0.5) is None
    with pytest.raises(ValueError):
        sketch.quantile({5: 1}, 1.5)
