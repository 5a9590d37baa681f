"""Stale-if-error, live: when no model of a request's fallback chain can answer, the chain's
``cache`` step serves the answer it holds even past its freshness (within
``--cache-stale-if-error-s``), marked ``x-wattson-cache: stale`` and ``cache_stale`` in its event;
never while a model answers, never past the bound, never without a ``cache`` step."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from inference.config import Fallback, RuntimeConfig, Upstream
from tests.inference.fake_upstream import FakeUpstream, fake_upstream, text_of
from tests.inference.live import LiveRuntime, serve
from tests.inference.test_cache import cache_config, metric, needs_redis

TTL_S = 0.5
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with fake_upstream() as upstream:
        yield upstream


def down_to_the_cache(fake: FakeUpstream, *, chain: tuple[str, ...] = ("small", "cache"),
                      **overrides: Any) -> RuntimeConfig:
    """``big`` falls back to ``small``, then to the cache; both are upstreams on the fake, so when it
    fails, every model of the chain is down."""
    return cache_config(models=(), upstreams=(Upstream("big", fake.url, "vendor/big"),
                                              Upstream("small", fake.url, "vendor/small")),
                        fallbacks=(Fallback("big", chain),), cache_ttl_s=TTL_S, upstream_retries=0, **overrides)


def question() -> dict[str, Any]:
    return {"model": "big", "messages": [{"role": "user", "content": uuid.uuid4().hex}], "temperature": 0,
            "max_tokens": 8}


def ask(live: LiveRuntime, body: dict[str, Any], **fields: Any) -> httpx.Response:
    return live.client().post(CHAT, json={**body, **fields})


def content(response: httpx.Response) -> str:
    if response.headers["content-type"].startswith("text/event-stream"):
        chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
        return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c.get("choices"))
    return str(response.json()["choices"][0]["message"]["content"])


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_with_every_model_down_an_expired_answer_is_served_marked_stale(fake: FakeUpstream, stream: bool) -> None:
    fake.reset()
    fake.reply(pieces=3)
    with serve(down_to_the_cache(fake)) as live:
        body = question()
        fresh = ask(live, body)
        assert (fresh.status_code, fresh.headers["x-wattson-cache"]) == (200, "miss")
        time.sleep(TTL_S + 0.1)
        fake.fail(503, "down for maintenance")

        stale = ask(live, body, stream=stream)

        assert stale.status_code == 200, stale.text
        assert stale.headers["x-wattson-cache"] == "stale"
        assert content(stale) == content(fresh) == text_of(3)
        request = stale.headers["x-wattson-request-id"]
        attempts = sorted((e for e in live.wait_for_events(4) if e.request_id == request), key=lambda e: e.attempt)
        taken = [(e.attempt, e.model_served, e.route_reason, e.status, e.cache_hit, e.cache_stale) for e in attempts]
        assert taken == [(1, "big", "requested", "error", False, False),
                         (2, "small", "fallback", "error", False, False), (3, "big", "fallback", "ok", True, True)]
        assert (attempts[-1].prompt_tokens, attempts[-1].completion_tokens) == (7, 3), "the answer's own usage"
        assert attempts[-1].gpu_seconds == 0, "a stale answer costs nothing"
        assert metric(live, "wattson_cache_stale_hits_total") == 1
        assert metric(live, "wattson_fallbacks_total") >= 2  # small, then the cache


def test_while_a_model_answers_an_expired_answer_is_never_served(fake: FakeUpstream) -> None:
    fake.reset()
    with serve(down_to_the_cache(fake)) as live:
        body = question()
        ask(live, body)
        time.sleep(TTL_S + 0.1)
        fake.fail(503, "big alone is down", times=1)  # then small answers

        response = ask(live, body)

        assert (response.status_code, response.headers["x-wattson-cache"]) == (200, "miss")
        assert response.json()["model"] == "small"
        assert metric(live, "wattson_cache_stale_hits_total") == 0


@pytest.mark.parametrize(("chain", "stale_s"), [(("small", "cache"), 0.3), (("small",), 3600.0)],
                         ids=["past_the_bound", "no_cache_step"])
def test_no_stale_answer_past_the_bound_or_without_a_cache_step(fake: FakeUpstream, chain: tuple[str, ...],
                                                                stale_s: float) -> None:
    fake.reset()
    with serve(down_to_the_cache(fake, chain=chain, cache_stale_if_error_s=stale_s)) as live:
        body = question()
        ask(live, body)
        time.sleep(TTL_S + 0.4)
        fake.fail(503, "down")

        response = ask(live, body)

        assert response.status_code == 503, "the last attempt's failure"
        assert response.json()["error"]["code"] == "upstream_overloaded"
        assert metric(live, "wattson_cache_stale_hits_total") == 0


@needs_redis
def test_a_replica_serves_stale_what_another_replica_stored_in_redis(fake: FakeUpstream) -> None:
    fake.reset()
    url = "redis://127.0.0.1:6379/6"
    with serve(down_to_the_cache(fake, cache_redis_url=url)) as one, \
            serve(down_to_the_cache(fake, cache_redis_url=url)) as two:
        body = question()
        fresh = ask(one, body)
        time.sleep(TTL_S + 0.1)  # past its freshness, and the write to Redis long done
        fake.fail(503, "down")

        stale = ask(two, body)

        assert (stale.status_code, stale.headers["x-wattson-cache"]) == (200, "stale")
        assert content(stale) == content(fresh)
