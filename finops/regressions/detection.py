"""A sustained rise in one of a feature's hourly cost figures, found the day it starts.

The method (docs/BENCHMARKS.md measures it; docs/DASHBOARDS.md explains it to a reader):

1. **Normalise by mix.** A figure is a ratio of hourly sums — tokens ÷ requests, cost ÷ successful
   tasks — kept per *cell* (a tenant and model of the feature), since the cells' levels differ: a
   tenant with long documents, a bigger model. Each cell's baseline level is its mean over the
   baseline hours, leaving out hours whose mean is off the cell's median hourly mean by more than
   a factor of ``OUTLIER_FACTOR`` (a batch job's hour). An hour's *index* is what the hour's cells added up to
   against what their baseline levels predict for the same counts: ``Σ total ÷ Σ n·level``. A shift in
   the mix (more traffic from the long-document tenant) leaves it at 1; only a change of level moves it.
2. **Standardise robustly.** Each cell's *spread* (one unit's deviation relative to its level) is
   the median absolute deviation of its baseline hours' means times √n; an hour's index then has
   the standard deviation its cells' spreads and counts give at that hour's mix — a night hour of
   two requests is not held to a noon hour of two hundred. If the baseline hours' own z-scores
   spread wider than that (MAD again: one bad hour cannot widen it), every deviation is widened by
   as much. Deviations are floored at ``MIN_HOURLY_SD`` so that near-constant traffic does not turn
   a 1% wobble into an alarm, and each hour's z-score is clipped at ±``CLIP``, so one outlier hour
   alone can never reach the threshold.
3. **One-sided CUSUM** over the watched hours: ``S = max(0, S + z − K)``; an alarm when ``S > H``.
   The change began in the first hour after ``S`` was last 0 (the CUSUM's own estimate of the
   changepoint). ``K`` = 1 lets pass the hours a few skewed values push up by a standard deviation
   or so (hourly means of a handful of requests have a long upper tail); ``H`` = 6 then takes at
   least three hours at the clip, or a day of +1.25σ, and keeps a false alarm of a stable series
   rare (BENCHMARKS.md: the rate measured on generated traffic).

The size is reported as before/after levels at the same mix: *before* is what the hours since
the change would have averaged at the baseline levels, *after* what they did average.
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

K = 1.0
H = 6.0
CLIP = 3.5
MIN_HOURLY_SD = 0.02  # a 2% wobble of an hour's index is never more than one standard deviation
MIN_BASELINE_HOURS = 24
OUTLIER_FACTOR = 2.0
DEFAULT_SPREAD = 1.0  # a cell with too few baseline hours to measure its spread: assume a wide one
MIN_SPREAD = 0.05
HOUR = dt.timedelta(hours=1)
WATCH = dt.timedelta(hours=24)  # an hourly check watches the last day...
BASELINE = dt.timedelta(days=7)  # ...against the week before it

# hour -> cell -> (n, total): requests and their tokens, or successful tasks and their cost.
Hours = Mapping[dt.datetime, Mapping[Hashable, tuple[float, float]]]


@dataclass(frozen=True)
class Changepoint:
    started_at: dt.datetime  # the first hour at the new level
    detected_at: dt.datetime  # the end of the hour whose figures raised the alarm
    before: float  # per unit, at the hours' own mix, at the baseline levels
    after: float  # per unit, as measured from started_at to the alarm
    score: float  # the CUSUM when it crossed H

    @property
    def change(self) -> float:
        """The relative change, +0.35 for 35% more."""
        return self.after / self.before - 1 if self.before else math.inf


@dataclass(frozen=True)
class CellBaseline:
    level: float  # per unit (request, task)
    spread: float  # one unit's standard deviation relative to the level


def cell_baselines(hours: Hours) -> dict[Hashable, CellBaseline]:
    """Each cell's baseline: its level is its total over its count, over the hours whose own mean is
    within a factor of ``OUTLIER_FACTOR`` of its median hourly mean (an outlier hour is left out); its
    spread is the robust deviation (MAD) of those hours' means from the level, times √n."""
    means: dict[Hashable, list[tuple[float, float, float]]] = {}
    for cells in hours.values():
        for cell, (n, total) in cells.items():
            if n > 0:
                means.setdefault(cell, []).append((total / n, n, total))
    baselines = {}
    for cell, values in means.items():
        middle = statistics.median(mean for mean, _, _ in values)
        kept = [(m, n, t) for m, n, t in values if middle / OUTLIER_FACTOR <= m <= middle * OUTLIER_FACTOR]
        count, total = sum(n for _, n, _ in kept), sum(t for _, _, t in kept)
        if count <= 0 or total <= 0:
            continue
        level = total / count
        spread = DEFAULT_SPREAD
        if len(kept) >= 3:
            spread = max(MIN_SPREAD, _mad([(m / level - 1) * math.sqrt(n) for m, n, _ in kept]))
        baselines[cell] = CellBaseline(level, spread)
    return baselines


