"""Writes to budgets: create, change, pause, delete, and the evaluation that runs every few seconds.

Evaluation (``budgets_evaluate``) is safe to run twice at once: each budget is evaluated in its own
transaction with its row locked (``SELECT … FOR UPDATE``; SQLite serialises writers anyway), so the
second run sees what the first recorded, and the unique constraints on threshold and forecast
events are the backstop. It only records: alert emails are sent from the events it writes
(``finops.budgets.alerts``), rulesets are pushed from the documents it compiles.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from finops.budgets.grants import grants_top_up, hard_budget_exhausted
from finops.budgets.models import AlertStatus, Budget, BudgetEvent, EventKind, State
from finops.budgets.periods import Period, period_at
from finops.budgets.rulesets import rulesets_compile
from finops.budgets.selectors import breach_forecast, budget_spend
from finops.lib.timezones import org_time_zone
from finops.pricing.services import QUANTUM
from finops.runtimes.selectors import rulesets_to_push

logger = logging.getLogger("finops.budgets")

# What a budget measures; changing it mid-period would make its events, grants and the runtimes'
# ledgers count two different things under one name. Create a new budget instead.
FIXED_AFTER_CREATE = ("tenant", "feature", "period", "unit")
EXHAUSTED_NOTE = "Hard limit reached: what is left cannot fit another request, so the runtimes refuse them."
EDITABLE_FIELDS = (
    "name", "tenant", "feature", "period", "unit", "limit", "thresholds", "recipients", "action",
    "throttle_tokens_per_minute", "throttle_requests_per_minute", "downgrade_model", "cap_max_tokens",
    "enforcement", "on_expiry", "paused",
)


def budget_create(*, fields: Mapping[str, Any]) -> Budget:
    """Create a budget from ``fields`` (any of ``EDITABLE_FIELDS``); ``ValidationError`` if invalid."""
    unknown = set(fields) - set(EDITABLE_FIELDS)
    if unknown:
        raise ValueError(f"not budget fields: {sorted(unknown)}")
    budget = Budget(**fields)
    budget.full_clean()
    budget.save()
    return budget


def budget_update(*, budget: Budget, fields: Mapping[str, Any]) -> Budget:
    """Change ``budget``; what it measures (``FIXED_AFTER_CREATE``) cannot change."""
    unknown = set(fields) - set(EDITABLE_FIELDS)
    if unknown:
        raise ValueError(f"not budget fields: {sorted(unknown)}")
    fixed = {name: ["Fixed once the budget exists: create a new budget to measure something else."]
             for name in FIXED_AFTER_CREATE if name in fields and fields[name] != getattr(budget, name)}
    if fixed:
        raise ValidationError(fixed)
    for name, value in fields.items():
        setattr(budget, name, value)
    budget.full_clean()
    budget.save(update_fields=[*fields, "updated_at"])
    return budget


def budget_pause(*, budget: Budget, paused: bool) -> Budget:
    """Pause (stop evaluating and enforcing) or resume a budget; its rules leave the runtimes'
    rulesets at the next evaluation."""
    budget.paused = paused
    budget.save(update_fields=["paused", "updated_at"])
    return budget


def budget_delete(*, budget: Budget) -> None:
    """Delete ``budget`` with its events and grants. Its row is locked first, the order evaluation
    takes the locks in: a delete during an evaluation waits for it, instead of deleting the grants
    the evaluation is about to update and deadlocking with it."""
    with transaction.atomic():
        if Budget.objects.select_for_update().filter(pk=budget.pk).first() is not None:
            budget.delete()


@dataclass
class Evaluation:
    evaluated: int = 0
    failed: int = 0
    events: int = 0
    alerts_pending: bool = False
    rulesets_changed: list[int] = field(default_factory=list)  # runtime pks with a new version
    rulesets_to_push: list[int] = field(default_factory=list)  # runtime pks whose ack is behind

    def as_dict(self) -> dict[str, Any]:
        return {"evaluated": self.evaluated, "failed": self.failed, "events": self.events,
                "alerts_pending": self.alerts_pending, "rulesets_changed": self.rulesets_changed,
                "rulesets_to_push": self.rulesets_to_push}


def budgets_evaluate(*, now: dt.datetime | None = None) -> Evaluation:
    """Evaluate every active budget, then compile each runtime's ruleset from the result."""
    now = now or timezone.now()
    result = Evaluation()
    for budget_id in Budget.objects.filter(paused=False).order_by("pk").values_list("pk", flat=True):
        try:
            result.events += budget_evaluate(budget_id=budget_id, now=now)
            result.evaluated += 1
        except Exception:  # one broken budget must not stop the others' evaluation or enforcement
            logger.exception("budget %s: evaluation failed", budget_id)
            result.failed += 1
    result.rulesets_changed = rulesets_compile(now=now)
    result.rulesets_to_push = rulesets_to_push(now=now)
    result.alerts_pending = BudgetEvent.objects.filter(alert_status=AlertStatus.PENDING).exists()
    return result


