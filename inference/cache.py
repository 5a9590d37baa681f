"""The exact response cache: an identical request from the same tenant is answered again without
the engine.

The key is a hash of the tenant, the model that serves the request, the normalized request (the
messages' roles and text, or the prompt) and every parameter that shapes the answer (max_tokens
after any cap, temperature, top_p, seed, stop, ignore_eos). Fields that do not change the answer
(``stream``, ``stream_options``, ``user``) are not in it, so a streamed request can be answered
from a collected one and back. The tenant is always in it: tenants never share an answer.

A sampled answer (temperature > 0 without a seed) is a fresh draw each time the client asks, so it
is only cached for keys configured with the ``cache-sampled`` flag.

Answers live in a bounded in-memory LRU (entries and bytes) with a TTL and, when a Redis URL is
configured, in Redis too, so replicas share them; memory is read first. Redis is an optimisation,
never a dependency: any Redis failure is a miss (and a counted error), and after one the runtime
leaves Redis alone for a few seconds rather than add a timeout to every request.

Stale-if-error: an answer is kept ``stale_s`` (``--cache-stale-if-error-s``) past its expiry, and
served only by the fallback chain's ``cache`` step when no model of the chain could answer
(``inference.attempts``), marked ``x-wattson-cache: stale`` and ``cache_stale`` in its event. Jobs
use the cache as the sync endpoints do; a hit is counted in throttles' request rates and spends
nothing from a budget (``inference.rules``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from inference.backends import Generation, ObservedOutputs, Output, Outputs
from inference.config import RuntimeConfig
from inference.engine.engine import GenerationResult, TokenDelta
from inference.fallback import CachedReplay
from inference.metrics import LiveSample, counter, gauge
from inference.optional_redis import OptionalRedis
from inference.schemas import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("inference.cache")

KEY_VERSION = 1
REDIS_PREFIX = "wattson:cache:v1:"
CACHE_HEADER = "x-wattson-cache"
_CACHED_FINISH = ("stop", "length")

Body = ChatCompletionRequest | CompletionRequest
Clock = Callable[[], float]


@dataclass(frozen=True)
class CachedAnswer:
    """A finished answer as the client saw it, and what producing it cost (what a hit saves)."""

    kind: Literal["chat", "completion"]
    pieces: tuple[str, ...]  # the text as it was streamed, so a hit streams the same chunks
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    gpu_seconds: float | None
    energy_measured: bool
    expires_at: float  # wall-clock seconds: replicas sharing Redis agree on it

    def to_json(self) -> bytes:
        return json.dumps({
            "v": KEY_VERSION, "kind": self.kind, "pieces": list(self.pieces), "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "gpu_seconds": self.gpu_seconds, "energy_measured": self.energy_measured,
            "expires_at": self.expires_at,
        }, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> CachedAnswer:
        """Parse a stored answer; ``ValueError`` when it is not one (never trust a shared store)."""
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("v") != KEY_VERSION:
            raise ValueError("not a cached answer of this version")
        pieces = data["pieces"]
        gpu = data["gpu_seconds"]
        counts = (data["prompt_tokens"], data["completion_tokens"])
        if (data["kind"] not in ("chat", "completion") or not isinstance(pieces, list)
                or not all(isinstance(p, str) for p in pieces) or data["finish_reason"] not in _CACHED_FINISH
                or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
                or not (gpu is None or (isinstance(gpu, int | float) and gpu >= 0))
                or not isinstance(data["expires_at"], int | float)):
            raise ValueError("malformed cached answer")
        return cls(kind=data["kind"], pieces=tuple(pieces), finish_reason=data["finish_reason"],
                   prompt_tokens=counts[0], completion_tokens=counts[1],
                   gpu_seconds=None if gpu is None else float(gpu),
                   energy_measured=bool(data["energy_measured"]), expires_at=float(data["expires_at"]))

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def replay(self) -> Generation:
        """The answer as a finished generation: its pieces, then a result that cost nothing."""
        gen = Generation()
        for i, piece in enumerate(self.pieces):
            gen.outputs.put_nowait(TokenDelta(piece, min(i + 1, self.completion_tokens)))
        now = time.perf_counter()
        gen.outputs.put_nowait(GenerationResult(
            text=self.text, finish_reason=self.finish_reason, prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens, submitted_at=now, first_token_at=now, finished_at=now,
            gpu_seconds=0.0, energy_joules=0.0 if self.energy_measured else None, mean_batch_size=None,
        ))
        return gen


def answer_recorded(gen: Outputs, store: Callable[[GenerationResult, list[str]], None], *, cache: str) -> Outputs:
    """``gen`` as the API reads it; once it finishes well, ``store`` gets its result and the pieces
    as they were streamed (so a hit streams the same chunks). A cache that cannot store an answer
    logs it: the answer is the client's whatever happens to the cache."""
    pieces: list[str] = []

    def keep(output: Output) -> None:
        if isinstance(output, TokenDelta):
            pieces.append(output.text)
        elif isinstance(output, GenerationResult):
            try:
                store(output, pieces)
            except Exception:
                log.exception("%s: could not store an answer", cache)
    return ObservedOutputs(gen, keep)


