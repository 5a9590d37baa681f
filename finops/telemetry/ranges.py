"""What a read counts: the filters (a range of whole UTC minutes, tenants, features, models) and
the rollup tiles that cover the range exactly.

A range is tiled at the coarsest granularity that fits it: whole UTC days inside it, whole hours
at its edges, minutes for the rest (``rollup_plan``). Minute rollups are deleted after
``MINUTE_ROLLUP_RETENTION_DAYS``: a range whose minute-sized edge is older than that is widened
outward to whole hours at that edge (``Plan.start``/``Plan.end`` say what was actually counted), so
the answer covers slightly more time instead of silently missing the expired minutes. A
minute-step series that reaches past the retention is refused (``ValueError``): there is nothing
left to draw it from.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

from django.conf import settings
from django.utils import timezone

Dimension = Literal["tenant", "feature", "model"]
Step = Literal["minute", "hour", "day"]

DIMENSIONS: tuple[Dimension, ...] = ("tenant", "feature", "model")
STEPS: tuple[Step, ...] = ("minute", "hour", "day")
STEP_LENGTH = {"minute": dt.timedelta(minutes=1), "hour": dt.timedelta(hours=1), "day": dt.timedelta(days=1)}
# Minute rollups younger than the retention by this margin are trusted to exist, whichever way the
# retention job rounds its cutoff.
MINUTE_RETENTION_MARGIN = dt.timedelta(hours=1)


@dataclass(frozen=True)
class Filters:
    """What to count: requests that started in ``[start, end)`` (minute-aligned, UTC), limited to
    the listed tenants, features and served models (empty: all). The model of a request no model
    served (a rejection) is ``""``."""

    start: dt.datetime
    end: dt.datetime
    tenants: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            moment = getattr(self, name)
            if moment.tzinfo is None or moment.utcoffset() != dt.timedelta(0):
                raise ValueError(f"{name} must be an aware UTC datetime, got {moment!r}")
            if moment.second or moment.microsecond:
                raise ValueError(f"{name} must be on a whole minute, got {moment.isoformat()}")
            object.__setattr__(self, name, moment.astimezone(dt.UTC))
        if self.start >= self.end:
            raise ValueError("start must be before end")
        for name in ("tenants", "features", "models"):
            object.__setattr__(self, name, tuple(getattr(self, name)))


@dataclass(frozen=True)
class Tile:
    """Rollup rows of one granularity whose buckets lie in ``[start, end)``."""

    granularity: Step
    start: dt.datetime
    end: dt.datetime


@dataclass(frozen=True)
class Plan:
    """The range actually counted (wider than asked only where minute rollups have expired) and
    the rollup tiles that cover it exactly."""

    start: dt.datetime
    end: dt.datetime
    tiles: tuple[Tile, ...]


def rollup_plan(*, filters: Filters, coarsest: Step = "day", now: dt.datetime | None = None) -> Plan:
    """Tile the filters' range with rollup buckets no coarser than ``coarsest``: whole UTC days
    inside it, whole hours at its edges, minutes for the rest.

    Where a minute-sized edge is older than ``MINUTE_ROLLUP_RETENTION_DAYS`` (its minute rollups may
    be gone), that edge is moved outward to the hour. With ``coarsest="minute"`` there is no coarser
    fallback, so a range that starts that far back raises ``ValueError``.
    """
    now = now or timezone.now()
    available_from = now - dt.timedelta(days=settings.MINUTE_ROLLUP_RETENTION_DAYS) + MINUTE_RETENTION_MARGIN
    start, end = filters.start, filters.end
    if coarsest == "minute":
        if start < available_from:
            raise ValueError(
                f"minute detail is kept for {settings.MINUTE_ROLLUP_RETENTION_DAYS} days; "
                "use an hourly step for a range that starts earlier"
            )
    else:
        if start < available_from:
            start = floor_to(start, "hour")
        if max(floor_to(end, "hour"), start) < available_from:
            end = ceil_to(end, "hour")
    return Plan(start, end, tuple(_tiles(start, end, coarsest)))


def minute_plan(start: dt.datetime, end: dt.datetime) -> Plan:
    """``rollup_plan`` of ``[start, end)`` widened to whole minutes."""
    return rollup_plan(filters=Filters(start=floor_to(start, "minute"), end=ceil_to(end, "minute")))


def _tiles(start: dt.datetime, end: dt.datetime, coarsest: Step) -> list[Tile]:
    if start >= end:
        return []
    for granularity, finer in (("day", "hour"), ("hour", "minute")):
        if STEPS.index(coarsest) >= STEPS.index(granularity):
            first, last = ceil_to(start, granularity), floor_to(end, granularity)
            if first < last:
                return [*_tiles(start, first, finer), Tile(granularity, first, last), *_tiles(last, end, finer)]
    return [Tile("minute", start, end)]


def steps(plan: Plan, step: Step) -> list[dt.datetime]:
    """The start of every ``step`` that overlaps the plan's range, in order."""
    at = floor_to(plan.start, step)
    starts = []
    while at < plan.end:
        starts.append(at)
        at += STEP_LENGTH[step]
    return starts


_FLOOR_FIELDS = {"minute": {"second": 0, "microsecond": 0},
                 "hour": {"minute": 0, "second": 0, "microsecond": 0},
                 "day": {"hour": 0, "minute": 0, "second": 0, "microsecond": 0}}


def floor_to(moment: dt.datetime, step: str) -> dt.datetime:
    """``moment`` (UTC) rounded down to its ``step``."""
    return moment.replace(**_FLOOR_FIELDS[step])


def ceil_to(moment: dt.datetime, step: str) -> dt.datetime:
    """``moment`` (UTC) rounded up to its ``step``."""
    floor = floor_to(moment, step)
    return floor if floor == moment else floor + STEP_LENGTH[step]


def check_dimension(dimension: str) -> None:
    if dimension not in DIMENSIONS:
        raise ValueError(f"dimension must be one of {DIMENSIONS}, got {dimension!r}")


def check_step(step: str) -> None:
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
