"""The enforcer alone, on a fake clock: matching by scope, token buckets, and the invariant that
reservations never let the ledger pass a grant, under random interleavings (hypothesis)."""

from __future__ import annotations

import contextlib
import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.rules import (
    RuleEnforcer,
    RuleRejection,
    RulesetInvalid,
    RulesetNotNewer,
    ruleset_compile,
    ruleset_parse,
)
from inference.rules.matching import ScopeIndex
from tests.inference.rulesets import allowance, document, rule, scope


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def enforcer_with(doc: dict[str, Any], clock: Clock | None = None) -> RuleEnforcer:
    clock = clock or Clock()
    enforcer = RuleEnforcer(clock=clock, monotonic=clock)
    enforcer.apply(ruleset_compile(ruleset_parse(json.dumps(doc).encode())))
    return enforcer


def apply(enforcer: RuleEnforcer, doc: dict[str, Any]) -> None:
    enforcer.apply(ruleset_compile(ruleset_parse(json.dumps(doc).encode())))


SERVED = {"big", "small"}


def test_wildcards_match_and_results_keep_document_order() -> None:
    index = ScopeIndex([
        (("acme", "*", "*"), "acme-any"),
        (("*", "search", "*"), "any-search"),
        (("*", "*", "*"), "everyone"),
        (("acme", "search", "big"), "exact"),
        (("globex", "*", "*"), "globex"),
    ])
    assert list(index.match("acme", "search", "big")) == ["acme-any", "any-search", "everyone", "exact"]
    assert list(index.match("acme", "chat", "small")) == ["acme-any", "everyone"]
    assert list(index.match("initech", "search", "big")) == ["any-search", "everyone"]
    assert list(index.match("globex", "chat", "small")) == ["everyone", "globex"]
    assert list(ScopeIndex([(("acme", "*", "*"), 1)]).match("globex", "x", "y")) == []


def test_the_first_servable_downgrade_and_the_smallest_cap_apply() -> None:
    enforcer = enforcer_with(document(rules=[
        rule("cap-9", {"type": "cap_max_tokens", "max_tokens": 9}),
        rule("down-missing", {"type": "downgrade", "model": "absent"}),
        rule("down-small", {"type": "downgrade", "model": "small"}, where=scope(tenant="acme")),
        rule("cap-4", {"type": "cap_max_tokens", "max_tokens": 4}, where=scope(feature="f")),
        rule("down-big", {"type": "downgrade", "model": "big"}),
    ]))
    match = enforcer.match("acme", "f", "big", SERVED)
    assert match is not None
    assert match.downgrade is not None and match.downgrade.id == "down-small"
    assert match.max_tokens_cap == 4
    assert enforcer.counters.downgrades_ignored == 1
    other = enforcer.match("globex", "g", "small", SERVED)
    assert other is not None and other.downgrade is not None and other.downgrade.id == "down-big"
    assert other.max_tokens_cap == 9


def test_a_throttle_refills_over_the_minute_and_takes_back_unused_tokens() -> None:
    clock = Clock()
    enforcer = enforcer_with(document(rules=[rule("t", {"type": "throttle", "tokens_per_minute": 600,
                                                        "requests_per_minute": 100})]), clock)
    match = enforcer.match("a", "f", "big", SERVED)
    assert match is not None
    first = enforcer.reserve(match, prompt_tokens=100, max_tokens=400, model="big")
    with pytest.raises(RuleRejection) as refused:
        enforcer.reserve(match, prompt_tokens=100, max_tokens=400, model="big")
    assert refused.value.code == "rejected_rule" and refused.value.retry_after_s == 40  # 400 short at 10/s
    enforcer.settle(first, prompt_tokens=100, completion_tokens=0, gpu_seconds=None)  # its 400 unused come back
    second = enforcer.reserve(match, prompt_tokens=100, max_tokens=400, model="big")
    enforcer.settle(second, prompt_tokens=100, completion_tokens=400, gpu_seconds=None)
    with pytest.raises(RuleRejection):
        enforcer.reserve(match, prompt_tokens=100, max_tokens=400, model="big")
    clock.now += 60  # a full minute refills the whole bucket
    enforcer.reserve(match, prompt_tokens=100, max_tokens=400, model="big")


def test_a_request_larger_than_the_whole_bucket_waits_for_a_full_bucket() -> None:
    clock = Clock()
    enforcer = enforcer_with(document(rules=[rule("t", {"type": "throttle", "tokens_per_minute": 60})]), clock)
    match = enforcer.match("a", "f", "big", SERVED)
    assert match is not None
    enforcer.reserve(match, prompt_tokens=10, max_tokens=500, model="big")  # full bucket: let through, in debt
    with pytest.raises(RuleRejection):
        enforcer.reserve(match, prompt_tokens=1, max_tokens=1, model="big")


def test_throttles_keep_their_buckets_across_documents() -> None:
    clock = Clock()
    limit = rule("t", {"type": "throttle", "requests_per_minute": 1})
    enforcer = enforcer_with(document(rules=[limit]), clock)
    match = enforcer.match("a", "f", "big", SERVED)
    assert match is not None
    enforcer.reserve(match, prompt_tokens=1, max_tokens=1, model="big")
    apply(enforcer, document(rules=[limit]))
    with pytest.raises(RuleRejection):
        enforcer.reserve(enforcer.match("a", "f", "big", SERVED), prompt_tokens=1, max_tokens=1, model="big")  # type: ignore[arg-type]


