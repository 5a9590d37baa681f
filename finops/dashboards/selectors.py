"""The queries behind the dashboards: usage, cost, latency and capacity, returned as plain data.

Rollups plus the raw tail
-------------------------
Request measures come from two places that never overlap:

* **rollups** — ``Rollup`` rows for whole buckets in the range, at the coarsest granularity that
  tiles it exactly: whole UTC days inside the range, whole hours at its edges, minutes for the rest
  (``rollup_plan``). A rollup row counts only events received at or before the ``requests``
  ``FillState`` watermark.
* **the raw tail** — ``RequestEvent`` rows that started in the range and were received after that
  watermark, so the last seconds ("now") are always included.

An event is in exactly one of the two, so the sums are exact and nothing is counted twice. With no
``FillState`` yet, everything is tail. The watermark and the rollup rows are read so that they agree
with each other (``_read_rollups``): a rollup run that commits between the two reads makes the read
start again instead of counting the freshly rolled events a second time from the tail.

Minute rollups are deleted after ``MINUTE_ROLLUP_RETENTION_DAYS``. A range whose minute-sized edge
is older than that is widened outward to whole hours at that edge (``Plan.start``/``Plan.end`` say
what was actually counted, and ``Totals`` repeats them), so the answer covers slightly more time
instead of silently missing the expired minutes. A minute-step series that reaches past the
retention is refused (``ValueError``): there is nothing left to draw it from.

Every aggregate is computed by the database, grouped by status class plus whatever the caller asks
for; Python only adds up those few rows (and merges latency histograms of rollup rows).
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal, TypeVar

from django.conf import settings
from django.core.exceptions import EmptyResultSet
from django.db import connection
from django.db.models import (
    Aggregate,
    Case,
    Count,
    DateTimeField,
    Expression,
    F,
    IntegerField,
    Max,
    Min,
    Q,
    QuerySet,
    Sum,
    Value,
    When,
)
from django.db.models.functions import Coalesce, Trunc
from django.utils import timezone

from finops.dashboards.tail import tail_span, watermark_after_read, watermark_before_read
from finops.pricing.services import QUANTUM, PriceCatalog, Prices
from finops.runtimes.models import Runtime
from finops.telemetry import sketch
from finops.telemetry.models import (
    Device,
    DeviceRollup,
    DeviceSample,
    DeviceUseRollup,
    FillState,
    Granularity,
    Marginal,
    MarginalRollup,
    RequestEvent,
    Rollup,
    RuntimeRollup,
    RuntimeSample,
)
from finops.telemetry.rollups import (  # exact cost sums on SQLite too
    cost_sum,
    cost_value,
    event_aggregates,
    rollup_aggregates,
)

logger = logging.getLogger(__name__)

Dimension = Literal["tenant", "feature", "model"]
Step = Literal["minute", "hour", "day"]
Metric = Literal["e2e", "ttft"]

DIMENSIONS: tuple[Dimension, ...] = ("tenant", "feature", "model")
STEPS: tuple[Step, ...] = ("minute", "hour", "day")
METRICS: tuple[Metric, ...] = ("e2e", "ttft")
STEP_LENGTH = {"minute": dt.timedelta(minutes=1), "hour": dt.timedelta(hours=1), "day": dt.timedelta(days=1)}
# Minute rollups younger than the retention by this margin are trusted to exist, whichever way the
# retention job rounds its cutoff.
MINUTE_RETENTION_MARGIN = dt.timedelta(hours=1)
# How often the watermark/rollup read is retried when a rollup run commits in between.
CONSISTENT_READ_ATTEMPTS = 5
THOUSAND = Decimal(1000)
SECONDS_PER_HOUR = Decimal(3600)
ZERO = Decimal(0)

T = TypeVar("T")


# -- filters and the rollup plan ------------------------------------------------------------------


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
            start = _floor(start, "hour")
        if max(_floor(end, "hour"), start) < available_from:
            end = _ceil(end, "hour")
    return Plan(start, end, tuple(_tiles(start, end, coarsest)))


def _tiles(start: dt.datetime, end: dt.datetime, coarsest: Step) -> list[Tile]:
    if start >= end:
        return []
    for granularity, finer in (("day", "hour"), ("hour", "minute")):
        if STEPS.index(coarsest) >= STEPS.index(granularity):
            first, last = _ceil(start, granularity), _floor(end, granularity)
            if first < last:
                return [*_tiles(start, first, finer), Tile(granularity, first, last), *_tiles(last, end, finer)]
    return [Tile("minute", start, end)]


_FLOOR_FIELDS = {"minute": {"second": 0, "microsecond": 0},
                 "hour": {"minute": 0, "second": 0, "microsecond": 0},
                 "day": {"hour": 0, "minute": 0, "second": 0, "microsecond": 0}}


def _floor(moment: dt.datetime, step: str) -> dt.datetime:
    return moment.replace(**_FLOOR_FIELDS[step])


def _ceil(moment: dt.datetime, step: str) -> dt.datetime:
    floor = _floor(moment, step)
    return floor if floor == moment else floor + STEP_LENGTH[step]


# -- the two sources ------------------------------------------------------------------------------


def _fetch(rows: QuerySet[Any]) -> list[dict[str, Any]]:
    """A ``values()`` query's rows as plain dicts, straight from the cursor: without Django's
    per-value converters, which cost more than the query for the thousands of rows of a split
    series. Truncated moments come back as the database gives them (see ``_moments``)."""
    try:
        sql, params = rows.query.sql_with_params()
    except EmptyResultSet:  # a query that cannot match (``none()``): nothing to ask the database
        return []
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _moments() -> Callable[[Any], dt.datetime | None]:
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


def _read_rollups(read: Callable[[], T], empty: T, *,
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


def _rollups(plan: Plan, filters: Filters, dimension: Dimension | None = None) -> tuple[QuerySet[Any], Expression]:
    """The rollup rows of the plan's tiles that the filters select, and the expression of
    ``dimension``'s value in them (for grouping; ``Value("")`` without one).

    Where the filters and ``dimension`` together involve at most one dimension, the rows are
    ``MarginalRollup``'s (that dimension kept, or none): a few per bucket instead of one per
    (tenant, feature, model). Otherwise they are ``Rollup``'s.
    """
    chosen = {"tenant": filters.tenants, "feature": filters.features, "model": filters.models}
    involved = {name for name, values in chosen.items() if values} | ({dimension} if dimension else set())
    buckets = _in_tiles(plan)
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


def _in_tiles(plan: Plan) -> Q:
    """Rollup rows (of any of the rollup models) whose bucket is one of the plan's tiles."""
    buckets = Q()
    for tile in plan.tiles:
        buckets |= Q(granularity=tile.granularity, bucket__gte=tile.start, bucket__lt=tile.end)
    return buckets


