"""Hard budgets are split into per-runtime grants that only grow and never add up to more than
the limit, so runtimes that each stay within their grant can never overspend together."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.db import transaction
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finops.budgets.grants import STARTER_FRACTION, grants_top_up
from finops.budgets.models import Budget, Grant
from finops.budgets.periods import Period, period_at
from finops.runtimes.models import Runtime
from finops.telemetry.models import RequestEvent
from tests.finops.budget_factories import budget, request_event, store

pytestmark = pytest.mark.django_db

NOW = timezone.now().replace(microsecond=0)


def live_runtimes(count: int) -> list[Runtime]:
    return [Runtime.objects.create(name=f"rt-{i}", base_url=f"http://rt-{i}.test", last_seen_at=NOW)
            for i in range(count)]


def top_up(hard: Budget, period: Period) -> dict[str, Decimal]:
    with transaction.atomic():
        grants_top_up(budget=Budget.objects.select_for_update().get(pk=hard.pk), period=period, now=NOW)
    return {g.runtime.name: g.granted for g in Grant.objects.filter(budget=hard).select_related("runtime")}


def use(runtime: Runtime, amount: Decimal, unit: str, *, received_at: dt.datetime | None = None) -> None:
    """What the runtime served and reported: ``amount`` in the budget's unit, stored just now."""
    tokens = int(amount) if unit == "tokens" else 1
    store([request_event(runtime_id=runtime.name, started_at=NOW - dt.timedelta(minutes=2),
                         received_at=received_at or timezone.now(), prompt_tokens=tokens, completion_tokens=0,
                         cost=amount if unit == "usd_list" else "0")])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    unit=st.sampled_from(["tokens", "usd_list"]),
    limit=st.integers(min_value=1, max_value=100_000),
    runtimes=st.integers(min_value=1, max_value=4),
    steps=st.lists(st.tuples(st.integers(min_value=0, max_value=3), st.floats(min_value=0, max_value=1)),
                   max_size=25),
)
def test_grants_only_grow_never_exceed_the_limit_and_bound_what_runtimes_can_spend(
        unit: str, limit: int, runtimes: int, steps: list[tuple[int, float]]) -> None:
    for model in (Grant, Budget, RequestEvent, Runtime):
        model.objects.all().delete()
    fleet = live_runtimes(runtimes)
    hard = budget(enforcement="hard", action="block", unit=unit, limit=Decimal(limit))
    period = period_at("monthly", NOW)
    spent = {r.name: Decimal(0) for r in fleet}
    granted = top_up(hard, period)

    for which, share in steps:
        runtime = fleet[which % runtimes]
        # The runtime admits only what fits in its grant (its own ledger, as the runtime keeps it).
        available = granted.get(runtime.name, Decimal(0)) - spent[runtime.name]
        amount = (available * Decimal(repr(share))).quantize(Decimal(1) if unit == "tokens" else Decimal("0.000001"),
                                                              rounding="ROUND_DOWN")
        if amount > 0:
            use(runtime, amount, unit)
            spent[runtime.name] += amount
        before = granted
        granted = top_up(hard, period)
        assert all(granted[name] >= before.get(name, Decimal(0)) for name in granted), "a grant shrank"
        assert sum(granted.values()) <= hard.limit, "grants add up to more than the limit"
        assert sum(spent.values()) <= hard.limit


def test_a_lone_runtime_is_granted_the_whole_limit_at_once() -> None:
    (alone,) = live_runtimes(1)
    hard = budget(enforcement="hard", action="block", unit="tokens", limit=Decimal(50_000))

    assert top_up(hard, period_at("monthly", NOW)) == {alone.name: Decimal(50_000)}


def test_several_runtimes_start_with_a_small_share_each() -> None:
    live_runtimes(2)
    hard = budget(enforcement="hard", action="block", unit="tokens", limit=Decimal(100_000))

    granted = top_up(hard, period_at("monthly", NOW))

    assert granted == {"rt-0": Decimal(5_000), "rt-1": Decimal(5_000)}  # 10% of the limit between them


def test_a_busy_runtime_gets_most_of_the_pool_while_an_idle_one_strands_at_most_its_starter() -> None:
    busy, _idle = live_runtimes(2)
    hard = budget(enforcement="hard", action="block", unit="tokens", limit=Decimal(100_000))
    period = period_at("monthly", NOW)
    granted = top_up(hard, period)
    spent = Decimal(0)

    for _ in range(40):
        amount = granted["rt-0"] - spent
        if amount > 0:
            use(busy, amount, "tokens")
            spent += amount
        granted = top_up(hard, period)

    assert granted["rt-1"] == Decimal(5_000)
    assert spent >= hard.limit * (1 - STARTER_FRACTION) - 10


def test_a_runtime_not_seen_lately_is_not_topped_up() -> None:
    _busy, gone = live_runtimes(2)
    Runtime.objects.filter(pk=gone.pk).update(last_seen_at=NOW - dt.timedelta(hours=1))
    hard = budget(enforcement="hard", action="block", unit="tokens", limit=Decimal(100_000))

    granted = top_up(hard, period_at("monthly", NOW))

    assert granted == {"rt-0": Decimal(10_000), "rt-1": Decimal(0)}  # the starter is shared by live runtimes


def test_reported_spend_advances_over_new_events_only() -> None:
    (alone,) = live_runtimes(1)
    hard = budget(enforcement="hard", action="block", unit="tokens", limit=Decimal(100_000))
    period = period_at("monthly", NOW)
    use(alone, Decimal(300), "tokens", received_at=NOW - dt.timedelta(minutes=40))
    top_up(hard, period)
    grant = Grant.objects.get(budget=hard)
    assert grant.reported == 300

    use(alone, Decimal(200), "tokens", received_at=NOW - dt.timedelta(minutes=1))
    # The settled count is kept, not recounted: change it behind the service's back to prove it,
    # with the budget's watermark set back to before the new event.
    Grant.objects.filter(pk=grant.pk).update(reported=Decimal(1_000))
    Budget.objects.filter(pk=hard.pk).update(grants_settled_through=NOW - dt.timedelta(minutes=30))
    top_up(hard, period)

    assert Grant.objects.get(pk=grant.pk).reported == 1_200


def test_a_watermark_of_another_period_counts_the_period_again() -> None:
    (alone,) = live_runtimes(1)
    hard = budget(enforcement="hard", action="block", unit="tokens", limit=Decimal(100_000))
    period = period_at("monthly", NOW)
    use(alone, Decimal(300), "tokens", received_at=NOW - dt.timedelta(minutes=40))
    top_up(hard, period)
    use(alone, Decimal(200), "tokens", received_at=NOW - dt.timedelta(minutes=1))
    # A watermark left by the previous period says nothing of this period's grants: their events
    # are counted from the period's start, not added to the count they hold.
    Budget.objects.filter(pk=hard.pk).update(grants_period_start=period.start - dt.timedelta(days=31))
    top_up(hard, period)

    assert Grant.objects.get(budget=hard).reported == 500


def test_lowering_a_hard_limit_below_what_was_granted_grants_nothing_more() -> None:
    live_runtimes(2)
    hard = budget(enforcement="hard", action="block", unit="tokens", limit=Decimal(100_000))
    period = period_at("monthly", NOW)
    first = top_up(hard, period)
    Budget.objects.filter(pk=hard.pk).update(limit=Decimal(1_000))
    Grant.objects.filter(budget=hard).update(last_chunk=Decimal(0))  # as if both wanted more

    assert top_up(hard, period) == first