def _mad(values: list[float]) -> float:
    """The median absolute deviation, scaled to a normal distribution's standard deviation."""
    middle = statistics.median(values)
    return 1.4826 * statistics.median(abs(v - middle) for v in values)


@dataclass(frozen=True)
class HourIndex:
    observed: float
    expected: float
    count: float
    sd: float  # of observed / expected, relative, from the cells' spreads at this hour's mix

    def z(self) -> float:
        """How far the hour is from its baseline, in its own standard deviations: the ratio's log,
        taken as lognormal with the hour's spread (so a few skewed values are not read as a rise)."""
        log_sd = max(math.sqrt(math.log1p(self.sd ** 2)), MIN_HOURLY_SD)
        ratio = max(self.observed, self.expected * 1e-6) / self.expected
        return (math.log(ratio) + log_sd ** 2 / 2) / log_sd


def _hour_index(cells: Mapping[Hashable, tuple[float, float]], baselines: Mapping[Hashable, CellBaseline]
                ) -> HourIndex | None:
    """An hour's cells that have a baseline, added up against it."""
    observed = expected = count = variance = 0.0
    for cell, (n, total) in cells.items():
        base = baselines.get(cell)
        if base is None or n <= 0:
            continue  # a cell new since the baseline cannot be normalised yet
        observed += total
        expected += n * base.level
        count += n
        variance += n * (base.spread * base.level) ** 2
    if count <= 0 or expected <= 0:
        return None
    return HourIndex(observed, expected, count, math.sqrt(variance) / expected)


def changepoint_find(*, baseline: Hours, watched: Hours) -> Changepoint | None:
    """The first sustained rise in ``watched`` against ``baseline`` (both hour -> cell -> (n, total)),
    or None: none, or too little baseline (fewer than ``MIN_BASELINE_HOURS`` hours with figures)."""
    baselines = cell_baselines(baseline)
    base = [i for cells in baseline.values() if (i := _hour_index(cells, baselines)) is not None]
    if len(base) < MIN_BASELINE_HOURS:
        return None
    scores = [i.z() for i in base]
    centre = statistics.median(scores)
    # How far the baseline hours' own z-scores spread: never trust the model to be tighter than the data.
    inflation = max(1.0, _mad(scores))
    score, start = 0.0, None
    observed = expected = count = 0.0
    for hour in sorted(watched):
        index = _hour_index(watched[hour], baselines)
        if index is None:
            continue
        z = max(-CLIP, min(CLIP, (index.z() - centre) / inflation))
        if score == 0.0:
            start, observed, expected, count = hour, 0.0, 0.0, 0.0
        score = max(0.0, score + z - K)
        observed, expected, count = observed + index.observed, expected + index.expected, count + index.count
        if score > H and start is not None:
            return Changepoint(started_at=start, detected_at=hour + HOUR, before=expected / count,
                               after=observed / count, score=score)
    return None


def changepoint_at(hours: Hours, *, end: dt.datetime, since: dt.datetime | None = None) -> Changepoint | None:
    """The check made at ``end`` (an hour boundary): the ``WATCH`` hours before it against the
    ``BASELINE`` before those, which starts at ``since`` at the earliest (a previous regression's
    start: its new level is the normal one from then on)."""
    watch_from = end - WATCH
    baseline_from = max(watch_from - BASELINE, since) if since else watch_from - BASELINE
    return changepoint_find(
        baseline={h: c for h, c in hours.items() if baseline_from <= h < watch_from},
        watched={h: c for h, c in hours.items() if max(watch_from, baseline_from) <= h < end})
