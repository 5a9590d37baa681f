"""Finding cost regressions: each hour, every feature's last day against its own recent baseline.

For each metric and feature the run reads the hourly figures per cell (``telemetry.feature_hours``),
watches the last ``WATCH`` hours against the ``BASELINE`` before them (``detection``), and records a
``CostRegression`` for a sustained rise. A feature-wide change is recorded once for the feature; a
change confined to one model, too diluted to show feature-wide, is recorded for that model. After a
regression the feature's baseline starts again at its start hour, so the new level becomes the
normal one and the same change is not reported twice. Safe to run twice at once: a regression is
unique per (feature, model, metric, start hour).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field

from django.db import IntegrityError, transaction
from django.utils import timezone

from finops.regressions.detection import BASELINE, WATCH, Changepoint, Hours, changepoint_at
from finops.regressions.models import CostRegression, Metric
from finops.telemetry.feature_hours import FeatureHours, hourly_task_costs, hourly_tokens

READERS: dict[str, Callable[..., FeatureHours]] = {
    Metric.TOKENS_PER_REQUEST: hourly_tokens,
    Metric.COST_PER_SUCCESSFUL_TASK: hourly_task_costs,
}


@dataclass
class DetectionResult:
    series: int = 0  # feature (and model) series examined
    found: list[int] = field(default_factory=list)  # CostRegression ids recorded by this run

    def as_dict(self) -> dict[str, int]:
        return {"series": self.series, "found": len(self.found)}


def regressions_detect(*, now: dt.datetime | None = None) -> DetectionResult:
    """Look for a regression in every feature's complete hours before ``now``; record what is found."""
    end = (now or timezone.now()).astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)
    watch_from = end - WATCH
    result = DetectionResult()
    for metric, read in READERS.items():
        figures = read(start=watch_from - BASELINE, end=end)
        resets = _baseline_resets(metric)
        for feature, hours in sorted(figures.items()):
            models = sorted({cell[1] for cells in hours.values() for cell in cells})
            for model in ["", *models]:
                series = hours if not model else _of_model(hours, model)
                result.series += 1
                # A regression restarts the baseline at its start: of its series, and of the feature's
                # models' series when it was feature-wide.
                starts = (resets.get((feature, model)), resets.get((feature, "")))
                since = max((at for at in starts if at is not None), default=None)
                found = changepoint_at(series, end=end, since=since)
                if found is None:
                    continue
                recorded = _record(feature=feature, model=model, metric=metric, found=found)
                if recorded is not None:
                    result.found.append(recorded)
                if not model:
                    break  # found feature-wide: the models' own series would only repeat it
    return result


def _of_model(hours: Hours, model: str) -> dict[dt.datetime, dict[tuple[str, str], tuple[float, float]]]:
    return {hour: kept for hour, cells in hours.items() if (kept := {c: v for c, v in cells.items() if c[1] == model})}


def _baseline_resets(metric: str) -> dict[tuple[str, str], dt.datetime]:
    """Per (feature, model), the start of its latest regression ("" model: feature-wide)."""
    return {(feature, model): started_at for feature, model, started_at in (
        CostRegression.objects.filter(metric=metric).values_list("feature", "model", "started_at")
        .order_by("started_at"))}


def _record(*, feature: str, model: str, metric: str, found: Changepoint) -> int | None:
    """The regression as a row (its alert pending); None if a concurrent run recorded it first."""
    try:
        with transaction.atomic():
            row, created = CostRegression.objects.get_or_create(
                feature=feature, model=model, metric=metric, started_at=found.started_at,
                defaults={"detected_at": found.detected_at, "before": found.before, "after": found.after,
                          "score": found.score})
    except IntegrityError:  # the other run's insert won between our read and write
        return None
    return row.pk if created else None


def regression_acknowledge(*, regression: CostRegression, user: object) -> None:
    """Someone has looked at it: it stays on the charts, marked as acknowledged."""
    if regression.acknowledged_at is None:
        CostRegression.objects.filter(pk=regression.pk, acknowledged_at__isnull=True).update(
            acknowledged_at=timezone.now(), acknowledged_by=user)
