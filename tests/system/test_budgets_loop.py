"""Budgets end to end over real HTTP (issue 4's "Done when"): a live control plane (pytest-django's
live server) evaluates budgets, emails alerts and compiles rulesets that reach a live runtime by
push (the ``push_ruleset`` task) or by the runtime's own pull; the runtime enforces them at
admission and exports every request, the refused ones included, back to the control plane's ingest.

Evaluation is called as the Celery task calls it (``budgets_evaluate``, then ``alerts_send``), and
the push is the Celery task itself, run eagerly (Celery's retries of a failed attempt then follow
at once, without their backoff); a ``now`` in the next period stands in for the clock reaching the
reset.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from django.core import mail
from django.utils import timezone
from pytest_django.live_server_helper import LiveServer

from finops.budgets.alerts import alerts_send
from finops.budgets.evaluation import budgets_evaluate
from finops.budgets.models import Budget, BudgetEvent, EventKind, State
from finops.budgets.periods import period_at
from finops.budgets.services import budget_create
from finops.pricing.models import ModelPrice, PriceBook
from finops.runtimes.models import Ruleset, Runtime
from finops.runtimes.services import runtime_register
from finops.runtimes.tasks import push_ruleset
from finops.telemetry.models import RequestEvent
from finops.telemetry.services import telemetry_caches_clear
from inference.engine.models import LoadedModel
from tests.inference.live import ACME, GLOBEX, LiveRuntime, serve, tiny_config

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "tiny-random"
CHEAP = "tiny-small"  # the same weights under another name, priced lower: the downgrade target
# A tenth of a cent a token (prompt and completion alike): a tiny request costs about a cent.
PRICE = Decimal("1000")
CHEAP_PRICE = Decimal("100")
PROMPT = "The keeper"
MAX_TOKENS = 8
WAIT_S = 30.0


@pytest.fixture(autouse=True)
def _fresh_ingest_caches() -> None:
    """Ingest caches prices for a few seconds; each test prices with the book it saved."""
    telemetry_caches_clear()


# -- helpers -----------------------------------------------------------------------------------------


def wait_for(condition: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def price_book(per_1m: dict[str, Decimal]) -> None:
    """One book in force since 2020: each model's price per 1M tokens, prompt and completion alike."""
    book = PriceBook.objects.create(name="list", effective_from=dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
    for model, price in per_1m.items():
        ModelPrice.objects.create(book=book, model=model, prompt_per_1m=price, completion_per_1m=price)


def request_cost(prompt_tokens: int, completion_tokens: int, price: Decimal = PRICE) -> Decimal:
    return (prompt_tokens + completion_tokens) * price / Decimal(1_000_000)


def budget(**fields: Any) -> Budget:
    values: dict[str, Any] = {"period": "monthly", "unit": "usd_list", "recipients": ["finance@example.com"]}
    values.update(fields)
    return budget_create(fields=values)


@contextmanager
def live_runtime(live_server: LiveServer, tmp_path: Path, preloaded: tuple[LoadedModel, ...], *,
                 pull_interval_s: float = 3600.0, **overrides: Any) -> Iterator[tuple[LiveRuntime, Runtime]]:
    """A runtime registered with the live control plane: it exports telemetry there, pulls its
    ruleset every ``pull_interval_s``, and takes pushes with its admin token at its real address."""
    runtime, token = runtime_register(name="budget-runtime", base_url="http://127.0.0.1:1")
    config = tiny_config(runtime_id=runtime.name, finops_url=live_server.url, finops_token=token,
                         admin_token=runtime.admin_token(), spool_dir=tmp_path / "spool",
                         state_dir=tmp_path / "state", export_interval_s=0.1,
                         ruleset_pull_interval_s=pull_interval_s, **overrides)
    with serve(config, preloaded=preloaded) as live:
        Runtime.objects.filter(pk=runtime.pk).update(base_url=live.base_url)
        runtime.refresh_from_db()
        yield live, runtime


def evaluate_and_push(runtime: Runtime, live: LiveRuntime, *, now: dt.datetime | None = None) -> int:
    """One evaluation, its alerts sent and the runtime's new ruleset pushed; returns the version the
    runtime holds, checked on the runtime itself."""
    evaluate(now=now)
    alerts_send()
    outcome = push_ruleset.apply(args=(runtime.pk,)).get()
    assert outcome["accepted"], outcome["detail"]
    version = Ruleset.objects.get(runtime=runtime).version
    assert live.runtime.rules.version == version == Runtime.objects.get(pk=runtime.pk).last_ruleset_ack
    return version


def evaluate(*, now: dt.datetime | None = None) -> None:
    """One evaluation of every budget, as the beat's task runs it; a budget whose evaluation
    failed (it is logged and skipped) fails the test."""
    result = budgets_evaluate(now=now)
    assert not result.failed, f"{result.failed} budget(s) failed to evaluate"


def all_ingested(live: LiveRuntime) -> list[RequestEvent]:
    """Every request the runtime recorded, once the control plane has stored it."""

    def stored() -> list[RequestEvent] | None:
        rows = list(RequestEvent.objects.filter(runtime_id=live.runtime.config.runtime_id))
        return rows if len(rows) == len(live.events) else None

    return wait_for(stored, "the runtime's events to reach the control plane")


def completion(live: LiveRuntime, key: str, feature: str, **body: Any) -> httpx.Response:
    with live.client(key, **{"X-Wattson-Feature": feature}) as client:
        return client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                                                    "ignore_eos": True, **body})


