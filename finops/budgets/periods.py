"""Budget periods in the organisation's time zone: a day, an ISO week (from Monday) or a calendar
month, each starting at local midnight and resetting exactly at the next one.

A period is half-open, ``[start, end)``, in UTC. Across a daylight-saving change a local day is 23
or 25 hours long; where local midnight does not exist (a zone that springs forward at midnight) the
period starts at the first local instant of the day, which is the moment of the transition.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass

from finops.lib.timezones import org_time_zone

DAILY, WEEKLY, MONTHLY = "daily", "weekly", "monthly"
PERIOD_NOUNS = {DAILY: "day", WEEKLY: "week", MONTHLY: "month"}


@dataclass(frozen=True)
class Period:
    kind: str
    start: dt.datetime  # UTC, inclusive
    end: dt.datetime  # UTC, exclusive: the reset

    @property
    def length(self) -> dt.timedelta:
        return self.end - self.start

    def contains(self, moment: dt.datetime) -> bool:
        return self.start <= moment < self.end


def period_at(kind: str, moment: dt.datetime, tz: dt.tzinfo | None = None) -> Period:
    """The period of ``kind`` that contains ``moment`` (an aware datetime)."""
    if moment.tzinfo is None:
        raise ValueError("moment must be an aware datetime")
    return _period_at(kind, moment, tz or org_time_zone())


@functools.lru_cache(maxsize=1024)  # an evaluation pass asks for the same few, once per budget
def _period_at(kind: str, moment: dt.datetime, tz: dt.tzinfo) -> Period:
    local = moment.astimezone(tz)
    if kind == DAILY:
        first = local.date()
        following = first + dt.timedelta(days=1)
    elif kind == WEEKLY:
        first = local.date() - dt.timedelta(days=local.weekday())
        following = first + dt.timedelta(weeks=1)
    elif kind == MONTHLY:
        first = local.date().replace(day=1)
        following = (first + dt.timedelta(days=32)).replace(day=1)
    else:
        raise ValueError(f"unknown period {kind!r}")
    start, end = _local_midnight(first, tz), _local_midnight(following, tz)
    if not start <= moment < end:  # only in a zone whose midnight repeats; step to the right side
        return _period_at(kind, end if moment >= end else start - dt.timedelta(microseconds=1), tz)
    return Period(kind, start, end)


def _local_midnight(day: dt.date, tz: dt.tzinfo) -> dt.datetime:
    """The first instant of ``day`` in ``tz``, in UTC, on a whole minute (every zone in use today
    has a whole-minute offset; the dashboards' selectors count whole minutes)."""
    # fold=0 on a skipped midnight reads it with the offset before the change, which lands on the
    # transition instant itself: the first moment that belongs to the new local day.
    moment = dt.datetime(day.year, day.month, day.day, tzinfo=tz).astimezone(dt.UTC)
    return moment.replace(second=0, microsecond=0)
