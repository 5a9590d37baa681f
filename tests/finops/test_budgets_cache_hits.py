"""Cache hits and budgets: a hit's tokens were saved, not spent, so a budget in tokens counts only
the tokens of answers a model generated (a hit costs nothing at list price either), in the spend
the pages and alerts show and in what a runtime's grant is told it used; the budget form says so."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.test import Client
from django.utils import timezone

from finops.budgets.evaluation import budgets_evaluate
from finops.budgets.models import Budget, Grant
from finops.budgets.periods import period_at
from finops.budgets.selectors import budget_status
from finops.runtimes.models import Runtime
from tests.finops.budget_factories import budget, request_event, store, user_in

pytestmark = pytest.mark.django_db

NOW = timezone.now().replace(microsecond=0)
EARLIER = period_at("monthly", NOW).start + dt.timedelta(minutes=5)


def served(*, hit: bool, prompt: int, completion: int, received_at: dt.datetime | None = None) -> None:
    """A request of tenant acme answered by the model, or from the cache (costing nothing)."""
    store([request_event(started_at=EARLIER, received_at=received_at, cache_hit=hit, prompt_tokens=prompt,
                         completion_tokens=completion, cost="0" if hit else "0.002",
                         saved_cost=Decimal("0.002") if hit else None, gpu_seconds=0.0 if hit else 0.5)])


def test_a_tokens_budget_counts_the_tokens_models_generated_and_not_those_of_cache_hits() -> None:
    tokens = budget(unit="tokens", limit=Decimal(10_000))
    dollars = budget(name="acme dollars", unit="usd_list", limit=Decimal(1))
    served(hit=False, prompt=100, completion=50)
    served(hit=True, prompt=100, completion=50)
    served(hit=True, prompt=100, completion=50)
    served(hit=False, prompt=30, completion=20)

    assert budget_status(budget=tokens, now=NOW).used == Decimal(150 + 50)
    assert budget_status(budget=dollars, now=NOW).used == Decimal("0.004"), "a hit costs nothing at list price"


def test_a_cache_hit_alone_uses_nothing_of_a_tokens_budget() -> None:
    tokens = budget(unit="tokens", limit=Decimal(100), thresholds=[50, 100])
    for _ in range(5):
        served(hit=True, prompt=100, completion=50)

    budgets_evaluate(now=NOW)

    tokens.refresh_from_db()
    assert (tokens.state, tokens.spend) == ("ok", Decimal(0))


def test_a_runtimes_grant_is_told_it_used_the_tokens_it_generated_only() -> None:
    Runtime.objects.create(name="rt-1", base_url="http://rt-1.test", last_seen_at=NOW)
    hard = budget(unit="tokens", limit=Decimal(100_000), enforcement="hard", action="block")
    settled = NOW - dt.timedelta(minutes=10)
    served(hit=False, prompt=300, completion=100, received_at=settled)
    served(hit=True, prompt=300, completion=100, received_at=settled)

    budgets_evaluate(now=NOW)

    assert Grant.objects.get(budget=hard).reported == Decimal(400), "as the runtime's own ledger counts it"


def test_the_budget_form_says_cache_hits_count_as_requests_and_not_as_tokens() -> None:
    client = Client()
    client.force_login(user_in("budget-admin", "ada"))

    page = client.get("/budgets/new/").content.decode()

    assert "a cache hit&#x27;s tokens are saved, not spent, and do not count" in page
    assert "Requests per minute, cache hits included" in page
    assert Budget.objects.count() == 0