def answer_of(kind: Literal["chat", "completion"], result: GenerationResult, pieces: list[str], *,
              expires_at: float) -> CachedAnswer | None:
    """The answer to keep from a finished generation, or None when it did not finish well."""
    if result.finish_reason not in _CACHED_FINISH or result.error is not None:
        return None
    # The streamed pieces are kept when they spell the answer; otherwise the answer in one piece.
    kept = tuple(pieces) if "".join(pieces) == result.text else ((result.text,) if result.text else ())
    return CachedAnswer(kind=kind, pieces=kept, finish_reason=result.finish_reason,
                        prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                        gpu_seconds=result.gpu_seconds, energy_measured=result.energy_joules is not None,
                        expires_at=expires_at)


def cacheable(body: Body, *, cache_sampled: bool) -> bool:
    """Whether the answer is the same every time: greedy, seeded, or the key accepts a repeat draw
    (its ``cache-sampled`` flag)."""
    return body.temperature == 0 or body.seed is not None or cache_sampled


def cache_key(*, tenant: str, model: str, body: Body, max_tokens_cap: int | None, default_max_tokens: int) -> str:
    """The hash that identifies an answer: tenant, model, normalized request and sampling."""
    if isinstance(body, ChatCompletionRequest):
        request: dict[str, Any] = {"kind": "chat",
                                   "messages": [[m.role, m.name, m.text()] for m in body.messages]}
    else:
        request = {"kind": "completion", "prompt": body.prompt_text()}
    return identity_digest({"v": KEY_VERSION, "tenant": tenant, "model": model, "request": request,
                            **generation_settings(body, max_tokens_cap=max_tokens_cap,
                                                  default_max_tokens=default_max_tokens)})


def generation_settings(body: Body, *, max_tokens_cap: int | None, default_max_tokens: int) -> dict[str, Any]:
    """What besides the prompt decides an answer: its length and sampling. Both caches key on it."""
    asked = body.requested_max_tokens()
    if asked is not None and max_tokens_cap is not None:
        asked = min(asked, max_tokens_cap)
    return {
        # Without max_tokens the length is the runtime's default (or the cap): both are in the key.
        "max_tokens": asked, "cap": max_tokens_cap if asked is None else None,
        "default_max_tokens": default_max_tokens if asked is None else None,
        "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed,
        "stop": list(body.stop_sequences()), "ignore_eos": body.ignore_eos,
    }


def identity_digest(identity: dict[str, Any]) -> str:
    """A stable hash of ``identity`` (keys sorted, compact JSON)."""
    encoded = json.dumps(identity, separators=(",", ":"), ensure_ascii=False, sort_keys=True).encode()
    return hashlib.sha256(encoded).hexdigest()


