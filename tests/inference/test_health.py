"""/health: 200 while the runtime serves, ``ok`` or ``degraded`` with the reasons (telemetry waiting
too long, refused, or failing to send); and an operator's view of the records set aside, behind the
admin token, where they can be resent or discarded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai

from inference.engine.models import LoadedModel
from tests.inference.collector import Collector
from tests.inference.live import ACME, LiveRuntime, serve, tiny_config
from tests.inference.rulesets import ADMIN_TOKEN
from tests.inference.telemetry_helpers import wait_until

TOKEN = "ingest-token-1"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def ask(live: LiveRuntime, feature: str = "search") -> None:
    client = openai.OpenAI(base_url=live.base_url + "/v1", api_key=ACME, max_retries=0,
                           default_headers={"X-Wattson-Feature": feature})
    client.completions.create(model="tiny-random", prompt="hello", max_tokens=2)


def health(live: LiveRuntime) -> httpx.Response:
    return httpx.get(live.base_url + "/health", timeout=10)


def reasons_with(live: LiveRuntime, words: str) -> Callable[[], bool]:
    return lambda: any(words in reason for reason in health(live).json()["reasons"])


def exporting(collector: Collector, tmp_path: Path, **overrides: Any) -> Any:
    return tiny_config(finops_url=collector.url, finops_token=TOKEN, spool_dir=tmp_path / "spool",
                       export_interval_s=0.05, admin_token=ADMIN_TOKEN, **overrides)


def test_a_healthy_runtime_says_ok_with_no_reasons_and_its_usual_fields(
    tiny_model: LoadedModel, collector: Collector, tmp_path: Path
) -> None:
    with serve(exporting(collector, tmp_path), preloaded=(tiny_model,)) as live:
        ask(live)
        assert wait_until(lambda: len(collector.events) == 1)
        response = health(live)

    body = response.json()
    assert response.status_code == 200
    assert (body["status"], body["reasons"]) == ("ok", [])
    assert body["runtime_id"] == "test-runtime" and body["models"] == ["tiny-random"]
    assert {"queue_depth", "running"} <= body.keys()
    assert body["telemetry"]["sent_records"] == 1 and body["telemetry"]["events_recorded"] == 1


def test_records_waiting_longer_than_the_threshold_make_the_runtime_degraded_until_they_are_sent(
    tiny_model: LoadedModel, collector: Collector, tmp_path: Path
) -> None:
    collector.down()
    config = exporting(collector, tmp_path, telemetry_stale_after_s=0.5)
    with serve(config, preloaded=(tiny_model,)) as live:
        ask(live)

        assert wait_until(reasons_with(live, "the oldest unsent telemetry record is"), timeout=10)
        response = health(live)
        assert (response.status_code, response.json()["status"]) == (200, "degraded"), "it still serves"
        assert response.json()["telemetry"]["oldest_unsent_age_s"] > 0.5

        collector.up()
        assert wait_until(lambda: health(live).json()["status"] == "ok", timeout=10)


def test_a_sender_that_keeps_failing_makes_the_runtime_degraded_with_the_answer_it_gets(
    tiny_model: LoadedModel, collector: Collector, tmp_path: Path
) -> None:
    collector.mode = "html_400"
    with serve(exporting(collector, tmp_path), preloaded=(tiny_model,)) as live:
        ask(live)

        assert wait_until(reasons_with(live, "the telemetry sender is failing"), timeout=10)
        [reason] = [r for r in health(live).json()["reasons"] if "sender" in r]
        assert "HTTP 400" in reason and "Bad Request" in reason


def test_an_operator_sees_resends_and_discards_the_records_set_aside(
    tiny_model: LoadedModel, collector: Collector, tmp_path: Path
) -> None:
    collector.refuse = {"feature:pricey": "cost: too large to store; check the prices",
                        "feature:junk": "tenant: String should have at most 100 characters"}
    with serve(exporting(collector, tmp_path), preloaded=(tiny_model,)) as live:
        ask(live, "pricey")
        assert wait_until(reasons_with(live, "1 telemetry records set aside"))
        ask(live, "junk")
        assert wait_until(reasons_with(live, "2 telemetry records set aside"))
        base = live.base_url + "/admin/telemetry/refused"

        assert httpx.get(base, timeout=10).status_code == 401
        listed = httpx.get(base, headers=ADMIN, timeout=10).json()
        assert listed["records"] == 2
        pricey, junk = listed["files"]
        assert pricey["reasons"] == ["HTTP 422: event 0: cost: too large to store; check the prices"]

        collector.refuse.pop("feature:pricey")  # the operator fixed the prices
        resent = httpx.post(base + "/resend", params={"file": pricey["name"]}, headers=ADMIN, timeout=10)
        assert resent.json() == {"resent": 1, "set_aside_records": 1}
        assert wait_until(lambda: [e["feature"] for e in collector.events.values()] == ["pricey"])

        missing = httpx.delete(f"{base}/{pricey['name']}", headers=ADMIN, timeout=10)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "set_aside_file_not_found"
        discarded = httpx.delete(f"{base}/{junk['name']}", headers=ADMIN, timeout=10)
        assert discarded.json() == {"discarded": 1}
        assert health(live).json()["status"] == "ok"
