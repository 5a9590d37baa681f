"""Latency histograms that merge exactly and bound every quantile's relative error (DDSketch).

A value x > 0 falls in bucket ``i = ceil(log_gamma(x))`` with ``gamma = (1 + alpha) / (1 - alpha)``;
reporting the bucket's midpoint ``2 * gamma**i / (gamma + 1)`` is within ``alpha`` (2%) of every
value in it. Buckets are counted in sparse dicts, so histograms of any minutes, tenants or runtimes
merge by adding counts, and the quantile of the merge keeps the same 2% bound. Values below
``MIN_MS`` are counted in the lowest bucket (they are all "under 10 µs").
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Mapping

ALPHA = 0.02
GAMMA = (1 + ALPHA) / (1 - ALPHA)
_LOG_GAMMA = math.log(GAMMA)
MIN_MS = 0.01
MAX_MS = 3_600_000.0  # an hour: longer latencies are clamped into the top bucket
MIN_INDEX = math.ceil(math.log(MIN_MS) / _LOG_GAMMA)
MAX_INDEX = math.ceil(math.log(MAX_MS) / _LOG_GAMMA)


def bucket_index(value_ms: float | None) -> int | None:
    """The sketch bucket of a latency in milliseconds (None stays None: not measured)."""
    if value_ms is None or math.isnan(value_ms):
        return None
    if value_ms <= MIN_MS:
        return MIN_INDEX
    return min(MAX_INDEX, math.ceil(math.log(value_ms) / _LOG_GAMMA))


def bucket_value(index: int) -> float:
    """The value reported for a bucket: within ALPHA of anything counted in it."""
    return 2 * GAMMA**index / (GAMMA + 1)


def merge(histograms: Iterable[Mapping[str | int, int]]) -> dict[int, int]:
    """Add sparse histograms (keys may be strings, as JSON stores them)."""
    merged: dict[int, int] = {}
    for histogram in histograms:
        for key, count in histogram.items():
            index = int(key)
            merged[index] = merged.get(index, 0) + int(count)
    return merged


def quantile(histogram: Mapping[str | int, int], q: float) -> float | None:
    """The q-quantile (0..1) of the values counted, within ALPHA relative error; None if empty."""
    return quantiles(histogram, (q,))[q]


def quantiles(histogram: Mapping[str | int, int], qs: Iterable[float]) -> dict[float, float | None]:
    """Several quantiles of one histogram (as ``quantile``), sorting its buckets once."""
    qs = tuple(qs)
    if any(not 0 <= q <= 1 for q in qs):
        raise ValueError("q must be between 0 and 1")
    if any(isinstance(key, str) for key in histogram):  # as JSON stores them
        histogram = {int(key): int(count) for key, count in histogram.items()}
    indexes = sorted(histogram)
    # cumulative[i]: values counted in the buckets up to indexes[i] (a page computes thousands).
    cumulative = list(itertools.accumulate(histogram[index] for index in indexes))
    total = cumulative[-1] if cumulative else 0
    if total <= 0:
        return dict.fromkeys(qs)
    # The q-quantile is in the first bucket whose cumulative count passes its rank.
    return {q: bucket_value(indexes[min(bisect.bisect_right(cumulative, q * (total - 1)), len(indexes) - 1)])
            for q in qs}
