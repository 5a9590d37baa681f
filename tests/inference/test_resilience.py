"""Faults, live: a failing model's breaker opens and its traffic takes the fallback chain until a
probe finds it well again; transient upstream failures are retried (a capped number of times), and
nothing else is.

The runtime serves the tiny local model and three upstreams on one fake server: ``big`` (falls back
to ``tiny-random``, then 503), ``solo`` (no chain) and ``cached`` (falls back to the cache, then 503).
Its breakers open at half of at least 4 outcomes and cool down for a second.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from inference.backends import Generation
from inference.config import Fallback, RuntimeConfig, Upstream
from inference.contracts import RequestEvent
from inference.engine.engine import GenerationResult, TokenDelta
from inference.engine.models import LoadedModel
from inference.fallback import Body
from tests.inference.collector import Collector
from tests.inference.fake_upstream import FakeUpstream, fake_upstream, text_of
from tests.inference.live import ACME, LiveRuntime, serve, tiny_config
from tests.inference.rulesets import metric

COOLDOWN_S = 1.0
TRIP = 4  # breaker_min_requests: this many failures in a row open a breaker


def chat(model: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, **fields}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with fake_upstream() as upstream:
        yield upstream


def gateway_config(fake: FakeUpstream, **overrides: Any) -> RuntimeConfig:
    upstreams = tuple(Upstream(name, fake.url, f"vendor/{name}") for name in ("big", "solo", "cached"))
    config = tiny_config(upstreams=upstreams, upstream_timeout_s=1.0, upstream_retries=0,
                         fallbacks=(Fallback("big", ("tiny-random", "503")), Fallback("cached", ("cache", "503"))),
                         breaker_min_requests=TRIP, breaker_error_rate=0.5, breaker_window_s=60.0,
                         breaker_cooldown_s=COOLDOWN_S, breaker_probes=1)
    return dataclasses.replace(config, **overrides)


@pytest.fixture
def live(fake: FakeUpstream, tiny_model: LoadedModel) -> Iterator[LiveRuntime]:
    fake.reset()
    with serve(gateway_config(fake), preloaded=(tiny_model,)) as server:
        yield server


@pytest.fixture
def retrying(fake: FakeUpstream, tiny_model: LoadedModel) -> Iterator[LiveRuntime]:
    """Two retries of a transient failure, 50 ms backoff, and a breaker that will not open here."""
    fake.reset()
    config = gateway_config(fake, upstream_retries=2, upstream_retry_backoff_s=0.05, upstream_timeout_s=0.5,
                            breaker_min_requests=1000)
    with serve(config, preloaded=(tiny_model,)) as server:
        yield server


def ask(live: LiveRuntime, model: str, **fields: Any) -> httpx.Response:
    return live.client().post("/v1/chat/completions", json=chat(model, **fields))


def last_event(live: LiveRuntime, count: int) -> RequestEvent:
    """The latest event, once ``count`` have been recorded."""
    events = live.wait_for_events(count)
    assert len(events) == count, f"expected {count} events, got {len(events)}"
    return events[-1]


def trip(live: LiveRuntime, fake: FakeUpstream, model: str) -> None:
    fake.fail(500, "CUDA out of memory")
    for _ in range(TRIP):
        assert ask(live, model).status_code == 502
    assert metric(live, "wattson_breaker_state", model=model) == 2


# -- the breaker and the fallback chain ------------------------------------------------------------


def test_a_failing_upstream_trips_its_breaker_its_traffic_falls_back_and_a_probe_recovers_it(
        live: LiveRuntime, fake: FakeUpstream) -> None:
    assert metric(live, "wattson_breaker_state", model="big") == 0
    fake.fail(500, "CUDA out of memory")
    for i in range(TRIP - 1):
        assert ask(live, "big").status_code == 502
        assert metric(live, "wattson_breaker_state", model="big") == 0, f"still closed after {i + 1} failures"
    trip_hits = len(fake.requests)
    assert ask(live, "big").status_code == 502
    assert metric(live, "wattson_breaker_state", model="big") == 2
    assert metric(live, "wattson_breaker_opens_total", model="big") == 1

    fake.reply(pieces=3)
    fallback = ask(live, "big")
    assert fallback.status_code == 200, fallback.text
    assert fallback.json()["model"] == "tiny-random"
    assert len(fake.requests) == trip_hits + 1, "nothing reached the upstream while its breaker was open"
    event = last_event(live, TRIP + 1)
    assert (event.model_requested, event.model_served, event.route_reason, event.status, event.device) == (
        "big", "tiny-random", "fallback", "ok", "cpu")
    assert metric(live, "wattson_fallbacks_total", model="big", step="tiny-random") == 1

    time.sleep(COOLDOWN_S + 0.1)
    assert metric(live, "wattson_breaker_state", model="big") == 1, "half-open after the cool-down"
    probe = ask(live, "big")
    assert probe.status_code == 200
    assert (probe.json()["model"], probe.json()["choices"][0]["message"]["content"]) == ("big", text_of(3))
    assert len(fake.requests) == trip_hits + 2
    event = last_event(live, TRIP + 2)
    assert (event.model_served, event.route_reason, event.status) == ("big", "requested", "ok")
    assert metric(live, "wattson_breaker_state", model="big") == 0, "the probe's success closed it"
    assert ask(live, "big").json()["model"] == "big"


def test_a_probe_that_fails_opens_the_breaker_again(live: LiveRuntime, fake: FakeUpstream) -> None:
    trip(live, fake, "big")
    time.sleep(COOLDOWN_S + 0.1)
    hits = len(fake.requests)

    assert ask(live, "big").status_code == 502, "the probe reached the still failing upstream"
    assert len(fake.requests) == hits + 1
    assert metric(live, "wattson_breaker_state", model="big") == 2
    assert metric(live, "wattson_breaker_opens_total", model="big") == 2
    assert ask(live, "big").json()["model"] == "tiny-random"
    assert len(fake.requests) == hits + 1


def test_while_half_open_only_the_probe_reaches_the_model(live: LiveRuntime, fake: FakeUpstream) -> None:
    trip(live, fake, "big")
    fake.reply(pieces=4, delay_s=0.15)  # the probe takes 0.6 s
    time.sleep(COOLDOWN_S + 0.1)
    hits = len(fake.requests)

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=10,
                                     headers={"Authorization": f"Bearer {ACME}"}) as client:
            probe = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat("big")))
            await until(lambda: len(fake.requests) == hits + 1)
            other = await client.post("/v1/chat/completions", json=chat("big"))
            return await probe, other

    probe, other = asyncio.run(scenario())
    assert (probe.json()["model"], other.json()["model"]) == ("big", "tiny-random")
    assert len(fake.requests) == hits + 1
    assert metric(live, "wattson_breaker_state", model="big") == 0


def failing_while(loaded: LoadedModel, broken: threading.Event, name: str) -> LoadedModel:
    """The same weights under another name, whose forward pass raises while ``broken`` is set."""
    model = copy.copy(loaded.model)
    forward = loaded.model.forward

    def flaky_forward(*args: Any, **kwargs: Any) -> Any:
        if broken.is_set():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return forward(*args, **kwargs)

    model.forward = flaky_forward  # type: ignore[method-assign]
    return dataclasses.replace(loaded, name=name, model=model)


def test_a_local_models_breaker_opens_on_engine_errors_and_its_traffic_takes_another_model(
        tiny_model: LoadedModel) -> None:
    broken = threading.Event()
    flaky, spare = failing_while(tiny_model, broken, "flaky"), dataclasses.replace(tiny_model, name="spare")
    config = tiny_config(models=("flaky", "spare"), fallbacks=(Fallback("flaky", ("spare",)),),
                         breaker_min_requests=TRIP, breaker_cooldown_s=COOLDOWN_S)
    with serve(config, preloaded=(flaky, spare)) as live:
        broken.set()
        for _ in range(TRIP):
            assert ask(live, "flaky").status_code == 500
        assert metric(live, "wattson_breaker_state", model="flaky") == 2
        served = ask(live, "flaky")
        assert (served.status_code, served.json()["model"]) == (200, "spare")
        event = last_event(live, TRIP + 1)
        assert (event.model_requested, event.model_served, event.route_reason) == ("flaky", "spare", "fallback")

        broken.clear()
        time.sleep(COOLDOWN_S + 0.1)
        assert ask(live, "flaky").json()["model"] == "flaky"
        assert metric(live, "wattson_breaker_state", model="flaky") == 0


def test_a_model_with_no_fallback_answers_503_with_retry_after_while_open(live: LiveRuntime,
                                                                          fake: FakeUpstream) -> None:
    trip(live, fake, "solo")
    hits = len(fake.requests)

    response = ask(live, "solo")

    assert response.status_code == 503
    error = response.json()["error"]
    assert (error["code"], error["type"]) == ("model_unavailable", "server_overloaded")
    assert 1 <= int(response.headers["Retry-After"]) <= COOLDOWN_S
    assert len(fake.requests) == hits
    event = last_event(live, TRIP + 1)
    assert (event.status, event.http_status, event.error_type, event.model_served) == (
        "error", 503, "model_unavailable", None)
    assert metric(live, "wattson_fallbacks_total", model="solo", step="503") == 1
    assert metric(live, "wattson_breaker_state", model="big") == 0, "each model has its own breaker"


class StubCache:
    """A response cache's side of the fallback hook, holding one answer for the model ``cached``."""

    TEXT = "an answer from before"

    def __init__(self) -> None:
        self.asked: list[tuple[str, str, str]] = []

    async def cached_answer(self, body: Body, *, tenant: str, model: str,
                            max_tokens_cap: int | None) -> Generation | None:
        self.asked.append((tenant, model, body.model))
        if model != "cached":
            return None
        replay, now = Generation(), time.perf_counter()
        replay.outputs.put_nowait(TokenDelta(self.TEXT, 4))
        replay.outputs.put_nowait(GenerationResult(
            text=self.TEXT, finish_reason="stop", prompt_tokens=9, completion_tokens=4, submitted_at=now,
            first_token_at=now, finished_at=now, gpu_seconds=0.0, energy_joules=None, mean_batch_size=None))
        return replay


