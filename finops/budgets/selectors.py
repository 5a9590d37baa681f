"""Reads about budgets: spend so far in the current period, the breach forecast, and the event log.

Spend comes from telemetry's ``usage_totals`` (rollups plus the raw tail, so the last seconds
count). A period whose start is older than the minute rollups' retention is counted from its start
rounded down to the hour (``Totals.start``): exact in every zone with a whole-hour offset, up to
the offset's extra minutes early elsewhere (India, Nepal).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal

from django.db.models import QuerySet
from django.utils import timezone

from finops.budgets.models import ANY, Budget, BudgetEvent, EventKind, Grant, State, Unit, amount_label
from finops.budgets.periods import Period, period_at
from finops.lib.timezones import org_time_zone
from finops.telemetry.ranges import Filters
from finops.telemetry.usage import Totals, usage_totals

# A forecast needs some history: before this share of the period has passed, a burst looks like a trend.
FORECAST_MIN_ELAPSED = 0.05
SECONDS_PER_HOUR = Decimal(3600)
TOKEN = Decimal(1)
MICRO = Decimal("0.000001")


@dataclass(frozen=True)
class Forecast:
    """When the limit will be reached at the period's average burn rate so far, if inside the period."""

    at: dt.datetime | None
    rate_per_hour: Decimal | None
    summary: str


@dataclass(frozen=True)
class BudgetStatus:
    budget: Budget
    period: Period
    used: Decimal
    forecast: Forecast

    @property
    def fraction(self) -> Decimal:
        return self.used / self.budget.limit

    @property
    def percent(self) -> float:
        return float(self.fraction * 100)

    @property
    def bar_percent(self) -> int:
        return max(0, min(100, int(self.percent)))

    @property
    def state(self) -> str:
        """The recorded state, or ``paused``; a budget not evaluated in this period yet is ``ok``."""
        if self.budget.paused:
            return "paused"
        if self.budget.period_start != self.period.start:
            return State.OK
        return self.budget.state

    @property
    def used_label(self) -> str:
        return amount_label(self.budget.unit, self.used)

    @property
    def limit_label(self) -> str:
        return amount_label(self.budget.unit, self.budget.limit)


def unit_amount(unit: str, totals: Totals) -> Decimal:
    """What ``totals`` used, measured in a budget's unit."""
    if unit == Unit.USD_LIST:
        return totals.list_cost
    if unit == Unit.USD_HARDWARE:
        return totals.hardware_cost
    if unit == Unit.TOKENS:  # a cache hit's tokens were saved, not spent
        return Decimal(totals.spent_tokens)
    if unit == Unit.GPU_HOURS:
        return (Decimal(repr(totals.gpu_seconds)) / SECONDS_PER_HOUR).quantize(MICRO)
    raise ValueError(f"unknown unit {unit!r}")


def budget_filters(*, budget: Budget, period: Period) -> Filters:
    return Filters(start=period.start, end=period.end,
                   tenants=() if budget.tenant == ANY else (budget.tenant,),
                   features=() if budget.feature == ANY else (budget.feature,))


def budget_spend(*, budget: Budget, period: Period) -> Decimal:
    """What the budget's scope has used in ``period`` so far, in the budget's unit."""
    return unit_amount(budget.unit, usage_totals(filters=budget_filters(budget=budget, period=period)))


def breach_forecast(*, used: Decimal, limit: Decimal, period: Period, now: dt.datetime, unit: str) -> Forecast:
    """Project the period's average burn rate so far forward; the breach counts only if it falls
    before the period resets."""
    if used >= limit:
        return Forecast(None, None, "limit reached")
    elapsed = Decimal(repr((now - period.start).total_seconds()))
    if elapsed <= 0 or elapsed < Decimal(repr(period.length.total_seconds())) * Decimal(repr(FORECAST_MIN_ELAPSED)):
        return Forecast(None, None, "too early in the period to tell")
    if used <= 0:
        return Forecast(None, Decimal(0), "nothing spent yet")
    rate = used / elapsed  # per second
    at = now + dt.timedelta(seconds=float((limit - used) / rate))
    per_hour = rate * SECONDS_PER_HOUR
    if at >= period.end:
        return Forecast(None, per_hour, "not before the period resets")
    local = timezone.localtime(at, org_time_zone())
    return Forecast(at, per_hour, f"around {local:%Y-%m-%d %H:%M %Z} at {amount_label(unit, per_hour)}/hour")


def budget_status(*, budget: Budget, now: dt.datetime | None = None) -> BudgetStatus:
    now = now or timezone.now()
    period = period_at(budget.period, now)
    used = budget_spend(budget=budget, period=period)
    if budget.state == State.EXCEEDED and budget.period_start == period.start:
        forecast = Forecast(None, None, "limit reached")  # a hard budget used up short of 100% included
    else:
        forecast = breach_forecast(used=used, limit=budget.limit, period=period, now=now, unit=budget.unit)
    return BudgetStatus(budget, period, used, forecast)


def budget_statuses(*, now: dt.datetime | None = None) -> list[BudgetStatus]:
    now = now or timezone.now()
    return [budget_status(budget=budget, now=now) for budget in Budget.objects.all()]


def budgets_naming(*, dimension: str, value: str) -> QuerySet[Budget]:
    """The budgets whose scope names this tenant or feature, by name (models carry no budgets)."""
    if dimension not in ("tenant", "feature"):
        return Budget.objects.none()
    return Budget.objects.filter(**{dimension: value}).order_by("name")


def budget_for_scope(*, tenant: str, feature: str, period: str) -> Budget | None:
    """The smallest active list-price budget of exactly this scope and period ("" for any)."""
    return (Budget.objects.filter(tenant=tenant or ANY, feature=feature or ANY, period=period,
                                  unit=Unit.USD_LIST, paused=False)
            .order_by("limit", "id").first())


def budget_state_history(*, budget: Budget, limit: int = 50) -> QuerySet[BudgetEvent]:
    return budget.events.filter(kind=EventKind.STATE_CHANGE).order_by("-created_at", "-id")[:limit]


def budget_alert_log(*, budget: Budget | None = None, limit: int = 50) -> QuerySet[BudgetEvent]:
    """Threshold and forecast events with what became of their emails, newest first."""
    events = BudgetEvent.objects.filter(kind__in=[EventKind.THRESHOLD, EventKind.FORECAST]).select_related("budget")
    if budget is not None:
        events = events.filter(budget=budget)
    return events.order_by("-created_at", "-id")[:limit]


def budget_grants(*, budget: Budget, period: Period) -> QuerySet[Grant]:
    return budget.grants.filter(period_start=period.start).select_related("runtime").order_by("runtime__name")
