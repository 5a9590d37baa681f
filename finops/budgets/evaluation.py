"""Budget evaluation, every few seconds: each active budget's spend, state, threshold crossings and
forecast, its grants if it is hard, then every runtime's ruleset compiled from the result.

Budgets are evaluated as a set, in chunks (``BUDGET_EVALUATION_CHUNK`` budgets, tenant by tenant so
that a chunk's reads narrow to its tenants): a chunk's spend comes from one grouped read per period
kind (``spend.budgets_spend``), its recorded alerts and granted totals from one query each, its
events and state from bulk writes, and its hard budgets' grants from ``grants_top_up_many``. A
whole pass is ``budgets_evaluate``; the Celery task spreads the chunks over workers when there are
several (``tasks.evaluate``), and ``evaluation_finish`` compiles the rulesets after the last one.

A chunk is one transaction holding its budgets' rows (``SELECT … FOR UPDATE``, in pk order; SQLite
serialises writers anyway), so two passes at once never interleave on a budget: the second sees what
the first recorded, and the unique constraints on threshold and forecast events are the backstop.
One bad budget cannot stop the others: an error computing one budget skips just that budget, and
an error in the chunk's shared reads or writes has the chunk evaluated again one budget at a time.
Evaluation only records: alert emails are sent from the events it writes (``alerts``), rulesets
are pushed from the documents it compiles.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from finops.budgets.grants import GrantRow, grants_top_up_many, hard_budgets_exhausted
from finops.budgets.models import AlertStatus, Budget, BudgetEvent, EventKind, State
from finops.budgets.periods import Period, period_at
from finops.budgets.rulesets import rulesets_compile
from finops.budgets.selectors import breach_forecast
from finops.budgets.spend import active_budget_scopes, budgets_spend
from finops.lib.bulk import rows_update
from finops.lib.lookups import AnyOf
from finops.lib.timezones import org_time_zone
from finops.pricing.services import QUANTUM
from finops.runtimes.selectors import rulesets_to_push

logger = logging.getLogger("finops.budgets")

EXHAUSTED_NOTE = "Hard limit reached: what is left cannot fit another request, so the runtimes refuse them."


@dataclass
class Evaluation:
    evaluated: int = 0
    failed: int = 0
    events: int = 0
    alerts_pending: bool = False
    rulesets_changed: list[int] = field(default_factory=list)  # runtime pks with a new version
    rulesets_to_push: list[int] = field(default_factory=list)  # runtime pks whose ack is behind
    # The hard budgets' grants as the pass left them, for compiling the rulesets (not in as_dict).
    grants: dict[int, list[GrantRow]] = field(default_factory=dict, repr=False)

    def add(self, other: Evaluation) -> None:
        """Count a chunk's evaluation into this pass's."""
        self.evaluated += other.evaluated
        self.failed += other.failed
        self.events += other.events
        self.grants.update(other.grants)

    def as_dict(self) -> dict[str, Any]:
        return {"evaluated": self.evaluated, "failed": self.failed, "events": self.events,
                "alerts_pending": self.alerts_pending, "rulesets_changed": self.rulesets_changed,
                "rulesets_to_push": self.rulesets_to_push}


def evaluation_chunks(*, size: int | None = None) -> list[list[int]]:
    """The active budgets' pks in chunks of ``size``, ordered by scope (tenant, feature), so that
    a chunk covers few tenants and its spend reads narrow to them."""
    size = size or settings.BUDGET_EVALUATION_CHUNK
    ids = list(Budget.objects.filter(paused=False).order_by("tenant", "feature", "pk").values_list("pk", flat=True))
    return [ids[at:at + size] for at in range(0, len(ids), size)]


def budgets_evaluate(*, now: dt.datetime | None = None) -> Evaluation:
    """Evaluate every active budget, chunk after chunk, then compile each runtime's ruleset. The
    spend of all of them is read once, before the first chunk: one read per period kind for the
    whole pass instead of one per chunk."""
    now = now or timezone.now()
    result = Evaluation()
    chunks = evaluation_chunks()
    spend = budgets_spend(active_budget_scopes(), now=now) if len(chunks) > 1 else None
    for chunk in chunks:
        result.add(budgets_evaluate_chunk(budget_ids=chunk, now=now, spend=spend))
    return evaluation_finish(result=result, now=now)


def evaluation_finish(*, result: Evaluation, now: dt.datetime) -> Evaluation:
    """After a pass's last chunk: compile the rulesets and say what to push and send."""
    result.rulesets_changed = rulesets_compile(now=now, grants=result.grants)
    result.rulesets_to_push = rulesets_to_push(now=now)
    result.alerts_pending = BudgetEvent.objects.filter(alert_status=AlertStatus.PENDING).exists()
    return result


