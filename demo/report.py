"""The demo's closing report: what the control plane stored from this run, per tenant and feature.

Import only after ``django.setup()``.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from django.db.models import Count, Q, Sum

from finops.budgets.models import Budget, amount_label
from finops.telemetry.models import RequestEvent


def _money(value: Decimal | None) -> str:
    return "n/a" if value is None else f"${value:,.4f}"


def print_report(*, runtime_name: str, since: dt.datetime) -> None:
    rows = (RequestEvent.objects.filter(runtime_id=runtime_name, received_at__gte=since)
            .values("tenant", "feature").order_by("tenant", "feature")
            .annotate(requests=Count("event_id"), ok=Count("event_id", filter=Q(status="ok")),
                      refused=Count("event_id", filter=Q(status__in=["rejected_budget", "rejected_rule"])),
                      shed=Count("event_id", filter=Q(status="shed")), prompt=Sum("prompt_tokens"),
                      completion=Sum("completion_tokens"), list_cost=Sum("list_cost"),
                      hardware_cost=Sum("hardware_cost"), gpu=Sum("gpu_seconds"),
                      exact=Count("event_id", filter=Q(cache_hit=True) & ~Q(cache_kind="semantic")),
                      semantic=Count("event_id", filter=Q(cache_hit=True, cache_kind="semantic"))))
    header = (f"{'tenant':<9} {'feature':<15} {'reqs':>5} {'ok':>4} {'429':>4} {'shed':>4} {'exact':>5} "
              f"{'semant':>6} {'prompt':>7} {'compl':>6} {'list $':>9} {'hardware $':>10} {'busy s':>7}")
    print("\nStored by the control plane for this run ('exact', 'semant': answered from the exact and the "
          "semantic cache):\n")
    print(header)
    print("-" * len(header))
    for row in rows:
        busy = "n/a" if row["gpu"] is None else f"{row['gpu']:.1f}"
        print(f"{row['tenant']:<9} {row['feature']:<15} {row['requests']:>5} {row['ok']:>4} {row['refused']:>4} "
              f"{row['shed']:>4} {row['exact']:>5} {row['semantic']:>6} {row['prompt'] or 0:>7} "
              f"{row['completion'] or 0:>6} {_money(row['list_cost']):>9} "
              f"{_money(row['hardware_cost']):>10} {busy:>7}")
    print("\nBudgets (evaluated every 5 s by the worker):")
    for budget in Budget.objects.order_by("name"):
        percent = budget.spend / budget.limit * 100 if budget.limit else Decimal(0)
        print(f"  {budget.name:<26} {budget.state:<9} {percent:6.1f}%  {amount_label(budget.unit, budget.spend)} "
              f"of {amount_label(budget.unit, budget.limit)} ({budget.get_period_display().lower()})")
