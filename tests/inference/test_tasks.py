"""Task identity: a client names the task a request is an attempt at (``X-Wattson-Task`` or the
body's ``metadata.task_id``); every attempt the runtime makes for it — retries at the same model and
the fallback chain — carries that task id, and a request that names none is a task of its own (its
``request_id``). A task id that is not a short plain name is refused with a 400 before any work."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest

from inference.config import Fallback, Upstream
from inference.engine.models import LoadedModel
from tests.inference.fake_upstream import FakeUpstream, fake_upstream
from tests.inference.live import LiveRuntime, serve, tiny_config


def chat(model: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, **fields}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with fake_upstream() as upstream:
        yield upstream


@pytest.fixture
def live(fake: FakeUpstream, tiny_model: LoadedModel) -> Iterator[LiveRuntime]:
    """``big`` on the fake upstream, retried once, then falling back to the local tiny model."""
    fake.reset()
    config = dataclasses.replace(
        tiny_config(upstreams=(Upstream("big", fake.url, "vendor/big"),),
                    fallbacks=(Fallback("big", ("tiny-random",)),)),
        upstream_timeout_s=1.0, upstream_retries=1, upstream_retry_backoff_s=0.01, breaker_min_requests=1000)
    with serve(config, preloaded=(tiny_model,)) as server:
        yield server


def test_every_attempt_of_a_named_task_carries_its_id(live: LiveRuntime, fake: FakeUpstream) -> None:
    """The upstream fails twice (the attempt, then its retry); the fallback answers: three events,
    one task."""
    fake.fail(503, "overloaded")
    response = live.client(**{"X-Wattson-Task": "ticket-42:summary"}).post("/v1/chat/completions", json=chat("big"))
    assert response.status_code == 200, response.text
    events = sorted(live.wait_for_events(3), key=lambda e: e.attempt or 0)
    assert [(e.attempt, e.model_served, e.status) for e in events] == [
        (1, "big", "error"), (2, "big", "error"), (3, "tiny-random", "ok")]
    assert {e.task_id for e in events} == {"ticket-42:summary"}
    assert len({e.request_id for e in events}) == 1


def test_metadata_task_id_names_the_task(live: LiveRuntime) -> None:
    response = live.client().post("/v1/chat/completions", json=chat("tiny-random", metadata={"task_id": "t-7"}))
    assert response.status_code == 200, response.text
    assert live.wait_for_events(1)[0].task_id == "t-7"


def test_a_request_that_names_no_task_is_a_task_of_its_own(live: LiveRuntime) -> None:
    response = live.client().post("/v1/chat/completions", json=chat("tiny-random"))
    assert response.status_code == 200, response.text
    event = live.wait_for_events(1)[0]
    assert event.task_id == event.request_id == response.headers["x-wattson-request-id"]


@pytest.mark.parametrize(("headers", "metadata", "param"), [
    ({"X-Wattson-Task": "x" * 101}, None, "X-Wattson-Task"),
    ({"X-Wattson-Task": "two words"}, None, "X-Wattson-Task"),
    ({"X-Wattson-Task": "<script>"}, None, "X-Wattson-Task"),
    ({}, {"task_id": ""}, "metadata.task_id"),
    ({}, {"task_id": "a\u2028b"}, "metadata.task_id"),
    ({"X-Wattson-Task": "one"}, {"task_id": "another"}, "metadata.task_id"),
])
def test_a_task_id_that_is_not_a_plain_short_name_is_refused(live: LiveRuntime, headers: dict[str, str],
                                                            metadata: dict[str, str] | None, param: str) -> None:
    body = chat("tiny-random", **({"metadata": metadata} if metadata is not None else {}))
    response = live.client(**headers).post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_task", param)
    # Refused before any attempt, and still recorded (as a task of its own).
    event = live.wait_for_events(1)[0]
    assert (event.http_status, event.task_id) == (400, event.request_id)


def test_metadata_that_is_not_string_pairs_is_refused(live: LiveRuntime) -> None:
    for metadata in ({"task_id": 7}, {f"k{i}": "v" for i in range(17)}, {"k" * 65: "v"}):
        response = live.client().post("/v1/chat/completions", json=chat("tiny-random", metadata=metadata))
        assert response.status_code == 400, (metadata, response.text)
        assert response.json()["error"]["param"].startswith("metadata")
