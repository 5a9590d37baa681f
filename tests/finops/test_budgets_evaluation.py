"""Budgets are evaluated as a set: every budget's spend from a few grouped reads, equal to the sum
over its scope's raw events; the number of queries does not grow with the number of budgets; no
number makes a budget fail to evaluate, and one that does fail costs only itself; a pass over many
budgets is split into chunks that Celery runs as a chord."""

from __future__ import annotations

import datetime as dt
import random
from decimal import Decimal

import pytest
from celery import current_app
from django.db import connection
from django.db.models import F, Sum
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from finops.budgets import tasks
from finops.budgets.evaluation import budgets_evaluate, evaluation_chunks
from finops.budgets.models import ANY, Budget, BudgetEvent, EventKind, State
from finops.budgets.periods import period_at
from finops.budgets.selectors import breach_forecast
from finops.budgets.spend import budgets_spend
from finops.runtimes.models import Ruleset, Runtime
from finops.telemetry.models import RequestEvent
from finops.telemetry.rollups import rollup_run
from tests.finops.budget_factories import budget, request_event, spend, store

pytestmark = pytest.mark.django_db

TENANTS = ("acme", "globex", "initech")
FEATURES = ("chat", "search", "summarise")
UNIT_SUMS = {"tokens": Sum(F("prompt_tokens") + F("completion_tokens")), "usd_list": Sum("list_cost"),
             "usd_hardware": Sum("hardware_cost")}


def traffic(now: dt.datetime, count: int, *, seed: int, received_at: dt.datetime | None = None) -> None:
    """``count`` requests of random tenants, features and sizes since the start of the month."""
    rng = random.Random(seed)
    month = period_at("monthly", now)
    span = (now - month.start).total_seconds()
    store(request_event(started_at=month.start + dt.timedelta(seconds=rng.uniform(0, span - 60)),
                        tenant=rng.choice(TENANTS), feature=rng.choice(FEATURES),
                        prompt_tokens=rng.randint(1, 900), completion_tokens=rng.randint(0, 300),
                        cost=Decimal(rng.randint(1, 10**6)) / 10**6, received_at=received_at) for _ in range(count))


def raw_sum(budget: Budget, now: dt.datetime) -> Decimal:
    period = period_at(budget.period, now)
    events = RequestEvent.objects.filter(started_at__gte=period.start, started_at__lt=period.end)
    if budget.tenant != ANY:
        events = events.filter(tenant=budget.tenant)
    if budget.feature != ANY:
        events = events.filter(feature=budget.feature)
    return Decimal(events.aggregate(total=UNIT_SUMS[budget.unit])["total"] or 0)


def every_scope(unit: str) -> list[Budget]:
    return [budget(name=f"{tenant} {feature} {unit}", tenant=tenant, feature=feature, unit=unit, limit=Decimal(10**9))
            for tenant in (*TENANTS, ANY) for feature in (*FEATURES, ANY)]


def test_every_budgets_spend_equals_the_sum_over_its_scopes_raw_events() -> None:
    now = timezone.now()
    traffic(now, 300, seed=1)
    rollup_run(now=now + dt.timedelta(minutes=2))  # most of it rolled up ...
    traffic(now, 40, seed=2, received_at=now + dt.timedelta(minutes=3))  # ... and some still raw
    budgets = [b for unit in UNIT_SUMS for b in every_scope(unit)]

    spent = budgets_spend(budgets, now=now)

    assert {b.pk: spent[b.pk] for b in budgets} == {b.pk: raw_sum(b, now) for b in budgets}
    evaluated = budgets_evaluate(now=now)
    assert evaluated.evaluated == len(budgets) and evaluated.failed == 0
    for stored in Budget.objects.all():
        assert stored.spend == raw_sum(stored, now), stored.name


def test_a_page_of_budgets_reads_only_its_own_tenants_and_still_sums_exactly() -> None:
    now = timezone.now()
    traffic(now, 200, seed=3)
    page = [budget(name="acme chat", tenant="acme", feature="chat"), budget(name="globex all", tenant="globex")]

    spent = budgets_spend(page, now=now)

    assert spent == {b.pk: raw_sum(b, now) for b in page}


