"""The semantic cache: how often it answers a different question than the one asked, how much it
answers, what a lookup costs at 100k entries, and how fast the embedding runs.

* Precision on ``bench/data/semantic_questions.txt`` (questions written for this purpose, each with
  two paraphrases and two near misses that share its topic but ask something else): for each
  threshold, the false-hit rate (near-miss pairs at or above it), recall (paraphrase pairs at or
  above it) and precision (paraphrases among the pairs at or above it), and the lowest threshold
  whose false-hit rate is under 1% next to the runtime's default.
* Lookup cost with one partition of 100k answers: the scan alone (``VectorIndex.best``), and a whole
  ``SemanticCache.lookup`` (embedding, optional Redis sync, scan) as a request pays it; with
  ``--redis-url`` also a replica's one-time catch-up of the 100k entries from Redis. The scan's cost
  does not depend on what the vectors say, so the 100k are random unit vectors plus the labelled
  questions' own.
* Embedding throughput at batch sizes 1, 8 and 32.

``python -m bench semantic_cache [--entries N] [--redis-url redis://127.0.0.1:6379/4]``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.report import percentile, print_table, progress
from inference import semantic_cache
from inference.cache import CachedAnswer
from inference.embedding import DIMENSIONS, Embedder
from inference.schemas import ChatCompletionRequest
from inference.semantic_cache import SemanticCache, VectorIndex, partition_of, redis_key
from inference.semantic_policy import DEFAULT_THRESHOLD, SemanticPolicy

DATA = Path(__file__).parent / "data" / "semantic_questions.txt"
THRESHOLDS = [0.70, 0.75, *(round(0.80 + 0.01 * i, 2) for i in range(20))]
TARGET_FALSE_HIT_RATE = 0.01
coarse_limit = semantic_cache.EXACT_SCAN_UP_TO


def labelled_pairs(path: Path = DATA) -> list[tuple[str, str, bool]]:
    """(question, other, same intent) for every group: two paraphrases (True), two near misses (False)."""
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split("|")]
        if len(parts) != 5 or not all(parts):
            raise ValueError(f"{path}:{number}: expected QUESTION | PARAPHRASE | PARAPHRASE | NEAR MISS | NEAR MISS")
        question, *paraphrases = parts[:3]
        pairs += [(question, p, True) for p in paraphrases]
        pairs += [(question, n, False) for n in parts[3:]]
    return pairs


def curve(similarities: np.ndarray, same: np.ndarray) -> list[tuple[float, float, float, float | None, int]]:
    """(threshold, false-hit rate, recall, precision, hits) per threshold."""
    rows = []
    for threshold in THRESHOLDS:
        hit = similarities >= threshold
        false_hits, true_hits = int((hit & ~same).sum()), int((hit & same).sum())
        precision = true_hits / (true_hits + false_hits) if true_hits + false_hits else None
        rows.append((threshold, false_hits / int((~same).sum()), true_hits / int(same.sum()), precision,
                     true_hits + false_hits))
    return rows


def embedding_throughput(embedder: Embedder, texts: list[str], *, rounds: int) -> list[tuple[int, float, float]]:
    """(batch size, texts/s, ms per batch)."""
    rows = []
    for size in (1, 8, 32):
        batch = texts[:size]
        embedder.embed(batch)  # warm
        started = time.perf_counter()
        for _ in range(rounds):
            embedder.embed(batch)
        elapsed = time.perf_counter() - started
        rows.append((size, size * rounds / elapsed, elapsed / rounds * 1000))
    return rows


def filled_index(entries: int, real: np.ndarray, answer: CachedAnswer) -> VectorIndex:
    rng = np.random.default_rng(19)
    index = VectorIndex(max_entries=entries)
    random = rng.standard_normal((entries - len(real), DIMENSIONS)).astype(np.float32)
    random /= np.linalg.norm(random, axis=1, keepdims=True)
    for vector in (*random, *real):
        index.add(vector, answer, stored_at=0.0)
    return index


def scan_latency(index: VectorIndex, queries: np.ndarray) -> tuple[list[float], list[float]]:
    """The queries scanned as the runtime does (a bfloat16 pass, then the best again in float32) and in
    float32 alone, in alternating blocks of 25, so both see much the same load (and neither has the
    other's matrix in cache)."""
    coarse: list[float] = []
    exact: list[float] = []
    for start in range(0, len(queries), 25):
        for times, limit in ((coarse, coarse_limit), (exact, len(index))):
            semantic_cache.EXACT_SCAN_UP_TO = limit
            for query in queries[start:start + 25]:
                started = time.perf_counter()
                index.best(query, now=0.0, not_before=None)
                times.append(time.perf_counter() - started)
    semantic_cache.EXACT_SCAN_UP_TO = coarse_limit
    return coarse, exact


def body(question: str) -> ChatCompletionRequest:
    message = {"role": "user", "content": question}
    return ChatCompletionRequest.model_validate({"model": "smollm2", "messages": [message], "max_tokens": 64,
                                                 "temperature": 0})


async def lookup_latency(cache: SemanticCache, questions: list[str]) -> list[float]:
    """Whole lookups as a request makes them (embedding one question, Redis sync if any, scan)."""
    times = []
    for question in questions:
        started = time.perf_counter()
        await cache.lookup(tenant="acme", feature="faq", model="smollm2", body=body(question), max_tokens_cap=None,
                           default_max_tokens=256, cache_sampled=False, document=None)
        times.append(time.perf_counter() - started)
    return times


async def redis_catch_up(url: str, index: VectorIndex, answer: CachedAnswer, *, entries: int) -> tuple[float, float]:
    """Fill a partition's stream with ``entries`` entries, then time a cold replica reading them all;
    returns (seconds to catch up, ms of a sync that finds nothing new)."""
    cache = SemanticCache(redis_url=url, max_entries=entries)
    assert cache.redis is not None
    partition = partition_of(tenant="bench", model="smollm2", feature="faq", body=body("x"), context=[],
                             max_tokens_cap=None, default_max_tokens=256)
    key = redis_key(feature="faq", tenant="bench", partition=partition)
    client = cache.redis._client
    await client.delete(key)
    vectors = index._vectors[:entries]
    encoded = answer.to_json()
    for start in range(0, entries, 1000):
        async with client.pipeline(transaction=False) as pipe:
            for vector in vectors[start:start + 1000]:
                pipe.xadd(key, {"v": vector.tobytes(), "a": encoded, "s": "0.0"})
            await pipe.execute()
    cold = VectorIndex(max_entries=entries)
    started = time.perf_counter()
    while len(cold) < entries:  # as the runtime's background sync does, resuming after a failed read
        if not await cache.redis.read_new(key, cold):
            await asyncio.sleep(0.1)
            cache.redis._skip_until = 0.0
    catch_up = time.perf_counter() - started
    empty = []
    for _ in range(50):
        began = time.perf_counter()
        await cache.redis.read_new(key, cold)
        empty.append(time.perf_counter() - began)
    await client.delete(key)
    await cache.close()
    assert len(cold) == entries
    return catch_up, percentile(empty, 50) * 1000


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench semantic_cache")
    parser.add_argument("--quick", action="store_true", help="1,000 entries and few rounds: checks the benchmark works")
    parser.add_argument("--entries", type=int, default=100_000, help="answers in the partition scanned")
    parser.add_argument("--redis-url", default=None, help="also time a replica catching up from this Redis")
    args = parser.parse_args(argv)
    entries = 1_000 if args.quick else args.entries

    pairs = labelled_pairs()
    texts = sorted({text for a, b, _ in pairs for text in (a, b)})
    progress(f"loading MiniLM-L6 and embedding {len(texts)} questions")
    embedder = Embedder(device="cpu")
    vectors = dict(zip(texts, embedder.embed(texts), strict=True))
    similarities = np.array([float(vectors[a] @ vectors[b]) for a, b, _ in pairs])
    same = np.array([label for _, _, label in pairs])
    rows = curve(similarities, same)
    chosen = next((r[0] for r in rows if r[1] < TARGET_FALSE_HIT_RATE), None)
    default = min(rows, key=lambda r: abs(r[0] - DEFAULT_THRESHOLD))
    print_table(
        f"Threshold curve: {len(pairs)} labelled pairs ({int(same.sum())} paraphrases, {int((~same).sum())} near "
        f"misses) from {DATA.name}",
        ["threshold", "false-hit rate %", "recall %", "precision %", "hits"],
        [(f"{t:.2f}", fh * 100, rc * 100, None if p is None else p * 100, n) for t, fh, rc, p, n in rows],
        notes=[f"\nLowest threshold with a false-hit rate under {TARGET_FALSE_HIT_RATE:.0%}: {chosen}. "
               f"Runtime default: {DEFAULT_THRESHOLD} (false-hit rate {default[1]:.2%}, recall {default[2]:.1%}).",
               f"Similarity of paraphrases: p5 {np.percentile(similarities[same], 5):.3f}, median "
               f"{np.median(similarities[same]):.3f}; of near misses: median {np.median(similarities[~same]):.3f}, "
               f"p95 {np.percentile(similarities[~same], 95):.3f}, max {similarities[~same].max():.3f}."])
    worst = sorted(((s, a, b) for (a, b, label), s in zip(pairs, similarities, strict=True) if not label),
                   reverse=True)[:5]
    print_table("Near misses most similar to their question", ["similarity", "question", "near miss"],
                [(f"{s:.3f}", a, b) for s, a, b in worst])

    rounds = 3 if args.quick else 20
    progress("embedding throughput")
    print_table("Embedding throughput (MiniLM-L6, fp32, in process)", ["batch", "questions/s", "ms per batch"],
                embedding_throughput(embedder, texts, rounds=rounds))

    progress(f"filling a partition with {entries:,} entries")
    answer = CachedAnswer(kind="chat", pieces=("An answer.",), finish_reason="stop", prompt_tokens=20,
                          completion_tokens=30, gpu_seconds=0.5, energy_measured=False, expires_at=time.time() + 3600)
    real = np.stack([vectors[t] for t in texts])
    index = filled_index(max(entries, len(real)), real, answer)
    queries = np.stack([vectors[b] for _, b, _ in pairs[:200]])
    scan, exact_scan = scan_latency(index, queries)

    cache = SemanticCache(flag_policies=(SemanticPolicy("faq", threshold=DEFAULT_THRESHOLD),),
                          embedder=embedder, max_entries=len(index))
    partition = partition_of(tenant="acme", model="smollm2", feature="faq", body=body("x"), context=[],
                             max_tokens_cap=None, default_max_tokens=256)
    cache.partitions[partition] = index
    cache._feature_of[partition] = ("faq", "acme")
    questions = [b for _, b, _ in pairs[:100 if not args.quick else 20]]
    whole = asyncio.run(lookup_latency(cache, questions))
    how = (f"bfloat16, best {semantic_cache.RESCORED} in float32" if len(index) > coarse_limit
           else f"float32: up to {coarse_limit:,} entries")
    rows = [(f"scan of {len(index):,} entries as the runtime does ({how})",
             percentile(scan, 50) * 1000, percentile(scan, 95) * 1000, len(scan)),
            (f"scan of {len(index):,} entries, float32 alone", percentile(exact_scan, 50) * 1000,
             percentile(exact_scan, 95) * 1000, len(exact_scan)),
            ("whole lookup: embed one question + scan", percentile(whole, 50) * 1000, percentile(whole, 95) * 1000,
             len(whole))]
    counted = cache.counters
    notes = [f"The whole lookups embedded {cache.batcher.texts if cache.batcher else 0} questions in "
             f"{cache.batcher.batches if cache.batcher else 0} passes and made {counted.lookups} scans "
             f"({counted.hits} hits at the default threshold against the labelled questions stored)."]
    if args.redis_url:
        progress(f"writing {entries:,} entries to {args.redis_url} and reading them back cold")
        catch_up, empty_ms = asyncio.run(redis_catch_up(args.redis_url, index, answer, entries=min(entries,
                                                                                                   len(index))))
        rows.append(("Redis sync finding nothing new (each lookup)", empty_ms, None, 50))
        notes.append(f"A cold replica read all {min(entries, len(index)):,} entries of the partition from Redis in "
                     f"{catch_up:.1f} s (once, on its first lookup of that partition).")
    print_table("Lookup latency, one partition (ms)", ["what", "p50 ms", "p95 ms", "lookups"], rows, notes=notes)
    return 0
