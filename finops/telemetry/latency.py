"""Latency: quantiles of end-to-end latency and time to first token over a range, in total and per
step, from the rollups' sketches plus the raw tail's bucketed values (``sources``).

Sketches merge by addition (``sketch``), so a quantile is within ``sketch.ALPHA`` relative error of
the exact quantile of the same requests however the range is tiled.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from django.db import connection
from django.db.models import Count, DateTimeField, F, QuerySet, Value
from django.db.models.functions import Trunc

from finops.telemetry import sketch
from finops.telemetry.ranges import Filters, Plan, Step, check_step, floor_to, rollup_plan, steps
from finops.telemetry.sources import fetch_rows, moments, read_rollups, rollup_rows, tail_events

Metric = Literal["e2e", "ttft"]
METRICS: tuple[Metric, ...] = ("e2e", "ttft")
QUANTILES = (0.5, 0.95, 0.99)
Histograms = dict[dt.datetime | None, dict[int, int]]


def latency_percentiles(
    *, filters: Filters, metric: Metric = "e2e", quantiles: Iterable[float] = QUANTILES
) -> dict[float, float | None]:
    """Quantiles of end-to-end latency or time to first token, in milliseconds.

    Rollup histograms and the tail's values (bucketed with ``sketch.bucket_index``, counted by the
    database) are merged into one sketch, so each quantile is within 2% (``sketch.ALPHA``) relative
    error of the exact quantile of the same requests, however the range is tiled. A quantile is
    None when no request in range had the metric measured (e.g. TTFT of rejected requests).
    """
    quantiles = tuple(quantiles)
    merged = _histograms(filters=filters, metric=metric, plan=rollup_plan(filters=filters), step=None)
    histogram = merged.get(None, {})
    return sketch.quantiles(histogram, quantiles)


@dataclass(frozen=True)
class LatencyPoint:
    at: dt.datetime  # the step's first moment
    requests: int  # requests with the metric measured in the step
    quantiles: dict[float, float | None]  # None where the step has none


def latency_series(
    *, filters: Filters, metric: Metric = "e2e", step: Step = "hour", quantiles: Iterable[float] = QUANTILES
) -> list[LatencyPoint]:
    """``latency_percentiles`` per ``step`` of the range (every step present, in order), from one
    grouped read of the rollups and one of the tail — not one query per point. Partial first and
    last steps are as in ``usage.usage_series``."""
    return latency_summary(filters=filters, metric=metric, step=step, quantiles=quantiles).points


@dataclass(frozen=True)
class LatencySummary:
    overall: dict[float, float | None]  # what latency_percentiles says over the whole range
    points: list[LatencyPoint]  # what latency_series says


def latency_summary(
    *, filters: Filters, metric: Metric = "e2e", step: Step = "hour", quantiles: Iterable[float] = QUANTILES
) -> LatencySummary:
    """``latency_percentiles`` and ``latency_series`` together, from the series' one read: the
    range's sketch is its steps' sketches added up (sketches merge exactly)."""
    check_step(step)
    quantiles = tuple(quantiles)
    plan = rollup_plan(filters=filters, coarsest=step)
    merged = _histograms(filters=filters, metric=metric, plan=plan, step=step)
    points = []
    for at in steps(plan, step):
        histogram = merged.get(at, {})
        points.append(LatencyPoint(at=at, requests=sum(histogram.values()),
                                   quantiles=sketch.quantiles(histogram, quantiles)))
    overall: dict[int, int] = {}
    for histogram in merged.values():
        for index, count in histogram.items():
            overall[index] = overall.get(index, 0) + count
    return LatencySummary(sketch.quantiles(overall, quantiles), points)


def _histograms(*, filters: Filters, metric: Metric, plan: Plan, step: Step | None) -> Histograms:
    """The metric's merged sketch histogram per step start (one, keyed None, without a step)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    hist_field, bucket_field, value_field = f"{metric}_hist", f"{metric}_bucket", f"{metric}_ms"

    def add(merged: Histograms, at: dt.datetime | None, index: int, count: int) -> None:
        histogram = merged.setdefault(at, {})
        histogram[index] = histogram.get(index, 0) + count

    def read() -> Histograms:
        rolled: Histograms = {}
        for at, index, count in _summed_histograms(rollup_rows(plan, filters)[0], hist_field, step=step):
            rolled.setdefault(at, {})[index] = count  # one row per (step, index)
        return rolled

    watermark, merged = read_rollups(read, empty={})
    tail = tail_events(plan, filters, watermark)
    at = Trunc("started_at", step, tzinfo=dt.UTC) if step else Value(None, output_field=DateTimeField())
    moment = moments()
    for row in fetch_rows(tail.filter(**{f"{bucket_field}__isnull": False}).values(at=at, index=F(bucket_field))
                          .annotate(count=Count("id")).order_by()):
        add(merged, moment(row["at"]), row["index"], row["count"])
    # Ingest buckets every event on arrival; an event stored without its bucket is bucketed here.
    unbucketed = tail.filter(**{f"{bucket_field}__isnull": True, f"{value_field}__isnull": False})
    for started, value in unbucketed.values_list("started_at", value_field):
        add(merged, floor_to(started.astimezone(dt.UTC), step) if step else None, sketch.bucket_index(value), 1)
    return merged


# Sparse histograms are added up by the database: a month of day rows is tens of thousands of
# JSON documents, too many to decode in Python within a page load.
_HISTOGRAM_SUM_SQL = {
    "postgresql": "SELECT {bucket}, h.key::int, SUM(h.value::bigint)::bigint FROM ({rows}) r "
                  "CROSS JOIN LATERAL jsonb_each_text(r.hist) h GROUP BY 1, 2",
    "sqlite": "SELECT {bucket}, CAST(h.key AS INTEGER), SUM(h.value) FROM ({rows}) r, json_each(r.hist) h "
              "GROUP BY 1, 2",
}


def _summed_histograms(rows: QuerySet[Any], hist_field: str, *,
                       step: Step | None) -> list[tuple[dt.datetime | None, int, int]]:
    """``(step start, sketch index, count)`` summed over ``rows`` — per ``step`` (the rollup
    buckets folded into it by the database), or over all of them with step start None."""
    at = Trunc("bucket", step, tzinfo=dt.UTC) if step else Value(None, output_field=DateTimeField())
    values = rows.order_by().values(at=at, hist=F(hist_field))
    template = _HISTOGRAM_SUM_SQL.get(connection.vendor)
    if template is None:
        summed: dict[tuple[dt.datetime | None, int], int] = {}
        for row in values:
            for index, count in sketch.merge([row["hist"]]).items():
                key = (row["at"].astimezone(dt.UTC) if step else None, index)
                summed[key] = summed.get(key, 0) + count
        return [(*key, count) for key, count in summed.items()]
    sql, params = values.query.sql_with_params()
    moment = moments()
    with connection.cursor() as cursor:
        cursor.execute(template.format(rows=sql, bucket="r.at" if step else "NULL"), params)
        return [(moment(at), key, count) for at, key, count in cursor.fetchall() if count]