def test_a_pass_costs_the_same_queries_for_ten_budgets_as_for_a_hundred() -> None:
    now = timezone.now()
    traffic(now, 50, seed=4)
    Runtime.objects.create(name="rt-1", base_url="http://rt-1.test", last_seen_at=now)

    def queries_for(count: int) -> int:
        Budget.objects.all().delete()
        for i in range(count):
            budget(name=f"b{i}", tenant=TENANTS[i % 3], feature=FEATURES[i // 3 % 3], unit="tokens",
                   enforcement="hard" if i % 2 else "soft", action="block", limit=Decimal(10**6 + i))
        budgets_evaluate(now=now)  # grants created on the first pass; steady state from here
        with CaptureQueriesContext(connection) as context:
            budgets_evaluate(now=now + dt.timedelta(seconds=5))
        return len(context.captured_queries)

    assert queries_for(100) == queries_for(10)


def test_a_limit_a_million_times_the_spend_is_evaluated_normally() -> None:
    month = period_at("monthly", timezone.now())
    now = month.start + month.length / 2
    spend("0.000002", at=month.start + dt.timedelta(hours=1))
    huge = budget(name="acme generous", limit=Decimal("2") * 10**6, thresholds=[50, 80, 100])

    result = budgets_evaluate(now=now)

    assert result.failed == 0 and result.evaluated == 1
    huge.refresh_from_db()
    assert (huge.state, huge.spend, huge.evaluated_at) == (State.OK, Decimal("0.000002"), now)
    assert not BudgetEvent.objects.filter(budget=huge, kind=EventKind.FORECAST).exists()


@pytest.mark.parametrize("limit", [Decimal("1e18"), Decimal("999999999999999999.999999")])
def test_a_breach_ages_away_is_not_this_period(limit: Decimal) -> None:
    month = period_at("monthly", timezone.now())
    forecast = breach_forecast(used=Decimal("1e-6"), limit=limit, period=month, now=month.start + month.length / 2,
                               unit="usd_list")
    assert forecast.at is None and forecast.summary == "not before the period resets"


def test_one_broken_budget_costs_only_itself() -> None:
    now = timezone.now()
    spend("3", at=now - dt.timedelta(minutes=1))
    healthy = [budget(name=f"healthy {i}", limit=Decimal("2")) for i in range(3)]
    broken = budget(name="broken")
    Budget.objects.filter(pk=broken.pk).update(thresholds="not a list")  # what a bad hand edit could leave

    result = budgets_evaluate(now=now)

    assert (result.evaluated, result.failed) == (3, 1)
    assert all(Budget.objects.get(pk=b.pk).state == State.EXCEEDED for b in healthy)
    assert Budget.objects.get(pk=broken.pk).evaluated_at is None


def test_chunks_follow_the_tenants_so_each_reads_few_of_them(settings) -> None:
    settings.BUDGET_EVALUATION_CHUNK = 2
    for tenant in ("zeta", "acme", "mid", "acme"):
        budget(name=f"{tenant}", tenant=tenant)

    chunks = evaluation_chunks()

    tenants = [[Budget.objects.get(pk=pk).tenant for pk in chunk] for chunk in chunks]
    assert tenants == [["acme", "acme"], ["mid", "zeta"]]


def test_a_pass_split_in_chunks_runs_as_a_chord_and_compiles_once(settings, monkeypatch: pytest.MonkeyPatch,
                                                                   django_capture_on_commit_callbacks) -> None:
    settings.BUDGET_EVALUATION_CHUNK = 2
    monkeypatch.setitem(current_app.conf, "task_always_eager", True)
    monkeypatch.setattr(tasks.push_ruleset, "delay", lambda runtime_id: None)
    monkeypatch.setattr(tasks.send_alerts, "delay", lambda: None)
    runtime = Runtime.objects.create(name="rt-1", base_url="http://rt-1.test")
    spend("11", at=timezone.now() - dt.timedelta(minutes=1))
    blocked = [budget(name=f"{tenant} cap", tenant="acme" if i < 3 else tenant, action="block")
               for i, tenant in enumerate(("a", "b", "c", "globex", "initech"))]

    with django_capture_on_commit_callbacks(execute=True):
        queued = tasks.evaluate()

    assert queued == {"chunks": 3, "budgets": 5}
    assert Budget.objects.filter(evaluated_at__isnull=False).count() == len(blocked)
    rules = Ruleset.objects.get(runtime=runtime).document["rules"]
    assert sorted(rule["scope"]["tenant"] for rule in rules) == ["acme", "acme", "acme"]
