"""The control plane's side of the demo, done through its own services: the database, the demo
logins, the runtime's registration, a price book and the demo budgets; afterwards, what arrived.

Import this module only after ``django.setup()`` (``demo.__main__`` does that first). Every step
is safe to run again on the same database: users get their demo password back, the runtime a new
ingest token, and the budgets that should trip during the demo are given new headroom above what
was already spent in their period, so each run shows them trip again.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.db import connections
from django.db.models import Count, Q, Sum
from django.utils import timezone

from finops.budgets.evaluation import budgets_evaluate
from finops.budgets.models import LIMIT, Action, Budget, Enforcement, Unit, amount_label
from finops.budgets.periods import period_at
from finops.budgets.permissions import BUDGET_ADMIN, PRODUCT_MANAGER
from finops.budgets.selectors import budget_spend
from finops.budgets.services import budget_create, budget_update
from finops.caching.models import DEFAULT_THRESHOLD, SemanticCachePolicy
from finops.pricing.models import ANY, DevicePrice, ModelPrice, PriceBook
from finops.runtimes.models import Ruleset, Runtime
from finops.runtimes.services import runtime_register, runtime_token_rotate, runtime_url_validate
from finops.telemetry.models import RequestEvent

ALERT_RECIPIENTS = ["finance@example.com"]
# List price: what a hosted API charges for a small chat model's tokens (the counterfactual);
# hardware: a 2-vCPU cloud instance, and a rented GPU.
PROMPT_PER_1M, COMPLETION_PER_1M = Decimal("2.50"), Decimal("10.00")
CPU_PER_HOUR, GPU_PER_HOUR, PER_KWH = Decimal("0.10"), Decimal("2.50"), Decimal("0.15")


@dataclass(frozen=True)
class Login:
    role: str
    username: str
    password: str


@dataclass(frozen=True)
class RuntimeCredentials:
    name: str
    token: str
    admin_token: str
    registered_now: bool


@dataclass(frozen=True)
class DemoBudget:
    name: str
    description: str


def database_migrate() -> None:
    call_command("migrate", interactive=False, verbosity=0)


def demo_logins_ensure(*, password: str) -> list[Login]:
    """A superuser in the budget-admin group and a product manager, both with ``password``."""
    users = get_user_model()
    logins = [Login("budget admin (superuser)", "demo-admin", password),
              Login("product manager (read-only)", "demo-pm", password)]
    admin, _ = users.objects.get_or_create(username="demo-admin", defaults={"email": "admin@example.com"})
    admin.is_staff = admin.is_superuser = admin.is_active = True
    admin.set_password(password)
    admin.save()
    admin.groups.add(Group.objects.get(name=BUDGET_ADMIN))
    pm, _ = users.objects.get_or_create(username="demo-pm", defaults={"email": "pm@example.com"})
    pm.is_staff = pm.is_superuser = False
    pm.is_active = True
    pm.set_password(password)
    pm.save()
    pm.groups.add(Group.objects.get(name=PRODUCT_MANAGER))
    return logins


def demo_runtime_register(*, name: str, base_url: str) -> RuntimeCredentials:
    """Register the demo runtime, or issue it a new ingest token (a plain token is never stored,
    so a rerun cannot reuse the last one) and point it at ``base_url``."""
    runtime = Runtime.objects.filter(name=name).first()
    if runtime is None:
        runtime, token = runtime_register(name=name, base_url=base_url)
        return RuntimeCredentials(name, token, runtime.admin_token(), registered_now=True)
    runtime_url_validate(base_url)
    if runtime.base_url != base_url:
        Runtime.objects.filter(pk=runtime.pk).update(base_url=base_url)
    token = runtime_token_rotate(runtime=runtime)
    return RuntimeCredentials(name, token, runtime.admin_token(), registered_now=False)


def demo_prices_ensure(*, model: str) -> str:
    """A price book for the served model and the CPU when there is none; a price for the model in
    the book in force when that book has none for it (from now on: past events keep their prices)."""
    book = PriceBook.objects.filter(effective_from__lte=timezone.now()).first()
    if book is None:
        book = PriceBook.objects.create(
            name="Demo list prices", effective_from=dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
            note="List price: what a hosted API would charge for the same tokens. Hardware: a 2-vCPU instance.")
        DevicePrice.objects.create(book=book, device_type="cpu", per_gpu_hour=CPU_PER_HOUR, per_kwh=PER_KWH)
        DevicePrice.objects.create(book=book, device_type=ANY, per_gpu_hour=GPU_PER_HOUR, per_kwh=PER_KWH)
        described = f"price book {book.name!r}: CPU ${CPU_PER_HOUR}/h, GPUs ${GPU_PER_HOUR}/h, ${PER_KWH}/kWh; "
    elif book.model_prices.filter(model__in=[model, ANY]).exists():
        return f"kept the price book in force ({book.name!r})"
    else:
        described = f"added to the price book {book.name!r}: "
    ModelPrice.objects.create(book=book, model=model, prompt_per_1m=PROMPT_PER_1M, completion_per_1m=COMPLETION_PER_1M)
    return described + f"{model} at ${PROMPT_PER_1M} / ${COMPLETION_PER_1M} per 1M prompt / completion tokens"


def demo_budgets_ensure(*, trip_tokens: int, acme_usd: Decimal) -> list[DemoBudget]:
    """The demo's budgets: one hard budget that trips during the traffic, one soft budget that
    crosses its alert thresholds, and others that stay healthy."""
    now = timezone.now()
    trip = _budget_with_headroom(
        "initech trial (hard)", headroom=Decimal(trip_tokens), now=now,
        fields={"tenant": "initech", "period": "daily", "unit": Unit.TOKENS, "enforcement": Enforcement.HARD,
                "action": Action.BLOCK, "thresholds": [80, 100], "recipients": ALERT_RECIPIENTS})
    acme = _budget_with_headroom(
        "acme monthly spend", headroom=acme_usd, now=now,
        fields={"tenant": "acme", "period": "monthly", "unit": Unit.USD_LIST, "action": Action.ALERT_ONLY,
                "thresholds": [50, 80, 100], "recipients": ALERT_RECIPIENTS})
    search = _budget_once(
        "globex search (throttle)",
        fields={"tenant": "globex", "feature": "search", "period": "daily", "unit": Unit.USD_LIST,
                "limit": Decimal("5.00"), "action": Action.THROTTLE, "throttle_requests_per_minute": 60,
                "throttle_tokens_per_minute": 20000, "recipients": ALERT_RECIPIENTS})
    daily = _budget_once(
        "all traffic daily", fields={"period": "daily", "unit": Unit.USD_LIST, "limit": Decimal("1.00"),
                                     "action": Action.ALERT_ONLY, "recipients": ALERT_RECIPIENTS})
    monthly = _budget_once(
        "all traffic monthly", fields={"period": "monthly", "unit": Unit.USD_LIST, "limit": Decimal("20.00"),
                                       "action": Action.ALERT_ONLY, "recipients": ALERT_RECIPIENTS})
    hardware = _budget_once(
        "all traffic hardware", fields={"period": "monthly", "unit": Unit.USD_HARDWARE, "limit": Decimal("25.00"),
                                        "action": Action.ALERT_ONLY, "recipients": ALERT_RECIPIENTS})
    return [
        DemoBudget(trip.name, f"hard, {_limit_label(trip, now)} a day for tenant initech: blocks (429) when spent"),
        DemoBudget(acme.name, f"soft, {_limit_label(acme, now)} a month for tenant acme: alerts at 50/80/100%"),
        DemoBudget(search.name, "soft, $5 a day for globex's search: throttles past it"),
        DemoBudget(daily.name, "soft, $1 a day of list price for all traffic (the overview's 'today' tile)"),
        DemoBudget(monthly.name, "soft, $20 a month of list price for all traffic"),
        DemoBudget(hardware.name, "soft, $25 a month of hardware cost for all traffic: stays healthy"),
    ]


def _limit_label(budget: Budget, now: dt.datetime) -> str:
    label = amount_label(budget.unit, budget.limit)
    used = budget_spend(budget=budget, period=period_at(budget.period, now))
    return f"{label} ({amount_label(budget.unit, used)} already used)" if used else label


def _budget_once(name: str, *, fields: dict[str, Any]) -> Budget:
    budget = Budget.objects.filter(name=name).first()
    return budget or budget_create(fields={"name": name, **fields})


def _budget_with_headroom(name: str, *, headroom: Decimal, now: dt.datetime, fields: dict[str, Any]) -> Budget:
    """Create the budget with ``headroom`` as its limit, or set its limit to what its scope spent
    this period plus ``headroom``, so that this run's traffic reaches it again."""
    budget = Budget.objects.filter(name=name).first()
    if budget is None:
        return budget_create(fields={"name": name, "limit": headroom, **fields})
    used = budget_spend(budget=budget, period=period_at(budget.period, now))
    places = Decimal(1) if budget.unit == Unit.TOKENS else Decimal(10) ** -LIMIT["decimal_places"]
    limit = (used + headroom).quantize(places, rounding=ROUND_CEILING)
    return budget_update(budget=budget, fields={"limit": limit, "paused": False})