_TAIL_MODEL = Coalesce("model_served", Value(""))


def _tail(plan: Plan, filters: Filters, watermark: dt.datetime | None) -> QuerySet[RequestEvent]:
    """The raw events of the plan's range that the filters select, received after ``watermark``:
    only the days they can be in, as far as the page's tail snapshot knows (``tail.tail_span``)."""
    span = tail_span(start=plan.start, end=plan.end, watermark=watermark)
    if span is None:
        return RequestEvent.objects.none()
    events = RequestEvent.objects.filter(started_at__gte=span[0], started_at__lt=span[1])
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


def _tail_key(dimension: Dimension) -> Expression:
    """A dimension's value in raw events."""
    _check_dimension(dimension)
    return _TAIL_MODEL if dimension == "model" else F(dimension)


def _check_dimension(dimension: str) -> None:
    if dimension not in DIMENSIONS:
        raise ValueError(f"dimension must be one of {DIMENSIONS}, got {dimension!r}")


# -- request measures -----------------------------------------------------------------------------

# Aliases are prefixed so that no aggregate hides the column a later one reads.
_STATUS_COUNTERS = {"ok": "ok", "error": "errors", "rejected": "rejections", "cancelled": "cancelled"}


def _rollup_sums() -> dict[str, Aggregate]:
    sums = rollup_aggregates("total_")
    # Status classes are folded into the group's counters by the database, not returned as rows.
    for status_class, counter in _STATUS_COUNTERS.items():
        sums[f"total_{counter}"] = Sum("requests", filter=Q(status_class=status_class))
    return sums


def _tail_sums() -> dict[str, Aggregate]:
    """``_rollup_sums`` of raw events, counted as the rollups count them."""
    sums = event_aggregates("total_")
    for status_class, counter in _STATUS_COUNTERS.items():
        sums[f"total_{counter}"] = Count("id", filter=Q(status_class=status_class))
    return sums


@dataclass
class _Sums:
    requests: int = 0
    ok: int = 0
    errors: int = 0
    rejections: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_hits: int = 0
    gpu_seconds: float = 0.0
    energy_joules: float = 0.0
    energy_measured: int = 0
    list_cost: Decimal = ZERO
    hardware_cost: Decimal = ZERO
    saved_cost: Decimal = ZERO
    unpriced: int = 0
    queue_wait_ms_sum: float = 0.0
    queue_waits: int = 0
    queue_wait_ms_max: float | None = None
    rejected_rule: int = 0
    rejected_budget: int = 0
    shed: int = 0

    def add(self, row: Mapping[str, Any]) -> None:
        """Add a row of ``_rollup_sums`` (spelled out: a split series adds thousands of rows)."""
        self.requests += int(row["total_requests"] or 0)
        self.ok += int(row["total_ok"] or 0)
        self.errors += int(row["total_errors"] or 0)
        self.rejections += int(row["total_rejections"] or 0)
        self.cancelled += int(row["total_cancelled"] or 0)
        self.prompt_tokens += int(row["total_prompt_tokens"] or 0)
        self.completion_tokens += int(row["total_completion_tokens"] or 0)
        self.cache_hits += int(row["total_cache_hits"] or 0)
        self.energy_measured += int(row["total_energy_measured"] or 0)
        self.unpriced += int(row["total_unpriced"] or 0)
        self.gpu_seconds += float(row["total_gpu_seconds"] or 0.0)
        self.energy_joules += float(row["total_energy_joules"] or 0.0)
        self.list_cost += cost_value(row["total_list_cost"])
        self.hardware_cost += cost_value(row["total_hardware_cost"])
        self.saved_cost += cost_value(row["total_saved_cost"])
        self.queue_wait_ms_sum += float(row["total_queue_wait_ms_sum"] or 0.0)
        self.queue_waits += int(row["total_queue_waits"] or 0)
        self.rejected_rule += int(row["total_rejected_rule"] or 0)
        self.rejected_budget += int(row["total_rejected_budget"] or 0)
        self.shed += int(row["total_shed"] or 0)
        self._wait_max(row["total_queue_wait_ms_max"])

    def _wait_max(self, value: float | None) -> None:
        if value is not None and (self.queue_wait_ms_max is None or value > self.queue_wait_ms_max):
            self.queue_wait_ms_max = float(value)