def budget_state(*, budget: Budget, used: Decimal) -> str:
    """Exceeded at 100% of the limit; warning from the lowest threshold below 100%."""
    if used >= budget.limit:
        return State.EXCEEDED
    warnings = [t for t in budget.thresholds if t < 100]
    if warnings and used * 100 >= budget.limit * min(warnings):
        return State.WARNING
    return State.OK


def budget_evaluate(*, budget_id: int, now: dt.datetime) -> int:
    """Evaluate one budget at ``now``: record its state changes, threshold crossings and forecast,
    and top up its grants if it is hard. Returns the number of events written."""
    with transaction.atomic():
        budget = Budget.objects.select_for_update().filter(pk=budget_id).first()
        if budget is None or budget.paused:
            return 0
        period = period_at(budget.period, now)
        used = budget_spend(budget=budget, period=period)
        # A hard budget whose rest cannot fit a request is at its limit for states and alerts.
        level = budget.limit if budget.is_hard and hard_budget_exhausted(budget=budget, period=period, used=used) \
            else used
        events = _state_events(budget=budget, period=period, used=used, level=level)
        events += _alert_events(budget=budget, period=period, used=used, level=level, now=now)
        if events:
            BudgetEvent.objects.bulk_create(events, ignore_conflicts=True)
        Budget.objects.filter(pk=budget.pk).update(
            state=budget_state(budget=budget, used=level), period_start=period.start,
            spend=used.quantize(QUANTUM), evaluated_at=now)
        if budget.is_hard:
            grants_top_up(budget=budget, period=period, now=now)
    return len(events)


def _event(budget: Budget, period: Period, used: Decimal, **fields: Any) -> BudgetEvent:
    return BudgetEvent(budget=budget, period_start=period.start, spend=used.quantize(QUANTUM), limit=budget.limit,
                       unit=budget.unit, **fields)


def _state_events(*, budget: Budget, period: Period, used: Decimal, level: Decimal) -> list[BudgetEvent]:
    events = []
    previous = budget.state
    if budget.period_start != period.start:
        if budget.period_start is not None and previous != State.OK:
            local = timezone.localtime(period.start, org_time_zone())
            note = f"The {budget.period_noun} reset at {local:%Y-%m-%d %H:%M %Z}."
            events.append(_event(budget, period, used, kind=EventKind.STATE_CHANGE, from_state=previous,
                                 to_state=State.OK, note=note))
        previous = State.OK
    state = budget_state(budget=budget, used=level)
    if state != previous:
        note = EXHAUSTED_NOTE if state == State.EXCEEDED and used < budget.limit else ""
        events.append(_event(budget, period, used, kind=EventKind.STATE_CHANGE, from_state=previous, to_state=state,
                             note=note))
    return events


def _alert_events(*, budget: Budget, period: Period, used: Decimal, level: Decimal, now: dt.datetime
                  ) -> list[BudgetEvent]:
    """Threshold crossings and the forecast not yet recorded in this period."""
    recorded = set(budget.events.filter(period_start=period.start, kind__in=[EventKind.THRESHOLD, EventKind.FORECAST])
                   .values_list("kind", "threshold"))
    events = [
        _event(budget, period, used, kind=EventKind.THRESHOLD, threshold=threshold, alert_status=AlertStatus.PENDING,
               note=EXHAUSTED_NOTE if used * 100 < budget.limit * threshold else "")
        for threshold in budget.thresholds
        if level * 100 >= budget.limit * threshold and (EventKind.THRESHOLD, threshold) not in recorded
    ]
    if (EventKind.FORECAST, None) not in recorded and level < budget.limit:
        forecast = breach_forecast(used=used, limit=budget.limit, period=period, now=now, unit=budget.unit)
        if forecast.at is not None:
            events.append(_event(budget, period, used, kind=EventKind.FORECAST, forecast_at=forecast.at,
                                 note=forecast.summary, alert_status=AlertStatus.PENDING))
    return events
