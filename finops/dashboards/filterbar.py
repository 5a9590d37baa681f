"""The filter bar's state, read from query parameters (``?range=7d&tenant=acme``) so a view can be
shared as a URL.

A parameter that cannot be used is never an error page: it is dropped, its default used instead,
and a message says so (``FilterState.problems``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlencode

from django.conf import settings
from django.utils import timezone

from finops.lib.timezones import org_time_zone
from finops.telemetry.ranges import Filters, Step, ceil_to

PRESETS: dict[str, dt.timedelta] = {
    "1h": dt.timedelta(hours=1),
    "24h": dt.timedelta(hours=24),
    "7d": dt.timedelta(days=7),
    "30d": dt.timedelta(days=30),
}
PRESET_STEPS: dict[str, Step] = {"1h": "minute", "24h": "hour", "7d": "hour", "30d": "day"}
DEFAULT_RANGE = "24h"
CUSTOM = "custom"
MAX_RANGE = dt.timedelta(days=400)
# Custom dates far outside any data would only reach the calendar's edges (and overflow there).
EARLIEST = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
LATEST_AHEAD = dt.timedelta(days=1)
MAX_VALUE_LENGTH = 200
DIMENSION_PARAMS = ("tenant", "feature", "model")
LOCAL_FORMATS = ("%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M", "%Y-%m-%d")


@dataclass(frozen=True)
class FilterState:
    """What the filter bar asks for, already checked: a minute-aligned UTC range, its chart step,
    and at most one value per dimension (``""``: all)."""

    range: str
    start: dt.datetime
    end: dt.datetime
    step: Step
    tenant: str = ""
    feature: str = ""
    model: str = ""
    problems: tuple[str, ...] = field(default=())

    def filters(self, **fixed: str) -> Filters:
        """The filters of telemetry's reads; ``fixed`` (e.g. ``tenant="acme"`` on a tenant's page) wins over the bar."""
        chosen = {name: fixed.get(name, getattr(self, name)) for name in DIMENSION_PARAMS}
        return Filters(start=self.start, end=self.end, tenants=_one(chosen["tenant"]),
                       features=_one(chosen["feature"]), models=_one(chosen["model"]))

    def params(self, **overrides: str) -> dict[str, str]:
        """The query parameters that reproduce this state (defaults left out)."""
        params: dict[str, str] = {}
        if self.range == CUSTOM:
            params.update(range=CUSTOM, start=_local_input(self.start), end=_local_input(self.end))
        elif self.range != DEFAULT_RANGE:
            params["range"] = self.range
        for name in DIMENSION_PARAMS:
            if getattr(self, name):
                params[name] = getattr(self, name)
        params.update(overrides)
        return {key: value for key, value in params.items() if value}

    def query(self, **overrides: str) -> str:
        params = self.params(**overrides)
        return "?" + urlencode(params) if params else ""

    @property
    def start_input(self) -> str:
        return _local_input(self.start)

    @property
    def end_input(self) -> str:
        return _local_input(self.end)

    @property
    def length(self) -> dt.timedelta:
        return self.end - self.start


def filterable(value: str) -> bool:
    """Whether the filter bar can carry ``value`` as it is: a browser's form rewrites line breaks and
    the bar trims spaces, so a name with a control character or surrounding spaces has no menu entry
    (its page, linked from the breakdown tables, shows it instead)."""
    return len(value) <= MAX_VALUE_LENGTH and value == value.strip() and not any(ord(ch) < 32 for ch in value)


def _one(value: str) -> tuple[str, ...]:
    return (value,) if value else ()


def _local_input(moment: dt.datetime) -> str:
    """A moment as an ``<input type="datetime-local">`` value in the organisation's time zone."""
    return timezone.localtime(moment, org_time_zone()).strftime("%Y-%m-%dT%H:%M")


def _parse_local(text: str) -> dt.datetime | None:
    for fmt in LOCAL_FORMATS:
        try:
            naive = dt.datetime.strptime(text.strip(), fmt)
            return timezone.make_aware(naive, org_time_zone()).astimezone(dt.UTC)
        except (ValueError, OverflowError):  # not a date, or one at the edge of the calendar (0001-01-01)
            continue
    return None


def step_for(start: dt.datetime, end: dt.datetime, *, now: dt.datetime) -> Step:
    """A chart step that gives a readable number of points; minutes only where they are still kept."""
    length = end - start
    minutes_kept_from = now - dt.timedelta(days=settings.MINUTE_ROLLUP_RETENTION_DAYS) + dt.timedelta(hours=2)
    if length <= dt.timedelta(hours=3) and start >= minutes_kept_from:
        return "minute"
    if length <= dt.timedelta(days=8):
        return "hour"
    return "day"


def filter_state_parse(query: Mapping[str, str], *, now: dt.datetime | None = None) -> FilterState:
    """The filter bar's state from a request's query parameters, with defaults (and a message in
    ``problems``) for anything unusable."""
    now = now or timezone.now()
    end = ceil_to(now.astimezone(dt.UTC), "minute")
    problems: list[str] = []
    chosen = (query.get("range") or DEFAULT_RANGE).strip()
    start: dt.datetime | None = None
    if chosen == CUSTOM:
        start_text, end_text = query.get("start", ""), query.get("end", "")
        custom_start = _parse_local(start_text) if start_text else None
        custom_end = _parse_local(end_text) if end_text else end
        if custom_start is None or custom_end is None:
            problems.append("A custom range needs a start and an end like 2026-11-22T09:00; "
                            f"showing the last {DEFAULT_RANGE} instead.")
        elif custom_start < EARLIEST or custom_end > now + LATEST_AHEAD:
            problems.append(f"A custom range must lie between {EARLIEST:%Y-%m-%d} and tomorrow; "
                            f"showing the last {DEFAULT_RANGE} instead.")
        elif custom_start >= custom_end:
            problems.append(f"The range's start must be before its end; showing the last {DEFAULT_RANGE} instead.")
        elif custom_end - custom_start > MAX_RANGE:
            problems.append(f"A range can cover at most {MAX_RANGE.days} days; showing the last {DEFAULT_RANGE} "
                            "instead.")
        else:
            start, end = custom_start.replace(second=0), ceil_to(custom_end.astimezone(dt.UTC), "minute")
            if start >= end:
                end = start + dt.timedelta(minutes=1)
    elif chosen not in PRESETS:
        problems.append(f"Unknown range {chosen[:40]!r} (choose 1h, 24h, 7d, 30d or custom); "
                        f"showing the last {DEFAULT_RANGE}.")
    if start is None:
        chosen = chosen if chosen in PRESETS else DEFAULT_RANGE
        start = end - PRESETS[chosen]
        step = PRESET_STEPS[chosen]
        if step == "minute" and start < now - dt.timedelta(days=settings.MINUTE_ROLLUP_RETENTION_DAYS):
            step = "hour"
    else:
        step = step_for(start, end, now=now)
    values: dict[str, str] = {}
    for name in DIMENSION_PARAMS:
        value = (query.get(name) or "").strip()
        if not filterable(value):
            problems.append(f"The {name} filter is not a valid name; showing every {name}.")
            value = ""
        values[name] = value
    return FilterState(range=chosen, start=start, end=end, step=step, problems=tuple(problems), **values)
