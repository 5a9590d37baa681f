"""The semantic cache: a question asked again in other words is answered with the answer already
given, when a feature's policy allows it and the two questions are close enough.

Off unless enabled per feature: by the ruleset's ``semantic_cache`` policies (docs/RULESET.md), or
by ``--semantic-cache FEATURE[=THRESHOLD]`` on a runtime without a control plane. A policy names a
feature (and a tenant, or ``*``), the similarity threshold and how long an answer is kept.

Only what the question's wording may change is compared: everything else must be identical, so a
request is looked up only in its *partition* — the tenant, the model that serves it, the feature,
every sampling parameter (as the exact cache keys them) and the conversation before the last user
message. Tenants, models and sampling settings never share an answer. A request with tools or
function calls, whose answer depends on more than its words, is never looked up or kept; image
parts are refused by the request schema before they get here.

Within a partition the last user message is embedded (``inference.embedding``) and compared by a
brute-force scan — one matrix-vector product over the partition's unit vectors in numpy — with every
answer still fresh and stored after the policy's last flush. Partitions are shared by replicas
through Redis (``--cache-redis-url``), one stream per partition: a replica appends what it stores
and, before each lookup, reads the entries it has not seen yet (one round trip, empty when nothing
is new), so every replica scans an in-memory copy. Redis is an optimisation, never a dependency:
a failure is a miss, and then Redis is skipped for a few seconds. docs/BENCHMARKS.md
("semantic_cache") measures the scan, the embedding and the false-hit rate that chose the default
threshold.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from inference.backends import Outputs
from inference.cache import CachedAnswer, answer_of, answer_recorded, cacheable, generation_settings, identity_digest
from inference.embedding import DIMENSIONS, Embedder, EmbedderUnavailable, EmbeddingBatcher
from inference.engine.engine import GenerationResult
from inference.engine.models import resolve_device
from inference.metrics import LiveSample, counter, gauge
from inference.optional_redis import OptionalRedis
from inference.schemas import ChatCompletionRequest, CompletionRequest
from inference.semantic_policy import SemanticPolicy

if TYPE_CHECKING:
    from inference.rules.contract import RulesetDocument

log = logging.getLogger("inference.semantic_cache")

REDIS_PREFIX = "wattson:semcache:v1:"
SYNC_BATCH = 200  # stream entries (~1.7 kB each) read per round trip while catching up
# How long a lookup waits for its partition's sync with Redis; past it the lookup scans what is
# here and the sync carries on in the background (a cold replica catching up on 100k entries).
SYNC_WAIT_S = 0.05
# Partitions up to this size are scanned in float32 alone; larger ones in bfloat16 first, and their
# RESCORED best again in float32 (bench semantic_cache: 100k entries).
EXACT_SCAN_UP_TO = 4096
RESCORED = 32
BYPASS_HEADER_VALUE = "bypass"  # the request header x-wattson-cache: bypass skips both caches' lookups

Body = ChatCompletionRequest | CompletionRequest
Clock = Callable[[], float]


def policies_of(document: RulesetDocument | None) -> list[SemanticPolicy]:
    if document is None:
        return []
    return [SemanticPolicy(feature=p.feature, tenant=p.tenant, threshold=float(p.threshold), ttl_s=float(p.ttl_s),
                           flushed_at=None if p.flushed_at is None else p.flushed_at.timestamp(), source="ruleset")
            for p in document.semantic_cache]


def question_of(body: Body) -> tuple[str, list[Any]] | None:
    """The text compared (the last user message, or the prompt) and the conversation before it
    (part of the partition), or None when the request may not use the semantic cache."""
    if isinstance(body, CompletionRequest):
        return body.prompt_text(), []
    if body.tools or body.functions or body.tool_choice is not None or body.function_call is not None:
        return None
    if any(m.role == "tool" for m in body.messages) or body.messages[-1].role != "user":
        return None
    return body.messages[-1].text(), [[m.role, m.name, m.text()] for m in body.messages[:-1]]


def partition_of(*, tenant: str, model: str, feature: str, body: Body, context: list[Any],
                 max_tokens_cap: int | None, default_max_tokens: int) -> str:
    """The partition a request is compared within: all that must be identical for an answer to apply."""
    return identity_digest({
        "tenant": tenant, "model": model, "feature": feature,
        "kind": "completion" if isinstance(body, CompletionRequest) else "chat", "context": context,
        **generation_settings(body, max_tokens_cap=max_tokens_cap, default_max_tokens=default_max_tokens),
    })


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:16]


def redis_key(*, feature: str, tenant: str, partition: str) -> str:
    """A partition's stream: feature and tenant digests first, so a flush finds a feature's keys."""
    return f"{REDIS_PREFIX}{_digest(feature)}:{_digest(tenant)}:{partition}"


class VectorIndex:
    """One partition's answers in memory, scanned whole. Up to ``EXACT_SCAN_UP_TO`` answers the scan
    is one float32 matrix-vector product; past it a bfloat16 copy of the matrix is scanned first (half
    the memory to read, which is what a scan of 100k vectors waits on) and its ``RESCORED`` best are
    scored again in float32, so the similarity reported and held to the threshold is exact."""

    def __init__(self, *, max_entries: int) -> None:
        self.max_entries = max_entries
        self._vectors = np.zeros((16, DIMENSIONS), dtype=np.float32)
        self._coarse = torch.zeros((16, DIMENSIONS), dtype=torch.bfloat16)
        self._expires = np.zeros(16, dtype=np.float64)
        self._stored = np.zeros(16, dtype=np.float64)
        self.answers: list[CachedAnswer] = []
        self.ids: set[str] = set()  # the Redis stream ids held, so a replica's sync skips its own
        self.cursor = "-"  # the last stream id read from Redis

    def __len__(self) -> int:
        return len(self.answers)

    def add(self, vector: np.ndarray, answer: CachedAnswer, *, stored_at: float, entry_id: str | None = None) -> None:
        if entry_id is not None:
            if entry_id in self.ids:
                return
            self.ids.add(entry_id)
        n = len(self.answers)
        if n == len(self._expires):
            grown = max(16, n * 2)
            self._vectors = np.resize(self._vectors, (grown, DIMENSIONS))
            self._coarse = torch.cat([self._coarse, torch.zeros((grown - n, DIMENSIONS), dtype=torch.bfloat16)])
            self._expires = np.resize(self._expires, grown)
            self._stored = np.resize(self._stored, grown)
        self._vectors[n], self._expires[n], self._stored[n] = vector, answer.expires_at, stored_at
        self._coarse[n] = torch.from_numpy(self._vectors[n]).to(torch.bfloat16)
        self.answers.append(answer)
        if len(self.answers) > self.max_entries:
            self.keep(np.arange(len(self.answers)) >= len(self.answers) - self.max_entries)

    def best(self, query: np.ndarray, *, now: float, not_before: float | None) -> tuple[CachedAnswer, float] | None:
        """The most similar answer still fresh (and stored after ``not_before``), with its similarity."""
        # One consistent view: a scan may run in a worker thread while the event loop adds answers
        # (which only append, or grow into new arrays) or compacts the partition (new arrays and list).
        answers, vectors, coarse_vectors = self.answers, self._vectors, self._coarse
        expires, stored = self._expires, self._stored
        n = min(len(answers), len(expires))
        if n == 0:
            return None
        usable = expires[:n] > now
        if not_before is not None:
            usable &= stored[:n] > not_before
        if n <= EXACT_SCAN_UP_TO:
            similarity = np.where(usable, vectors[:n] @ query, -2.0)
            i = int(np.argmax(similarity))
            return None if similarity[i] < -1.0 else (answers[i], float(similarity[i]))
        coarse = _as_float32(coarse_vectors[:n] @ torch.from_numpy(query).to(torch.bfloat16))
        coarse = np.where(usable, coarse, -2.0)
        candidates = np.argpartition(coarse, n - RESCORED)[n - RESCORED:]
        candidates = candidates[coarse[candidates] > -1.5]
        if len(candidates) == 0:
            return None
        exact = vectors[candidates] @ query
        i = int(candidates[int(np.argmax(exact))])
        return answers[i], float(exact.max())

    def prune(self, *, now: float) -> None:
        """Drop expired answers once they are half the partition (a scan pays for every row)."""
        n = len(self.answers)
        fresh = self._expires[:n] > now
        if n and fresh.sum() * 2 < n:
            self.keep(fresh)

    def keep(self, mask: np.ndarray) -> None:
        rows = np.flatnonzero(mask)
        self._vectors = self._vectors[rows].copy()
        self._coarse = self._coarse[torch.from_numpy(rows)].clone()
        self._expires, self._stored = self._expires[rows].copy(), self._stored[rows].copy()
        self.answers = [self.answers[i] for i in rows]


def _as_float32(values: torch.Tensor) -> np.ndarray:
    """bfloat16 values as float32, in numpy on this thread (a bfloat16 is a float32's top half):
    torch's own conversion is one more parallel step, which waits for every thread on a busy machine."""
    return (values.view(torch.int16).numpy().astype(np.int32) << 16).view(np.float32)


class SemanticRedis(OptionalRedis):
    """Partitions shared by replicas, one Redis stream each. Every failure is a miss (``None`` or
    nothing) and counted; after one, Redis is skipped for a while (``inference.optional_redis``)."""

    def __init__(self, url: str) -> None:
        super().__init__(url, name="semantic cache")

    async def append(self, key: str, vector: np.ndarray, answer: CachedAnswer, *, stored_at: float, ttl_s: float,
                     max_entries: int) -> str | None:
        if not self.available:
            return None
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.xadd(key, {"v": vector.astype(np.float32).tobytes(), "a": answer.to_json(), "s": repr(stored_at)},
                          maxlen=max_entries, approximate=True)
                # Stream ids are milliseconds: what is older than the TTL has expired, and goes.
                pipe.xtrim(key, minid=f"{max(0, int((stored_at - ttl_s) * 1000))}-0", approximate=True)
                pipe.pexpire(key, max(1, int(ttl_s * 1000)))
                entry_id, _, _ = await pipe.execute()
        except Exception as exc:
            self._failed("write", exc)
            return None
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def read_new(self, key: str, index: VectorIndex) -> bool:
        """Add the partition's entries after ``index.cursor`` to it; False when Redis failed."""
        if not self.available:
            return False
        try:
            while True:
                start = "-" if index.cursor == "-" else "(" + index.cursor
                entries = await self._client.xrange(key, min=start, max="+", count=SYNC_BATCH)
                for entry_id, fields in entries:
                    index.cursor = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                    self._add(index, index.cursor, fields)
                if len(entries) < SYNC_BATCH:
                    return True
        except Exception as exc:
            self._failed("read", exc)
            return False

    def _add(self, index: VectorIndex, entry_id: str, fields: dict[bytes, bytes]) -> None:
        try:
            vector = np.frombuffer(fields[b"v"], dtype=np.float32)
            if vector.shape != (DIMENSIONS,) or not np.isfinite(vector).all():
                raise ValueError("not a vector of this model")
            answer = CachedAnswer.from_json(fields[b"a"])
            stored_at = float(fields[b"s"])
        except (KeyError, ValueError, TypeError):  # never trust a shared store
            self.errors += 1
            log.warning("semantic cache: ignoring a malformed entry in Redis")
            return
        if answer.expires_at > time.time():  # an expired one would only be scanned past
            index.add(vector, answer, stored_at=stored_at, entry_id=entry_id)

    async def delete_feature(self, feature: str, tenant: str) -> int:
        """Delete a feature's partitions (of one tenant, or all: ``*``); how many were deleted."""
        if not self.available:
            return 0
        tenants = "*" if tenant == "*" else _digest(tenant)
        deleted = 0
        try:
            async for key in self._client.scan_iter(match=f"{REDIS_PREFIX}{_digest(feature)}:{tenants}:*", count=500):
                deleted += await self._client.delete(key)
        except Exception as exc:
            self._failed("flush", exc)
        return deleted


@dataclass(frozen=True)
class SemanticProbe:
    """A looked-up request's place in the cache: where its answer is kept once it is generated."""

    policy: SemanticPolicy
    tenant: str
    partition: str
    vector: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class SemanticHit:
    answer: CachedAnswer
    similarity: float


@dataclass
class SemanticCounters:
    lookups: int = 0
    hits: int = 0
    misses: int = 0
    stores: int = 0
    unavailable: int = 0  # lookups that found no embedding model (loading, or not installed)
    errors: int = 0  # lookups whose embedding failed (served as misses)
    lookup_seconds: float = 0.0
    flushed: int = 0


class SemanticCache:
    """The runtime's semantic cache: policies (flags and the ruleset), the embedder, the partitions."""

    def __init__(self, *, flag_policies: tuple[SemanticPolicy, ...] = (), redis_url: str | None = None,
                 device: str = "auto", max_entries: int = 100_000, clock: Clock = time.time,
                 embedder: Embedder | None = None) -> None:
        self.flag_policies = flag_policies
        self.device = device
        self.max_entries = max_entries
        self._clock = clock
        self.redis = SemanticRedis(redis_url) if redis_url else None
        self.partitions: dict[str, VectorIndex] = {}
        self._feature_of: dict[str, tuple[str, str]] = {}  # partition -> (feature, tenant)
        self.counters = SemanticCounters()
        self.batcher = EmbeddingBatcher(embedder) if embedder is not None else None
        self._loading: asyncio.Task[None] | None = None
        self._load_failed: str | None = None
        self._document: RulesetDocument | None = None
        self._ruleset_policies: list[SemanticPolicy] = []
        self._flushes_done: dict[tuple[str, str], float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._syncs: dict[str, asyncio.Task[Any]] = {}  # Redis key -> its partition's sync under way

    # -- policies ------------------------------------------------------------------------------

    def follow(self, document: RulesetDocument | None) -> None:
        """Take the policies of the ruleset in force (when one is accepted, and before each lookup:
        cheap when unchanged; on the event loop).
        A policy whose ``flushed_at`` moved drops that feature's entries here and in Redis."""
        if document is self._document:
            return
        self._document = document
        self._ruleset_policies = policies_of(document)
        if self._ruleset_policies:
            self._ready()  # starts loading the embedding model if it is not loaded
        for policy in self._ruleset_policies:
            scope = (policy.feature, policy.tenant)
            if policy.flushed_at is not None and self._flushes_done.get(scope, 0.0) < policy.flushed_at:
                self._flushes_done[scope] = policy.flushed_at
                self._spawn(self.flush(policy.feature, tenant=policy.tenant))

    def policy_for(self, *, tenant: str, feature: str) -> SemanticPolicy | None:
        """The policy in force for a request: the ruleset's over a flag's, a tenant's own over ``*``."""
        for policies in (self._ruleset_policies, self.flag_policies):
            found = [p for p in policies if p.feature == feature and p.tenant in (tenant, "*")]
            if found:
                return min(found, key=lambda p: p.tenant == "*")
        return None

    def thresholds(self) -> list[SemanticPolicy]:
        return [*self._ruleset_policies, *self.flag_policies]

    # -- the embedder --------------------------------------------------------------------------

    async def load(self) -> None:
        """Load the embedding model now (a runtime started with ``--semantic-cache`` does, before it serves)."""
        if self.batcher is not None or self._load_failed is not None:
            return
        try:
            device = str(resolve_device(self.device))
            embedder = await asyncio.to_thread(Embedder, device=device)
        except (EmbedderUnavailable, OSError, ValueError, RuntimeError) as exc:
            self._load_failed = str(exc)
            log.error("semantic cache: the embedding model could not be loaded (%s); every lookup is a miss", exc)
            return
        self.batcher = EmbeddingBatcher(embedder)
        log.info("semantic cache: embedding model loaded in %.1f s on %s", embedder.load_s, device)

    def _ready(self) -> bool:
        """Whether lookups can embed; the first policy to need the model starts loading it."""
        if self.batcher is not None:
            return True
        if self._loading is None and self._load_failed is None:
            self._loading = self._spawn(self.load())
        return False

    # -- lookups and answers -------------------------------------------------------------------

    async def lookup(self, *, tenant: str, feature: str, model: str, body: Body, max_tokens_cap: int | None,
                     default_max_tokens: int, cache_sampled: bool,
                     document: RulesetDocument | None) -> tuple[SemanticHit | None, SemanticProbe | None]:
        """The answer to a question already asked in other words (a hit), and the probe under which
        the request's own answer is to be kept (None, None: the semantic cache does not apply)."""
        self.follow(document)
        policy = self.policy_for(tenant=tenant, feature=feature)
        if policy is None or not cacheable(body, cache_sampled=cache_sampled):
            return None, None
        question = question_of(body)
        if question is None:
            return None, None
        if not self._ready():
            self.counters.unavailable += 1
            return None, None
        started = time.perf_counter()
        text, context = question
        partition = partition_of(tenant=tenant, model=model, feature=feature, body=body, context=context,
                                 max_tokens_cap=max_tokens_cap, default_max_tokens=default_max_tokens)
        assert self.batcher is not None
        try:
            vector = await self.batcher.embed(text)
        except Exception:  # the request is answered by its model, never failed by the cache
            self.counters.errors += 1
            log.exception("semantic cache: embedding a question failed; served as a miss")
            return None, None
        index = self._index(partition, feature, tenant)
        if self.redis is not None:
            await self._synced(redis_key(feature=feature, tenant=tenant, partition=partition), index)
        if len(index) > EXACT_SCAN_UP_TO:  # milliseconds of work: off the event loop, which streams others' answers
            found = await asyncio.to_thread(index.best, vector, now=self._clock(), not_before=policy.flushed_at)
        else:
            found = index.best(vector, now=self._clock(), not_before=policy.flushed_at)
        c = self.counters
        c.lookups += 1
        c.lookup_seconds += time.perf_counter() - started
        probe = SemanticProbe(policy, tenant, partition, vector)
        if found is None or found[1] < policy.threshold:
            c.misses += 1
            return None, probe
        c.hits += 1
        return SemanticHit(found[0], found[1]), probe

    async def _synced(self, key: str, index: VectorIndex) -> None:
        """Bring ``index`` up to date with its Redis stream, waiting at most ``SYNC_WAIT_S``: one sync
        per partition at a time, which a later lookup joins."""
        assert self.redis is not None
        task = self._syncs.get(key)
        if task is None or task.done():
            task = self._syncs[key] = self._spawn(self.redis.read_new(key, index))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), timeout=SYNC_WAIT_S)

    def recording(self, gen: Outputs, probe: SemanticProbe, *, kind: Literal["chat", "completion"]) -> Outputs:
        """``gen`` as the API reads it, keeping its answer for ``probe``'s question once it finishes well."""
        return answer_recorded(gen, lambda result, pieces: self.put(probe, kind, result, pieces),
                               cache="semantic cache")

    def put(self, probe: SemanticProbe, kind: Literal["chat", "completion"], result: GenerationResult,
            pieces: list[str]) -> None:
        now = self._clock()
        policy = probe.policy
        answer = answer_of(kind, result, pieces, expires_at=now + policy.ttl_s)
        if answer is None:
            return
        index = self._index(probe.partition, policy.feature, probe.tenant)
        self.counters.stores += 1
        if self.redis is None:
            index.add(probe.vector, answer, stored_at=now)
            return

        async def share() -> None:
            assert self.redis is not None
            key = redis_key(feature=policy.feature, tenant=probe.tenant, partition=probe.partition)
            entry_id = await self.redis.append(key, probe.vector, answer, stored_at=now, ttl_s=policy.ttl_s,
                                               max_entries=self.max_entries)
            index.add(probe.vector, answer, stored_at=now, entry_id=entry_id)
        self._spawn(share())

    async def flush(self, feature: str, *, tenant: str = "*") -> int:
        """Forget a feature's answers (one tenant's, or every tenant's), here and in Redis."""
        dropped = [p for p, (f, t) in self._feature_of.items() if f == feature and tenant in ("*", t)]
        for partition in dropped:
            del self.partitions[partition], self._feature_of[partition]
        self._syncs.clear()  # a sync under way fills an index no longer held
        deleted = await self.redis.delete_feature(feature, tenant) if self.redis is not None else 0
        self.counters.flushed += 1
        log.info("semantic cache: flushed feature %r (tenant %s): %d partitions here, %d in Redis",
                 feature, tenant, len(dropped), deleted)
        return len(dropped) + deleted

    def _index(self, partition: str, feature: str, tenant: str) -> VectorIndex:
        index = self.partitions.get(partition)
        if index is None:
            index = self.partitions[partition] = VectorIndex(max_entries=self.max_entries)
            self._feature_of[partition] = (feature, tenant)
        index.prune(now=self._clock())
        return index

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self.redis is not None:
            await self.redis.close()

    def samples(self) -> list[LiveSample]:
        c = self.counters
        rows = counter("wattson_semantic_cache_lookups_total", "Requests looked up in the semantic cache", c.lookups)
        rows += counter("wattson_semantic_cache_hits_total", "Requests answered with the answer to a similar "
                        "question", c.hits)
        rows += counter("wattson_semantic_cache_misses_total", "Semantic lookups below the threshold", c.misses)
        rows += counter("wattson_semantic_cache_stores_total", "Answers kept in the semantic cache", c.stores)
        rows += counter("wattson_semantic_cache_unavailable_total", "Lookups made without an embedding model "
                        "(loading, or not installed): misses", c.unavailable)
        rows += counter("wattson_semantic_cache_errors_total", "Lookups whose embedding failed: misses", c.errors)
        rows += counter("wattson_semantic_cache_lookup_seconds_total", "Time spent embedding and scanning",
                        c.lookup_seconds)
        rows += gauge("wattson_semantic_cache_entries", "Answers held in memory",
                      sum(len(i) for i in self.partitions.values()))
        if self.redis is not None:
            rows += counter("wattson_semantic_cache_redis_errors_total", "Redis reads and writes that failed "
                            "(served as misses)", self.redis.errors)
        return rows
