"""Upstream mode: ``--upstream NAME=URL#MODEL`` serves NAME from another OpenAI-compatible server.

The runtime here serves no local model at all, only ``big`` (a fake vLLM-like server on a real
port, model ``vendor/big-model``) and ``down`` (a port nothing listens on). Clients see the same API,
admission and errors as for a local model; telemetry takes tokens from the upstream's ``usage`` and
attributes the upstream's busy time among its requests; energy stays null, because no GPU of the
upstream is visible here (test_upstream_device.py has one).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from inference.config import Upstream
from inference.contracts import RequestEvent
from tests.inference.fake_upstream import FakeUpstream, fake_upstream, text_of
from tests.inference.live import ACME, GLOBEX, INITECH, LiveRuntime, free_port, serve, tiny_config

UPSTREAM_TIMEOUT_S = 1.0
CHAT = {"model": "big", "messages": [{"role": "user", "content": "Hello there"}]}
COMPLETION = {"model": "big", "prompt": "Once upon a time"}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with fake_upstream() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def gateway(fake: FakeUpstream) -> Iterator[LiveRuntime]:
    """A runtime with no local model: every request goes to an upstream."""
    upstreams = (Upstream("big", fake.url, "vendor/big-model"),
                 Upstream("down", f"http://127.0.0.1:{free_port()}", "vendor/gone"))
    # Each test here sees one answer relayed as it came: no retries, and no breaker opening on the
    # failures the module provokes on purpose (test_resilience.py tests those).
    config = tiny_config(models=(), upstreams=upstreams, upstream_timeout_s=UPSTREAM_TIMEOUT_S, upstream_retries=0,
                         breaker_min_requests=1_000_000)
    with serve(config) as live:
        yield live


@pytest.fixture(autouse=True)
def fresh(fake: FakeUpstream, gateway: LiveRuntime) -> None:
    fake.reset()
    gateway.events.clear()


@pytest.fixture
def sdk(gateway: LiveRuntime) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url + "/v1", api_key=ACME, max_retries=0, timeout=10)


def only_event(live: LiveRuntime) -> RequestEvent:
    """The request's event, after checking that no second one follows it."""
    live.wait_for_events(1)
    time.sleep(0.05)
    (event,) = live.events
    return event


# -- answers ---------------------------------------------------------------------------------------


def test_the_upstream_model_is_listed_as_served_upstream(gateway: LiveRuntime) -> None:
    models = gateway.client().get("/v1/models").json()["data"]
    assert {(m["id"], m["owned_by"]) for m in models} == {("big", "wattson:upstream"),
                                                          ("down", "wattson:upstream")}


def test_chat_is_answered_by_the_upstream_under_the_served_name_with_its_usage(
        sdk: openai.OpenAI, fake: FakeUpstream) -> None:
    fake.reply(pieces=5, tokens_per_piece=3, prompt_tokens=21)
    reply = sdk.chat.completions.create(model="big", messages=[{"role": "user", "content": "Hello there"}],
                                        temperature=0.3, top_p=0.9, max_tokens=40, stop=["END"], seed=7)
    assert reply.model == "big"
    assert reply.choices[0].message.content == text_of(5)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (21, 15, 36)

    (sent,) = fake.requests
    assert sent.path == "/v1/chat/completions"
    assert sent.body["model"] == "vendor/big-model", "the served name is rewritten to the upstream's model"
    assert sent.body["messages"] == [{"role": "user", "content": "Hello there"}]
    assert {k: sent.body[k] for k in ("temperature", "top_p", "max_tokens", "stop", "seed")} == {
        "temperature": 0.3, "top_p": 0.9, "max_tokens": 40, "stop": ["END"], "seed": 7}
    assert not sent.body.get("stream")


def test_completion_is_answered_by_the_upstream_under_the_served_name_with_its_usage(
        sdk: openai.OpenAI, fake: FakeUpstream) -> None:
    fake.reply(pieces=3, tokens_per_piece=2, prompt_tokens=4, finish_reason="length")
    reply = sdk.completions.create(model="big", prompt="Once upon a time", max_tokens=6, temperature=0,
                                   stop="\n\n", seed=3)
    assert (reply.model, reply.object) == ("big", "text_completion")
    assert reply.choices[0].text == text_of(3)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (4, 6)

    (sent,) = fake.requests
    assert sent.path == "/v1/completions"
    assert (sent.body["model"], sent.body["prompt"]) == ("vendor/big-model", "Once upon a time")
    assert (sent.body["max_tokens"], sent.body["temperature"], sent.body["stop"], sent.body["seed"]) == (
        6, 0, "\n\n", 3)


def test_stream_options_of_an_unstreamed_request_are_not_forwarded(gateway: LiveRuntime,
                                                                   fake: FakeUpstream) -> None:
    # vLLM answers 400 to stream_options without stream, even {"include_usage": false}.
    response = gateway.client().post("/v1/chat/completions",
                                     json={**CHAT, "stream_options": {"include_usage": False}})
    assert response.status_code == 200
    assert "stream_options" not in fake.requests[0].body