def test_concurrency_caps_keep_their_counts_across_documents_and_take_new_limits() -> None:
    cap = {"type": "concurrency", "max_running": 2}
    enforcer = enforcer_with(document(rules=[rule("c1", cap, where=scope(tenant="acme"))]))
    match = enforcer.match("acme", "chat", "big", SERVED)
    assert match is not None
    (held,) = match.caps
    held.running = 2  # two of acme's requests run
    apply(enforcer, document(rules=[rule("c1", {**cap, "max_running": 3}, where=scope(tenant="acme"))]))
    again = enforcer.match("acme", "chat", "big", SERVED)
    assert again is not None and again.caps == [held]
    assert (held.running, held.max_running, held.can_run()) == (2, 3, True)
    apply(enforcer, document())
    assert enforcer.match("acme", "chat", "big", SERVED) is None


@pytest.mark.parametrize("action", [
    {"type": "concurrency"}, {"type": "concurrency", "max_running": 0}, {"type": "concurrency", "max_queued": -1},
    {"type": "concurrency", "max_running": "2"}, {"type": "concurrency", "max_running": 1, "burst": 2},
])
def test_a_concurrency_action_that_limits_nothing_or_is_malformed_is_refused(action: dict[str, Any]) -> None:
    with pytest.raises(RulesetInvalid):
        ruleset_parse(json.dumps(document(rules=[rule("c1", action)])).encode())


def test_an_older_document_is_not_newer() -> None:
    enforcer = enforcer_with(document(version=5))
    with pytest.raises(RulesetNotNewer):
        apply(enforcer, document(version=5))
    assert enforcer.version == 5


def test_usd_worst_case_and_settlement_use_the_served_models_prices() -> None:
    prices = {"big": {"prompt_per_1m": 3, "completion_per_1m": 15}, "small": {"prompt_per_1m": 0.1,
                                                                              "completion_per_1m": 0.4}}
    enforcer = enforcer_with(document(prices=prices, allowances=[allowance("usd", unit="usd_list", granted=0.01)]))
    match = enforcer.match("a", "f", "big", SERVED)
    assert match is not None
    with pytest.raises(RuleRejection) as refused:
        enforcer.reserve(match, prompt_tokens=1000, max_tokens=1000, model="big")  # $0.018 > $0.01
    assert "usd" in refused.value.message and refused.value.code == "rejected_budget"
    held = enforcer.reserve(match, prompt_tokens=1000, max_tokens=1000, model="small")  # $0.0005
    assert enforcer.ledger.reserved(("usd", "2026-11-01T00:00:00Z")) == Decimal("0.0005")
    enforcer.settle(held, prompt_tokens=1000, completion_tokens=250, gpu_seconds=None)
    assert enforcer.ledger.settled[("usd", "2026-11-01T00:00:00Z")] == Decimal("0.0002")


# -- the invariant -------------------------------------------------------------------------------

Step = tuple[str, int, int, int]  # (what, a, b, c)

steps = st.lists(st.one_of(
    st.tuples(st.just("start"), st.integers(1, 300), st.integers(1, 300), st.integers(0, 2)),
    st.tuples(st.just("finish"), st.integers(0, 50), st.integers(0, 100), st.integers(0, 1)),
    st.tuples(st.just("raise_grant"), st.integers(0, 500), st.integers(0, 500), st.just(0)),
), max_size=80)


@settings(max_examples=300, deadline=None)
@given(steps=steps, unit=st.sampled_from(["tokens", "usd_list"]), granted=st.integers(0, 2000),
       reported=st.integers(0, 1000))
def test_reservations_never_let_the_ledger_pass_the_grant(steps: list[Step], unit: str, granted: int,
                                                          reported: int) -> None:
    """Requests start (reserving their worst case), finish in any order having used any part of
    it, and the grant is raised between them (the control plane only raises grants); the settled
    spend never passes the grant, and the reserved total returns to zero."""
    prices = {"big": {"prompt_per_1m": 500_000, "completion_per_1m": 2_000_000}}  # $0.5 and $2 a token
    grants = [Decimal(granted)]

    def doc() -> dict[str, Any]:
        return document(prices=prices, allowances=[allowance("b", unit=unit, granted=float(grants[-1]),
                                                             reported=reported)])

    enforcer = enforcer_with(doc())
    period = ("b", "2026-11-01T00:00:00Z")
    running: list[tuple[Any, int, int]] = []
    for what, a, b, _ in steps:
        if what == "start":
            match = enforcer.match("t", "f", "big", SERVED)
            assert match is not None
            with contextlib.suppress(RuleRejection):  # refused: nothing held
                running.append((enforcer.reserve(match, prompt_tokens=a, max_tokens=b, model="big"), a, b))
        elif what == "finish" and running:
            reservation, prompt, max_tokens = running.pop(a % len(running))
            completion = max_tokens * b // 100  # any share of what it may generate
            enforcer.settle(reservation, prompt_tokens=prompt, completion_tokens=completion, gpu_seconds=None)
            enforcer.settle(reservation, prompt_tokens=prompt, completion_tokens=completion, gpu_seconds=None)
        elif what == "raise_grant":
            grants.append(grants[-1] + a)
            apply(enforcer, doc())
        settled = enforcer.ledger.settled.get(period, Decimal(0))
        spent = max(settled, Decimal(reported))
        assert spent + enforcer.ledger.reserved(period) <= max(grants[-1], Decimal(reported))
        if settled > 0:
            assert settled <= grants[-1]
    for reservation, prompt, max_tokens in running:
        enforcer.settle(reservation, prompt_tokens=prompt, completion_tokens=max_tokens, gpu_seconds=None)
    assert enforcer.ledger.reserved(period) == 0
    assert enforcer.ledger.settled.get(period, Decimal(0)) <= grants[-1]
