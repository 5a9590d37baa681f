"""Budget state compiles into one versioned ruleset per runtime (docs/RULESET.md): rules for
exceeded budgets, allowances for hard ones; a new version only when the content changes. Every
document is checked with the runtime's own contract parser."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from finops.budgets.evaluation import budgets_evaluate
from finops.budgets.grants import ALLOWANCE_TTL
from finops.budgets.models import Budget
from finops.budgets.periods import period_at
from finops.budgets.rulesets import json_number, rulesets_compile
from finops.budgets.services import budget_pause
from finops.runtimes.models import ConcurrencyCap, PowerCap, Ruleset, Runtime
from inference.rules.compiled import ruleset_compile
from inference.rules.contract import ruleset_parse
from inference.rules.enforcement import RuleEnforcer
from tests.finops.budget_factories import budget, spend
from tests.finops.factories import price_book

pytestmark = pytest.mark.django_db

EARLY = period_at("monthly", timezone.now()).start + dt.timedelta(hours=1)


@pytest.fixture
def runtime() -> Runtime:
    return Runtime.objects.create(name="rt-1", base_url="http://rt-1.test:8000")


def document(runtime: Runtime) -> dict[str, Any]:
    """The runtime's current document, as the runtime would parse it."""
    doc = Ruleset.objects.get(runtime=runtime).document
    ruleset_parse(json.dumps(doc).encode())  # raises if the runtime would refuse it
    return doc


def exceeded(**fields: Any) -> Budget:
    made = budget(**fields)
    spend("11", at=EARLY - dt.timedelta(minutes=10), tenant=made.tenant if made.tenant != "*" else "acme",
          feature=made.feature if made.feature != "*" else "chat")
    return made


def test_an_exceeded_blocking_budget_blocks_its_scope_until_the_period_resets(runtime: Runtime) -> None:
    blocked = exceeded(action="block")

    budgets_evaluate(now=EARLY)

    (rule,) = document(runtime)["rules"]
    assert rule == {
        "id": f"b{blocked.pk}-block", "budget_id": str(blocked.pk), "budget_name": "acme monthly",
        "scope": {"tenant": "acme", "feature": "*", "model": "*"}, "action": {"type": "block"},
        "reason": rule["reason"],
        "expires_at": period_at("monthly", EARLY).end.isoformat().replace("+00:00", "Z"),
    }
    assert rule["reason"].startswith("Budget 'acme monthly' reached its limit of $10.00 (list price) for this month")


def test_throttle_downgrade_and_a_max_tokens_cap_compile_to_their_actions(runtime: Runtime) -> None:
    throttled = exceeded(name="slow", action="throttle", throttle_tokens_per_minute=20_000,
                         throttle_requests_per_minute=60, cap_max_tokens=64)
    downgraded = exceeded(name="cheap", tenant="globex", feature="search", action="downgrade", downgrade_model="tiny")

    budgets_evaluate(now=EARLY)

    actions = {rule["id"]: rule["action"] for rule in document(runtime)["rules"]}
    assert actions == {
        f"b{downgraded.pk}-downgrade": {"type": "downgrade", "model": "tiny"},
        f"b{throttled.pk}-throttle": {"type": "throttle", "tokens_per_minute": 20_000, "requests_per_minute": 60},
        f"b{throttled.pk}-cap": {"type": "cap_max_tokens", "max_tokens": 64},
    }


def test_narrower_scopes_come_first_so_their_downgrade_wins(runtime: Runtime) -> None:
    everyone = exceeded(name="everyone", tenant="*", action="downgrade", downgrade_model="small")
    acme_chat = exceeded(name="acme chat", tenant="acme", feature="chat", action="downgrade", downgrade_model="tiny")

    budgets_evaluate(now=EARLY)

    assert [rule["budget_id"] for rule in document(runtime)["rules"]] == [str(acme_chat.pk), str(everyone.pk)]


@pytest.mark.parametrize("case", ["alert_only", "under_the_limit", "paused"])
def test_no_rule_for_a_budget_that_only_alerts_is_under_its_limit_or_is_paused(runtime: Runtime, case: str) -> None:
    if case == "alert_only":
        exceeded(action="alert_only")
    elif case == "under_the_limit":
        budget(action="block")
        spend("9", at=EARLY - dt.timedelta(minutes=10))
    else:
        budget_pause(budget=exceeded(action="block"), paused=True)

    budgets_evaluate(now=EARLY)

    assert document(runtime)["rules"] == []


