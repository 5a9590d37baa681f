"""Reads of cost regressions: the ones a feature's charts mark."""

from __future__ import annotations

import datetime as dt

from finops.regressions.models import CostRegression


def regressions_of(*, feature: str, start: dt.datetime, end: dt.datetime) -> list[CostRegression]:
    """The feature's regressions (feature-wide or of one of its models) that began in ``[start, end)``."""
    return list(CostRegression.objects.filter(feature=feature, started_at__gte=start, started_at__lt=end)
                .order_by("started_at"))