def demo_semantic_cache_ensure(*, feature: str) -> str:
    """The semantic cache on for ``feature`` of every tenant, at the default threshold; what to print."""
    policy, _ = SemanticCachePolicy.objects.update_or_create(
        feature=feature, tenant="*", defaults={"threshold": DEFAULT_THRESHOLD, "enabled": True})
    return (f"semantic cache on for feature {policy.feature!r} (every tenant, threshold {policy.threshold}, "
            f"TTL {policy.ttl_seconds} s): paraphrased questions are answered from the cache")


def budgets_compile(*, runtime_name: str) -> int:
    """One evaluation here, so the runtime finds its ruleset (and its hard-budget allowance) at its
    first pull; returns the ruleset version compiled for it."""
    budgets_evaluate()
    return ruleset_version(runtime_name=runtime_name)


def ruleset_version(*, runtime_name: str) -> int:
    return Ruleset.objects.filter(runtime__name=runtime_name).values_list("version", flat=True).first() or 0


def budgets_evaluated_since(moment: dt.datetime) -> bool:
    """Whether the worker's beat has evaluated the budgets since ``moment``."""
    try:
        return Budget.objects.filter(paused=False, evaluated_at__gt=moment).exists()
    finally:
        connections_close()


@dataclass(frozen=True)
class Arrived:
    events: int
    rejected_budget: int
    rejected_rule: int
    prompt_tokens: int
    completion_tokens: int


def events_arrived(*, runtime_name: str, since: dt.datetime) -> Arrived:
    totals = RequestEvent.objects.filter(runtime_id=runtime_name, received_at__gte=since).aggregate(
        events=Count("event_id"), rejected_budget=Count("event_id", filter=Q(status="rejected_budget")),
        rejected_rule=Count("event_id", filter=Q(status="rejected_rule")),
        prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"))
    return Arrived(totals["events"], totals["rejected_budget"], totals["rejected_rule"], totals["prompt"] or 0,
                   totals["completion"] or 0)


def events_wait(*, runtime_name: str, count: int, since: dt.datetime, timeout: float = 30.0) -> Arrived:
    """Wait until ``count`` events from the runtime have arrived since ``since`` (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        arrived = events_arrived(runtime_name=runtime_name, since=since)
        connections_close()
        if arrived.events >= count or time.monotonic() > deadline:
            return arrived
        time.sleep(0.5)


def connections_close() -> None:
    """Let go of the database before the children use it (SQLite: no lock held across them)."""
    connections.close_all()