def test_the_version_changes_only_when_the_content_does(runtime: Runtime) -> None:
    blocked = budget(action="block")
    budgets_evaluate(now=EARLY)
    first = document(runtime)["version"]

    budgets_evaluate(now=EARLY + dt.timedelta(seconds=5))
    assert document(runtime)["version"] == first

    spend("11", at=EARLY - dt.timedelta(minutes=10))
    budgets_evaluate(now=EARLY + dt.timedelta(seconds=10))
    assert document(runtime)["version"] == first + 1

    budget_pause(budget=blocked, paused=True)
    budgets_evaluate(now=EARLY + dt.timedelta(seconds=15))
    assert document(runtime)["version"] == first + 2
    assert document(runtime)["rules"] == []


def test_a_concurrency_cap_compiles_to_a_rule_the_runtime_hands_to_admission(runtime: Runtime) -> None:
    cap = ConcurrencyCap(tenant="acme", feature="batch", max_running=2, max_queued=10, note="Batch jobs share.")
    cap.full_clean()
    cap.save()
    ConcurrencyCap.objects.create(tenant="globex", max_queued=0)

    budgets_evaluate(now=EARLY)

    doc = document(runtime)
    acme, globex = doc["rules"]
    assert acme == {
        "id": f"cap{cap.pk}-concurrency", "budget_id": None, "budget_name": None,
        "scope": {"tenant": "acme", "feature": "batch", "model": "*"},
        "action": {"type": "concurrency", "max_running": 2, "max_queued": 10},
        "reason": "Concurrency cap for tenant 'acme', feature 'batch': at most 2 running and 10 waiting "
                  "request(s) at once. Batch jobs share.",
        "expires_at": None,
    }
    assert globex["action"] == {"type": "concurrency", "max_queued": 0}
    # The runtime's side of the contract: the rule reaches admission as a cap with these limits.
    enforcer = RuleEnforcer()
    enforcer.apply(ruleset_compile(ruleset_parse(json.dumps(doc).encode())))
    match = enforcer.match("acme", "batch", "tiny-random", {"tiny-random"})
    assert match is not None
    (held,) = match.caps
    assert (held.rule_id, held.max_running, held.max_queued) == (f"cap{cap.pk}-concurrency", 2, 10)
    assert enforcer.match("acme", "chat", "tiny-random", {"tiny-random"}) is None


def test_a_cap_that_limits_nothing_is_refused() -> None:
    with pytest.raises(ValidationError):
        ConcurrencyCap(tenant="acme").full_clean()
    with pytest.raises(ValidationError):
        ConcurrencyCap(tenant="acme", max_running=0).full_clean()
    with pytest.raises(ValidationError):
        ConcurrencyCap(tenant="acme; drop", max_running=1).full_clean()


def test_a_changed_cap_issues_a_new_version(runtime: Runtime) -> None:
    cap = ConcurrencyCap.objects.create(tenant="acme", max_running=2)
    budgets_evaluate(now=EARLY)
    first = document(runtime)["version"]
    cap.max_running = 3
    cap.save()
    budgets_evaluate(now=EARLY + dt.timedelta(seconds=5))
    assert document(runtime)["version"] == first + 1
    assert document(runtime)["rules"][0]["action"] == {"type": "concurrency", "max_running": 3}


def test_each_runtime_gets_its_own_document(runtime: Runtime) -> None:
    other = Runtime.objects.create(name="rt-2", base_url="http://rt-2.test:8000")
    exceeded(action="block")

    budgets_evaluate(now=EARLY)

    assert document(runtime)["runtime_id"] == "rt-1"
    assert document(other)["runtime_id"] == "rt-2"
    assert document(runtime)["rules"] == document(other)["rules"]


def test_a_hard_budget_grants_its_only_runtime_the_whole_limit(runtime: Runtime) -> None:
    hard = budget(enforcement="hard", action="block", unit="usd_list", limit=Decimal("4.5"), on_expiry="closed")
    spend("1.25", at=EARLY - dt.timedelta(minutes=10), received_at=EARLY - dt.timedelta(minutes=9))

    budgets_evaluate(now=EARLY)

    (allowance,) = document(runtime)["allowances"]
    period = period_at("monthly", EARLY)
    assert allowance == {
        "budget_id": str(hard.pk), "budget_name": "acme monthly",
        "scope": {"tenant": "acme", "feature": "*", "model": "*"}, "unit": "usd_list",
        "period_start": period.start.isoformat().replace("+00:00", "Z"),
        "resets_at": period.end.isoformat().replace("+00:00", "Z"),
        "granted": 4.5, "reported": 1.25,
        "expires_at": (EARLY + ALLOWANCE_TTL).isoformat().replace("+00:00", "Z"),
        "on_expiry": "closed",
    }