def test_streamed_chat_relays_the_pieces_in_order_and_ends_with_the_upstreams_usage(
        sdk: openai.OpenAI, fake: FakeUpstream, gateway: LiveRuntime) -> None:
    fake.reply(pieces=6, delay_s=0.03, tokens_per_piece=2, prompt_tokens=9)
    chunks = list(sdk.chat.completions.create(model="big", messages=[{"role": "user", "content": "Hi"}],
                                              stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert deltas == [f"w{i} " for i in range(6)]
    assert all(c.model == "big" for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (9, 12)

    (sent,) = fake.requests
    assert sent.body["stream"] is True and sent.body["model"] == "vendor/big-model"
    event = only_event(gateway)
    assert event.ttft_ms is not None and event.ttft_ms >= 25, "the first piece came after the 30 ms delay"
    assert event.ttft_ms < event.e2e_ms and event.e2e_ms >= 6 * 30 * 0.9
    assert event.tpot_ms is not None and event.tpot_ms > 0


def test_streamed_completion_without_include_usage_still_records_the_upstreams_usage(
        sdk: openai.OpenAI, fake: FakeUpstream, gateway: LiveRuntime) -> None:
    fake.reply(pieces=4, tokens_per_piece=5, prompt_tokens=3)
    chunks = list(sdk.completions.create(model="big", prompt="Once", stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text_of(4)
    assert all(c.usage is None for c in chunks), "the client did not ask for usage"
    assert fake.requests[0].body["stream_options"] == {"include_usage": True}, "the runtime asks for it"
    event = only_event(gateway)
    assert (event.prompt_tokens, event.completion_tokens) == (3, 20)


def test_streamed_completion_tokens_are_counted_as_pieces_when_the_upstream_reports_no_usage(
        sdk: openai.OpenAI, fake: FakeUpstream, gateway: LiveRuntime) -> None:
    # Some servers ignore stream_options; one streamed piece is then taken as one token.
    fake.reply(pieces=7, tokens_per_piece=3, usage=False)
    chunks = list(sdk.chat.completions.create(model="big", messages=[{"role": "user", "content": "Hi"}],
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7
    assert only_event(gateway).completion_tokens == 7


# -- telemetry -------------------------------------------------------------------------------------


def test_each_request_is_one_event_with_tokens_from_usage_attributed_time_and_no_invented_energy(
        gateway: LiveRuntime, fake: FakeUpstream) -> None:
    fake.reply(pieces=2, tokens_per_piece=4, prompt_tokens=13)
    client = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key=INITECH, max_retries=0,
                           default_headers={"X-Wattson-Feature": "search"})
    client.chat.completions.create(model="big", messages=[{"role": "user", "content": "Hi"}], user="u-9")
    event = only_event(gateway)
    assert (event.tenant, event.feature, event.end_user) == ("initech", "search", "u-9")
    assert (event.model_requested, event.model_served, event.device) == ("big", "big", "upstream")
    assert (event.status, event.http_status, event.error_type) == ("ok", 200, None)
    assert (event.prompt_tokens, event.completion_tokens) == (13, 8)
    assert event.gpu_seconds is not None and 0 < event.gpu_seconds <= event.e2e_ms / 1000
    assert event.device_use_source == "attributed"
    assert event.energy_joules is None, "no upstream GPU visible here: null, never 0"
    assert event.mean_batch_size is None
    assert event.queue_wait_ms == 0 and event.queue_depth_at_admit == 0
    assert event.e2e_ms > 0 and event.finished_at >= event.started_at


# -- failures --------------------------------------------------------------------------------------


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"type", "message", "code", "param"}
    return error


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_an_upstream_rejection_reaches_the_client_as_400_with_the_upstreams_message(
        gateway: LiveRuntime, fake: FakeUpstream, stream: bool) -> None:
    fake.fail(400, "max_tokens must be at most 4096")
    response = gateway.client(GLOBEX).post("/v1/chat/completions", json={**CHAT, "stream": stream})
    error = assert_openai_error(response, 400)
    assert "max_tokens must be at most 4096" in error["message"]
    assert error["type"] == "invalid_request_error"
    event = only_event(gateway)
    assert (event.status, event.http_status, event.tenant) == ("error", 400, "globex")


@pytest.mark.parametrize("body", [
    {"object": "error", "message": "prompt is too long", "type": "BadRequestError", "code": 400},
    {"error": "prompt is too long", "error_type": "validation"},
], ids=["vllm-legacy", "tgi"])
def test_an_upstream_rejection_in_another_servers_error_shape_keeps_its_message(
        gateway: LiveRuntime, fake: FakeUpstream, body: dict[str, Any]) -> None:
    fake.fail(400, body=body)
    error = assert_openai_error(gateway.client().post("/v1/completions", json=COMPLETION), 400)
    assert "prompt is too long" in error["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_an_upstream_server_error_is_a_502(gateway: LiveRuntime, fake: FakeUpstream, stream: bool) -> None:
    fake.fail(500, "CUDA out of memory")
    response = gateway.client().post("/v1/chat/completions", json={**CHAT, "stream": stream})
    error = assert_openai_error(response, 502)
    assert "CUDA out of memory" in error["message"] and "big" in error["message"]
    assert only_event(gateway).http_status == 502


@pytest.mark.parametrize("status", [429, 503])
def test_an_overloaded_upstream_is_passed_on_with_when_to_retry(gateway: LiveRuntime, fake: FakeUpstream,
                                                                status: int) -> None:
    fake.fail(status, "too busy")
    response = gateway.client().post("/v1/chat/completions", json=CHAT)
    error = assert_openai_error(response, status)
    assert error["code"] == "upstream_overloaded" and "too busy" in error["message"]
    assert int(response.headers["Retry-After"]) >= 1


def test_a_malformed_upstream_answer_is_a_502_not_a_hang(gateway: LiveRuntime, fake: FakeUpstream) -> None:
    fake.answer_raw({"id": "x", "object": "chat.completion", "choices": []})
    response = gateway.client().post("/v1/chat/completions", json=CHAT, timeout=5)
    assert_openai_error(response, 502)
    assert only_event(gateway).status == "error"


def test_an_upstream_that_hangs_past_the_timeout_is_a_504_recorded_as_timeout(
        gateway: LiveRuntime, fake: FakeUpstream) -> None:
    fake.hang(10)
    started = time.monotonic()
    response = gateway.client().post("/v1/completions", json=COMPLETION)
    elapsed = time.monotonic() - started
    assert_openai_error(response, 504)
    assert UPSTREAM_TIMEOUT_S * 0.9 <= elapsed < UPSTREAM_TIMEOUT_S + 2
    assert fake.requests[0].wait_until_ended() == "client_gone", "the runtime closed the upstream request"
    event = only_event(gateway)
    assert (event.status, event.http_status) == ("timeout", 504)


def test_an_upstream_with_nothing_listening_is_a_502(gateway: LiveRuntime) -> None:
    response = gateway.client().post("/v1/chat/completions", json={**CHAT, "model": "down"})
    error = assert_openai_error(response, 502)
    assert "down" in error["message"]
    event = only_event(gateway)
    assert (event.status, event.http_status, event.model_served) == ("error", 502, "down")


# -- admission and cancellation --------------------------------------------------------------------


def test_admission_sheds_the_request_past_the_queue_with_503_and_retry_after(fake: FakeUpstream) -> None:
    # Each answer takes 2 s: the second request must be seen queued before the first ends, which took
    # longer than 0.4 s once in CI on a loaded 2-core machine.
    fake.reply(pieces=4, delay_s=0.5)
    config = tiny_config(models=(), upstreams=(Upstream("big", fake.url, "vendor/big-model"),),
                         upstream_max_concurrency=1, max_queue_depth=1, upstream_timeout_s=5.0)
    with serve(config) as live:
        admission = live.runtime.backends["big"].admission

        async def scenario() -> tuple[httpx.Response, ...]:
            async with httpx.AsyncClient(base_url=live.base_url, timeout=10,
                                         headers={"Authorization": f"Bearer {ACME}"}) as client:
                running = asyncio.ensure_future(client.post("/v1/chat/completions", json=CHAT))
                await until(lambda: len(fake.requests) == 1)
                queued = asyncio.ensure_future(client.post("/v1/chat/completions", json=CHAT))
                await until(lambda: admission.depth == 1)
                shed = await client.post("/v1/chat/completions", json=CHAT)
                return await running, await queued, shed

        running, queued, shed = asyncio.run(scenario())
        events = live.wait_for_events(3)

    assert (running.status_code, queued.status_code) == (200, 200)
    assert_openai_error(shed, 503)
    assert int(shed.headers["Retry-After"]) >= 1
    assert len(fake.requests) == 2, "the shed request never reached the upstream"
    assert sorted((e.status, e.http_status) for e in events) == [("ok", 200), ("ok", 200), ("shed", 503)]
    assert max(e.queue_wait_ms or 0 for e in events) > 100, "the queued request waited for the first"


def test_a_client_leaving_mid_stream_cancels_the_upstream_request(gateway: LiveRuntime,
                                                                  fake: FakeUpstream) -> None:
    fake.reply(pieces=200, delay_s=0.02)  # 4 s if read to the end
    with gateway.client().stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        assert response.status_code == 200
        pieces = 0
        for line in response.iter_lines():
            pieces += '"content":"w' in line
            if pieces == 3:
                break
    left_at = time.monotonic()
    (upstream_request,) = fake.requests
    assert upstream_request.wait_until_ended(2) == "client_gone"
    assert time.monotonic() - left_at < 1.5
    assert upstream_request.pieces_sent < 200
    event = only_event(gateway)
    assert (event.status, event.http_status) == ("cancelled", 499)
    assert 3 <= event.completion_tokens <= upstream_request.pieces_sent, "tokens streamed before leaving"


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)