class MemoryStore:
    """Least-recently-used answers, bounded in entries and in bytes, each until its expiry and then
    ``stale_s`` longer for stale-if-error."""

    def __init__(self, *, max_entries: int, max_bytes: int, clock: Clock, stale_s: float = 0.0) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.stale_s = stale_s
        self._clock = clock
        self._entries: OrderedDict[str, tuple[CachedAnswer, int]] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, *, stale: bool = False) -> CachedAnswer | None:
        """The answer under ``key`` while it is fresh; with ``stale``, also one past its expiry by
        less than ``stale_s``."""
        held = self._entries.get(key)
        if held is None:
            return None
        answer, now = held[0], self._clock()
        if answer.expires_at + self.stale_s <= now:
            self._remove(key)
            return None
        if answer.expires_at <= now and not stale:
            return None
        self._entries.move_to_end(key)
        return answer

    def put(self, key: str, answer: CachedAnswer, size: int) -> None:
        if size > self.max_bytes:
            return  # one answer larger than the whole cache is not kept
        if key in self._entries:
            self._remove(key)
        self._entries[key] = (answer, size)
        self.bytes += size
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self._remove(oldest)
            self.evictions += 1

    def _remove(self, key: str) -> None:
        _, size = self._entries.pop(key)
        self.bytes -= size


class RedisStore(OptionalRedis):
    """Answers shared by replicas. Every failure is reported to the caller as ``None`` (a miss)
    and counted; after one, Redis is skipped for a while (``inference.optional_redis``)."""

    def __init__(self, url: str) -> None:
        super().__init__(url, name="response cache")

    async def get(self, key: str) -> bytes | None:
        if not self.available:
            return None
        try:
            value = await self._client.get(REDIS_PREFIX + key)
        except Exception as exc:
            self._failed("read", exc)
            return None
        return value if isinstance(value, bytes) else None

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        if not self.available:
            return
        try:
            await self._client.set(REDIS_PREFIX + key, value, px=max(1, int(ttl_s * 1000)))
        except Exception as exc:
            self._failed("write", exc)


@dataclass
class CacheCounters:
    hits: int = 0
    stale_hits: int = 0
    misses: int = 0
    stores: int = 0
    saved_prompt_tokens: int = 0
    saved_completion_tokens: int = 0
    saved_gpu_seconds: float = 0.0


