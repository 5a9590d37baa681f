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
from inference.fallback import Body, CachedReplay
from tests.inference.collector import Collector
from tests.inference.fake_upstream import ConnectionDropper, FakeUpstream, fake_upstream, text_of
from tests.inference.live import ACME, LiveRuntime, serve, tiny_config
from tests.inference.rulesets import metric

COOLDOWN_S = 2.0  # long enough that tripping a breaker (each request answered by its fallback) ends before it
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
    """Open ``model``'s breaker: TRIP failures in a row (its chain, if any, answers them meanwhile)."""
    fake.fail(500, "CUDA out of memory")
    for _ in range(TRIP):
        ask(live, model, max_tokens=1)
    assert metric(live, "wattson_breaker_state", model=model) == 2


def attempts_of(events: list[RequestEvent], request_id: str) -> list[RequestEvent]:
    """A request's events, in the order of their attempts."""
    return sorted((e for e in events if e.request_id == request_id), key=lambda e: e.attempt or 0)


def outline(events: list[RequestEvent]) -> list[tuple[Any, ...]]:
    return [(e.attempt, e.model_served, e.route_reason, e.status, e.http_status) for e in events]


# -- a failing model: every request gets its fallback, before and after the breaker opens -------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("fault", ["503", "dropped_connection"])
def test_no_client_sees_a_failing_upstream_while_its_fallback_answers_and_each_failure_is_an_attempt(
        fake: FakeUpstream, tiny_model: LoadedModel, fault: str, stream: bool) -> None:
    """The upstream answers 503 (or closes every connection unanswered) from the start: each request
    is sent to it, fails, and is re-sent to the fallback within the same request, until the breaker
    opens; from then on nothing reaches the upstream. No client sees an error at any point."""
    fake.reset()
    with ConnectionDropper() as dropper:
        config = gateway_config(fake, breaker_cooldown_s=60.0)  # no probe while the test runs
        if fault == "503":
            fake.fail(503, "overloaded")
            failing, hits, failure_status = config, lambda: len(fake.requests), 503
        else:
            failing = dataclasses.replace(config, upstreams=(Upstream("big", dropper.url, "vendor/big"),
                                                             *config.upstreams[1:]))
            hits, failure_status = (lambda: dropper.requests), 502
        with serve(failing, preloaded=(tiny_model,)) as live:
            answers = [ask(live, "big", stream=stream) for _ in range(TRIP + 3)]

            assert [r.status_code for r in answers] == [200] * (TRIP + 3), [r.text for r in answers]
            assert all(r.headers["x-wattson-request-id"] for r in answers)
            if not stream:
                assert {r.json()["model"] for r in answers} == {"tiny-random"}
            else:
                assert all(r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text for r in answers)
            assert metric(live, "wattson_breaker_state", model="big") == 2
            assert hits() == TRIP, "the upstream was tried until its breaker opened, and never after"
            events = live.wait_for_events(2 * TRIP + 3)
            for i, response in enumerate(answers):
                taken = outline(attempts_of(events, response.headers["x-wattson-request-id"]))
                if i < TRIP:  # a failed attempt at the upstream, then the fallback in the same request
                    assert taken == [(1, "big", "requested", "error", failure_status),
                                     (2, "tiny-random", "fallback", "ok", 200)], taken
                else:  # the breaker is open: straight to the fallback
                    assert taken == [(1, "tiny-random", "fallback", "ok", 200)], taken
            failed = [e for e in events if e.status == "error"]
            assert len(failed) == TRIP and {e.model_served for e in failed} == {"big"}
            assert metric(live, "wattson_fallbacks_total", model="big", step="tiny-random") == TRIP + 3


def test_the_attempt_that_answers_is_timed_from_the_request_and_a_failed_one_by_itself(
        live: LiveRuntime, fake: FakeUpstream) -> None:
    fake.hang(5)  # past the upstream timeout (1 s): the attempt fails with a 504

    response = ask(live, "big")

    assert response.status_code == 200 and response.json()["model"] == "tiny-random"
    failed, answered = attempts_of(live.wait_for_events(2), response.headers["x-wattson-request-id"])
    assert (failed.status, failed.error_type, answered.status) == ("timeout", "upstream_timeout", "ok")
    assert failed.e2e_ms >= 1000
    assert answered.started_at == failed.started_at, "the answer's clock starts with the request"
    assert answered.ttft_ms is not None and answered.ttft_ms >= failed.e2e_ms, "the client waited for both"
    assert answered.e2e_ms >= failed.e2e_ms


