"""CSV tables of budgets and their alert log (``lib.tables``): the budgets page's and a tenant's
or feature's page's."""

from __future__ import annotations

from collections.abc import Iterable

from finops.budgets.models import BudgetEvent
from finops.budgets.selectors import BudgetStatus
from finops.lib.tables import Table


def budgets_table(statuses: list[BudgetStatus], *, stem: str) -> Table:
    return Table(stem, ["budget", "tenant", "feature", "period", "unit", "used", "limit", "fraction_used", "state",
                        "period_start", "forecast_breach_at"],
                 ([s.budget.name, s.budget.tenant, s.budget.feature, s.budget.period, s.budget.unit, s.used,
                   s.budget.limit, s.fraction, s.state, s.period.start, s.forecast.at] for s in statuses))


def alerts_table(events: Iterable[BudgetEvent], *, stem: str) -> Table:
    return Table(stem, ["created_at", "budget", "kind", "threshold_percent", "note", "spend", "limit", "unit",
                        "forecast_at", "email_status", "sent_at"],
                 ([e.created_at, e.budget.name, e.kind, e.threshold, e.note, e.spend, e.limit, e.unit, e.forecast_at,
                   e.alert_status, e.sent_at] for e in events))