@dataclass(slots=True)
class Measures:
    """Request counts, tokens, device use and cost. Rates are None when there were no requests;
    energy figures are None when no request had its energy measured (a CPU or upstream runtime),
    never 0. Costs are sums over priced requests; ``unpriced`` counts requests no list price
    applied to. Not frozen: a split series builds thousands, and a frozen dataclass's
    ``__init__`` costs twice as much; nothing changes them after the selectors return."""

    requests: int
    ok: int
    errors: int  # status error or timeout
    rejections: int  # rejected by a rule or budget, or shed
    cancelled: int
    prompt_tokens: int
    completion_tokens: int
    tokens: int
    cache_hits: int
    cache_hit_rate: float | None  # cache hits / requests
    error_rate: float | None  # errors / requests
    rejection_rate: float | None  # rejections / requests
    gpu_seconds: float
    energy_joules: float | None
    energy_per_1k_tokens: float | None  # measured joules per 1,000 tokens of all requests
    list_cost: Decimal
    hardware_cost: Decimal
    saved_cost: Decimal  # list price that cache hits did not cost
    unpriced: int
    queue_wait_ms_mean: float | None  # over the requests that waited in a runtime's queue (None: none did)
    queue_wait_ms_max: float | None
    rejected_rule: int  # rejections by reason: a throttling or blocking rule,
    rejected_budget: int  # an exhausted budget allowance,
    shed: int  # or load shedding (rejections of events older than these counters have no known reason)
    cost_per_1k_tokens: Decimal | None  # list cost per 1,000 tokens
    hardware_cost_per_1k_tokens: Decimal | None


@dataclass(slots=True)
class Totals(Measures):
    start: dt.datetime  # the range counted (see rollup_plan)
    end: dt.datetime


@dataclass(slots=True)
class Row(Measures):
    dimension: Dimension
    value: str


@dataclass(slots=True)
class SeriesPoint(Measures):
    at: dt.datetime  # the step's first moment
    value: str | None  # the dimension's value, None for an unsplit series


def _measures(sums: _Sums) -> dict[str, Any]:
    tokens = sums.prompt_tokens + sums.completion_tokens
    energy = sums.energy_joules if sums.energy_measured else None

    def rate(part: int) -> float | None:
        return part / sums.requests if sums.requests else None

    def per_1k(cost: Decimal) -> Decimal | None:
        return cost * THOUSAND / tokens if tokens else None

    return {
        "requests": sums.requests,
        "ok": sums.ok,
        "errors": sums.errors,
        "rejections": sums.rejections,
        "cancelled": sums.cancelled,
        "prompt_tokens": sums.prompt_tokens,
        "completion_tokens": sums.completion_tokens,
        "tokens": tokens,
        "cache_hits": sums.cache_hits,
        "cache_hit_rate": rate(sums.cache_hits),
        "error_rate": rate(sums.errors),
        "rejection_rate": rate(sums.rejections),
        "gpu_seconds": sums.gpu_seconds,
        "energy_joules": energy,
        "energy_per_1k_tokens": energy * 1000 / tokens if energy is not None and tokens else None,
        "list_cost": sums.list_cost,
        "hardware_cost": sums.hardware_cost,
        "saved_cost": sums.saved_cost,
        "unpriced": sums.unpriced,
        "queue_wait_ms_mean": sums.queue_wait_ms_sum / sums.queue_waits if sums.queue_waits else None,
        "queue_wait_ms_max": sums.queue_wait_ms_max,
        "rejected_rule": sums.rejected_rule,
        "rejected_budget": sums.rejected_budget,
        "shed": sums.shed,
        "cost_per_1k_tokens": per_1k(sums.list_cost),
        "hardware_cost_per_1k_tokens": per_1k(sums.hardware_cost),
    }


def _usage(
    *,
    filters: Filters,
    plan: Plan,
    dimension: Dimension | None = None,
    step: Step | None = None,
) -> dict[tuple[Any, ...], _Sums]:
    """Measures grouped by the ``step`` the request started in and/or ``dimension``'s value,
    rollups and tail added up. A group's key is ``(step start, value)`` without whichever of the two
    is not asked for."""
    rolled, tail = _grouped_sums(filters, plan, dimension, step, _rollup_sums(), _tail_sums())
    groups: dict[tuple[Any, ...], _Sums] = {}
    moment = _moments()
    for row in [*rolled, *tail]:
        if not row["total_requests"]:
            continue  # an aggregate over no rows
        at = (moment(row["at"]),) if step else ()
        key = (*at, row["kept"]) if dimension else at
        groups.setdefault(key, _Sums()).add(row)
    return groups