def budget_evaluate(*, budget_id: int, now: dt.datetime) -> int:
    """Evaluate one budget at ``now`` (without compiling rulesets); the number of events written."""
    return budgets_evaluate_chunk(budget_ids=[budget_id], now=now).events


def budgets_evaluate_chunk(*, budget_ids: Sequence[int], now: dt.datetime,
                           spend: Mapping[int, Decimal] | None = None) -> Evaluation:
    """Evaluate these budgets at ``now`` together, in one transaction; where that fails as a whole,
    one at a time, so that one budget's failure costs only that budget. ``spend``: the pass's
    spend of every budget, read already (read here for these budgets otherwise)."""
    try:
        with transaction.atomic():
            return _evaluate_locked(budget_ids, now, spend)
    except Exception:
        if len(budget_ids) == 1:
            logger.exception("budget %s: evaluation failed", budget_ids[0])
            return Evaluation(failed=1)
        logger.exception("budgets %s..%s: evaluating %d together failed; evaluating them one at a time",
                         budget_ids[0], budget_ids[-1], len(budget_ids))
    result = Evaluation()
    for budget_id in budget_ids:
        result.add(budgets_evaluate_chunk(budget_ids=[budget_id], now=now, spend=spend))
    return result


def budget_state(*, budget: Budget, used: Decimal) -> str:
    """Exceeded at 100% of the limit; warning from the lowest threshold below 100%."""
    if used >= budget.limit:
        return State.EXCEEDED
    warnings = [t for t in budget.thresholds if t < 100]
    if warnings and used * 100 >= budget.limit * min(warnings):
        return State.WARNING
    return State.OK


def _evaluate_locked(budget_ids: Sequence[int], now: dt.datetime, read: Mapping[int, Decimal] | None) -> Evaluation:
    budgets = list(Budget.objects.select_for_update().filter(AnyOf(F("pk"), budget_ids), paused=False)
                   .defer("created_at", "updated_at", "recipients", "evaluated_at").order_by("pk"))
    result = Evaluation()
    if not budgets:
        return result
    periods = {budget.pk: period_at(budget.period, now) for budget in budgets}
    spend = read if read is not None and all(b.pk in read for b in budgets) else budgets_spend(budgets, now=now)
    hard = [(budget, periods[budget.pk]) for budget in budgets if budget.is_hard]
    # A hard budget whose rest cannot fit a request is at its limit for states and alerts.
    exhausted = hard_budgets_exhausted(pairs=hard, used=spend) if hard else set()
    recorded = _recorded_alerts(budgets, periods)
    events: list[BudgetEvent] = []
    evaluated: list[Budget] = []
    for budget in budgets:
        try:
            period, used = periods[budget.pk], spend[budget.pk]
            level = budget.limit if budget.pk in exhausted else used
            written = _state_events(budget=budget, period=period, used=used, level=level)
            written += _alert_events(budget=budget, period=period, used=used, level=level, now=now,
                                     recorded=recorded.get(budget.pk, set()))
            state, stored = budget_state(budget=budget, used=level), used.quantize(QUANTUM)
        except Exception:  # one broken budget must not stop the others' evaluation or enforcement
            logger.exception("budget %s: evaluation failed", budget.pk)
            result.failed += 1
            continue
        events += written
        budget.state, budget.period_start, budget.spend, budget.evaluated_at = state, period.start, stored, now
        evaluated.append(budget)
    BudgetEvent.objects.bulk_create(events, ignore_conflicts=True, batch_size=1000)
    rows_update(Budget, evaluated, ["state", "period_start", "spend", "evaluated_at"])
    result.grants = grants_top_up_many(pairs=[(budget, periods[budget.pk]) for budget in evaluated if budget.is_hard],
                                       now=now)
    result.evaluated += len(evaluated)
    result.events += len(events)
    return result


def _recorded_alerts(budgets: list[Budget], periods: dict[int, Period]) -> dict[int, set[tuple[str, int | None]]]:
    """The threshold and forecast events each budget has recorded in its current period."""
    recorded: dict[int, set[tuple[str, int | None]]] = {}
    rows = BudgetEvent.objects.filter(
        AnyOf(F("budget_id"), [budget.pk for budget in budgets]), kind__in=[EventKind.THRESHOLD, EventKind.FORECAST],
        period_start__in={period.start for period in periods.values()},
    ).values_list("budget_id", "period_start", "kind", "threshold")
    for budget_id, period_start, kind, threshold in rows:
        if periods[budget_id].start == period_start:
            recorded.setdefault(budget_id, set()).add((kind, threshold))
    return recorded


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


def _alert_events(*, budget: Budget, period: Period, used: Decimal, level: Decimal, now: dt.datetime,
                  recorded: set[tuple[str, int | None]]) -> list[BudgetEvent]:
    """Threshold crossings and the forecast not yet recorded in this period."""
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
