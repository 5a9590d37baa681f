"""A request's deadline bounds it whole: however many retries and fallbacks it is allowed, a request
ends by its deadline (``X-Wattson-Deadline``, at most ``--request-deadline-s``), its generation
included, and what it spent is still counted; a job's attempts all spend from the job's deadline."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest

from inference.config import Fallback, RuntimeConfig, Upstream
from inference.contracts import RequestEvent
from inference.engine.models import LoadedModel
from tests.inference.fake_upstream import FakeUpstream, fake_upstream
from tests.inference.live import LiveRuntime, serve, slowed, tiny_config
from tests.inference.rulesets import ADMIN_TOKEN, admin
from tests.inference.test_jobs import finished, submitted

# Wall-clock slack over a deadline: the HTTP round trip and the event loop's own turns, which a
# loaded 2-core machine (this one runs other suites beside it) delayed by up to 0.9 s when measured;
# twice that, to keep CI from failing on a busy machine. Without the deadline each of these
# requests would take ten times as long or more: fifty retries with backoff, a 30 s upstream
# timeout, 400 tokens at 50 ms each.
SLACK_S = 2.0


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with fake_upstream() as upstream:
        yield upstream


def generous(fake: FakeUpstream, **overrides: Any) -> RuntimeConfig:
    """``big`` falls back to ``small`` (both upstreams on the fake), and each may be retried fifty
    times: only a deadline can stop a request that keeps failing."""
    config = tiny_config(
        upstreams=(Upstream("big", fake.url, "vendor/big"), Upstream("small", fake.url, "vendor/small")),
        fallbacks=(Fallback("big", ("small",)),), upstream_retries=50, upstream_retry_backoff_s=0.05,
        retry_budget_min=10_000, breaker_min_requests=10_000, upstream_timeout_s=30.0, job_max_attempts=50,
        admin_token=ADMIN_TOKEN)
    return dataclasses.replace(config, **overrides)


@pytest.fixture
def live(fake: FakeUpstream, tiny_model: LoadedModel) -> Iterator[LiveRuntime]:
    fake.reset()
    with serve(generous(fake), preloaded=(tiny_model,)) as server:
        yield server


def ask(live: LiveRuntime, deadline: str | None, body: dict[str, Any] | None = None) -> tuple[httpx.Response, float]:
    """POST a chat completion with ``deadline``; the response and the seconds it took."""
    headers = {"X-Wattson-Deadline": deadline} if deadline is not None else {}
    body = body or {"model": "big", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    started = time.monotonic()
    response = live.client(**headers).post("/v1/chat/completions", json=body)
    return response, time.monotonic() - started


def of_request(live: LiveRuntime, request_id: str, at_least: int = 1) -> list[RequestEvent]:
    live.wait_for_events(at_least)
    time.sleep(0.2)  # an attempt stopped at the deadline is recorded once its backend has stopped
    return sorted((e for e in live.events if e.request_id == request_id), key=lambda e: e.attempt or 0)


def test_retries_and_fallbacks_stop_at_the_deadline_however_many_are_allowed(live: LiveRuntime,
                                                                              fake: FakeUpstream) -> None:
    fake.fail(503, "overloaded")  # at once, every time

    response, took = ask(live, "1.5")

    assert took < 1.5 + SLACK_S, f"the request took {took:.2f} s with a 1.5 s deadline"
    assert response.status_code in (503, 504)
    attempts = of_request(live, response.headers["x-wattson-request-id"], 3)
    assert len(attempts) >= 4, "it was retried and fell back while the deadline allowed"
    assert [e.attempt for e in attempts] == list(range(1, len(attempts) + 1))
    assert {e.model_served for e in attempts} == {"big", "small"}
    assert attempts[0].route_reason == "requested" and {e.route_reason for e in attempts[1:]} <= {"retry", "fallback"}
    start = attempts[0].started_at
    assert all(e.finished_at <= start + timedelta(seconds=1.5 + SLACK_S) for e in attempts)
    assert len(fake.requests) == len(attempts), "every attempt reached the upstream once"


def test_an_upstream_that_hangs_is_cut_at_the_deadline_and_not_at_its_timeout(live: LiveRuntime,
                                                                              fake: FakeUpstream) -> None:
    fake.hang(30)  # the upstream timeout is 30 s too

    response, took = ask(live, "1")

    assert took < 1 + SLACK_S
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "deadline_exceeded"
    (event,) = of_request(live, response.headers["x-wattson-request-id"])
    assert (event.status, event.http_status, event.error_type, event.model_served) == (
        "timeout", 504, "deadline_exceeded", "big")
    assert fake.requests[0].wait_until_ended() == "client_gone", "the upstream call was given up"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_generation_longer_than_the_deadline_is_stopped_and_what_it_spent_is_counted(
        tiny_model: LoadedModel, stream: bool) -> None:
    body = {"model": "tiny-random", "messages": [{"role": "user", "content": "Tell me everything"}],
            "max_tokens": 400, "ignore_eos": True, "stream": stream}
    with serve(tiny_config(), preloaded=(slowed(tiny_model, 0.05),)) as live:
        response, took = ask(live, "1", body)

        assert took < 1 + SLACK_S
        if stream:
            assert response.status_code == 200, "the stream had started: it ends with the error in it"
            errors = [json.loads(line[6:]) for line in response.text.splitlines()
                      if line.startswith("data: {") and '"error"' in line]
            assert errors[-1]["error"]["code"] == "deadline_exceeded"
            assert response.text.rstrip().endswith("data: [DONE]")
        else:
            assert response.status_code == 504
            assert response.json()["error"]["code"] == "deadline_exceeded"
        (event,) = of_request(live, response.headers["x-wattson-request-id"])
        assert (event.status, event.error_type) == ("timeout", "deadline_exceeded")
        assert 0 < event.completion_tokens < 400, "the tokens generated before the deadline are counted"
        assert event.gpu_seconds is not None and event.gpu_seconds > 0


@pytest.mark.parametrize("value", ["0", "-1", "soon", "1e3", "2.1234", "601"])
def test_a_deadline_that_is_not_a_positive_number_of_seconds_within_the_limit_is_a_400(live: LiveRuntime,
                                                                                        value: str) -> None:
    response, _ = ask(live, value)

    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_deadline", "X-Wattson-Deadline")
    assert "600" in error["message"], "the message names the runtime's limit"


def test_a_jobs_attempts_all_spend_from_its_deadline(live: LiveRuntime, fake: FakeUpstream) -> None:
    fake.fail(503, "overloaded")
    started = time.monotonic()

    job_id = submitted(live, {"model": "big", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
                       **{"X-Wattson-Deadline": "2"})
    done = finished(live, job_id)

    assert time.monotonic() - started < 2 + SLACK_S, "failed within its deadline"
    assert done["status"] == "failed"
    assert done["deadline_at"] - done["created_at"] in (1, 2, 3)
    events = of_request(live, job_id)
    assert len(events) >= 2 and [e.attempt for e in events] == list(range(1, len(events) + 1)), \
        "the job's attempts at models are numbered across its job attempts"
    assert all(e.request_id == job_id for e in events)

    replayed = admin(live).post(f"/admin/jobs/dead/{job_id}/replay").json()
    assert replayed["deadline_at"] > done["deadline_at"], "the deadline is counted again from the replay"
    assert finished(live, job_id)["status"] == "failed", "as long a deadline again, spent again"
    again = of_request(live, job_id)
    assert [e.attempt for e in again] == list(range(1, len(again) + 1)) and len(again) > len(events), \
        "a replay's attempts carry on the job's numbering"
