"""What many budgets have used, read together: a few grouped queries per pass, not one per budget.

Every budget counts the requests of one scope (a tenant, a feature, both, or ``*`` for any) in its
current period. All budgets of one period kind share that period, so one read per period, grouped
by (tenant, feature), gives every scope's use in it: a budget of one tenant and one feature reads
its group, a budget with ``*`` the sum over the groups it covers (``ScopeIndex``). The read is the
dashboards' (``telemetry.sources``): rollup rows of the period's tiles plus the raw tail after the
rollups' watermark, read consistently, so a budget's spend is what ``usage_totals`` says of its
scope and period, exactly (tokens and costs are integers and decimals; GPU-hours are a float sum
rounded to micro GPU-hours).

``scope_index`` only adds up what the database grouped; ``budgets_spend`` answers for any set of
budgets: an evaluation pass (all of them), a page of the budgets list (a few dozen: the read is
then narrowed to their tenants or features when none of them spans all).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

from django.db.models import Aggregate, F, Q, Sum

from finops.budgets.models import ANY, Budget, Unit
from finops.budgets.periods import Period, period_at
from finops.telemetry.models import Rollup
from finops.telemetry.ranges import Filters, rollup_plan
from finops.telemetry.sources import fetch_rows, in_tiles, read_rollups, tail_events
from finops.telemetry.sums import ZERO, cost_sum, cost_value

SECONDS_PER_HOUR = Decimal(3600)
MICRO = Decimal("0.000001")


@dataclass(slots=True)
class Use:
    """What one group of requests used, in every budget unit's terms."""

    tokens: int = 0  # spent: a cache hit's tokens are not
    list_cost: Decimal = ZERO
    hardware_cost: Decimal = ZERO
    gpu_seconds: float = 0.0

    def add(self, other: Use) -> None:
        self.tokens += other.tokens
        self.list_cost += other.list_cost
        self.hardware_cost += other.hardware_cost
        self.gpu_seconds += other.gpu_seconds

    def amount(self, unit: str) -> Decimal:
        """This use measured in a budget's unit."""
        if unit == Unit.USD_LIST:
            return self.list_cost
        if unit == Unit.USD_HARDWARE:
            return self.hardware_cost
        if unit == Unit.TOKENS:
            return Decimal(self.tokens)
        if unit == Unit.GPU_HOURS:
            return (Decimal(repr(self.gpu_seconds)) / SECONDS_PER_HOUR).quantize(MICRO)
        raise ValueError(f"unknown unit {unit!r}")


def use_aggregates(*, rollups: bool = False) -> dict[str, Aggregate]:
    """The SQL sums a ``Use`` is read from, over raw events or (``rollups``) over rollup rows. A
    cache hit's tokens were saved, not spent (``Sums.saved_tokens``): budgets in tokens leave them out."""
    saved = (Sum("saved_tokens") if rollups
             else Sum(F("prompt_tokens") + F("completion_tokens"), filter=Q(cache_hit=True)))
    return {"use_prompt_tokens": Sum("prompt_tokens"), "use_completion_tokens": Sum("completion_tokens"),
            "use_saved_tokens": saved, "use_list_cost": cost_sum("list_cost"),
            "use_hardware_cost": cost_sum("hardware_cost"), "use_gpu_seconds": Sum("gpu_seconds")}


def use_of(row: Mapping[str, Any]) -> Use:
    """A row of ``use_aggregates`` as a ``Use``."""
    return Use(tokens=int(row["use_prompt_tokens"] or 0) + int(row["use_completion_tokens"] or 0)
           - int(row["use_saved_tokens"] or 0),
               list_cost=cost_value(row["use_list_cost"]), hardware_cost=cost_value(row["use_hardware_cost"]),
               gpu_seconds=float(row["use_gpu_seconds"] or 0.0))


