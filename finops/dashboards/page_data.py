"""What each dashboard page reads: plain functions composing telemetry's reads (usage, latency,
capacity) and the budgets' selectors into the figures a page shows, so the views only parse and
render. Nothing here queries the database itself.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal

from django.utils import timezone

from finops.budgets.models import Budget, Period
from finops.budgets.periods import period_at
from finops.budgets.selectors import BudgetStatus, budget_for_scope, budget_statuses_of, budgets_naming
from finops.dashboards.filterbar import FilterState
from finops.regressions.models import CostRegression
from finops.regressions.selectors import regressions_of
from finops.telemetry.capacity import RuntimeGauge, RuntimeHistoryPoint, runtime_history
from finops.telemetry.latency import LatencySummary, latency_summary
from finops.telemetry.ranges import DIMENSIONS, Dimension, Filters, Step, ceil_to
from finops.telemetry.task_costs import TaskFigures, TaskPoint, TaskRow, task_series, task_totals, tasks_by
from finops.telemetry.usage import (
    Row,
    SeriesPoint,
    SpendPoint,
    Totals,
    spend_series,
    usage_by,
    usage_series,
    usage_totals,
)

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
    tasks: TaskFigures  # tasks begun in the range, counted up to the last rollup run

    @property
    def p50(self) -> float | None:
        return self.latency.overall.get(0.5)

    @property
    def p95(self) -> float | None:
        return self.latency.overall.get(0.95)

    @property
    def ttft_p95(self) -> float | None:
        return self.ttft.overall.get(0.95)


def spend_against_budget(
    *, state: FilterState, period: str, now: dt.datetime, fixed: dict[str, str]
) -> SpendAgainstBudget:
    """Spend so far in the current ``period`` for the filter bar's tenant, feature and model
    (whatever the range), beside the budget set for the same tenant and feature."""
    current = period_at(period, now)
    chosen = state.filters(**fixed)
    filters = Filters(start=current.start.astimezone(dt.UTC), end=ceil_to(now.astimezone(dt.UTC), "minute"),
                      tenants=chosen.tenants, features=chosen.features, models=chosen.models)
    spend = usage_totals(filters=filters).list_cost
    tenant = fixed.get("tenant", state.tenant)
    feature = fixed.get("feature", state.feature)
    model = fixed.get("model", state.model)
    budget = None if model else budget_for_scope(tenant=tenant, feature=feature, period=period)
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
        tasks=task_totals(filters=filters),
    )


# -- series ---------------------------------------------------------------------------------------


# -- breakdowns (features, tenants, models) -------------------------------------------------------


@dataclass(frozen=True)
class BreakdownRow:
    row: Row
    spark: list[float]  # list cost per step, oldest first
    tasks: TaskFigures = field(default_factory=TaskFigures)  # this value's tasks (none counted yet: all zero)


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
    "tasks": lambda r: r.tasks.tasks,
    "per_task": lambda r: (r.tasks.cost_per_successful_task if r.tasks.cost_per_successful_task is not None
                           else Decimal(-1)),
    "waste": lambda r: r.tasks.waste,
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
    tasks: dict[str, TaskRow] = tasks_by(filters=filters, dimension=dimension)
    sparks: dict[str, list[float]] = {}
    for point in series:
        sparks.setdefault(point.value or "", []).append(float(point.list_cost))
    result = [BreakdownRow(row, sparks.get(row.value, []), tasks.get(row.value, TaskFigures())) for row in rows]
    ascending = sort.startswith("-")
    key = SORT_KEYS.get(sort.lstrip("-"), SORT_KEYS[DEFAULT_SORT])
    # Names read A→Z by default; numbers largest first.
    reverse = not ascending if sort.lstrip("-") != "name" else ascending
    result.sort(key=key, reverse=reverse)
    return Breakdown(result, series)


def budgets_for(*, dimension: Dimension, value: str) -> list[BudgetStatus]:
    """The budgets whose scope names this tenant or feature (models carry no budgets)."""
    return budget_statuses_of(list(budgets_naming(dimension=dimension, value=value)))


def task_points(*, state: FilterState, fixed: dict[str, str] | None = None) -> list[TaskPoint]:
    """The page's tasks per step (cost per successful task, waste)."""
    return task_series(filters=state.filters(**(fixed or {})), step=state.step)


def regressions_marked(*, state: FilterState, fixed: dict[str, str]) -> list[CostRegression]:
    """The regressions a page's charts mark: a feature's (of the chosen model, or feature-wide) in the range."""
    feature = fixed.get("feature") or state.feature
    if not feature:
        return []
    model = fixed.get("model") or state.model
    return [r for r in regressions_of(feature=feature, start=state.start, end=state.end)
            if not r.model or not model or r.model == model]


def series(*, state: FilterState, fixed: dict[str, str] | None = None,
           split: Dimension | None = None) -> tuple[list[SeriesPoint], list[SpendPoint]]:
    """The page's usage series, and its spend split by ``split`` (for the stacked spend chart)."""
    filters = state.filters(**(fixed or {}))
    total = usage_series(filters=filters, step=state.step)
    if split is None:
        return total, []
    return total, spend_series(filters=filters, step=state.step, dimension=split)
