"""Reads about budgets: spend so far in the current period, the breach forecast, and the event log.

Spend comes from ``spend`` (rollups plus the raw tail, so the last seconds count; many budgets'
in one read). A period whose start is older than the minute rollups' retention is counted from its start
rounded down to the hour (``Totals.start``): exact in every zone with a whole-hour offset, up to
the offset's extra minutes early elsewhere (India, Nepal).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from django.core.paginator import Page, Paginator
from django.db.models import Case, F, IntegerField, Q, QuerySet, Value, When
from django.utils import timezone

from finops.budgets.models import ANY, Budget, BudgetEvent, EventKind, Grant, State, Unit, amount_label
from finops.budgets.periods import Period, period_at
from finops.budgets.spend import budgets_spend, period_use
from finops.lib.timezones import org_time_zone

# A forecast needs some history: before this share of the period has passed, a burst looks like a trend.
FORECAST_MIN_ELAPSED = 0.05
SECONDS_PER_HOUR = Decimal(3600)
STALE_AFTER = dt.timedelta(minutes=1)


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
    as_of: dt.datetime | None = None  # when ``used`` was evaluated; None: read live

    @property
    def stale_since(self) -> dt.datetime | None:
        """When ``used`` was evaluated, if that was over a minute ago (evaluation has stalled)."""
        if self.as_of is not None and timezone.now() - self.as_of > STALE_AFTER:
            return self.as_of
        return None

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


def budget_spend(*, budget: Budget, period: Period) -> Decimal:
    """What the budget's scope has used in ``period`` so far, in the budget's unit."""
    return period_use(period=period, tenants=() if budget.tenant == ANY else (budget.tenant,),
                      features=() if budget.feature == ANY else (budget.feature,)
                      ).use(budget.tenant, budget.feature).amount(budget.unit)


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
    per_hour = rate * SECONDS_PER_HOUR
    # Compared in seconds before any datetime is made: a breach ages away (a limit a million times
    # the spend) is simply not this period, never a date past the calendar's end.
    to_breach = (limit - used) / rate
    if to_breach >= Decimal(repr((period.end - now).total_seconds())):
        return Forecast(None, per_hour, "not before the period resets")
    at = now + dt.timedelta(seconds=float(to_breach))
    local = timezone.localtime(at, org_time_zone())
    return Forecast(at, per_hour, f"around {local:%Y-%m-%d %H:%M %Z} at {amount_label(unit, per_hour)}/hour")


def budget_status(*, budget: Budget, now: dt.datetime | None = None) -> BudgetStatus:
    return budget_statuses_of([budget], now=now)[0]


def budget_statuses_of(budgets: Sequence[Budget], *, now: dt.datetime | None = None,
                       evaluated: bool = False) -> list[BudgetStatus]:
    """The status of each of ``budgets``, in order: their live spend, read together (``spend``);
    with ``evaluated``, the spend their last evaluation stored where it was in this period (the
    budgets list: a few seconds old, what it sorts by, and no read of telemetry for a page of
    them), live for the others."""
    now = now or timezone.now()
    periods = {budget.pk: period_at(budget.period, now) for budget in budgets}
    stored = {budget.pk: budget.spend for budget in budgets
              if evaluated and budget.evaluated_at is not None and budget.period_start == periods[budget.pk].start}
    spend = {**budgets_spend([b for b in budgets if b.pk not in stored], now=now), **stored}
    statuses = []
    for budget in budgets:
        period = periods[budget.pk]
        used = spend[budget.pk]
        if budget.state == State.EXCEEDED and budget.period_start == period.start:
            forecast = Forecast(None, None, "limit reached")  # a hard budget used up short of 100% included
        else:
            forecast = breach_forecast(used=used, limit=budget.limit, period=period, now=now, unit=budget.unit)
        as_of = budget.evaluated_at if budget.pk in stored else None
        statuses.append(BudgetStatus(budget, period, used, forecast, as_of))
    return statuses


def budget_statuses(*, now: dt.datetime | None = None) -> list[BudgetStatus]:
    """Every budget's live status (the CSV export)."""
    return budget_statuses_of(list(Budget.objects.all()), now=now)


# The budgets list's orders: by name, scope, period, limit, state, and the share of the limit used
# (at the last evaluation: what the database can sort 10,000 budgets by).
BUDGET_ORDERS: dict[str, tuple[str, ...]] = {
    "name": ("name", "id"), "scope": ("tenant", "feature", "id"), "period": ("period", "name", "id"),
    "limit": ("limit", "id"), "used": ("used", "id"), "state": ("state_rank", "used", "id"),
}
DEFAULT_BUDGET_ORDER = "-used"
BUDGETS_PER_PAGE = 50
_STATE_RANK = Case(When(paused=True, then=Value(-1)), When(state=State.EXCEEDED, then=Value(2)),
                   When(state=State.WARNING, then=Value(1)), default=Value(0), output_field=IntegerField())


@dataclass(frozen=True)
class BudgetPage:
    """One page of the budgets list: its budgets' live statuses and where it lies in the whole."""

    statuses: list[BudgetStatus]
    page: Page
    search: str
    order: str

    @property
    def sorts(self) -> dict[str, dict[str, str]]:
        """Per sortable column: the order its header link asks for (the other direction when it is
        the current one; names A→Z, numbers largest first otherwise) and its arrow."""
        links = {}
        for name in BUDGET_ORDERS:
            if self.order == name:
                links[name] = {"order": f"-{name}", "arrow": "▲"}
            elif self.order == f"-{name}":
                links[name] = {"order": name, "arrow": "▼"}
            else:
                links[name] = {"order": name if name in ("name", "scope", "period") else f"-{name}", "arrow": ""}
        return links


def budget_order(order: str) -> str:
    """``order`` if the list knows it (a name from ``BUDGET_ORDERS``, ``-`` first for descending)."""
    return order if order.lstrip("-") in BUDGET_ORDERS else DEFAULT_BUDGET_ORDER


def budget_page(*, search: str = "", order: str = DEFAULT_BUDGET_ORDER, page: int | str = 1,
                per_page: int = BUDGETS_PER_PAGE, now: dt.datetime | None = None) -> BudgetPage:
    """A page of budgets whose name, tenant or feature contains ``search``, in ``order``, with
    the status of each as of its last evaluation (``budget_statuses_of``). A page number past the
    end is the last page."""
    search, order = search.strip()[:100], budget_order(order)
    budgets = Budget.objects.annotate(used=F("spend") / F("limit"), state_rank=_STATE_RANK)
    if search:
        budgets = budgets.filter(Q(name__icontains=search) | Q(tenant__icontains=search) |
                                 Q(feature__icontains=search))
    fields = BUDGET_ORDERS[order.lstrip("-")]
    descending = order.startswith("-")
    budgets = budgets.order_by(*(f"-{name}" if descending and name != "id" else name for name in fields))
    chosen = Paginator(budgets, per_page).get_page(page)
    return BudgetPage(budget_statuses_of(list(chosen.object_list), now=now, evaluated=True), chosen, search, order)


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