def streamed(client: httpx.Client, feature: str, model: str = MODEL) -> tuple[int, dict[str, Any]]:
    """One streamed completion: its status and, when served, its last chunk with usage; when
    refused, its error body."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body, headers={"X-Wattson-Feature": feature}) as response:
        text = response.read().decode()
    if response.status_code != 200:
        return response.status_code, {**json.loads(text), "retry_after": response.headers.get("Retry-After")}
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert text.rstrip().endswith("data: [DONE]")
    return 200, chunks[-1]


def times(event: RequestEvent, count: int) -> Decimal:
    """``count`` requests like ``event``, at list price, as a budget's limit (6 decimal places)."""
    return (event.list_cost * count).quantize(Decimal("0.000001"))


def total_list_cost(events: list[RequestEvent]) -> Decimal:
    return sum((e.list_cost for e in events if e.list_cost is not None), Decimal(0))


# -- the specifications ------------------------------------------------------------------------------


def test_a_hard_budget_is_never_overspent_by_64_concurrent_streaming_clients(
    live_server: LiveServer, tiny_model: LoadedModel, tmp_path: Path
) -> None:
    price_book({MODEL: PRICE})
    limit = Decimal("0.40")  # about 33 requests of ~12 tokens at $0.001 a token
    hard = budget(name="globex hard cap", tenant="globex", limit=limit, enforcement="hard", action="block")
    with live_runtime(live_server, tmp_path, (tiny_model,), max_batch_size=32, max_queue_depth=128) as (live, rt):
        evaluate_and_push(rt, live)  # one runtime: granted the whole limit at once
        (allowance,) = live.runtime.rules.snapshot()["allowances"]
        assert Decimal(allowance["granted"]) == limit

        results: list[tuple[int, dict[str, Any]]] = []
        lock = threading.Lock()
        start = threading.Barrier(64)

        def client_loop() -> None:
            """Stream request after request until the runtime refuses one."""
            with live.client(GLOBEX) as client:
                start.wait()
                for _ in range(10):
                    status, body = streamed(client, "search")
                    with lock:
                        results.append((status, body))
                    if status != 200:
                        return

        threads = [threading.Thread(target=client_loop) for _ in range(64)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=WAIT_S)
        assert not any(thread.is_alive() for thread in threads)

        served = [body for status, body in results if status == 200]
        refused = [(status, body) for status, body in results if status != 200]
        assert len(refused) == 64, "every client ends refused"
        assert {status for status, _ in refused} == {429}
        for _, body in refused:
            assert body["error"]["type"] == "budget_exceeded" and body["error"]["code"] == "rejected_budget"
            assert "globex hard cap" in body["error"]["message"]
            assert int(body["retry_after"]) > 0  # seconds to the monthly reset
        assert len(served) >= 20, "a few dozen requests fit in the budget"

        events = all_ingested(live)
        spent = total_list_cost(events)
        assert spent <= limit, f"overspent: ${spent} recorded against a hard limit of ${limit}"
        ok = [e for e in events if e.status == "ok"]
        assert len(ok) == len(served)
        assert spent == sum((request_cost(e.prompt_tokens, e.completion_tokens) for e in ok), Decimal(0))
        worst = max(request_cost(e.prompt_tokens, MAX_TOKENS) for e in ok)
        assert limit - spent < worst, "the runtime stopped only once the rest could not fit a request"
        rejected = [e for e in events if e.status == "rejected_budget"]
        assert len(rejected) == 64
        assert {(e.http_status, e.rule_id, e.tenant, e.list_cost) for e in rejected} == \
            {(429, f"allowance:{hard.pk}", "globex", Decimal(0))}
        # The runtime's own ledger agrees with what the control plane recorded.
        (allowance,) = live.runtime.rules.snapshot()["allowances"]
        assert Decimal(allowance["settled"]) == spent and Decimal(allowance["reserved"]) == 0

        # The control plane sees the budget used up and puts a block in force: later requests are
        # refused by name, and other tenants are served.
        evaluate_and_push(rt, live)
        hard.refresh_from_db()
        assert hard.state == State.EXCEEDED
        later = completion(live, GLOBEX, "search")
        assert later.status_code == 429
        assert later.json()["error"]["code"] == "rejected_budget"
        assert "Budget 'globex hard cap'" in later.json()["error"]["message"]
        assert completion(live, ACME, "search").status_code == 200
        events = all_ingested(live)
        assert total_list_cost([e for e in events if e.tenant == "globex"]) == spent
        assert RequestEvent.objects.filter(status="rejected_budget", rule_id=f"b{hard.pk}-block").count() == 1


