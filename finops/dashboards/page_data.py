"""What each dashboard page reads: plain functions composing the selectors (``selectors.py``,
the budgets' selectors) into the figures a page shows, so the views only parse and render.

One read here goes to raw request events because no rollup keeps what it needs: top end users
(there are too many end users to roll up per bucket). It reads at most the last ``RAW_WINDOW`` of
the range (the whole range when it is shorter), through the ``(started_at, tenant)`` index, and the
page says so beside it: a month of raw events is too many rows to scan within a page load.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from django.db.models import Count, F, QuerySet, Sum
from django.utils import timezone

from finops.budgets.models import ANY, Budget, Period, Unit
from finops.budgets.periods import period_at
from finops.budgets.selectors import BudgetStatus, budget_status
from finops.dashboards.filterbar import FilterState
from finops.dashboards.selectors import (
    DIMENSIONS,
    Dimension,
    Filters,
    LatencySummary,
    Row,
    RuntimeGauge,
    RuntimeHistoryPoint,
    SeriesPoint,
    SpendPoint,
    Step,
    Totals,
    latency_summary,
    raw_events_filtered,
    runtime_history,
    spend_series,
    usage_by,
    usage_series,
    usage_totals,
)
from finops.telemetry.models import RequestEvent
from finops.telemetry.rollups import cost_sum, cost_value

RAW_WINDOW = dt.timedelta(hours=6)
TOP_END_USERS = 10


# -- overview -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpendAgainstBudget:
    """List-price spend in the current day or month (org time zone) and the budgets of that scope."""

    label: str
    spend: Decimal
    limit: Decimal | None  # the smallest active budget's limit for this scope and period, if any
    budget: Budget | None

    @property
    def fraction(self) -> float | None:
        return float(self.spend / self.limit) if self.limit else None


@dataclass(frozen=True)
class Overview:
    totals: Totals
    latency: LatencySummary  # end to end: the KPI over the range and the chart's steps, one read
    ttft: LatencySummary
    gpu_util: float | None  # mean over runtimes that measured it
    today: SpendAgainstBudget
    month: SpendAgainstBudget

    @property
    def p50(self) -> float | None:
        return self.latency.overall.get(0.5)

    @property
    def p95(self) -> float | None:
        return self.latency.overall.get(0.95)

    @property
    def ttft_p95(self) -> float | None:
        return self.ttft.overall.get(0.95)


def _ceil_minute(moment: dt.datetime) -> dt.datetime:
    floor = moment.astimezone(dt.UTC).replace(second=0, microsecond=0)
    return floor if floor == moment else floor + dt.timedelta(minutes=1)


def _scope_budget(*, tenant: str, feature: str, period: str) -> Budget | None:
    return (Budget.objects.filter(tenant=tenant or ANY, feature=feature or ANY, period=period,
                                  unit=Unit.USD_LIST, paused=False)
            .order_by("limit", "id").first())


def spend_against_budget(
    *, state: FilterState, period: str, now: dt.datetime, fixed: dict[str, str]
) -> SpendAgainstBudget:
    """Spend so far in the current ``period`` for the filter bar's tenant, feature and model
    (whatever the range), beside the budget set for the same tenant and feature."""
    current = period_at(period, now)
    chosen = state.filters(**fixed)
    filters = Filters(start=current.start.astimezone(dt.UTC), end=_ceil_minute(now),
                      tenants=chosen.tenants, features=chosen.features, models=chosen.models)
    spend = usage_totals(filters=filters).list_cost
    tenant = fixed.get("tenant", state.tenant)
    feature = fixed.get("feature", state.feature)
    budget = None if fixed.get("model", state.model) else _scope_budget(tenant=tenant, feature=feature, period=period)
    label = "Spend today" if period == Period.DAILY else "Spend month to date"
    return SpendAgainstBudget(label, spend, budget.limit if budget else None, budget)


def gpu_utilisation(gauges: Iterable[RuntimeGauge]) -> float | None:
    """Mean GPU utilisation over the runtimes that measured it (None: none did)."""
    measured = [g.gpu_util_avg for g in gauges if g.gpu_util_avg is not None]
    return sum(measured) / len(measured) if measured else None


def gpu_utilisation_history(points: Iterable[RuntimeHistoryPoint]) -> float | None:
    """Mean GPU utilisation over the sample rollups' steps, weighted by samples (None: not measured).
    Cheaper than ``runtime_gauges`` over long ranges: it reads rollup rows, not every sample."""
    measured = [(p.gpu_util_avg, p.samples) for p in points if p.gpu_util_avg is not None and p.samples]
    weight = sum(samples for _, samples in measured)
    return sum(util * samples for util, samples in measured) / weight if weight else None


def _coarse(state: FilterState) -> Step:
    """The coarsest sample-rollup step that still fits the range a few times."""
    if state.length > dt.timedelta(days=2):
        return "day"
    return "hour" if state.length > dt.timedelta(hours=3) else "minute"


def overview(*, state: FilterState, fixed: dict[str, str] | None = None, now: dt.datetime | None = None) -> Overview:
    now = now or timezone.now()
    fixed = fixed or {}
    filters = state.filters(**fixed)
    return Overview(
        totals=usage_totals(filters=filters),
        latency=latency_summary(filters=filters, metric="e2e", step=state.step),
        ttft=latency_summary(filters=filters, metric="ttft", step=state.step),
        gpu_util=gpu_utilisation_history(runtime_history(start=state.start, end=state.end, step=_coarse(state))),
        today=spend_against_budget(state=state, period=Period.DAILY, now=now, fixed=fixed),
        month=spend_against_budget(state=state, period=Period.MONTHLY, now=now, fixed=fixed),
    )


# -- series ---------------------------------------------------------------------------------------


def _raw_events(filters: Filters) -> tuple[QuerySet[RequestEvent], dt.datetime]:
    """Raw events of the filters' last ``RAW_WINDOW``, and where that window starts."""
    start = max(filters.start, filters.end - RAW_WINDOW)
    events = RequestEvent.objects.filter(started_at__gte=start, started_at__lt=filters.end)
    return raw_events_filtered(events, filters).order_by(), start