def test_the_cache_step_answers_from_a_wired_cache_and_is_passed_over_without_one(
        live: LiveRuntime, fake: FakeUpstream) -> None:
    trip(live, fake, "cached")
    assert ask(live, "cached").status_code == 503, "no cache: the chain goes on to its 503"

    cache = StubCache()
    live.runtime.fallback_cache = cache
    answered = ask(live, "cached")
    streamed = live.client().post("/v1/chat/completions",
                                  json=chat("cached", stream=True, stream_options={"include_usage": True}))

    assert answered.status_code == 200
    body = answered.json()
    assert (body["model"], body["choices"][0]["message"]["content"]) == ("cached", StubCache.TEXT)
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    assert cache.asked == [("acme", "cached", "cached")] * 2
    event = last_event(live, TRIP + 3)
    assert (event.route_reason, event.cache_hit, event.model_served, event.status) == (
        "fallback", True, "cached", "ok")
    assert (event.prompt_tokens, event.completion_tokens, event.gpu_seconds) == (9, 4, 0.0)
    assert (event.queue_wait_ms, event.queue_depth_at_admit) == (0, None), "a cached answer never queued"
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert streamed.text.rstrip().endswith("data: [DONE]")
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == StubCache.TEXT
    assert chunks[-1]["usage"]["total_tokens"] == 13
    assert len(fake.requests) == TRIP, "the cache answered: the failing upstream was not asked"
    assert metric(live, "wattson_fallbacks_total", model="cached", step="cache") == 2
    assert metric(live, "wattson_breaker_state", model="cached") == 2, "cache hits do not close the breaker"


