"""A feature's hourly figures per cell (tenant, model): what cost-regression detection reads.

Each returns feature -> hour -> (tenant, model) -> (n, total), from the hour rollups and the task
table, so they count what the rollups have counted (complete hours, a minute or so behind).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.db.models import Count, F, Sum
from django.db.models.functions import Trunc

from finops.telemetry.models import ClientTask, Granularity, Rollup
from finops.telemetry.sums import cost_sum, cost_value

FeatureHours = dict[str, dict[dt.datetime, dict[tuple[str, str], tuple[float, float]]]]


def _put(result: FeatureHours, row: dict[str, Any], hour: dt.datetime, n: float, total: float) -> None:
    if n > 0:
        result.setdefault(row["feature"], {}).setdefault(hour, {})[(row["tenant"], row["model"])] = (n, total)


def hourly_tokens(*, start: dt.datetime, end: dt.datetime) -> FeatureHours:
    """Requests a model generated (ok, not from the cache) and their tokens, per feature, hour and cell."""
    rows = (Rollup.objects.filter(granularity=Granularity.HOUR, bucket__gte=start, bucket__lt=end, status_class="ok")
            .values("feature", "bucket", "tenant", "model")
            .annotate(n=Sum(F("requests") - F("cache_hits")),
                      tokens=Sum(F("prompt_tokens") + F("completion_tokens") - F("saved_tokens"))).order_by())
    result: FeatureHours = {}
    for row in rows:
        _put(result, row, row["bucket"], float(row["n"] or 0), float(row["tokens"] or 0))
    return result


def hourly_task_costs(*, start: dt.datetime, end: dt.datetime) -> FeatureHours:
    """Successful tasks and their list cost (every attempt's), per feature, hour of first attempt and cell."""
    rows = (ClientTask.objects.filter(succeeded=True, first_started_at__gte=start, first_started_at__lt=end)
            .annotate(hour=Trunc("first_started_at", "hour", tzinfo=dt.UTC))
            .values("feature", "hour", "tenant", "model").annotate(n=Count("id"), cost=cost_sum("list_cost"))
            .order_by())
    result: FeatureHours = {}
    for row in rows:
        _put(result, row, row["hour"], float(row["n"]), float(cost_value(row["cost"])))
    return result
