"""The runtime works unchanged with the official ``openai`` SDK: sync, async and streaming."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.inference.live import ACME, GLOBEX, INITECH, LiveRuntime


@pytest.fixture
def client(live: LiveRuntime) -> openai.OpenAI:
    live.events.clear()
    return openai.OpenAI(base_url=live.base_url + "/v1", api_key=ACME, max_retries=0)


def test_lists_the_served_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["tiny-random"]


def test_chat_completion_reports_usage_and_finish_reason(client: openai.OpenAI, live: LiveRuntime) -> None:
    reply = client.chat.completions.create(
        model="tiny-random", messages=[{"role": "user", "content": "Tell me about the sea."}], max_tokens=7,
        extra_body={"ignore_eos": True},
    )
    assert reply.object == "chat.completion"
    assert reply.model == "tiny-random"
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage is not None and reply.usage.completion_tokens == 7
    assert reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 7


def test_text_completion(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="tiny-random", prompt="The lighthouse keeper", max_tokens=4,
                                      extra_body={"ignore_eos": True})
    assert reply.object == "text_completion"
    assert reply.usage is not None and reply.usage.completion_tokens == 4
    assert isinstance(reply.choices[0].text, str)


def test_streamed_chat_matches_the_unstreamed_answer(client: openai.OpenAI) -> None:
    request = dict(model="tiny-random", messages=[{"role": "user", "content": "Hello"}], max_tokens=12,
                   temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**request).choices[0].message.content
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12


def test_streamed_completion_without_usage_sends_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model="tiny-random", prompt="Once", max_tokens=3, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_async_client_serves_concurrent_requests(live: LiveRuntime) -> None:
    async def run() -> list[int]:
        async with openai.AsyncOpenAI(base_url=live.base_url + "/v1", api_key=GLOBEX, max_retries=0) as aclient:
            replies = await asyncio.gather(*[
                aclient.chat.completions.create(model="tiny-random", max_tokens=5 + i,
                                                messages=[{"role": "user", "content": f"Question {i}"}],
                                                extra_body={"ignore_eos": True})
                for i in range(6)
            ])
        return [r.usage.completion_tokens for r in replies if r.usage]

    assert asyncio.run(run()) == [5, 6, 7, 8, 9, 10]


def test_async_streaming(live: LiveRuntime) -> None:
    async def run() -> str:
        async with openai.AsyncOpenAI(base_url=live.base_url + "/v1", api_key=ACME, max_retries=0) as aclient:
            stream = await aclient.chat.completions.create(
                model="tiny-random", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, stream=True,
                temperature=0, extra_body={"ignore_eos": True})
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    assert asyncio.run(run()) == asyncio.run(run())


def test_same_seed_gives_the_same_sampled_text(client: openai.OpenAI) -> None:
    def ask(seed: int) -> str:
        reply = client.completions.create(model="tiny-random", prompt="The sea", max_tokens=16, temperature=1.0,
                                          top_p=0.9, seed=seed, extra_body={"ignore_eos": True})
        return reply.choices[0].text

    assert ask(7) == ask(7)
    assert len({ask(s) for s in (1, 2, 3, 4)}) > 1


def test_stop_sequence_ends_the_text_before_it(client: openai.OpenAI) -> None:
    free_text = client.completions.create(model="tiny-random", prompt="The wind", max_tokens=24, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text
    stop = free_text[5:7]
    assert stop
    reply = client.completions.create(model="tiny-random", prompt="The wind", max_tokens=24, temperature=0,
                                      stop=[stop], extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].text == free_text[: free_text.index(stop)]


def test_every_request_becomes_an_event_with_tenant_feature_and_timings(live: LiveRuntime) -> None:
    live.events.clear()
    sdk = openai.OpenAI(base_url=live.base_url + "/v1", api_key=INITECH, max_retries=0,
                        default_headers={"X-Wattson-Feature": "search", "X-Wattson-Priority": "high"})
    sdk.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                user="end-user-42", extra_body={"ignore_eos": True})
    (event,) = live.wait_for_events(1)
    assert (event.tenant, event.feature, event.end_user) == ("initech", "search", "end-user-42")
    assert event.priority == "normal", "a free key's 'high' hint is capped at normal"
    assert (event.status, event.http_status, event.model_served) == ("ok", 200, "tiny-random")
    assert event.completion_tokens == 4 and event.prompt_tokens > 0
    assert event.ttft_ms is not None and 0 < event.ttft_ms <= event.e2e_ms
    assert event.tpot_ms is not None and event.tpot_ms > 0
    assert event.queue_wait_ms == 0 and event.queue_depth_at_admit == 0
    assert event.gpu_seconds is not None and event.gpu_seconds > 0
    assert event.energy_joules is None, "no energy counter on a CPU: null, never zero"
    assert event.device == "cpu" and event.mean_batch_size is not None and event.mean_batch_size >= 1
    assert event.finished_at > event.started_at