def test_breaker_states_reach_the_control_plane_in_runtime_samples(
        fake: FakeUpstream, tiny_model: LoadedModel, collector: Collector, tmp_path: Path) -> None:
    fake.reset()
    config = gateway_config(fake, finops_url=collector.url, finops_token="t" * 20, sample_interval_s=0.1,
                            export_interval_s=0.1, spool_dir=tmp_path / "spool")
    with serve(config, preloaded=(tiny_model,)) as live:
        trip(live, fake, "big")
        assert wait_for(lambda: any((s.get("breakers") or {}).get("big") == "open" for s in collector.samples))
        assert live.runtime.sampler is not None
        assert live.runtime.sampler.take().breakers == {"big": "open", "cached": "closed", "solo": "closed",
                                                        "tiny-random": "closed"}
    sample = next(s for s in collector.samples if (s.get("breakers") or {}).get("big") == "open")
    assert sample["breakers"]["tiny-random"] == "closed"


# -- retries ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_transient_upstream_failure_is_retried_and_the_client_never_sees_it(
        retrying: LiveRuntime, fake: FakeUpstream, stream: bool) -> None:
    fake.reply(pieces=2)
    fake.fail(503, "warming up", times=2)

    response = ask(retrying, "big", stream=stream)

    assert response.status_code == 200, response.text
    assert text_of(2).split()[0] in response.text
    assert len(fake.requests) == 3, "two failed attempts and the one that answered"
    event = last_event(retrying, 1)
    assert (event.status, event.model_served, event.completion_tokens) == ("ok", "big", 2)
    assert metric(retrying, "wattson_retries_total", model="big") == 2


@pytest.mark.parametrize(("fault", "status"), [("502", 502), ("504", 502), ("hang", 504)])
def test_retries_of_a_transient_failure_stop_at_the_cap(retrying: LiveRuntime, fake: FakeUpstream, fault: str,
                                                        status: int) -> None:
    if fault == "hang":
        fake.hang(5)
    else:
        fake.fail(int(fault), "bad gateway")

    response = ask(retrying, "big")

    assert response.status_code == status
    assert len(fake.requests) == 3, "the first attempt and two retries"
    assert last_event(retrying, 1).http_status == status


@pytest.mark.parametrize("status", [400, 404, 422, 429, 500])
def test_client_errors_rate_limits_and_server_bugs_are_not_retried(retrying: LiveRuntime, fake: FakeUpstream,
                                                                   status: int) -> None:
    fake.fail(status, "no")

    response = ask(retrying, "big")

    assert response.status_code == (502 if status == 500 else status)
    assert len(fake.requests) == 1
    assert metric(retrying, "wattson_retries_total", model="big") == 0


def test_a_request_refused_by_validation_never_reaches_the_upstream(retrying: LiveRuntime,
                                                                    fake: FakeUpstream) -> None:
    response = retrying.client().post("/v1/chat/completions", json={"model": "big", "messages": "hi"})
    assert response.status_code == 400
    assert fake.requests == []


# -- helpers ---------------------------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)