def test_a_runtime_registered_after_the_grants_were_made_gets_an_allowance_of_nothing_not_none(
        runtime: Runtime) -> None:
    budget(enforcement="hard", action="block", unit="tokens", limit=Decimal("1000"))
    budgets_evaluate(now=EARLY)
    late = Runtime.objects.create(name="rt-late", base_url="http://late.test:8000")

    rulesets_compile(now=EARLY)

    (allowance,) = document(late)["allowances"]
    assert (allowance["granted"], allowance["unit"]) == (0, "tokens")


def test_an_allowance_expiry_is_renewed_only_when_half_of_it_is_left(runtime: Runtime) -> None:
    budget(enforcement="hard", action="block", unit="tokens", limit=Decimal("1000"))
    budgets_evaluate(now=EARLY)
    first = document(runtime)

    budgets_evaluate(now=EARLY + ALLOWANCE_TTL / 4)
    assert document(runtime)["version"] == first["version"]

    budgets_evaluate(now=EARLY + ALLOWANCE_TTL * 3 / 4)
    renewed = document(runtime)
    assert renewed["version"] == first["version"] + 1
    assert renewed["allowances"][0]["expires_at"] > first["allowances"][0]["expires_at"]


def test_prices_come_from_the_book_in_force(runtime: Runtime) -> None:
    price_book(effective_from=EARLY - dt.timedelta(days=400), models={"smollm2": ("0.10", "0.40")})
    price_book(effective_from=EARLY - dt.timedelta(days=1), models={"smollm2": ("0.20", "0.80"), "*": ("1", "2")})
    price_book(effective_from=EARLY + dt.timedelta(days=1), models={"smollm2": ("9", "9")})

    budgets_evaluate(now=EARLY)

    assert document(runtime)["prices"] == {"*": {"prompt_per_1m": 1.0, "completion_per_1m": 2.0},
                                           "smollm2": {"prompt_per_1m": 0.2, "completion_per_1m": 0.8}}


@pytest.mark.parametrize("value", ["0.1", "0.3", "4.5", "1234567.123456", "0.000001"])
def test_granted_amounts_never_round_up_and_reported_ones_never_round_down(value: str) -> None:
    amount = Decimal(value)
    assert Decimal(repr(json_number(amount, "usd_list", down=True))) <= amount
    assert Decimal(repr(json_number(amount, "usd_list", down=False))) >= amount
    assert json_number(Decimal("10.7"), "tokens", down=True) == 10
    assert json_number(Decimal("10.2"), "tokens", down=False) == 11


# -- power caps ------------------------------------------------------------------------------------


def test_a_power_cap_in_force_is_a_power_cap_rule_until_its_schedule_ends(runtime: Runtime) -> None:
    ends = EARLY + dt.timedelta(hours=2)
    cap = PowerCap.objects.create(name="night", device_type="NVIDIA H100 80GB HBM3", watts=450,
                                  starts_at=EARLY - dt.timedelta(minutes=5), ends_at=ends)

    rulesets_compile(now=EARLY)

    (rule,) = document(runtime)["rules"]
    assert rule == {
        "id": f"pc{cap.pk}-power_cap", "budget_id": None, "budget_name": None,
        "scope": {"tenant": "*", "feature": "*", "model": "*"},
        "action": {"type": "power_cap", "watts": 450, "device": "*", "device_type": "NVIDIA H100 80GB HBM3"},
        "reason": "Power cap 'night': 450 W on NVIDIA H100 80GB HBM3.",
        "expires_at": ends.isoformat().replace("+00:00", "Z"),
    }


def test_a_power_cap_goes_only_to_its_runtime_and_only_within_its_schedule(runtime: Runtime) -> None:
    other = Runtime.objects.create(name="rt-2", base_url="http://rt-2.test:8000")
    PowerCap.objects.create(name="rt-2 only", runtime=other, watts=300)
    PowerCap.objects.create(name="later", watts=200, starts_at=EARLY + dt.timedelta(minutes=1))
    PowerCap.objects.create(name="over", watts=250, ends_at=EARLY)
    PowerCap.objects.create(name="off", watts=350, enabled=False)

    rulesets_compile(now=EARLY)
    assert document(runtime)["rules"] == []
    assert [r["action"]["watts"] for r in document(other)["rules"]] == [300]

    rulesets_compile(now=EARLY + dt.timedelta(minutes=2))
    assert [r["action"]["watts"] for r in document(runtime)["rules"]] == [200], "the scheduled cap starts"


def test_a_power_cap_that_ends_before_it_starts_is_refused_by_the_database() -> None:
    from django.db import IntegrityError

    with pytest.raises(IntegrityError):
        PowerCap.objects.create(name="backwards", watts=300, starts_at=EARLY, ends_at=EARLY - dt.timedelta(hours=1))
