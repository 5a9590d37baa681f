"""The runtime pulls its ruleset from the control plane: newer documents are applied, 304 changes
nothing, failures are survived and retried."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from inference.engine.models import LoadedModel
from tests.inference.live import LiveRuntime, serve, tiny_config
from tests.inference.ruleset_stub import RulesetStub
from tests.inference.rulesets import ADMIN_TOKEN, document, held, metric, push, rule

TOKEN = "ingest-token-0123456789"


def until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return bool(condition())


@pytest.fixture
def stub() -> Iterator[RulesetStub]:
    stub = RulesetStub()
    stub.up()
    yield stub
    stub.down()


def pulling(tiny_model: LoadedModel, stub: RulesetStub, interval_s: float = 0.05):  # type: ignore[no-untyped-def]
    config = tiny_config(admin_token=ADMIN_TOKEN, finops_url=stub.url, finops_token=TOKEN,
                         ruleset_pull_interval_s=interval_s, export_interval_s=0.1)
    return serve(config, preloaded=(tiny_model,))


def test_a_newer_document_is_pulled_and_applied(tiny_model: LoadedModel, stub: RulesetStub) -> None:
    doc = document(rules=[rule("blk", {"type": "block"}, budget_name="pulled block")])
    stub.document = doc
    with pulling(tiny_model, stub) as live:
        assert until(lambda: held(live)["version"] == doc["version"])
        with live.client() as client:
            blocked = client.post("/v1/completions", json={"model": "tiny-random", "prompt": "x", "max_tokens": 1})
        assert blocked.status_code == 429 and "pulled block" in blocked.json()["error"]["message"]

        # Held now: the next pulls say so, and the stub answers 304.
        assert until(lambda: any(p["version"] == str(doc["version"]) for p in stub.pulls))
        assert held(live)["ruleset"] == doc

        newer = document()
        stub.document = newer
        assert until(lambda: held(live)["version"] == newer["version"])

    assert stub.pulls[0] == {"authorization": f"Bearer {TOKEN}", "version": "0"}


def test_304_changes_nothing(tiny_model: LoadedModel, stub: RulesetStub) -> None:
    stub.mode = "not_modified"
    with pulling(tiny_model, stub) as live:
        assert until(lambda: len(stub.pulls) >= 3)
        assert held(live)["version"] == 0
        assert metric(live, "wattson_ruleset_pull_failures_total") == 0


def test_failures_are_survived_with_backoff_and_a_later_document_still_applies(
        tiny_model: LoadedModel, stub: RulesetStub) -> None:
    stub.mode = "error"
    with pulling(tiny_model, stub, interval_s=0.05) as live:
        assert until(lambda: len(stub.pulls) >= 3)
        assert metric(live, "wattson_ruleset_pull_failures_total") >= 3
        puller = live.runtime.puller
        assert puller is not None and puller.next_delay_s() > puller.interval_s, "backs off"
        assert puller.next_delay_s() <= 60

        stub.mode = "garbage"  # a 200 that is not a ruleset is refused like any other
        failures = metric(live, "wattson_ruleset_pull_failures_total") or 0
        assert until(lambda: (metric(live, "wattson_ruleset_pull_failures_total") or 0) > failures)
        assert held(live)["version"] == 0

        with live.client() as client:  # serving goes on throughout
            assert client.post("/v1/completions", json={"model": "tiny-random", "prompt": "x",
                                                        "max_tokens": 1}).status_code == 200

        doc = document()
        stub.document, stub.mode = doc, "document"
        assert until(lambda: held(live)["version"] == doc["version"], timeout=15)
        assert puller.failures_in_a_row == 0


def test_a_pulled_document_older_than_a_pushed_one_is_ignored(tiny_model: LoadedModel, stub: RulesetStub) -> None:
    older, newer = document(), document()
    with pulling(tiny_model, stub) as live:
        push(live, newer)
        stub.document = older
        assert until(lambda: sum(p["version"] == str(newer["version"]) for p in stub.pulls) >= 2)
        assert held(live)["version"] == newer["version"]
        assert metric(live, "wattson_ruleset_pull_failures_total") == 0


def test_the_pull_survives_the_control_plane_going_away(tiny_model: LoadedModel, stub: RulesetStub) -> None:
    live: LiveRuntime
    with pulling(tiny_model, stub) as live:
        stub.down()
        assert until(lambda: (metric(live, "wattson_ruleset_pull_failures_total") or 0) >= 2)
        assert live.runtime.puller is not None and live.runtime.puller._task is not None
        assert not live.runtime.puller._task.done()