def test_a_model_that_refuses_the_request_itself_is_not_fallen_back_from(live: LiveRuntime,
                                                                          fake: FakeUpstream) -> None:
    fake.fail(400, "max_tokens is too large for this model")

    response = ask(live, "big")

    assert response.status_code == 400, "the request is wrong for the model: another would not help"
    assert "too large" in response.json()["error"]["message"]
    (event,) = live.wait_for_events(1)
    assert (event.attempt, event.model_served, event.error_type) == (1, "big", "upstream_rejected")


def test_a_failing_upstream_trips_its_breaker_and_a_probe_recovers_it(live: LiveRuntime,
                                                                     fake: FakeUpstream) -> None:
    trip(live, fake, "big")
    assert metric(live, "wattson_breaker_opens_total", model="big") == 1
    trip_hits = len(fake.requests)

    fake.reply(pieces=3)
    fallback = ask(live, "big")
    assert fallback.status_code == 200, fallback.text
    assert fallback.json()["model"] == "tiny-random"
    assert len(fake.requests) == trip_hits, "nothing reached the upstream while its breaker was open"
    event = last_event(live, 2 * TRIP + 1)
    assert (event.model_requested, event.model_served, event.route_reason, event.status, event.device) == (
        "big", "tiny-random", "fallback", "ok", "cpu")

    time.sleep(COOLDOWN_S + 0.1)
    assert metric(live, "wattson_breaker_state", model="big") == 1, "half-open after the cool-down"
    probe = ask(live, "big")
    assert probe.status_code == 200
    assert (probe.json()["model"], probe.json()["choices"][0]["message"]["content"]) == ("big", text_of(3))
    assert len(fake.requests) == trip_hits + 1
    event = last_event(live, 2 * TRIP + 2)
    assert (event.model_served, event.route_reason, event.status) == ("big", "requested", "ok")
    assert metric(live, "wattson_breaker_state", model="big") == 0, "the probe's success closed it"
    assert ask(live, "big").json()["model"] == "big"


def test_a_probe_that_fails_opens_the_breaker_again_and_its_request_still_gets_the_fallback(
        live: LiveRuntime, fake: FakeUpstream) -> None:
    trip(live, fake, "big")
    time.sleep(COOLDOWN_S + 0.1)
    hits = len(fake.requests)

    probe = ask(live, "big")
    assert (probe.status_code, probe.json()["model"]) == (200, "tiny-random"), "the probe failed, then fell back"
    assert len(fake.requests) == hits + 1, "the probe reached the still failing upstream"
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


def test_a_local_models_engine_errors_fall_back_per_request_and_open_its_breaker(
        tiny_model: LoadedModel) -> None:
    broken = threading.Event()
    flaky, spare = failing_while(tiny_model, broken, "flaky"), dataclasses.replace(tiny_model, name="spare")
    config = tiny_config(models=("flaky", "spare"), fallbacks=(Fallback("flaky", ("spare",)),),
                         breaker_min_requests=TRIP, breaker_cooldown_s=COOLDOWN_S)
    with serve(config, preloaded=(flaky, spare)) as live:
        broken.set()
        for _ in range(TRIP):
            served = ask(live, "flaky")
            assert (served.status_code, served.json()["model"]) == (200, "spare"), "the engine's error fell back"
        assert metric(live, "wattson_breaker_state", model="flaky") == 2
        failed = [e for e in live.wait_for_events(2 * TRIP) if e.status == "error"]
        assert [(e.model_served, e.http_status, e.error_type) for e in failed] == [
            ("flaky", 500, "engine_error")] * TRIP
        served = ask(live, "flaky")
        assert (served.status_code, served.json()["model"]) == (200, "spare")
        event = last_event(live, 2 * TRIP + 1)
        assert (event.model_requested, event.model_served, event.route_reason, event.attempt) == (
            "flaky", "spare", "fallback", 1)

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
        self.asked: list[tuple[str, str, str, bool]] = []

    async def cached_answer(self, body: Body, *, tenant: str, model: str, max_tokens_cap: int | None,
                            stale: bool = False) -> CachedReplay | None:
        self.asked.append((tenant, model, body.model, stale))
        if model != "cached":
            return None
        replay, now = Generation(), time.perf_counter()
        replay.outputs.put_nowait(TokenDelta(self.TEXT, 4))
        replay.outputs.put_nowait(GenerationResult(
            text=self.TEXT, finish_reason="stop", prompt_tokens=9, completion_tokens=4, submitted_at=now,
            first_token_at=now, finished_at=now, gpu_seconds=0.0, energy_joules=None, mean_batch_size=None))
        return CachedReplay(replay, model, "chat")