def test_a_soft_budget_sends_exactly_one_email_per_threshold(
    live_server: LiveServer, tiny_model: LoadedModel, tmp_path: Path, mailoutbox: list[mail.EmailMessage]
) -> None:
    price_book({MODEL: PRICE})
    with live_runtime(live_server, tmp_path, (tiny_model,)) as (live, rt):
        # What one request costs, learned from one outside the budget's scope.
        assert completion(live, ACME, "probe").status_code == 200
        (probe,) = all_ingested(live)
        soft = budget(name="acme reports", tenant="acme", feature="reports", limit=times(probe, 10),
                      action="alert_only")

        def spend_then_evaluate(requests: int, times: int = 3) -> list[int]:
            """Spend, then evaluate ``times`` times; the thresholds emailed so far, one entry per email."""
            for _ in range(requests):
                assert completion(live, ACME, "reports").status_code == 200
            all_ingested(live)
            for _ in range(times):  # evaluation runs every few seconds: again and again
                evaluate_and_push(rt, live)
            crossed = [re.search(r'^Budget "acme reports" crossed (\d+)%: ', m.subject) for m in mailoutbox]
            return sorted(int(match[1]) for match in crossed if match)

        assert spend_then_evaluate(4) == []  # 40%
        assert spend_then_evaluate(1) == [50]
        assert spend_then_evaluate(2) == [50]  # 70%
        assert spend_then_evaluate(1) == [50, 80]
        assert spend_then_evaluate(2) == [50, 80, 100]
        assert spend_then_evaluate(3, times=5) == [50, 80, 100], "past the limit: nothing more"

    thresholds = BudgetEvent.objects.filter(budget=soft, kind=EventKind.THRESHOLD)
    assert sorted(thresholds.values_list("threshold", flat=True)) == [50, 80, 100]
    assert set(thresholds.values_list("alert_status", flat=True)) == {"sent"}
    forecasts = [m for m in mailoutbox if "on course" in m.subject]
    assert len(forecasts) <= 1, "the forecast alert too is sent at most once"
    assert len(mailoutbox) == 3 + len(forecasts)
    for message in mailoutbox:
        assert message.to == ["finance@example.com"]
        assert f"/budgets/{soft.pk}/" in message.body
        assert message.alternatives and message.alternatives[0][1] == "text/html"