@dataclass(frozen=True)
class EndUser:
    end_user: str
    requests: int
    tokens: int
    list_cost: Decimal


def top_end_users(*, filters: Filters, limit: int = TOP_END_USERS) -> tuple[list[EndUser], dt.datetime]:
    """The end users who cost most at list price in the range's last ``RAW_WINDOW``, and where that
    window starts. Requests without an end user are left out."""
    events, start = _raw_events(filters)
    # Ranked and cut by the database: a big tenant has thousands of end users in the window.
    rows = (events.filter(end_user__isnull=False).exclude(end_user="")
            .values("end_user")
            .annotate(requests=Count("id"), tokens=Sum(F("prompt_tokens") + F("completion_tokens")),
                      cost=cost_sum("list_cost"))
            .order_by(F("cost").desc(nulls_last=True), F("tokens").desc(nulls_last=True), "end_user")[:limit])
    users = [EndUser(row["end_user"], row["requests"], int(row["tokens"] or 0), cost_value(row["cost"]))
             for row in rows]
    return users, start


# -- breakdowns (features, tenants, models) -------------------------------------------------------


@dataclass(frozen=True)
class BreakdownRow:
    row: Row
    spark: list[float]  # list cost per step, oldest first


SORT_KEYS = {
    "name": lambda r: r.row.value,
    "requests": lambda r: r.row.requests,
    "tokens": lambda r: r.row.tokens,
    "cost": lambda r: r.row.list_cost,
    "hardware": lambda r: r.row.hardware_cost,
    "cost_per_1k": lambda r: r.row.cost_per_1k_tokens if r.row.cost_per_1k_tokens is not None else Decimal(-1),
    "cache": lambda r: r.row.cache_hit_rate if r.row.cache_hit_rate is not None else -1.0,
    "errors": lambda r: r.row.error_rate if r.row.error_rate is not None else -1.0,
    "rejections": lambda r: r.row.rejection_rate if r.row.rejection_rate is not None else -1.0,
    "energy": lambda r: r.row.energy_per_1k_tokens if r.row.energy_per_1k_tokens is not None else -1.0,
}
DEFAULT_SORT = "cost"


@dataclass(frozen=True)
class Breakdown:
    rows: list[BreakdownRow]
    series: list[SpendPoint]  # the range's steps split by the dimension (the sparklines' source)


def breakdown(*, state: FilterState, dimension: Dimension, sort: str = DEFAULT_SORT) -> Breakdown:
    """Every value of ``dimension`` in the range with its measures and a spend sparkline, sorted by
    ``sort`` (a ``SORT_KEYS`` name, ``-`` in front for ascending; an unknown one sorts by cost)."""
    if dimension not in DIMENSIONS:
        raise ValueError(f"dimension must be one of {DIMENSIONS}")
    filters = state.filters()
    rows = usage_by(filters=filters, dimension=dimension)
    series = spend_series(filters=filters, step=state.step, dimension=dimension)
    sparks: dict[str, list[float]] = {}
    for point in series:
        sparks.setdefault(point.value or "", []).append(float(point.list_cost))
    result = [BreakdownRow(row, sparks.get(row.value, [])) for row in rows]
    ascending = sort.startswith("-")
    key = SORT_KEYS.get(sort.lstrip("-"), SORT_KEYS[DEFAULT_SORT])
    # Names read A→Z by default; numbers largest first.
    reverse = not ascending if sort.lstrip("-") != "name" else ascending
    result.sort(key=key, reverse=reverse)
    return Breakdown(result, series)


def budgets_for(*, dimension: Dimension, value: str) -> list[BudgetStatus]:
    """The budgets whose scope names this tenant or feature (models carry no budgets)."""
    if dimension == "model":
        return []
    return [budget_status(budget=budget) for budget in Budget.objects.filter(**{dimension: value}).order_by("name")]


def series(*, state: FilterState, fixed: dict[str, str] | None = None,
           split: Dimension | None = None) -> tuple[list[SeriesPoint], list[SpendPoint]]:
    """The page's usage series, and its spend split by ``split`` (for the stacked spend chart)."""
    filters = state.filters(**(fixed or {}))
    total = usage_series(filters=filters, step=state.step)
    if split is None:
        return total, []
    return total, spend_series(filters=filters, step=state.step, dimension=split)