@pytest.fixture
def steady(fake: FakeUpstream, tiny_model: LoadedModel) -> Iterator[LiveRuntime]:
    """Breakers that stay open for the whole test once tripped."""
    fake.reset()
    with serve(gateway_config(fake, breaker_cooldown_s=60.0), preloaded=(tiny_model,)) as server:
        yield server


def test_the_cache_step_answers_from_a_wired_cache_and_is_passed_over_without_one(
        steady: LiveRuntime, fake: FakeUpstream) -> None:
    live = steady
    trip(live, fake, "cached")
    assert ask(live, "cached").status_code == 503, "no cache: the chain goes on to its 503"

    cache = StubCache()
    live.runtime.fallback_cache = cache
    answered = ask(live, "cached")
    streamed = live.client().post("/v1/chat/completions",
                                  json=chat("cached", stream=True, stream_options={"include_usage": True}))

    assert answered.status_code == 200
    assert answered.headers["x-wattson-cache"] == "hit"
    body = answered.json()
    assert (body["model"], body["choices"][0]["message"]["content"]) == ("cached", StubCache.TEXT)
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    assert cache.asked == [("acme", "cached", "cached", False)] * 2
    event = last_event(live, TRIP + 3)
    assert (event.route_reason, event.cache_hit, event.cache_stale, event.model_served, event.status) == (
        "fallback", True, False, "cached", "ok")
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
    taken = attempts_of(retrying.wait_for_events(3), response.headers["x-wattson-request-id"])
    assert outline(taken) == [(1, "big", "requested", "error", 503), (2, "big", "retry", "error", 503),
                              (3, "big", "retry", "ok", 200)]
    assert taken[-1].completion_tokens == 2
    assert metric(retrying, "wattson_retries_total", model="big") == 2


@pytest.mark.parametrize(("fault", "status"), [("502", 502), ("504", 502), ("hang", 504)])
def test_retries_of_a_transient_failure_stop_at_the_cap(retrying: LiveRuntime, fake: FakeUpstream, fault: str,
                                                        status: int) -> None:
    if fault == "hang":
        fake.hang(5)
    else:
        fake.fail(int(fault), "bad gateway")

    response = ask(retrying, "solo")

    assert response.status_code == status
    assert len(fake.requests) == 3, "the first attempt and two retries"
    events = retrying.wait_for_events(3)
    assert [(e.attempt, e.http_status) for e in events] == [(1, status), (2, status), (3, status)]


@pytest.mark.parametrize("status", [400, 404, 422, 429, 500])
def test_client_errors_rate_limits_and_server_bugs_are_not_retried(retrying: LiveRuntime, fake: FakeUpstream,
                                                                   status: int) -> None:
    fake.fail(status, "no")

    response = ask(retrying, "solo")

    assert response.status_code == (502 if status == 500 else status)
    assert len(fake.requests) == 1
    assert metric(retrying, "wattson_retries_total", model="solo") == 0


@pytest.mark.parametrize(("ratio", "minimum"), [(0.1, 2), (100.0, 1000)], ids=["budget", "no_budget"])
def test_the_retry_budget_caps_the_extra_load_retries_put_on_a_failing_upstream(
        fake: FakeUpstream, tiny_model: LoadedModel, ratio: float, minimum: int) -> None:
    """An upstream that drops every connection, each request allowed two retries, and a breaker
    that never opens: without a budget it receives every request three times; with one, at most a
    tenth more than the requests (plus the budget's minimum per ten seconds)."""
    requests = 30
    with ConnectionDropper() as dropper:
        config = gateway_config(fake, upstreams=(Upstream("solo", dropper.url, "vendor/solo"),), fallbacks=(),
                                upstream_retries=2, upstream_retry_backoff_s=0.01, breaker_min_requests=10_000,
                                retry_budget_ratio=ratio, retry_budget_min=minimum)
        with serve(config, preloaded=(tiny_model,)) as live:
            started = time.monotonic()
            answers = [ask(live, "solo").status_code for _ in range(requests)]
            windows = int((time.monotonic() - started) // 10) + 1

            assert answers == [502] * requests
            if ratio < 1:
                assert requests < dropper.requests <= requests * (1 + ratio) + windows * minimum, dropper.requests
                assert metric(live, "wattson_retry_budget_exhausted_total", model="solo") > 0
            else:
                assert dropper.requests == 3 * requests
            assert metric(live, "wattson_retries_total", model="solo") == dropper.requests - requests
            events = live.wait_for_events(dropper.requests)
            assert len(events) == dropper.requests, "each request that reached the upstream is an attempt"


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
