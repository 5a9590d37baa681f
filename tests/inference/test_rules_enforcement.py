"""Rules obeyed at admission, over real HTTP: block, throttle, downgrade, cap, and allowances
(their reservations under concurrent streams, and what happens when they expire)."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from decimal import Decimal

import httpx
import pytest

from inference.engine.models import LoadedModel
from tests.inference.live import ACME, GLOBEX, INITECH, LiveRuntime, serve, slowed, tiny_config
from tests.inference.rulesets import ADMIN_TOKEN, allowance, at, document, held, metric, push, rule, scope

SMALL = "tiny-small"
BODY = {"model": "tiny-random", "prompt": "The keeper", "max_tokens": 4, "ignore_eos": True}


@pytest.fixture(scope="module")
def live(tiny_model: LoadedModel) -> Iterator[LiveRuntime]:
    """Two models (the second a renamed copy of the first) for downgrades."""
    small = dataclasses.replace(tiny_model, name=SMALL)
    config = tiny_config(admin_token=ADMIN_TOKEN, models=("tiny-random", SMALL))
    with serve(config, preloaded=(tiny_model, small)) as server:
        yield server


@pytest.fixture(scope="module")
def slow_live(tiny_model: LoadedModel) -> Iterator[LiveRuntime]:
    """The tiny model slowed to a few hundred ms a request, so that concurrent streams overlap and a
    client can leave one midway."""
    with serve(tiny_config(admin_token=ADMIN_TOKEN), preloaded=(slowed(tiny_model, 0.005),)) as server:
        yield server


@pytest.fixture(autouse=True)
def no_rules(live: LiveRuntime) -> Iterator[None]:
    """Each test starts and ends with an empty ruleset and an empty event list."""
    push(live, document())
    live.events.clear()
    yield
    push(live, document())


def post(live: LiveRuntime, key: str = ACME, feature: str = "default", **body: object) -> httpx.Response:
    with live.client(key, **{"X-Wattson-Feature": feature}) as client:
        return client.post("/v1/completions", json={**BODY, **body})


def last_event(live: LiveRuntime, count: int = 1):  # type: ignore[no-untyped-def]
    return live.wait_for_events(count)[-1]


# -- block ---------------------------------------------------------------------------------------

def test_a_block_rule_answers_429_naming_the_budget_with_retry_after_to_the_reset(live: LiveRuntime) -> None:
    push(live, document(rules=[rule("b7-block", {"type": "block"}, where=scope(tenant="acme"),
                                    budget_name="acme monthly", expires_at=at(3600),
                                    reason="Budget 'acme monthly' exceeded: $12.04 of $12.00 this month")]))

    blocked = post(live)
    other_tenant = post(live, key=GLOBEX)

    assert blocked.status_code == 429
    error = blocked.json()["error"]
    assert error["type"] == "budget_exceeded" and error["code"] == "rejected_budget"
    assert "acme monthly" in error["message"]
    assert 3590 <= int(blocked.headers["Retry-After"]) <= 3600
    assert other_tenant.status_code == 200
    event = live.wait_for_events(2)[0]
    assert (event.status, event.http_status, event.rule_id) == ("rejected_budget", 429, "b7-block")
    assert event.tenant == "acme" and event.completion_tokens == 0
    assert metric(live, "wattson_rule_rejections_total", reason="block") >= 1


def test_a_blocked_stream_gets_a_json_error_before_any_event_stream(live: LiveRuntime) -> None:
    push(live, document(rules=[rule("blk", {"type": "block"}, budget_name="everyone")]))

    blocked = post(live, stream=True)

    assert blocked.status_code == 429
    assert blocked.headers["content-type"].startswith("application/json")
    assert blocked.json()["error"]["code"] == "rejected_budget"
    assert blocked.headers["Retry-After"] == "60"  # no expiry given


def test_a_rule_past_its_expiry_no_longer_applies(live: LiveRuntime) -> None:
    push(live, document(rules=[rule("old", {"type": "block"}, expires_at=at(-1))]))
    assert post(live).status_code == 200


def test_block_wins_over_the_other_rules_and_scopes_match_on_feature(live: LiveRuntime) -> None:
    push(live, document(rules=[
        rule("cap", {"type": "cap_max_tokens", "max_tokens": 1}),
        rule("blk", {"type": "block"}, where=scope(feature="summaries"), budget_name="summaries daily"),
    ]))
    assert post(live, feature="summaries").status_code == 429
    assert post(live, feature="search").status_code == 200


# -- throttle ------------------------------------------------------------------------------------

def test_a_throttle_limits_requests_per_minute_and_refills(live: LiveRuntime) -> None:
    push(live, document(rules=[rule("thr", {"type": "throttle", "requests_per_minute": 60},
                                    where=scope(tenant="initech"), reason="free tier: 60 requests a minute")]))
    statuses: list[int] = []
    refused: httpx.Response | None = None
    with live.client(INITECH) as client:
        for _ in range(200):  # a bucket of 60 that refills one a second runs out well before 200
            response = client.post("/v1/completions", json={**BODY, "max_tokens": 1})
            statuses.append(response.status_code)
            if response.status_code == 429:
                refused = response
                break

    assert refused is not None, "the throttle never acted"
    assert statuses.count(200) >= 60
    assert refused.json()["error"]["code"] == "rejected_rule"
    assert refused.headers["Retry-After"] == "1"
    assert "free tier" in refused.json()["error"]["message"]
    assert post(live, max_tokens=1).status_code == 200, "other tenants are not throttled"
    time.sleep(1.1)
    assert post(live, key=INITECH, max_tokens=1).status_code == 200, "the bucket refilled"
    refused_event = next(e for e in live.events if e.status == "rejected_rule")
    assert refused_event.rule_id == "thr" and refused_event.http_status == 429
    assert refused_event.queue_wait_ms is None, "refused before the queue: no wait to speak of"


def test_a_throttle_on_tokens_counts_the_worst_case_of_requests_in_flight(live: LiveRuntime) -> None:
    # 1000 tokens a minute: two requests of ~5 + 400 fit, the third does not while they run.
    push(live, document(rules=[rule("tpm", {"type": "throttle", "tokens_per_minute": 1000})]))
    with live.client() as c1, live.client() as c2:
        streams = [c.stream("POST", "/v1/completions", json={**BODY, "max_tokens": 400, "stream": True})
                   for c in (c1, c2)]
        responses = [s.__enter__() for s in streams]
        try:
            assert [r.status_code for r in responses] == [200, 200]
            third = post(live, max_tokens=400)
            assert third.status_code == 429
            assert third.json()["error"]["code"] == "rejected_rule"
            assert int(third.headers["Retry-After"]) >= 1
        finally:
            for s in streams:
                s.__exit__(None, None, None)


# -- downgrade and cap ---------------------------------------------------------------------------

def test_a_downgrade_serves_the_cheaper_model_and_the_event_says_so(live: LiveRuntime) -> None:
    push(live, document(rules=[rule("b4-downgrade", {"type": "downgrade", "model": SMALL},
                                    where=scope(tenant="acme", feature="search"))]))

    downgraded = post(live, feature="search")
    as_asked = post(live, feature="chat")

    assert downgraded.status_code == 200 and downgraded.json()["model"] == SMALL
    assert as_asked.json()["model"] == "tiny-random"
    first, second = live.wait_for_events(2)
    assert (first.model_requested, first.model_served, first.route_reason, first.rule_id) == \
        ("tiny-random", SMALL, "downgraded_by_rule", "b4-downgrade")
    assert (second.model_served, second.route_reason, second.rule_id) == ("tiny-random", "requested", None)


def test_a_downgrade_to_a_model_not_served_here_is_ignored_and_counted(live: LiveRuntime) -> None:
    before = metric(live, "wattson_rule_downgrades_ignored_total") or 0
    push(live, document(rules=[rule("nowhere", {"type": "downgrade", "model": "gpt-9"}),
                               rule("second", {"type": "downgrade", "model": SMALL})]))

    response = post(live)

    assert response.status_code == 200 and response.json()["model"] == SMALL
    assert metric(live, "wattson_rule_downgrades_ignored_total") == before + 1


def test_a_cap_clips_max_tokens_and_the_smallest_cap_applies(live: LiveRuntime) -> None:
    push(live, document(rules=[rule("cap-5", {"type": "cap_max_tokens", "max_tokens": 5}),
                               rule("cap-3", {"type": "cap_max_tokens", "max_tokens": 3})]))

    capped = post(live, max_tokens=50)
    streamed = post(live, max_tokens=50, stream=True, stream_options={"include_usage": True})
    defaulted = post(live, max_tokens=None)  # the runtime's default length (16) is capped too

    assert capped.json()["usage"]["completion_tokens"] == 3
    usage = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")][-1]["usage"]
    assert usage["completion_tokens"] == 3
    assert defaulted.json()["usage"]["completion_tokens"] == 3
    assert live.wait_for_events(3)[0].rule_id == "cap-3"


# -- allowances ----------------------------------------------------------------------------------

def test_concurrent_streams_never_spend_more_than_the_grant(slow_live: LiveRuntime) -> None:
    live = slow_live
    # $1 a token: each request may cost (prompt + 12); the grant covers about three of them.
    prices = {"tiny-random": {"prompt_per_1m": 1_000_000, "completion_per_1m": 1_000_000}}
    grant = 50
    live.events.clear()
    push(live, document(prices=prices, allowances=[
        allowance("b3", unit="usd_list", granted=grant, where=scope(tenant="globex"),
                  budget_name="globex hard cap", resets_at=at(7200))]))
    results: list[tuple[int, int]] = []  # (status, tokens used) per client
    barrier = threading.Barrier(8)

    def stream_one() -> None:
        with live.client(GLOBEX) as client:
            barrier.wait()
            body = {**BODY, "max_tokens": 12, "stream": True, "stream_options": {"include_usage": True}}
            with client.stream("POST", "/v1/completions", json=body) as response:
                text = response.read().decode()
        usage = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
        used = usage[-1]["usage"]["total_tokens"] if response.status_code == 200 else 0
        results.append((response.status_code, used))

    for _round in range(3):  # three waves: the grant runs out during them
        threads = [threading.Thread(target=stream_one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        barrier.reset()

    served = [used for status, used in results if status == 200]
    refused = [status for status, _ in results if status != 200]
    assert served and refused
    assert set(refused) == {429}
    assert sum(served) <= grant, "spent more than the grant"
    state = held(live)["state"]
    (b3,) = state["allowances"]
    assert Decimal(b3["settled"]) == sum(served) and Decimal(b3["reserved"]) == 0
    later = post(live, key=GLOBEX)
    assert later.status_code == 429
    assert "globex hard cap" in later.json()["error"]["message"]
    assert later.json()["error"]["type"] == "budget_exceeded"
    assert 7100 <= int(later.headers["Retry-After"]) <= 7200
    events = [e for e in live.wait_for_events(len(results) + 1) if e.status == "rejected_budget"]
    assert events and all(e.rule_id == "allowance:b3" and e.http_status == 429 for e in events)


def test_the_reported_spend_counts_when_it_is_above_the_ledger(live: LiveRuntime) -> None:
    push(live, document(allowances=[allowance("tok", unit="tokens", granted=1000, reported=995)]))
    assert post(live).status_code == 429  # 5 left; the request may need ~7
    push(live, document(allowances=[allowance("tok", unit="tokens", granted=2000, reported=995)]))
    assert post(live).status_code == 200  # the grant was raised


def test_a_new_period_starts_a_fresh_ledger(live: LiveRuntime) -> None:
    push(live, document(allowances=[allowance("tok", unit="tokens", granted=20, period_start="2026-11-01T00:00:00Z")]))
    assert post(live, max_tokens=8).status_code == 200
    assert post(live, max_tokens=8).status_code == 429
    push(live, document(allowances=[allowance("tok", unit="tokens", granted=20, period_start="2026-12-01T00:00:00Z")]))
    assert post(live, max_tokens=8).status_code == 200
    (row,) = held(live)["state"]["ledger"]
    assert row["period_start"] == "2026-12-01T00:00:00Z"


def test_a_cancelled_stream_settles_only_what_it_generated(slow_live: LiveRuntime) -> None:
    live = slow_live
    live.events.clear()
    push(live, document(allowances=[allowance("tok", unit="tokens", granted=100_000)]))
    with live.client() as client, client.stream(
            "POST", "/v1/completions", json={**BODY, "max_tokens": 400, "stream": True}) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
    event = live.wait_for_events(1)[0]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and held(live)["state"]["allowances"][0]["reserved"] != "0":
        time.sleep(0.05)
    (tok,) = held(live)["state"]["allowances"]
    assert event.status == "cancelled"
    assert tok["reserved"] == "0"
    assert int(tok["settled"]) == event.prompt_tokens + event.completion_tokens < 400


def test_a_closed_allowance_past_its_expiry_refuses_with_503(live: LiveRuntime) -> None:
    before = metric(live, "wattson_ruleset_fail_closed_total") or 0
    push(live, document(allowances=[allowance("late", where=scope(tenant="acme"), expires_at=at(-1),
                                              on_expiry="closed", budget_name="acme hard cap")]))

    refused = post(live)

    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "ruleset_stale"
    assert refused.headers["Retry-After"] == "5"
    assert "acme hard cap" in refused.json()["error"]["message"]
    assert post(live, key=GLOBEX).status_code == 200, "only matching requests are refused"
    assert metric(live, "wattson_ruleset_stale") == 1
    assert metric(live, "wattson_ruleset_fail_closed_total") == before + 1
    assert live.wait_for_events(1)[0].status == "rejected_budget"


def test_an_open_allowance_past_its_expiry_is_ignored(live: LiveRuntime) -> None:
    before = metric(live, "wattson_ruleset_fail_open_total") or 0
    push(live, document(allowances=[allowance("late", unit="tokens", granted=0, expires_at=at(-1),
                                              on_expiry="open")]))

    assert post(live).status_code == 200
    assert metric(live, "wattson_ruleset_stale") == 1
    assert metric(live, "wattson_ruleset_fail_open_total") == before + 1
    push(live, document(allowances=[allowance("late", unit="tokens", granted=0, expires_at=at(600))]))
    assert metric(live, "wattson_ruleset_stale") == 0
    assert post(live).status_code == 429, "renewed, the (empty) grant applies again"


def test_a_usd_allowance_for_a_model_without_a_price_refuses_instead_of_guessing(live: LiveRuntime) -> None:
    push(live, document(allowances=[allowance("usd", unit="usd_list", granted=100)]))
    refused = post(live)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "budget_unpriced"


# -- concurrency caps -----------------------------------------------------------------------------

def test_a_concurrency_cap_from_the_ruleset_limits_one_tenant_and_not_the_others(slow_live: LiveRuntime) -> None:
    live = slow_live
    push(live, document(rules=[rule("cap-acme", {"type": "concurrency", "max_running": 1, "max_queued": 0},
                                    where=scope(tenant="acme"), reason="acme may run one request at a time")]))
    live.events.clear()
    with live.client() as client, client.stream(
            "POST", "/v1/completions", json={**BODY, "max_tokens": 200, "stream": True}) as running:
        lines = running.iter_lines()
        next(lines)  # acme's first request holds a slot
        second = post(live, max_tokens=2)
        other_tenant = post(live, key=GLOBEX, max_tokens=2)
    after = post(live, max_tokens=2)

    assert second.status_code == 429
    error = second.json()["error"]
    assert error["code"] == "rejected_rule" and "one request at a time" in error["message"]
    assert int(second.headers["Retry-After"]) >= 1
    assert other_tenant.status_code == 200
    assert after.status_code == 200  # the cap's slot was given back when the stream ended
    refused = [e for e in live.wait_for_events(4) if e.status == "rejected_rule"]
    assert [(e.tenant, e.rule_id, e.http_status) for e in refused] == [("acme", "cap-acme", 429)]
    assert metric(live, "wattson_rule_rejections_total", reason="concurrency") == 1
    push(live, document())
