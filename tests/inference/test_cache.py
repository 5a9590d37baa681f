"""The exact response cache, against live runtimes: a hit is the same answer without an engine step,
never another tenant's, never a sampled draw, gone after its TTL or when evicted; Redis shares hits
between replicas and its outage is a miss, never an error."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from inference.config import ApiKey, ConfigError, RuntimeConfig, Upstream, load_config
from inference.engine.models import LoadedModel
from tests.inference.fake_upstream import fake_upstream
from tests.inference.live import ACME, GLOBEX, KEYS, LiveRuntime, free_port, serve, slowed, tiny_config

SAMPLER_KEY = ApiKey("sk-hooli-sampled-0004", "hooli", "standard", cache_sampled=True)


def cache_config(**overrides: object) -> RuntimeConfig:
    return tiny_config(cache_enabled=True, api_keys=(*KEYS, SAMPLER_KEY), **overrides)


@pytest.fixture(scope="module")
def cached(tiny_model: LoadedModel) -> Iterator[LiveRuntime]:
    with serve(cache_config(), preloaded=(tiny_model,)) as server:
        yield server


def greedy(prompt: str | None = None, **fields: object) -> dict:
    """A greedy completion of a prompt no other test sends."""
    return {"model": "tiny-random", "prompt": prompt or f"The keeper {uuid.uuid4().hex[:8]}", "max_tokens": 6,
            "temperature": 0, **fields}


def steps(live: LiveRuntime) -> int:
    return live.runtime.backends["tiny-random"].engine.stats.steps_total


def post(live: LiveRuntime, body: dict, key: str = ACME, path: str = "/v1/completions") -> httpx.Response:
    with live.client(key) as client:
        response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response


def answer(response: httpx.Response) -> tuple:
    body = response.json()
    return body["choices"], body["usage"], body["model"]


def metric(live: LiveRuntime, name: str) -> float:
    with live.client() as client:
        text = client.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def test_a_repeated_request_is_the_same_answer_without_an_engine_step(cached: LiveRuntime) -> None:
    body = greedy()
    hits_before = metric(cached, "wattson_cache_hits_total")
    first = post(cached, body)
    before = steps(cached)
    cached.events.clear()
    again = post(cached, body)

    assert steps(cached) == before, "a hit must not reach the engine"
    assert (first.headers["x-wattson-cache"], again.headers["x-wattson-cache"]) == ("miss", "hit")
    assert answer(again) == answer(first)
    assert again.json()["id"] != first.json()["id"]
    (event,) = cached.wait_for_events(1)
    assert event.cache_hit and event.status == "ok"
    assert (event.prompt_tokens, event.completion_tokens) == (first.json()["usage"]["prompt_tokens"],
                                                              first.json()["usage"]["completion_tokens"])
    assert event.gpu_seconds == 0 and event.energy_joules is None, "a hit costs nothing; CPU energy is unmeasured"
    assert event.device_use_source == "measured", "nothing ran: the zero is known, not attributed"
    assert (event.queue_wait_ms, event.queue_depth_at_admit) == (0, None), "a hit never queued"
    assert metric(cached, "wattson_cache_hits_total") == hits_before + 1


def test_chat_messages_are_normalized_before_they_are_keyed(cached: LiveRuntime) -> None:
    word = uuid.uuid4().hex[:8]
    as_text = {"model": "tiny-random", "max_tokens": 5, "temperature": 0,
               "messages": [{"role": "user", "content": f"The lighthouse {word}"}]}
    as_parts = {**as_text, "messages": [{"role": "user", "content": [{"type": "text", "text": "The lighthouse "},
                                                                     {"type": "text", "text": word}]}],
                "user": "someone-else", "stream_options": None}
    first = post(cached, as_text, path="/v1/chat/completions")
    before = steps(cached)
    again = post(cached, as_parts, path="/v1/chat/completions")
    assert again.headers["x-wattson-cache"] == "hit" and steps(cached) == before
    assert again.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
    assert again.json()["object"] == "chat.completion"


@pytest.mark.parametrize("change", [{"max_tokens": 7}, {"stop": ["zz"]}, {"top_p": 0.5}, {"ignore_eos": True},
                                    {"prompt": "!"}], ids=["max_tokens", "stop", "top_p", "ignore_eos", "prompt"])
def test_anything_that_shapes_the_answer_is_in_the_key(cached: LiveRuntime, change: dict) -> None:
    body = greedy()
    post(cached, body)
    changed = {**body, **change}
    if "prompt" in change:
        changed["prompt"] = body["prompt"] + change["prompt"]
    before = steps(cached)
    again = post(cached, changed)
    assert again.headers["x-wattson-cache"] == "miss"
    assert steps(cached) > before


def test_another_tenant_never_gets_a_hit(cached: LiveRuntime) -> None:
    body = greedy()
    post(cached, body, key=ACME)
    before = steps(cached)
    cached.events.clear()
    other = post(cached, body, key=GLOBEX)
    assert other.headers["x-wattson-cache"] == "miss"
    assert steps(cached) > before
    (event,) = cached.wait_for_events(1)
    assert event.device_use_source == "measured"
    assert event.tenant == "globex" and not event.cache_hit and event.gpu_seconds and event.gpu_seconds > 0


def test_a_sampled_answer_without_a_seed_is_not_cached(cached: LiveRuntime) -> None:
    body = greedy(temperature=0.8)
    post(cached, body)
    before = steps(cached)
    again = post(cached, body)
    assert "x-wattson-cache" not in again.headers, "not even looked up"
    assert steps(cached) > before


def test_a_seeded_sampled_answer_is_cached(cached: LiveRuntime) -> None:
    body = greedy(temperature=0.8, seed=7)
    first = post(cached, body)
    before = steps(cached)
    again = post(cached, body)
    assert again.headers["x-wattson-cache"] == "hit" and steps(cached) == before
    assert answer(again) == answer(first)


def test_a_key_flagged_cache_sampled_gets_sampled_answers_again(cached: LiveRuntime) -> None:
    body = greedy(temperature=0.8)
    first = post(cached, body, key=SAMPLER_KEY.key)
    before = steps(cached)
    again = post(cached, body, key=SAMPLER_KEY.key)
    assert again.headers["x-wattson-cache"] == "hit" and steps(cached) == before
    assert answer(again) == answer(first)


def sse_events(response: httpx.Response) -> list:
    lines = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_a_hit_streams_like_a_generated_answer(cached: LiveRuntime) -> None:
    body = greedy(stream=True, stream_options={"include_usage": True}, max_tokens=8)
    generated = sse_events(post(cached, body))
    before = steps(cached)
    cached.events.clear()
    response = post(cached, body)
    replayed = sse_events(response)

    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-wattson-cache"] == "hit" and steps(cached) == before
    strip = lambda chunks: [(c["choices"], c.get("usage")) for c in chunks]  # noqa: E731
    assert strip(replayed) == strip(generated), "the same chunks, piece by piece"
    assert len(replayed) > 3
    (event,) = cached.wait_for_events(1)
    assert event.cache_hit and event.completion_tokens == replayed[-1]["usage"]["completion_tokens"]


def test_a_collected_answer_is_streamed_from_the_cache(cached: LiveRuntime) -> None:
    body = greedy(max_tokens=8)
    text = post(cached, body).json()["choices"][0]["text"]
    response = post(cached, {**body, "stream": True})
    assert response.headers["x-wattson-cache"] == "hit"
    assert "".join(c["choices"][0]["text"] for c in sse_events(response) if c["choices"]) == text


def test_an_answer_cut_short_by_the_client_is_not_cached(tiny_model: LoadedModel) -> None:
    with serve(cache_config(), preloaded=(slowed(tiny_model, 0.01),)) as live:
        body = greedy(max_tokens=100, ignore_eos=True, stream=True)
        with live.client() as client, client.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
        deadline = time.monotonic() + 10
        while live.runtime.running() and time.monotonic() < deadline:
            time.sleep(0.01)
        again = post(live, {**body, "stream": False})
        assert again.headers["x-wattson-cache"] == "miss"
        assert again.json()["usage"]["completion_tokens"] == 100


def test_an_upstreams_answer_is_cached_and_a_hit_never_calls_it() -> None:
    with fake_upstream() as fake:
        config = cache_config(models=(), upstreams=(Upstream("big", fake.url, "vendor/big"),))
        with serve(config) as live:
            body = {"model": "big", "messages": [{"role": "user", "content": uuid.uuid4().hex}], "temperature": 0}
            first = post(live, body, path="/v1/chat/completions")
            again = post(live, {**body, "stream": True}, path="/v1/chat/completions")
            assert len(fake.requests) == 1, "the hit did not reach the upstream"
            assert again.headers["x-wattson-cache"] == "hit"
            streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in sse_events(again) if c["choices"])
            assert streamed == first.json()["choices"][0]["message"]["content"]
            events = live.wait_for_events(2)
            assert [e.cache_hit for e in events] == [False, True]
            assert events[1].gpu_seconds == 0 and events[1].completion_tokens == events[0].completion_tokens


def test_an_answer_expires_after_its_ttl(tiny_model: LoadedModel) -> None:
    with serve(cache_config(cache_ttl_s=1.0), preloaded=(tiny_model,)) as live:
        body = greedy()
        post(live, body)
        assert post(live, body).headers["x-wattson-cache"] == "hit"
        time.sleep(1.1)
        before = steps(live)
        assert post(live, body).headers["x-wattson-cache"] == "miss"
        assert steps(live) > before


def test_the_least_recently_used_answer_is_evicted_first(tiny_model: LoadedModel) -> None:
    with serve(cache_config(cache_max_entries=2), preloaded=(tiny_model,)) as live:
        a, b, c = greedy(), greedy(), greedy()
        post(live, a)
        post(live, b)
        assert post(live, a).headers["x-wattson-cache"] == "hit"  # a is now the most recently used
        post(live, c)  # evicts b, the least recently used
        assert post(live, a).headers["x-wattson-cache"] == "hit"
        assert post(live, b).headers["x-wattson-cache"] == "miss"  # ... and b's new answer evicts c
        assert post(live, a).headers["x-wattson-cache"] == "hit"
        assert post(live, c).headers["x-wattson-cache"] == "miss"
        assert metric(live, "wattson_cache_entries") == 2
        assert metric(live, "wattson_cache_evictions_total") == 3


def test_the_byte_bound_keeps_memory_under_its_limit(tiny_model: LoadedModel) -> None:
    with serve(cache_config(cache_max_mb=1200 / 1024 / 1024), preloaded=(tiny_model,)) as live:
        for _ in range(6):
            post(live, greedy(max_tokens=16))
        held = metric(live, "wattson_cache_bytes")
        assert 0 < held <= 1200
        assert metric(live, "wattson_cache_evictions_total") >= 1


def redis_running() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5):
            return True
    except OSError:
        return False


needs_redis = pytest.mark.skipif(not redis_running(), reason="no Redis on 127.0.0.1:6379")


@needs_redis
def test_replicas_share_answers_through_redis(tiny_model: LoadedModel) -> None:
    url = "redis://127.0.0.1:6379/0"
    with serve(cache_config(cache_redis_url=url), preloaded=(tiny_model,)) as one, \
            serve(cache_config(cache_redis_url=url), preloaded=(tiny_model,)) as two:
        body = greedy()
        first = post(one, body)
        time.sleep(0.2)  # the write to Redis is off the request's path
        before = steps(two)
        second = post(two, body)
        assert second.headers["x-wattson-cache"] == "hit", "answered from what the other replica stored"
        assert steps(two) == before
        assert answer(second) == answer(first)
        other_tenant = post(two, body, key=GLOBEX)
        assert other_tenant.headers["x-wattson-cache"] == "miss"


def test_a_redis_outage_is_a_miss_not_an_error(tiny_model: LoadedModel) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with serve(cache_config(cache_redis_url=dead), preloaded=(tiny_model,)) as live:
        body = greedy()
        started = time.monotonic()
        first = post(live, body)
        assert time.monotonic() - started < 5
        assert first.headers["x-wattson-cache"] == "miss"
        assert post(live, body).headers["x-wattson-cache"] == "hit", "memory still serves"
        assert post(live, greedy()).status_code == 200
        assert metric(live, "wattson_cache_redis_errors_total") >= 1
        assert metric(live, "wattson_cache_redis_up") == 0


def test_cache_options_and_the_sampled_key_flag_are_configurable() -> None:
    config = load_config(["--cache-enabled", "on", "--cache-max-entries", "5", "--cache-ttl-s", "9",
                          "--cache-redis-url", "redis://r:6379/1",
                          "--api-keys", "sk-aaaaaaaa:acme:free:cache-sampled,sk-bbbbbbbb:globex"], environ={})
    assert (config.cache_enabled, config.cache_max_entries, config.cache_ttl_s, config.cache_redis_url) == (
        True, 5, 9.0, "redis://r:6379/1")
    assert [k.cache_sampled for k in config.api_keys] == [True, False]
    assert load_config([], environ={"INFERENCE_CACHE_ENABLED": "off"}).cache_enabled is False


@pytest.mark.parametrize(("argv", "env", "message"), [
    ([], {"INFERENCE_CACHE_ENABLED": "maybe"}, "must be one of on, off"),
    (["--cache-ttl-s", "0"], {}, "cache_ttl_s must be positive"),
    (["--cache-max-entries", "-1"], {}, "cache_max_entries must be positive"),
    (["--cache-redis-url", "http://r"], {}, "redis://"),
    (["--api-keys", "sk-aaaaaaaa:acme:free:cache-everything"], {}, "must be one of cache-sampled"),
])
def test_bad_cache_options_are_refused(argv: list[str], env: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(argv, environ=env)


# -- jobs use the cache -----------------------------------------------------------------------------


def test_a_job_is_answered_from_the_cache_and_its_answer_is_kept_for_the_next_request(tiny_model: LoadedModel) -> None:
    from tests.inference.test_jobs import finished, submitted

    with serve(cache_config(), preloaded=(tiny_model,)) as live:
        asked_first = greedy()
        sync = post(live, asked_first)
        before = steps(live)
        job = finished(live, submitted(live, asked_first, url="/v1/completions"))
        assert steps(live) == before, "the job's answer came from the cache"
        assert answer_of(job["result"]) == answer(sync)

        job_first = greedy()
        job = finished(live, submitted(live, job_first, url="/v1/completions"))
        again = post(live, job_first)
        assert again.headers["x-wattson-cache"] == "hit", "the job's answer was kept"
        assert answer(again) == answer_of(job["result"])
        events = live.wait_for_events(4)
        assert [(e.cache_hit, e.priority) for e in events] == [(False, "normal"), (True, "low"), (False, "low"),
                                                               (True, "normal")]


def answer_of(body: dict) -> tuple:
    return body["choices"], body["usage"], body["model"]


# -- cache hits under the rules: a request to throttles, free to budgets ----------------------------


def test_cache_hits_count_in_a_throttles_request_rate(tiny_model: LoadedModel) -> None:
    from tests.inference.rulesets import ADMIN_TOKEN, document, push, rule, scope

    with serve(cache_config(admin_token=ADMIN_TOKEN), preloaded=(tiny_model,)) as live:
        push(live, document(rules=[rule("r3", {"type": "throttle", "requests_per_minute": 3},
                                        where=scope(tenant="acme"))]))
        body = greedy()
        assert [post(live, body).headers["x-wattson-cache"] for _ in range(3)] == ["miss", "hit", "hit"]

        with live.client() as client:
            refused = client.post("/v1/completions", json=body)

        assert refused.status_code == 429, "the third request of the minute was a cache hit, and counted"
        assert refused.json()["error"]["code"] == "rejected_rule"
        assert live.wait_for_events(4)[-1].status == "rejected_rule"


def test_cache_hits_take_no_tokens_from_a_throttle_nor_from_a_tokens_budget(tiny_model: LoadedModel) -> None:
    from tests.inference.rulesets import ADMIN_TOKEN, allowance, document, held, push, rule, scope

    with serve(cache_config(admin_token=ADMIN_TOKEN), preloaded=(tiny_model,)) as live:
        body = greedy()
        post(live, body)  # answered and kept before any rule
        push(live, document(rules=[rule("r1", {"type": "throttle", "tokens_per_minute": 1}, where=scope("acme"))]))
        post(live, greedy())  # a full bucket lets one oversized request through and is in debt after it
        assert post(live, body).headers["x-wattson-cache"] == "hit", "a hit needs no tokens"
        with live.client() as client:
            assert client.post("/v1/completions", json=greedy()).status_code == 429

        push(live, document(allowances=[allowance("7", unit="tokens", granted=5, where=scope("acme"))]))
        hits = [post(live, body) for _ in range(3)]
        assert [h.headers["x-wattson-cache"] for h in hits] == ["hit"] * 3, "served though 5 tokens cannot fit one"
        (ledger,) = held(live)["state"]["allowances"]
        assert (ledger["settled"], ledger["reserved"]) == ("0", "0"), "a hit's tokens are saved, not spent"
        with live.client() as client:
            refused = client.post("/v1/completions", json=greedy())
        assert (refused.status_code, refused.json()["error"]["code"]) == (429, "rejected_budget")