@dataclass
class ScopeIndex:
    """Use per (tenant, feature) group and its sums over either or both (``*``): what any budget
    scope used, in one lookup. ``key`` splits each scope further (by runtime, for grants). With
    ``wanted`` (the scopes budgets name), only the sums some budget reads are added up: a pass
    over a thousand tenants adds tens of thousands of groups."""

    cells: dict[tuple[str, str], dict[Any, Use]] = field(default_factory=dict)
    wanted: set[tuple[str, str]] | None = None

    def add(self, tenant: str, feature: str, use: Use, key: Any = None) -> None:
        for scope in ((tenant, feature), (tenant, ANY), (ANY, feature), (ANY, ANY)):
            if self.wanted is None or scope in self.wanted:
                self.cells.setdefault(scope, {}).setdefault(key, Use()).add(use)

    def use(self, tenant: str, feature: str, key: Any = None) -> Use:
        return self.cells.get((tenant, feature), {}).get(key) or Use()


def scope_index(rows: Iterable[Mapping[str, Any]], *, key: str | None = None,
                wanted: set[tuple[str, str]] | None = None) -> ScopeIndex:
    """Rows of ``use_aggregates`` grouped by ``tenant`` and ``feature`` (and ``key``), indexed
    (only the ``wanted`` scopes, if given)."""
    index = ScopeIndex(wanted=wanted)
    for row in rows:
        index.add(row["tenant"], row["feature"], use_of(row), row[key] if key else None)
    return index


def period_use(*, period: Period, tenants: Iterable[str] = (), features: Iterable[str] = (),
               wanted: set[tuple[str, str]] | None = None) -> ScopeIndex:
    """What every (tenant, feature) used in ``period`` (optionally only the listed tenants or
    features, and only the ``wanted`` scopes), from the rollups plus the raw tail: one consistent
    read of each."""
    filters = Filters(start=period.start, end=period.end, tenants=tuple(sorted(set(tenants))),
                      features=tuple(sorted(set(features))))
    plan = rollup_plan(filters=filters)

    def rolled_up() -> list[dict[str, Any]]:
        rows = Rollup.objects.filter(in_tiles(plan))
        if filters.tenants:
            rows = rows.filter(tenant__in=filters.tenants)
        if filters.features:
            rows = rows.filter(feature__in=filters.features)
        return fetch_rows(rows.order_by().values("tenant", "feature").annotate(**use_aggregates(rollups=True)))

    watermark, rolled = read_rollups(rolled_up, empty=[])
    tail = fetch_rows(tail_events(plan, filters, watermark).values("tenant", "feature").annotate(**use_aggregates()))
    return scope_index([*rolled, *tail], wanted=wanted)


class Scoped(Protocol):
    """What a spend read needs of a budget: a ``Budget``, or ``BudgetScope`` where nothing else is."""

    pk: int
    tenant: str
    feature: str
    period: str
    unit: str


@dataclass(frozen=True, slots=True)
class BudgetScope:
    pk: int
    tenant: str
    feature: str
    period: str
    unit: str


def active_budget_scopes() -> list[BudgetScope]:
    """Every active budget's scope, period kind and unit: what a pass reads spend for."""
    return [BudgetScope(*row) for row in
            Budget.objects.filter(paused=False).values_list("pk", "tenant", "feature", "period", "unit")]


def budgets_spend(budgets: Iterable[Scoped], *, now: dt.datetime) -> dict[int, Decimal]:
    """What each budget's scope has used in its current period at ``now``, in its unit, by pk."""
    by_period: dict[Period, list[Scoped]] = {}
    for budget in budgets:
        by_period.setdefault(period_at(budget.period, now), []).append(budget)
    spend: dict[int, Decimal] = {}
    for period, members in by_period.items():
        tenants = {b.tenant for b in members}
        features = {b.feature for b in members}
        index = period_use(period=period, tenants=() if ANY in tenants else tenants,
                           features=() if ANY in features else features,
                           wanted={(b.tenant, b.feature) for b in members})
        for budget in members:
            spend[budget.pk] = index.use(budget.tenant, budget.feature).amount(budget.unit)
    return spend