def test_the_period_reset_lifts_the_block(live_server: LiveServer, tiny_model: LoadedModel, tmp_path: Path) -> None:
    """Both kinds of budget reach their limit; the runtime learns of it and later of the reset by
    pulling its ruleset, nothing pushed."""
    price_book({MODEL: PRICE})
    with live_runtime(live_server, tmp_path, (tiny_model,), pull_interval_s=0.1) as (live, rt):
        assert completion(live, ACME, "probe").status_code == 200
        (probe,) = all_ingested(live)
        soft = budget(name="acme daily", tenant="acme", period="daily", limit=times(probe, 3), action="block")
        hard = budget(name="globex daily", tenant="globex", period="daily", limit=times(probe, 3),
                      enforcement="hard", action="block")

        def pulled(now: dt.datetime | None = None) -> None:
            evaluate(now=now)
            version = Ruleset.objects.get(runtime=rt).version
            wait_for(lambda: live.runtime.rules.version == version, f"the runtime to pull ruleset v{version}")

        pulled()
        for _ in range(3):
            assert completion(live, GLOBEX, "search").status_code == 200
            assert completion(live, ACME, "search").status_code == 200
        assert completion(live, GLOBEX, "search").status_code == 429  # the hard one refuses at once
        all_ingested(live)
        pulled()
        for key, name in ((ACME, "acme daily"), (GLOBEX, "globex daily")):
            refused = completion(live, key, "search")
            assert refused.status_code == 429
            assert f"Budget '{name}'" in refused.json()["error"]["message"]
            reset = period_at("daily", timezone.now()).end
            assert abs(int(refused.headers["Retry-After"]) - (reset - timezone.now()).total_seconds()) <= 5

        # The clock reaches midnight in the organisation's time zone: the next evaluation is in a
        # new period, where nothing has been spent.
        tomorrow = period_at("daily", timezone.now()).end + dt.timedelta(seconds=1)
        pulled(now=tomorrow)
        for key in (ACME, GLOBEX):
            assert completion(live, key, "search").status_code == 200

    for limited in (soft, hard):
        limited.refresh_from_db()
        assert (limited.state, limited.period_start) == (State.OK, period_at("daily", tomorrow).start)
        reset = BudgetEvent.objects.filter(budget=limited, kind=EventKind.STATE_CHANGE).first()
        assert (reset.from_state, reset.to_state) == (State.EXCEEDED, State.OK)
        assert reset.note.startswith("The day reset at ")


def test_a_downgrade_budget_makes_requests_come_back_from_the_cheaper_model(
    live_server: LiveServer, tiny_model: LoadedModel, tmp_path: Path
) -> None:
    price_book({MODEL: PRICE, CHEAP: CHEAP_PRICE})
    small = dataclasses.replace(tiny_model, name=CHEAP)
    with live_runtime(live_server, tmp_path, (tiny_model, small), models=(MODEL, CHEAP)) as (live, rt):
        assert completion(live, ACME, "probe").status_code == 200
        (probe,) = all_ingested(live)
        downgrading = budget(name="acme search", tenant="acme", feature="search", limit=times(probe, 2),
                             action="downgrade", downgrade_model=CHEAP)
        client = openai.OpenAI(base_url=live.base_url + "/v1", api_key=ACME, max_retries=0,
                               default_headers={"X-Wattson-Feature": "search"})

        def served_model() -> str:
            chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, stream=True,
                                                    extra_body={"ignore_eos": True}))
            assert sum(len(c.choices[0].text) for c in chunks if c.choices) > 0
            return {c.model for c in chunks}.pop()

        assert [served_model() for _ in range(2)] == [MODEL, MODEL]
        all_ingested(live)
        evaluate_and_push(rt, live)
        downgrading.refresh_from_db()
        assert downgrading.state == State.EXCEEDED

        assert [served_model() for _ in range(3)] == [CHEAP] * 3
        assert completion(live, ACME, "chat").json()["model"] == MODEL, "outside the budget's scope"
        events = all_ingested(live)

    downgraded = [e for e in events if e.route_reason == "downgraded_by_rule"]
    assert len(downgraded) == 3
    for event in downgraded:
        assert (event.model_requested, event.model_served, event.rule_id, event.status) == \
            (MODEL, CHEAP, f"b{downgrading.pk}-downgrade", "ok")
        assert event.list_cost == request_cost(event.prompt_tokens, event.completion_tokens, CHEAP_PRICE)
    assert RequestEvent.objects.filter(feature="search", route_reason="requested", model_served=MODEL).count() == 2


def test_a_hard_budget_is_metered_with_the_price_books_price_for_any_model(
    live_server: LiveServer, tiny_model: LoadedModel, tmp_path: Path
) -> None:
    """A price book may price every model with one ``*`` row; ingest prices the events with it, so
    the runtime must meter a hard USD budget with it too, not refuse the model as unpriced."""
    price_book({"*": PRICE})
    budget(name="globex hard cap", tenant="globex", limit=Decimal("0.05"), enforcement="hard", action="block")
    with live_runtime(live_server, tmp_path, (tiny_model,)) as (live, rt):
        evaluate_and_push(rt, live)
        statuses = [completion(live, GLOBEX, "search").status_code for _ in range(6)]
        events = all_ingested(live)

    assert statuses[0] == 200 and statuses[-1] == 429, statuses
    served = [e for e in events if e.status == "ok"]
    assert len(served) == statuses.count(200)
    assert total_list_cost(events) == sum(request_cost(e.prompt_tokens, e.completion_tokens) for e in served)
    assert total_list_cost(events) <= Decimal("0.05")