class ResponseCache:
    def __init__(self, *, max_entries: int, max_bytes: int, ttl_s: float, redis_url: str | None = None,
                 stale_s: float = 0.0, clock: Clock = time.time) -> None:
        self.ttl_s = ttl_s
        self.stale_s = stale_s
        self._clock = clock
        self.memory = MemoryStore(max_entries=max_entries, max_bytes=max_bytes, clock=clock, stale_s=stale_s)
        self.redis = RedisStore(redis_url) if redis_url else None
        self.counters = CacheCounters()
        self._writes: set[asyncio.Task[None]] = set()

    @classmethod
    def from_config(cls, config: RuntimeConfig) -> ResponseCache:
        return cls(max_entries=config.cache_max_entries, max_bytes=int(config.cache_max_mb * 1024 * 1024),
                   ttl_s=config.cache_ttl_s, redis_url=config.cache_redis_url,
                   stale_s=config.cache_stale_if_error_s)

    def key_for(self, *, tenant: str, cache_sampled: bool, model: str, body: Body, max_tokens_cap: int | None,
                default_max_tokens: int) -> str | None:
        """The request's cache key, or None when its answer must not be cached (``cache_sampled``:
        the key's flag that lets sampled answers be)."""
        if not cacheable(body, cache_sampled=cache_sampled):
            return None
        return cache_key(tenant=tenant, model=model, body=body, max_tokens_cap=max_tokens_cap,
                         default_max_tokens=default_max_tokens)

    def expired(self, answer: CachedAnswer) -> bool:
        return answer.expires_at <= self._clock()

    async def get(self, key: str, *, stale: bool = False) -> CachedAnswer | None:
        """The fresh answer under ``key`` (a hit or a miss); with ``stale``, the last resort of a
        fallback chain, also one up to ``stale_s`` past its expiry (counted as a stale hit, and never
        as a miss: the request was already counted)."""
        answer = self.memory.get(key, stale=stale)
        if answer is None and self.redis is not None:
            answer = await self._from_redis(key, stale=stale)
        c = self.counters
        if answer is None:
            if not stale:
                c.misses += 1
            return None
        if self.expired(answer):
            c.stale_hits += 1
        else:
            c.hits += 1
        c.saved_prompt_tokens += answer.prompt_tokens
        c.saved_completion_tokens += answer.completion_tokens
        c.saved_gpu_seconds += answer.gpu_seconds or 0.0
        return answer

    def recording(self, gen: Outputs, key: str, *, kind: Literal["chat", "completion"]) -> Outputs:
        """``gen`` as the API reads it, keeping its answer under ``key`` once it finishes well."""
        return answer_recorded(gen, lambda result, pieces: self.put(key, kind, result, pieces), cache="response cache")

    def put(self, key: str, kind: Literal["chat", "completion"], result: GenerationResult,
            pieces: list[str]) -> None:
        answer = answer_of(kind, result, pieces, expires_at=self._clock() + self.ttl_s)
        if answer is None:
            return
        encoded = answer.to_json()
        self.memory.put(key, answer, len(encoded))
        self.counters.stores += 1
        if self.redis is not None:
            task = asyncio.ensure_future(self.redis.put(key, encoded, self.ttl_s + self.stale_s))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def close(self) -> None:
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        if self.redis is not None:
            await self.redis.close()

    async def _from_redis(self, key: str, *, stale: bool) -> CachedAnswer | None:
        assert self.redis is not None
        raw = await self.redis.get(key)
        if raw is None:
            return None
        try:
            answer = CachedAnswer.from_json(raw)
        except (ValueError, KeyError, TypeError):
            self.redis.errors += 1
            log.warning("response cache: ignoring a malformed entry in Redis")
            return None
        if answer.expires_at + (self.stale_s if stale else 0.0) <= self._clock():
            return None
        self.memory.put(key, answer, len(raw))
        return answer

    def samples(self) -> list[LiveSample]:
        c = self.counters
        rows = counter("wattson_cache_hits_total", "Requests answered from the response cache", c.hits)
        rows += counter("wattson_cache_stale_hits_total", "Requests answered with an expired answer because no "
                        "model of their fallback chain could answer", c.stale_hits)
        rows += counter("wattson_cache_misses_total", "Cacheable requests the cache could not answer", c.misses)
        rows += counter("wattson_cache_stores_total", "Answers kept in the response cache", c.stores)
        rows += gauge("wattson_cache_entries", "Answers held in memory", len(self.memory))
        rows += gauge("wattson_cache_bytes", "Memory held by cached answers", self.memory.bytes)
        rows += counter("wattson_cache_evictions_total", "Answers evicted from memory by the size bounds",
                        self.memory.evictions)
        rows += counter("wattson_cache_saved_tokens_total", "Tokens cache hits did not have to process",
                        c.saved_prompt_tokens, kind="prompt")
        rows += counter("wattson_cache_saved_tokens_total", "Tokens cache hits did not have to process",
                        c.saved_completion_tokens, kind="completion")
        rows += counter("wattson_cache_saved_gpu_seconds_total", "Engine time the cached answers took when first made",
                        c.saved_gpu_seconds)
        if self.redis is not None:
            rows += counter("wattson_cache_redis_errors_total", "Redis reads and writes that failed (served as misses)",
                            self.redis.errors)
            rows += gauge("wattson_cache_redis_up", "0 while Redis is being skipped after a failure",
                          1.0 if self.redis.available else 0.0)
        return rows


class CacheFallback:
    """The response cache as the fallback chains' ``cache`` step (``fallback.FallbackCache``): the
    answer it holds for the same tenant, model and request, replayed while the model is failing; with
    ``stale``, one past its freshness too (within ``--cache-stale-if-error-s``)."""

    def __init__(self, cache: ResponseCache, *, default_max_tokens: int) -> None:
        self._cache = cache
        self._default_max_tokens = default_max_tokens

    async def cached_answer(self, body: Body, *, tenant: str, model: str, max_tokens_cap: int | None,
                            stale: bool = False) -> CachedReplay | None:
        key = cache_key(tenant=tenant, model=model, body=body, max_tokens_cap=max_tokens_cap,
                        default_max_tokens=self._default_max_tokens)
        answer = await self._cache.get(key, stale=stale)
        if answer is None:
            return None
        return CachedReplay(answer.replay(), model, answer.kind, stale=self._cache.expired(answer))