def _grouped_sums(filters: Filters, plan: Plan, dimension: Dimension | None, step: Step | None,
                  rollup_sums: dict[str, Aggregate], tail_sums: dict[str, Aggregate]
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rollups' and the tail's rows of the given sums, grouped by ``step`` start (``at``) and
    ``dimension``'s value (``kept``); one row without either."""
    def grouped(rows: QuerySet[Any], moment: str, value: Expression | None,
                sums: dict[str, Aggregate]) -> list[dict[str, Any]]:
        # Edge buckets finer than the step (hours and minutes at the range's ends) are folded into
        # their step by the database, so a month by day is a row per day and value.
        keys: dict[str, Expression] = {}
        if step:
            keys["at"] = Trunc(moment, step, tzinfo=dt.UTC)
        if value is not None:
            keys["kept"] = value
        if not keys:
            return [rows.aggregate(**sums)]
        return _fetch(rows.values(**keys).annotate(**sums).order_by())

    def read() -> list[dict[str, Any]]:
        rows, value = _rollups(plan, filters, dimension)
        return grouped(rows.order_by(), "bucket", value if dimension else None, rollup_sums)

    watermark, rolled = _read_rollups(read, empty=[])
    tail = grouped(_tail(plan, filters, watermark), "started_at", _tail_key(dimension) if dimension else None,
                   tail_sums)
    return rolled, tail


def usage_totals(*, filters: Filters) -> Totals:
    """Every measure over the filtered requests."""
    plan = rollup_plan(filters=filters)
    groups = _usage(filters=filters, plan=plan)
    return Totals(**_measures(groups.get((), _Sums())), start=plan.start, end=plan.end)


def usage_by(*, filters: Filters, dimension: Dimension) -> list[Row]:
    """The measures per tenant, feature or served model, highest list cost first."""
    _check_dimension(dimension)  # a wrong dimension is refused before any query
    plan = rollup_plan(filters=filters)
    groups = _usage(filters=filters, plan=plan, dimension=dimension)
    rows = [Row(**_measures(sums), dimension=dimension, value=key[0]) for key, sums in groups.items()]
    rows.sort(key=lambda row: (-row.list_cost, -row.requests, row.value))
    return rows


def usage_series(*, filters: Filters, step: Step = "hour", dimension: Dimension | None = None) -> list[SeriesPoint]:
    """The measures per ``step`` (UTC minutes, hours or days), optionally split by a dimension.

    Every step of the counted range is present (zero where nothing happened; for a split series,
    for every value seen), ordered by time, then value. Summed, the points equal ``usage_totals``
    over the same range. A step coarser than the range's alignment makes its first and last points
    partial (they count only the part of the step inside the range).
    """
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    if dimension is not None:
        _check_dimension(dimension)
    plan = rollup_plan(filters=filters, coarsest=step)
    groups = _usage(filters=filters, plan=plan, dimension=dimension, step=step)
    return _series_points(plan, step, groups, dimension)


@dataclass(slots=True)
class SpendPoint:
    """List-price spend and requests of one value of a dimension over one step."""

    at: dt.datetime  # the step's first moment
    value: str
    requests: int
    list_cost: Decimal


def spend_series(*, filters: Filters, step: Step, dimension: Dimension) -> list[SpendPoint]:
    """List-price spend and requests per ``step`` and value of ``dimension``: what a split
    ``usage_series`` says of them (every step for every value seen, ordered by time then value),
    from a read of those two sums only — what stacked spend charts and sparklines draw, without
    the rest of the measures of every step and value."""
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    _check_dimension(dimension)
    plan = rollup_plan(filters=filters, coarsest=step)
    rolled, tail = _grouped_sums(
        filters, plan, dimension, step,
        {"total_requests": Sum("requests"), "total_list_cost": cost_sum("list_cost")},
        {"total_requests": Count("id"), "total_list_cost": cost_sum("list_cost")})
    sums: dict[tuple[dt.datetime | None, str], tuple[int, Decimal]] = {}
    moment = _moments()
    for row in [*rolled, *tail]:
        if row["total_requests"]:
            key = (moment(row["at"]), row["kept"])
            requests, cost = sums.get(key, (0, ZERO))
            sums[key] = (requests + int(row["total_requests"]), cost + cost_value(row["total_list_cost"]))
    values = sorted({value for _, value in sums})
    points = []
    at = _floor(plan.start, step)
    while at < plan.end:
        for value in values:
            requests, cost = sums.get((at, value), (0, ZERO))
            points.append(SpendPoint(at, value, requests, cost))
        at += STEP_LENGTH[step]
    return points


def _series_points(plan: Plan, step: Step, groups: Mapping[tuple[Any, ...], _Sums],
                   dimension: Dimension | None) -> list[SeriesPoint]:
    values: Iterable[str | None] = sorted({key[1] for key in groups}) if dimension else [None]
    points = []
    at = _floor(plan.start, step)
    while at < plan.end:
        for value in values:
            key = (at, value) if dimension else (at,)
            points.append(SeriesPoint(**_measures(groups.get(key, _Sums())), at=at, value=value))
        at += STEP_LENGTH[step]
    return points


def dimension_values(*, filters: Filters, dimension: Dimension) -> list[str]:
    """The values of a dimension seen in the range (for filter menus), sorted."""
    _check_dimension(dimension)
    plan = rollup_plan(filters=filters)

    def read() -> set[str]:
        rows, value = _rollups(plan, filters, dimension)
        return set(rows.order_by().annotate(kept=value).values_list("kept", flat=True).distinct())

    watermark, rolled = _read_rollups(read, empty=set())
    tail = _tail(plan, filters, watermark).annotate(kept=_tail_key(dimension)).values_list("kept", flat=True)
    return sorted(rolled | set(tail.distinct()))


# -- latency --------------------------------------------------------------------------------------


def latency_percentiles(
    *, filters: Filters, metric: Metric = "e2e", quantiles: Iterable[float] = (0.5, 0.95, 0.99)
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
    *, filters: Filters, metric: Metric = "e2e", step: Step = "hour", quantiles: Iterable[float] = (0.5, 0.95, 0.99)
) -> list[LatencyPoint]:
    """``latency_percentiles`` per ``step`` of the range (every step present, in order), from one
    grouped read of the rollups and one of the tail — not one query per point. Partial first and
    last steps are as in ``usage_series``."""
    return latency_summary(filters=filters, metric=metric, step=step, quantiles=quantiles).points


@dataclass(frozen=True)
class LatencySummary:
    overall: dict[float, float | None]  # what latency_percentiles says over the whole range
    points: list[LatencyPoint]  # what latency_series says


def latency_summary(
    *, filters: Filters, metric: Metric = "e2e", step: Step = "hour", quantiles: Iterable[float] = (0.5, 0.95, 0.99)
) -> LatencySummary:
    """``latency_percentiles`` and ``latency_series`` together, from the series' one read: the
    range's sketch is its steps' sketches added up (sketches merge exactly)."""
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    quantiles = tuple(quantiles)
    plan = rollup_plan(filters=filters, coarsest=step)
    merged = _histograms(filters=filters, metric=metric, plan=plan, step=step)
    points = []
    at = _floor(plan.start, step)
    while at < plan.end:
        histogram = merged.get(at, {})
        points.append(LatencyPoint(at=at, requests=sum(histogram.values()),
                                   quantiles=sketch.quantiles(histogram, quantiles)))
        at += STEP_LENGTH[step]
    overall: dict[int, int] = {}
    for histogram in merged.values():
        for index, count in histogram.items():
            overall[index] = overall.get(index, 0) + count
    return LatencySummary(sketch.quantiles(overall, quantiles), points)


def _histograms(
    *, filters: Filters, metric: Metric, plan: Plan, step: Step | None
) -> dict[dt.datetime | None, dict[int, int]]:
    """The metric's merged sketch histogram per step start (one, keyed None, without a step)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    hist_field, bucket_field, value_field = f"{metric}_hist", f"{metric}_bucket", f"{metric}_ms"

    def add(merged: dict[dt.datetime | None, dict[int, int]], at: dt.datetime | None, index: int,
            count: int) -> None:
        histogram = merged.setdefault(at, {})
        histogram[index] = histogram.get(index, 0) + count

    def read() -> dict[dt.datetime | None, dict[int, int]]:
        rolled: dict[dt.datetime | None, dict[int, int]] = {}
        for at, index, count in _summed_histograms(_rollups(plan, filters)[0], hist_field, step=step):
            rolled.setdefault(at, {})[index] = count  # one row per (step, index)
        return rolled

    watermark, merged = _read_rollups(read, empty={})
    tail = _tail(plan, filters, watermark)
    at = Trunc("started_at", step, tzinfo=dt.UTC) if step else Value(None, output_field=DateTimeField())
    moment = _moments()
    for row in _fetch(tail.filter(**{f"{bucket_field}__isnull": False}).values(at=at, index=F(bucket_field))
                      .annotate(count=Count("id")).order_by()):
        add(merged, moment(row["at"]), row["index"], row["count"])
    # Ingest buckets every event on arrival; an event stored without its bucket is bucketed here.
    unbucketed = tail.filter(**{f"{bucket_field}__isnull": True, f"{value_field}__isnull": False})
    for started, value in unbucketed.values_list("started_at", value_field):
        add(merged, _floor(started.astimezone(dt.UTC), step) if step else None, sketch.bucket_index(value), 1)
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
    moment = _moments()
    with connection.cursor() as cursor:
        cursor.execute(template.format(rows=sql, bucket="r.at" if step else "NULL"), params)
        return [(moment(at), key, count) for at, key, count in cursor.fetchall() if count]


# -- runtimes and devices -------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceGauge:
    runtime_id: str
    device: str
    name: str | None
    samples: int
    gpu_util_avg: float | None
    mem_used_max: int | None
    mem_total: int | None
    power_avg_w: float | None
    temperature_max_c: float | None
    energy_joules: float | None  # growth of the device's energy counter over the range


@dataclass(frozen=True)
class RuntimeGauge:
    """A runtime's samples over a range. None where nothing was measured (no samples, or a CPU
    runtime's GPU figures); device figures add up across the runtime's devices."""

    runtime_id: str
    samples: int
    last_sample_at: dt.datetime | None
    queue_depth_avg: float | None
    queue_depth_max: int | None
    running_avg: float | None
    tokens_per_s_avg: float | None
    gpu_util_avg: float | None  # mean over devices
    power_avg_w: float | None  # sum over devices
    energy_joules: float | None  # sum over devices
    devices: tuple[DeviceGauge, ...] = field(default=())


SAMPLES_FILL_STATE = "samples"


def _samples_watermark() -> dt.datetime | None:
    """How far the sample rollups have counted (by ``received_at``); None before the first run."""
    return FillState.objects.filter(name=SAMPLES_FILL_STATE).values_list("watermark", flat=True).first()


def _read_sample_rollups(read: Callable[[], T], empty: T) -> tuple[dt.datetime | None, T]:
    return _read_rollups(read, empty, before_read=_samples_watermark, after_read=_samples_watermark)


def _minute_plan(start: dt.datetime, end: dt.datetime) -> Plan:
    """``rollup_plan`` of ``[start, end)`` widened to whole minutes."""
    return rollup_plan(filters=Filters(start=_floor(start, "minute"), end=_ceil(end, "minute")))


def _samples_tail(model: type[RuntimeSample] | type[DeviceSample], plan: Plan,
                  watermark: dt.datetime | None) -> QuerySet[Any]:
    """Samples taken in the plan's range that the sample rollups have not counted yet."""
    samples = model.objects.filter(at__gte=plan.start, at__lt=plan.end).order_by()
    return samples.filter(received_at__gt=watermark) if watermark is not None else samples


def runtime_gauges(*, start: dt.datetime, end: dt.datetime) -> list[RuntimeGauge]:
    """Queue, throughput and device gauges per runtime over ``[start, end)`` (whole minutes);
    registered runtimes that sent no samples are listed with ``samples == 0``.

    Read from the sample rollups (``RuntimeRollup``, ``DeviceRollup``) tiled like ``rollup_plan``,
    plus the samples received since their watermark. Energy is the growth of each device's
    cumulative counter (the rollups skip a step where a driver restart reset it); the step between
    the last counted reading and the newest raw ones is added by the next rollup run.
    ``last_sample_at`` is the newest raw sample, or the start of the newest rollup bucket where the
    raw samples have expired.
    """
    plan = _minute_plan(start, end)

    def read() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        runtime_rows = (RuntimeRollup.objects.filter(_in_tiles(plan)).values("runtime_id").annotate(
            samples=Sum("samples"), queue_sum=Sum("queue_depth_sum"), queue_max=Max("queue_depth_max"),
            running_sum=Sum("running_sum"), tokens_sum=Sum("tokens_per_s_sum"), last_bucket=Max("bucket"))
            .order_by())
        device_rows = (DeviceRollup.objects.filter(_in_tiles(plan)).values("runtime_id", "device").annotate(
            name=Max("name"), samples=Sum("samples"), util_sum=Sum("gpu_util_sum"), util_n=Sum("gpu_util_count"),
            mem_max=Max("mem_used_max"), mem_total=Max("mem_total_max"), power_sum=Sum("power_w_sum"),
            power_n=Sum("power_w_count"), temperature=Max("temperature_c_max"), energy=Sum("energy_joules"),
            energy_n=Sum("energy_count")).order_by())
        return list(runtime_rows), list(device_rows)

    watermark, (runtime_rows, device_rows) = _read_sample_rollups(read, ([], []))
    runtimes: dict[str, dict[str, Any]] = {}
    for row in runtime_rows:
        runtimes[row["runtime_id"]] = {**row, "last_at": None}
    for row in (_samples_tail(RuntimeSample, plan, watermark).values("runtime_id").annotate(
            samples=Count("id"), queue_sum=Sum("queue_depth"), queue_max=Max("queue_depth"),
            running_sum=Sum("running"), tokens_sum=Sum("tokens_per_s"), last_at=Max("at"))):
        _merge_gauge(runtimes.setdefault(row["runtime_id"], {}), row)
    devices: dict[tuple[str, str], dict[str, Any]] = {(r["runtime_id"], r["device"]): dict(r) for r in device_rows}
    for row in (_samples_tail(DeviceSample, plan, watermark).values("runtime_id", "device").annotate(
            name=Max("name"), samples=Count("id"), util_sum=Sum("gpu_util"), util_n=Count("gpu_util"),
            mem_max=Max("mem_used"), mem_total=Max("mem_total"), power_sum=Sum("power_w"), power_n=Count("power_w"),
            temperature=Max("temperature_c"), energy_first=Min("energy_joules_total"),
            energy_last=Max("energy_joules_total"), energy_n=Count("energy_joules_total"))):
        first, last = row.pop("energy_first"), row.pop("energy_last")
        row["energy"] = last - first if row["energy_n"] > 1 else 0.0
        row["energy_n"] = max(row["energy_n"] - 1, 0)  # n readings are n - 1 counter steps
        _merge_gauge(devices.setdefault((row["runtime_id"], row["device"]), {}), row)

    by_runtime: dict[str, list[DeviceGauge]] = {}
    for (runtime_id, device), row in sorted(devices.items()):
        by_runtime.setdefault(runtime_id, []).append(DeviceGauge(
            runtime_id=runtime_id, device=device, name=row.get("name"), samples=int(row["samples"]),
            gpu_util_avg=row["util_sum"] / row["util_n"] if row["util_n"] else None,
            mem_used_max=row["mem_max"], mem_total=row["mem_total"],
            power_avg_w=row["power_sum"] / row["power_n"] if row["power_n"] else None,
            temperature_max_c=row["temperature"], energy_joules=row["energy"] if row["energy_n"] else None,
        ))
    names = set(runtimes) | set(by_runtime) | set(Runtime.objects.values_list("name", flat=True))
    gauges = []
    for name in sorted(names):
        row = runtimes.get(name)
        own = tuple(by_runtime.get(name, ()))
        samples = int(row["samples"]) if row else 0
        utils = [d.gpu_util_avg for d in own if d.gpu_util_avg is not None]
        powers = [d.power_avg_w for d in own if d.power_avg_w is not None]
        energies = [d.energy_joules for d in own if d.energy_joules is not None]
        gauges.append(RuntimeGauge(
            runtime_id=name,
            samples=samples,
            last_sample_at=_last_sample_at(name, row, plan) if row else None,
            queue_depth_avg=int(row["queue_sum"]) / samples if row and samples else None,
            queue_depth_max=row["queue_max"] if row and samples else None,
            running_avg=int(row["running_sum"]) / samples if row and samples else None,
            tokens_per_s_avg=float(row["tokens_sum"]) / samples if row and samples else None,
            gpu_util_avg=sum(utils) / len(utils) if utils else None,
            power_avg_w=sum(powers) if powers else None,
            energy_joules=sum(energies) if energies else None,
            devices=own,
        ))
    return gauges


def _merge_gauge(total: dict[str, Any], more: Mapping[str, Any]) -> None:
    """Add a group of raw samples to the same group's rollup figures (sums add, maxima take the larger)."""
    for name, value in more.items():
        if value is None or name in ("runtime_id", "device"):
            total.setdefault(name, value)
        elif name in ("name", "last_at"):
            total[name] = value
        elif name.endswith(("_max", "max")) or name in ("mem_total", "temperature"):
            total[name] = value if total.get(name) is None else max(total[name], value)
        else:
            total[name] = (total.get(name) or 0) + value


def _last_sample_at(runtime_id: str, row: Mapping[str, Any], plan: Plan) -> dt.datetime | None:
    """The runtime's newest sample in the plan's range: from the raw tail, else the newest raw
    sample in its newest rollup bucket (the bucket's start once raw samples have expired)."""
    if row.get("last_at") is not None:
        return row["last_at"]
    bucket = row.get("last_bucket")
    if bucket is None:
        return None
    tile = next((t for t in reversed(plan.tiles) if t.start <= bucket < t.end), None)
    bucket_end = min(bucket + STEP_LENGTH[tile.granularity] if tile else plan.end, plan.end)
    newest = (RuntimeSample.objects.filter(runtime_id=runtime_id, at__gte=bucket, at__lt=bucket_end)
              .aggregate(newest=Max("at"))["newest"])
    return newest or bucket


@dataclass(frozen=True)
class RuntimeHistoryPoint:
    """One runtime over one step, from the sample rollups. None where nothing was measured: no
    samples, or no device reported the figure (a CPU runtime, a driver without power readings)."""

    runtime_id: str
    bucket: dt.datetime
    samples: int
    queue_depth_avg: float | None
    queue_depth_max: int | None
    tokens_per_s_avg: float | None
    gpu_util_avg: float | None  # mean over the devices' readings
    power_avg_w: float | None  # sum over devices of each one's mean power
    energy_joules: float | None  # sum over devices


def runtime_history(*, start: dt.datetime, end: dt.datetime, step: Step) -> list[RuntimeHistoryPoint]:
    """Runtime and device figures per runtime and ``step`` bucket in ``[start, end)``, ordered by
    runtime then bucket, read from ``RuntimeRollup`` / ``DeviceRollup`` only: it reaches back past
    ``SAMPLE_RETENTION_DAYS`` (minute steps as far as ``MINUTE_ROLLUP_RETENTION_DAYS``), and leaves
    out the last seconds the sample rollups have not yet counted (``runtime_gauges`` has those)."""
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    in_range = {"granularity": step, "bucket__gte": start, "bucket__lt": end}
    devices: dict[tuple[str, dt.datetime], list[DeviceRollup]] = {}
    for row in DeviceRollup.objects.filter(**in_range).order_by():
        devices.setdefault((row.runtime_id, row.bucket), []).append(row)
    runtimes = {(row.runtime_id, row.bucket): row for row in RuntimeRollup.objects.filter(**in_range).order_by()}
    points = []
    for key in sorted(set(runtimes) | set(devices)):
        runtime, own = runtimes.get(key), devices.get(key, [])
        samples = runtime.samples if runtime else 0
        util_count = sum(d.gpu_util_count for d in own)
        powers = [d.power_w_sum / d.power_w_count for d in own if d.power_w_count]
        energies = [d.energy_joules for d in own if d.energy_count]
        points.append(RuntimeHistoryPoint(
            runtime_id=key[0],
            bucket=key[1],
            samples=samples,
            queue_depth_avg=runtime.queue_depth_sum / samples if runtime and samples else None,
            queue_depth_max=runtime.queue_depth_max if runtime and samples else None,
            tokens_per_s_avg=runtime.tokens_per_s_sum / samples if runtime and samples else None,
            gpu_util_avg=sum(d.gpu_util_sum for d in own) / util_count if util_count else None,
            power_avg_w=sum(powers) if powers else None,
            energy_joules=sum(energies) if energies else None,
        ))
    return points


def _paid_minutes(start: dt.datetime, end: dt.datetime, part_of: Callable[[str], Expression],
                  part_at: Callable[[dt.datetime], int]
                  ) -> tuple[dict[tuple[str, str], dict[int, float]], dict[tuple[str, str], str | None]]:
    """Seconds paid per (runtime, device) and price-book part (see ``idle_capacity``), and each
    device's name as sampled."""
    minute_rows = {"granularity": Granularity.MINUTE.value, "bucket__gte": start, "bucket__lt": end, "samples__gt": 0}

    def read() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        devices = (DeviceRollup.objects.filter(**minute_rows).annotate(part=part_of("bucket"))
                   .values("runtime_id", "device", "part").annotate(minutes=Count("id"), name=Max("name")).order_by())
        runtimes = (RuntimeRollup.objects.filter(**minute_rows).annotate(part=part_of("bucket"))
                    .values("runtime_id", "part").annotate(minutes=Count("id")).order_by())
        return list(devices), list(runtimes)

    plan = Plan(start, end, (Tile("minute", start, end),))
    watermark, (device_rows, runtime_rows) = _read_sample_rollups(read, ([], []))
    minutes: dict[tuple[str, str], dict[int, int]] = {}
    names: dict[tuple[str, str], str | None] = {}
    for row in device_rows:
        minutes.setdefault((row["runtime_id"], row["device"]), {})[row["part"]] = row["minutes"]
        names[(row["runtime_id"], row["device"])] = row["name"]
    # Minutes sampled since the watermark that no minute row holds yet.
    device_tail = {(r, d, at.astimezone(dt.UTC).replace(second=0, microsecond=0)): name for r, d, at, name
                   in _samples_tail(DeviceSample, plan, watermark).values_list("runtime_id", "device", "at", "name")}
    counted = set(DeviceRollup.objects.filter(**minute_rows, bucket__in={k[2] for k in device_tail})
                  .values_list("runtime_id", "device", "bucket")) if device_tail else set()
    for key, name in device_tail.items():
        names[key[:2]] = names.get(key[:2]) or name
        if key not in counted:
            part = minutes.setdefault(key[:2], {})
            part[part_at(key[2])] = part.get(part_at(key[2]), 0) + 1
    gpu_runtimes = {runtime_id for runtime_id, _ in minutes}
    for row in runtime_rows:
        if row["runtime_id"] not in gpu_runtimes:
            minutes.setdefault((row["runtime_id"], CPU), {})[row["part"]] = row["minutes"]
    runtime_tail = {(r, at.astimezone(dt.UTC).replace(second=0, microsecond=0)) for r, at
                    in _samples_tail(RuntimeSample, plan, watermark).values_list("runtime_id", "at")
                    if r not in gpu_runtimes}
    counted_runtime = set(RuntimeRollup.objects.filter(**minute_rows, bucket__in={k[1] for k in runtime_tail})
                          .values_list("runtime_id", "bucket")) if runtime_tail else set()
    for runtime_id, minute in runtime_tail - counted_runtime:
        part = minutes.setdefault((runtime_id, CPU), {})
        part[part_at(minute)] = part.get(part_at(minute), 0) + 1
    seconds = SAMPLED_SLOT.total_seconds()
    return {key: {part: n * seconds for part, n in parts.items()} for key, parts in minutes.items()}, names


def _attributed_seconds(start: dt.datetime, end: dt.datetime) -> dict[tuple[str, str], float]:
    """Device seconds attributed to requests that started in ``[start, end)``, per (runtime, device)."""
    plan = rollup_plan(filters=Filters(start=start, end=end))

    def read() -> list[tuple[str, str, float]]:
        return list(DeviceUseRollup.objects.filter(_in_tiles(plan)).values("runtime_id", "device")
                    .annotate(seconds=Sum("gpu_seconds")).order_by().values_list("runtime_id", "device", "seconds"))

    watermark, rows = _read_rollups(read, [])
    tail = (_tail(plan, Filters(start=start, end=end), watermark).filter(device__isnull=False)
            .values("runtime_id", "device").annotate(seconds=Sum("gpu_seconds")).order_by()
            .values_list("runtime_id", "device", "seconds"))
    seconds: dict[tuple[str, str], float] = {}
    for runtime_id, device, used in [*rows, *tail]:
        seconds[(runtime_id, device)] = seconds.get((runtime_id, device), 0.0) + (used or 0.0)
    return seconds


@dataclass(frozen=True)
class DeviceIdle:
    """Device time paid for against the time requests were attributed, and what the gap cost."""

    runtime_id: str
    device: str  # GPU uuid, or "cpu"
    device_type: str | None  # NVML's name, "cpu", or None when unknown
    paid_seconds: float
    attributed_seconds: float
    idle_seconds: float
    idle_fraction: float | None
    idle_cost: Decimal | None  # None when no price book prices the device type


CPU = "cpu"
SAMPLED_SLOT = dt.timedelta(minutes=1)


def idle_capacity(*, start: dt.datetime, end: dt.datetime) -> list[DeviceIdle]:
    """Idle capacity per device over ``[start, end)`` (whole minutes), most costly first.

    *Paid* time is the number of distinct minutes in which the device was sampled, times 60 s: the
    runtime samples every few seconds, so a minute with a sample is a minute the device was up, and
    a stretch without samples (the runtime was down) is not counted. Partial minutes at a runtime's
    start and stop count as whole ones. A runtime with no device samples is a CPU runtime: its
    device ``"cpu"`` is paid for the minutes its runtime samples cover. The sampled minutes are the
    minute rows of the sample rollups (kept ``MINUTE_ROLLUP_RETENTION_DAYS``, so ``start`` should
    be within that) plus the minutes of samples they have not counted yet.

    *Attributed* time is the ``gpu_seconds`` of requests that started in the range on that device
    (``DeviceUseRollup`` plus the raw tail). Idle = paid − attributed, never negative. It is priced
    at the ``per_gpu_hour`` of the device type (``telemetry.Device`` name, ``"*"`` fallback) in the
    price book in force at each minute — the range is split at book changes, and idle is clamped at
    zero in each part. Only devices with samples in the range are listed.
    """
    start, end = _floor(start, "minute"), _ceil(end, "minute")
    catalog = PriceCatalog.load()
    books = [book for book in catalog.books if start < book.effective_from < end]
    # Each part of the range is labelled by the index of its book in `parts` (0: in force at start).
    parts: list[Prices | None] = [catalog.at(start), *books]
    bounds = [start, *(_ceil(book.effective_from, "minute") for book in books), end]

    def part_of(moment: str) -> Expression:
        if not books:
            return Value(0, output_field=IntegerField())
        whens = [When(**{f"{moment}__gte": bound}, then=Value(i + 1)) for i, bound in enumerate(bounds[1:-1])]
        return Case(*reversed(whens), default=Value(0), output_field=IntegerField())

    def part_at(moment: dt.datetime) -> int:
        return sum(1 for bound in bounds[1:-1] if moment >= bound)

    paid, device_names = _paid_minutes(start, end, part_of, part_at)
    if not paid:
        return []
    attributed: dict[tuple[str, str], dict[int, float]] = {}
    for part, (part_start, part_end) in enumerate(itertools.pairwise(bounds)):
        if part_start < part_end:
            for key, seconds in _attributed_seconds(part_start, part_end).items():
                if key in paid:
                    attributed.setdefault(key, {})[part] = seconds

    known_types = dict(Device.objects.filter(uuid__in={d for _, d in paid}).values_list("uuid", "name"))
    result = []
    for key, paid_parts in paid.items():
        runtime_id, device = key
        device_type = CPU if device == CPU else known_types.get(device) or device_names.get(key)
        used_parts = attributed.get(key, {})
        idle_seconds = 0.0
        idle_cost: Decimal | None = ZERO
        for part in set(paid_parts) | set(used_parts):
            idle = max(0.0, paid_parts.get(part, 0.0) - used_parts.get(part, 0.0))
            idle_seconds += idle
            price = parts[part].for_device(device_type) if parts[part] else None
            if price is None:
                if idle:
                    idle_cost = None
            elif idle_cost is not None:
                idle_cost += (Decimal(str(idle)) * price[0] / SECONDS_PER_HOUR).quantize(QUANTUM)
        paid_seconds = sum(paid_parts.values())
        result.append(DeviceIdle(
            runtime_id=runtime_id,
            device=device,
            device_type=device_type,
            paid_seconds=paid_seconds,
            attributed_seconds=sum(used_parts.values()),
            idle_seconds=idle_seconds,
            idle_fraction=idle_seconds / paid_seconds if paid_seconds else None,
            idle_cost=idle_cost,
        ))
    result.sort(key=lambda d: (-(d.idle_cost or ZERO), -d.idle_seconds, d.runtime_id, d.device))
    return result
