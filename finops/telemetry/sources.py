"""The two sources every request read adds up: rollup rows and the raw tail.

* **rollups** — ``Rollup`` (or ``MarginalRollup``) rows of the plan's tiles (``ranges.rollup_plan``).
  A rollup row counts only events received at or before the ``requests`` ``FillState`` watermark.
* **the raw tail** — ``RequestEvent`` rows that started in the range and were received after that
  watermark, so the last seconds ("now") are always included.

An event is in exactly one of the two, so the sums are exact and nothing is counted twice. With no
``FillState`` yet, everything is tail. The watermark and the rollup rows are read so that they agree
with each other (``read_rollups``): a rollup run that commits between the two reads makes the read
start again instead of counting the freshly rolled events a second time from the tail.

Every aggregate is computed by the database, grouped by status class plus whatever the caller asks
for; Python only adds up those few rows (and merges latency histograms of rollup rows).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from django.core.exceptions import EmptyResultSet
from django.db import connection
from django.db.models import Expression, F, Q, QuerySet, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from finops.telemetry.models import Marginal, MarginalRollup, RequestEvent, Rollup
from finops.telemetry.quarantine import in_bounds
from finops.telemetry.ranges import Dimension, Filters, Plan, check_dimension
from finops.telemetry.tail import tail_span, watermark_after_read, watermark_before_read

logger = logging.getLogger(__name__)

# How often the watermark/rollup read is retried when a rollup run commits in between.
CONSISTENT_READ_ATTEMPTS = 5

T = TypeVar("T")


def fetch_rows(rows: QuerySet[Any]) -> list[dict[str, Any]]:
    """A ``values()`` query's rows as plain dicts, straight from the cursor: without Django's
    per-value converters, which cost more than the query for the thousands of rows of a split
    series. Truncated moments come back as the database gives them (see ``moments``)."""
    try:
        sql, params = rows.query.sql_with_params()
    except EmptyResultSet:  # a query that cannot match (``none()``): nothing to ask the database
        return []
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def moments() -> Callable[[Any], dt.datetime | None]:
    """A converter of the step starts a raw query returns (naive UTC datetimes on PostgreSQL, text
    on SQLite) to aware UTC datetimes, remembering each one: a split series repeats every step."""
    field = Rollup._meta.get_field("bucket")
    seen: dict[Any, dt.datetime | None] = {None: None}

    def convert(value: Any) -> dt.datetime | None:
        if value not in seen:
            moment = field.to_python(value) if isinstance(value, str) else value
            seen[value] = (moment if timezone.is_aware(moment) else moment.replace(tzinfo=dt.UTC)).astimezone(dt.UTC)
        return seen[value]
    return convert


def read_rollups(read: Callable[[], T], empty: T, *,
                 before_read: Callable[[], dt.datetime | None] = watermark_before_read,
                 after_read: Callable[[], dt.datetime | None] = watermark_after_read
                 ) -> tuple[dt.datetime | None, T]:
    """Read rollup rows together with the watermark they were filled to.

    A rollup run writes its rows and advances the watermark in one transaction, and the watermark
    only moves forward; so if it reads the same before and after ``read``, the rows read are
    exactly the events received up to it (a seqlock). Without a watermark nothing is rolled up.
    Inside a page's tail snapshot the opening watermark is the previous read's closing one. The
    sample rollups pass their own watermark's reads.
    """
    after: dt.datetime | None = None
    result = empty
    for _ in range(CONSISTENT_READ_ATTEMPTS):
        before = before_read()
        if before is None:
            return None, empty
        result = read()
        after = after_read()
        if after == before:
            return before, result
    # Rollup runs kept committing mid-read; counting from the later watermark can miss the
    # events of one run until the next refresh, but never counts one twice.
    logger.warning("rollups kept changing while being read; using watermark %s", after)
    return after, result


def rollup_rows(plan: Plan, filters: Filters, dimension: Dimension | None = None) -> tuple[QuerySet[Any], Expression]:
    """The rollup rows of the plan's tiles that the filters select, and the expression of
    ``dimension``'s value in them (for grouping; ``Value("")`` without one).

    Where the filters and ``dimension`` together involve at most one dimension, the rows are
    ``MarginalRollup``'s (that dimension kept, or none): a few per bucket instead of one per
    (tenant, feature, model). Otherwise they are ``Rollup``'s.
    """
    chosen = {"tenant": filters.tenants, "feature": filters.features, "model": filters.models}
    involved = {name for name, values in chosen.items() if values} | ({dimension} if dimension else set())
    buckets = in_tiles(plan)
    if len(involved) <= 1:
        kept = next(iter(involved), Marginal.TOTAL.value)
        rows: QuerySet[Any] = MarginalRollup.objects.filter(buckets, dimension=kept)
        if kept and chosen[kept]:
            rows = rows.filter(value__in=chosen[kept])
        return rows, F("value") if kept else Value("")
    rows = Rollup.objects.filter(buckets)
    for name, values in chosen.items():
        if values:
            rows = rows.filter(**{f"{name}__in": values})
    return rows, F(dimension) if dimension else Value("")


def in_tiles(plan: Plan) -> Q:
    """Rollup rows (of any of the rollup models) whose bucket is one of the plan's tiles."""
    buckets = Q()
    for tile in plan.tiles:
        buckets |= Q(granularity=tile.granularity, bucket__gte=tile.start, bucket__lt=tile.end)
    return buckets


_TAIL_MODEL = Coalesce("model_served", Value(""))


def tail_events(plan: Plan, filters: Filters, watermark: dt.datetime | None) -> QuerySet[RequestEvent]:
    """The raw events of the plan's range that the filters select, received after ``watermark``:
    only the days they can be in, as far as the page's tail snapshot knows (``tail.tail_span``),
    and never one the rollups will leave out (``quarantine``)."""
    span = tail_span(start=plan.start, end=plan.end, watermark=watermark)
    if span is None:
        return RequestEvent.objects.none()
    events = in_bounds(RequestEvent.objects.filter(started_at__gte=span[0], started_at__lt=span[1]))
    if watermark is not None:
        events = events.filter(received_at__gt=watermark)
    return raw_events_filtered(events, filters).order_by()


def raw_events_filtered(events: QuerySet[RequestEvent], filters: Filters) -> QuerySet[RequestEvent]:
    """``events`` limited to the filters' tenants, features and served models (not their range)."""
    if filters.tenants:
        events = events.filter(tenant__in=filters.tenants)
    if filters.features:
        events = events.filter(feature__in=filters.features)
    if filters.models:
        served = Q(model_served__in=filters.models)
        if "" in filters.models:
            served |= Q(model_served__isnull=True)
        events = events.filter(served)
    return events


def tail_key(dimension: Dimension) -> Expression:
    """A dimension's value in raw events."""
    check_dimension(dimension)
    return _TAIL_MODEL if dimension == "model" else F(dimension)
