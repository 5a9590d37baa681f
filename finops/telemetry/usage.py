"""Usage and cost: request counts, tokens, device use and cost over a range, in total, per tenant,
feature or model, and per step, read from the rollups plus the raw tail (``sources``).

Every figure is a ``sums.Sums`` field added up over rollup rows and tail events, or follows from
them (``Measures``): a new summed measure reaches every read here without a change to this module.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Self

from django.db.models import Aggregate, Count, Expression, F, QuerySet, Sum
from django.db.models.functions import Trunc

from finops.telemetry.models import RequestEvent
from finops.telemetry.ranges import (
    Dimension,
    Filters,
    Plan,
    Step,
    check_dimension,
    check_step,
    rollup_plan,
    steps,
)
from finops.telemetry.sources import (
    fetch_rows,
    moments,
    raw_events_filtered,
    read_rollups,
    rollup_rows,
    tail_events,
    tail_key,
)
from finops.telemetry.sums import ZERO, Sums, cost_sum, cost_value, event_aggregates, rollup_aggregates

THOUSAND = Decimal(1000)
# Top end users read raw events (there are too many end users to roll up per bucket): at most the
# last this much of a range, through the ``(started_at, tenant)`` index.
RAW_WINDOW = dt.timedelta(hours=6)
TOP_END_USERS = 10

# Aliases are prefixed so that no aggregate hides the column a later one reads.
_PREFIX = "total_"


@dataclass(kw_only=True)
class Measures(Sums):
    """A ``Sums`` and what follows from it. Rates are None when there were no requests; energy
    figures are None when no request had its energy measured (a CPU or upstream runtime), never 0.
    Costs are sums over priced requests; ``unpriced`` counts requests no list price applied to.
    Latency histograms are read by ``latency``: here they are empty."""

    energy_joules: float | None = None  # None: no request had its energy measured

    @classmethod
    def of(cls, sums: Sums, **more: Any) -> Self:
        """The measures of ``sums`` (``more``: a subclass's own fields)."""
        values = {name: getattr(sums, name) for name in _ADDED}
        if not sums.energy_measured:
            values["energy_joules"] = None
        return cls(**values, **more)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def spent_tokens(self) -> int:
        """Tokens a model processed: every request's but cache hits' (``saved_tokens``), which cost nothing."""
        return self.tokens - self.saved_tokens

    @property
    def cache_hit_rate(self) -> float | None:  # cache hits / requests
        return self._rate(self.cache_hits)

    @property
    def exact_hits(self) -> int:
        """Hits of the exact cache (and of runtimes older than the hit kind, which had no other)."""
        return self.cache_hits - self.semantic_hits

    @property
    def exact_saved_cost(self) -> Decimal:
        return self.saved_cost - self.semantic_saved_cost

    @property
    def exact_hit_rate(self) -> float | None:
        return self._rate(self.exact_hits)

    @property
    def semantic_hit_rate(self) -> float | None:  # semantic cache hits / requests
        return self._rate(self.semantic_hits)

    @property
    def error_rate(self) -> float | None:  # errors / requests
        return self._rate(self.errors)

    @property
    def rejection_rate(self) -> float | None:  # rejections / requests
        return self._rate(self.rejections)

    @property
    def energy_per_1k_tokens(self) -> float | None:
        """Measured joules per 1,000 tokens of all requests."""
        tokens = self.tokens
        return self.energy_joules * 1000 / tokens if self.energy_joules is not None and tokens else None

    @property
    def queue_wait_ms_mean(self) -> float | None:
        """Over the requests that waited in a runtime's queue (None: none did)."""
        return self.queue_wait_ms_sum / self.queue_waits if self.queue_waits else None

    @property
    def cost_per_1k_tokens(self) -> Decimal | None:  # list cost per 1,000 tokens
        return self._per_1k(self.list_cost)

    @property
    def hardware_cost_per_1k_tokens(self) -> Decimal | None:
        return self._per_1k(self.hardware_cost)

    def _rate(self, part: int) -> float | None:
        return part / self.requests if self.requests else None

    def _per_1k(self, cost: Decimal) -> Decimal | None:
        tokens = self.tokens
        return cost * THOUSAND / tokens if tokens else None


_ADDED = tuple(f.name for f in dataclasses.fields(Sums) if f.metadata["kind"] != "histogram")


@dataclass(kw_only=True)
class Totals(Measures):
    start: dt.datetime  # the range counted (see ranges.rollup_plan)
    end: dt.datetime


@dataclass(kw_only=True)
class Row(Measures):
    dimension: Dimension
    value: str


@dataclass(kw_only=True)
class SeriesPoint(Measures):
    at: dt.datetime  # the step's first moment
    value: str | None  # the dimension's value, None for an unsplit series


def usage_totals(*, filters: Filters) -> Totals:
    """Every measure over the filtered requests."""
    plan = rollup_plan(filters=filters)
    groups = _usage(filters=filters, plan=plan)
    return Totals.of(groups.get((), Sums()), start=plan.start, end=plan.end)


def usage_by(*, filters: Filters, dimension: Dimension) -> list[Row]:
    """The measures per tenant, feature or served model, highest list cost first."""
    check_dimension(dimension)  # a wrong dimension is refused before any query
    plan = rollup_plan(filters=filters)
    groups = _usage(filters=filters, plan=plan, dimension=dimension)
    rows = [Row.of(sums, dimension=dimension, value=key[0]) for key, sums in groups.items()]
    rows.sort(key=lambda row: (-row.list_cost, -row.requests, row.value))
    return rows


def usage_series(*, filters: Filters, step: Step = "hour", dimension: Dimension | None = None) -> list[SeriesPoint]:
    """The measures per ``step`` (UTC minutes, hours or days), optionally split by a dimension.

    Every step of the counted range is present (zero where nothing happened; for a split series,
    for every value seen), ordered by time, then value. Summed, the points equal ``usage_totals``
    over the same range. A step coarser than the range's alignment makes its first and last points
    partial (they count only the part of the step inside the range).
    """
    check_step(step)
    if dimension is not None:
        check_dimension(dimension)
    plan = rollup_plan(filters=filters, coarsest=step)
    groups = _usage(filters=filters, plan=plan, dimension=dimension, step=step)
    values: Iterable[str | None] = sorted({key[1] for key in groups}) if dimension else [None]
    return [SeriesPoint.of(groups.get((at, value) if dimension else (at,), _NOTHING), at=at, value=value)
            for at in steps(plan, step) for value in values]


_NOTHING = Sums()  # read only: what a step nothing happened in adds up to


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
    check_step(step)
    check_dimension(dimension)
    plan = rollup_plan(filters=filters, coarsest=step)
    rolled, tail = _grouped_sums(
        filters, plan, dimension, step,
        {"total_requests": Sum("requests"), "total_list_cost": cost_sum("list_cost")},
        {"total_requests": Count("id"), "total_list_cost": cost_sum("list_cost")})
    sums: dict[tuple[dt.datetime | None, str], tuple[int, Decimal]] = {}
    moment = moments()
    for row in [*rolled, *tail]:
        if row["total_requests"]:
            key = (moment(row["at"]), row["kept"])
            requests, cost = sums.get(key, (0, ZERO))
            sums[key] = (requests + int(row["total_requests"]), cost + cost_value(row["total_list_cost"]))
    values = sorted({value for _, value in sums})
    return [SpendPoint(at, value, *sums.get((at, value), (0, ZERO))) for at in steps(plan, step) for value in values]


def dimension_values(*, filters: Filters, dimension: Dimension) -> list[str]:
    """The values of a dimension seen in the range (for filter menus), sorted."""
    check_dimension(dimension)
    plan = rollup_plan(filters=filters)

    def read() -> set[str]:
        rows, value = rollup_rows(plan, filters, dimension)
        return set(rows.order_by().annotate(kept=value).values_list("kept", flat=True).distinct())

    watermark, rolled = read_rollups(read, empty=set())
    tail = tail_events(plan, filters, watermark).annotate(kept=tail_key(dimension)).values_list("kept", flat=True)
    return sorted(rolled | set(tail.distinct()))


def _usage(*, filters: Filters, plan: Plan, dimension: Dimension | None = None,
           step: Step | None = None) -> dict[tuple[Any, ...], Sums]:
    """Measures grouped by the ``step`` the request started in and/or ``dimension``'s value,
    rollups and tail added up. A group's key is ``(step start, value)`` without whichever of the two
    is not asked for."""
    rolled, tail = _grouped_sums(filters, plan, dimension, step, rollup_aggregates(_PREFIX),
                                 event_aggregates(_PREFIX))
    groups: dict[tuple[Any, ...], Sums] = {}
    moment = moments()
    for row in [*rolled, *tail]:
        if not row[_PREFIX + "requests"]:
            continue  # an aggregate over no rows
        at = (moment(row["at"]),) if step else ()
        key = (*at, row["kept"]) if dimension else at
        group = groups.get(key)
        if group is None:
            group = groups[key] = Sums()
        group.add_row(row, _PREFIX)
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
        return fetch_rows(rows.values(**keys).annotate(**sums).order_by())

    def read() -> list[dict[str, Any]]:
        rows, value = rollup_rows(plan, filters, dimension)
        return grouped(rows.order_by(), "bucket", value if dimension else None, rollup_sums)

    watermark, rolled = read_rollups(read, empty=[])
    tail = grouped(tail_events(plan, filters, watermark), "started_at", tail_key(dimension) if dimension else None,
                   tail_sums)
    return rolled, tail


@dataclass(frozen=True)
class EndUser:
    end_user: str
    requests: int
    tokens: int
    list_cost: Decimal


def top_end_users(*, filters: Filters, limit: int = TOP_END_USERS) -> tuple[list[EndUser], dt.datetime]:
    """The end users who cost most at list price in the range's last ``RAW_WINDOW``, and where that
    window starts. Requests without an end user are left out. Raw events, not rollups: a month of
    them is too many rows to scan within a page load, so the page says where the window starts."""
    start = max(filters.start, filters.end - RAW_WINDOW)
    events = raw_events_filtered(RequestEvent.objects.filter(started_at__gte=start, started_at__lt=filters.end),
                                 filters).order_by()
    # Ranked and cut by the database: a big tenant has thousands of end users in the window.
    rows = (events.filter(end_user__isnull=False).exclude(end_user="")
            .values("end_user")
            .annotate(requests=Count("id"), tokens=Sum(F("prompt_tokens") + F("completion_tokens")),
                      cost=cost_sum("list_cost"))
            .order_by(F("cost").desc(nulls_last=True), F("tokens").desc(nulls_last=True), "end_user")[:limit])
    users = [EndUser(row["end_user"], row["requests"], int(row["tokens"] or 0), cost_value(row["cost"]))
             for row in rows]
    return users, start
