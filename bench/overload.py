"""Overload: offered load at 3x the engine's capacity, with mixed priorities.

Three phases against the real server (``python -m inference serve``, its own process), every request
a greedy completion of exactly ``--max-tokens`` tokens (EOS ignored) of a prompt no other request
has (the response cache is off, as it is by default):

1. capacity — a closed loop of ``--max-batch-size`` clients keeps every slot busy; capacity is the
   requests/s it completes;
2. unloaded — high-priority requests one at a time: the latency the overload run is held to;
3. overload — Poisson arrivals at ``--load`` x capacity for ``--seconds``, each high, normal or low
   priority (``--mix``): high from a premium key, normal from a standard key, low from a free-tier
   key. The runtime runs with a target queue wait (``--queue-target-wait-s``), past which it sheds
   low work first and caps free keys' max_tokens, a longest wait (``--max-queue-wait-s``), a
   slot kept for high-priority work (``--high-priority-slots``) and, while high-priority work runs,
   at most ``--high-priority-max-running`` requests running in all (others are paused or wait).

The table gives, per priority, what was sent, served (and of those, capped), shed with 503 and
``Retry-After``, anything else, and the latency of the served requests; then the goals: high p95
within 2x its unloaded p95, low work shed with 503 + Retry-After, and no request waiting without
bound (the server's queue-wait histogram, which counts a paused request's pause, against the
longest wait plus one service time).

    python -m bench overload [--quick] [--model smollm2] [--seconds 60] [--load 3] ...
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.http_load import closed_loop
from bench.prompts import prompt_texts
from bench.report import percentile, print_table, progress
from bench.servers import runtime_server

PRIORITIES = ("high", "normal", "low")
KEYS = {"high": ("sk-bench-high-0001", "bench-high", "premium"),
        "normal": ("sk-bench-normal-02", "bench-normal", "standard"),
        "low": ("sk-bench-free-00003", "bench-free", "free")}
GOAL_HIGH_RATIO = 2.0


@dataclass(frozen=True)
class Settings:
    model: str
    max_batch_size: int
    max_tokens: int
    prompt_words: int
    seconds: float
    load: float
    mix: tuple[float, float, float]
    target_wait_s: float
    max_wait_s: float
    free_cap: int
    high_slots: int
    high_max_running: int
    unloaded_requests: int
    seed: int


@dataclass(frozen=True)
class Outcome:
    priority: str
    status: int
    retry_after: bool
    code: str | None
    latency_s: float
    capped: bool


def parse_args(argv: Sequence[str]) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m bench overload", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny-random model for 8 s (checks the script)")
    parser.add_argument("--model", help="smollm2 (default), tiny-random (default with --quick) or a directory")
    parser.add_argument("--max-batch-size", type=int, default=4, help="running slots (default 4)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default 32)")
    parser.add_argument("--prompt-words", type=int, default=12, help="words per prompt (default 12)")
    parser.add_argument("--seconds", type=float, help="length of the overload run (default 60)")
    parser.add_argument("--load", type=float, default=3.0, help="offered load as a multiple of capacity (default 3)")
    parser.add_argument("--mix", type=float, nargs=3, default=(0.15, 0.35, 0.5), metavar=("HIGH", "NORMAL", "LOW"),
                        help="share of each priority (default 0.15 0.35 0.5)")
    parser.add_argument("--queue-target-wait-s", type=float, default=2.0, help="the runtime's target wait (default 2)")
    parser.add_argument("--max-queue-wait-s", type=float, default=10.0, help="the runtime's longest wait (default 10)")
    parser.add_argument("--free-max-tokens-under-load", type=int, default=8,
                        help="the free tier's max_tokens under load (default 8)")
    parser.add_argument("--high-priority-slots", type=int, default=1,
                        help="slots only high-priority work may take (default 1)")
    parser.add_argument("--high-priority-max-running", type=int, default=3,
                        help="requests running in all while high-priority work runs (default 3)")
    parser.add_argument("--unloaded-requests", type=int, help="high-priority requests timed alone (default 20)")
    parser.add_argument("--seed", type=int, default=1, help="arrival times and priorities (default 1)")
    args = parser.parse_args(argv)
    quick = args.quick
    return Settings(
        model=args.model or ("tiny-random" if quick else "smollm2"),
        max_batch_size=args.max_batch_size, max_tokens=args.max_tokens, prompt_words=args.prompt_words,
        seconds=args.seconds or (8.0 if quick else 60.0), load=args.load, mix=tuple(args.mix),  # type: ignore[arg-type]
        target_wait_s=args.queue_target_wait_s, max_wait_s=args.max_queue_wait_s,
        free_cap=args.free_max_tokens_under_load, high_slots=args.high_priority_slots,
        high_max_running=args.high_priority_max_running,
        unloaded_requests=args.unloaded_requests or (5 if quick else 20), seed=args.seed,
    )


def body(settings: Settings, prompt: str) -> dict[str, Any]:
    return {"model": settings.model, "prompt": prompt, "max_tokens": settings.max_tokens, "temperature": 0.0,
            "ignore_eos": True}


def headers(priority: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[priority][0]}", "X-Wattson-Priority": priority}


def measure_capacity(url: str, settings: Settings, prompt: str) -> float:
    """Requests/s with every slot kept busy (after a warm-up round); high priority, so that the
    slots kept for it are busy too."""
    slots, endpoint = settings.max_batch_size, url + "/v1/completions"
    closed_loop(endpoint, body(settings, prompt), headers=headers("high"), concurrency=slots, requests=slots)
    run = closed_loop(endpoint, body(settings, prompt), headers=headers("high"), concurrency=slots,
                      requests=4 * slots)
    if run.errors:
        raise RuntimeError(f"{run.errors} requests failed while measuring capacity")
    return run.requests_per_s


def measure_unloaded(url: str, settings: Settings, prompt: str) -> list[float]:
    run = closed_loop(url + "/v1/completions", body(settings, prompt), headers=headers("high"), concurrency=1,
                      requests=settings.unloaded_requests)
    if run.errors:
        raise RuntimeError(f"{run.errors} unloaded requests failed")
    return run.latencies_s


def arrivals(settings: Settings, rate: float) -> list[tuple[float, str]]:
    """Poisson arrival times over the run, each with its priority."""
    rng = random.Random(settings.seed)
    plan: list[tuple[float, str]] = []
    at = rng.expovariate(rate)
    while at < settings.seconds:
        plan.append((at, rng.choices(PRIORITIES, weights=settings.mix)[0]))
        at += rng.expovariate(rate)
    return plan


def offer(url: str, settings: Settings, plan: list[tuple[float, str]], prompts: list[str]) -> list[Outcome]:
    return asyncio.run(_offer(url, settings, plan, prompts))


async def _offer(url: str, settings: Settings, plan: list[tuple[float, str]], prompts: list[str]) -> list[Outcome]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:

        async def one(priority: str, prompt: str) -> Outcome:
            sent = time.perf_counter()
            response = await client.post("/v1/completions", json=body(settings, prompt), headers=headers(priority))
            latency = time.perf_counter() - sent
            code = None
            if response.status_code != 200:
                try:
                    code = response.json()["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    code = None
            retry_after = response.headers.get("retry-after", "")
            return Outcome(priority, response.status_code, retry_after.isdigit() and int(retry_after) >= 1, code,
                           latency, "x-wattson-degraded" in response.headers)

        started = time.perf_counter()
        tasks = []
        for i, (at, priority) in enumerate(plan):
            delay = started + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(priority, prompts[i % len(prompts)])))
        return list(await asyncio.gather(*tasks))


def ms(seconds: float) -> float:
    return seconds * 1000


def queue_waits_over(url: str, model: str, limits_s: Sequence[float]) -> list[tuple[float, int]]:
    """From the server's queue-wait histogram, for each limit: its smallest bucket bound at or above
    the limit, and how many admitted requests waited longer than that."""
    text = httpx.get(url + "/metrics", timeout=10).text
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith("wattson_queue_wait_seconds_bucket{") and f'model="{model}"' in line:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[math.inf if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    over = []
    for limit in limits_s:
        bound = min(b for b in buckets if b >= limit)
        over.append((bound, int(buckets[math.inf] - buckets[bound])))
    return over


def report(settings: Settings, capacity: float, unloaded: list[float], outcomes: list[Outcome],
           waits: list[tuple[float, int]]) -> None:
    rows = []
    for priority in PRIORITIES:
        mine = [o for o in outcomes if o.priority == priority]
        ok = [o.latency_s for o in mine if o.status == 200]
        shed = [o for o in mine if o.status == 503 and o.retry_after]
        other = len(mine) - len(ok) - len(shed)
        rows.append([priority, len(mine), len(ok), sum(o.capped for o in mine if o.status == 200), len(shed), other,
                     ms(percentile(ok, 50)) if ok else None, ms(percentile(ok, 95)) if ok else None,
                     ms(max(ok)) if ok else None, ms(max(o.latency_s for o in shed)) if shed else None])
    unloaded_p95 = percentile(unloaded, 95)
    rows.append(["high, unloaded", len(unloaded), len(unloaded), 0, 0, 0, ms(percentile(unloaded, 50)),
                 ms(unloaded_p95), ms(max(unloaded)), None])
    headers_ = ["priority", "sent", "ok", "ok capped", "shed 503+RA", "other", "ok p50 ms", "ok p95 ms", "ok max ms",
                "max ms to 503"]
    offered = len(outcomes) / settings.seconds
    reasons: dict[str, int] = {}
    for o in outcomes:
        if o.status != 200:
            reasons[f"{o.status} {o.code}"] = reasons.get(f"{o.status} {o.code}", 0) + 1
    high_ok = [o.latency_s for o in outcomes if o.priority == "high" and o.status == 200]
    ratio = percentile(high_ok, 95) / unloaded_p95 if high_ok else float("nan")
    low = [o for o in outcomes if o.priority == "low"]
    low_shed = [o for o in low if o.status == 503]
    longest = max(o.latency_s for o in outcomes)
    longest_shed = max((o.latency_s for o in outcomes if o.status == 503), default=0.0)
    (max_wait_bucket, over_max_wait), (bound, over) = waits
    notes = [
        f"model {settings.model}, {settings.max_batch_size} slots, {settings.max_tokens} tokens a request "
        f"(greedy, EOS ignored), prompts of {settings.prompt_words} words; capacity {capacity:.2f} requests/s; "
        f"offered {offered:.2f} requests/s ({offered / capacity:.1f}x) for {settings.seconds:.0f} s, "
        f"mix high/normal/low {'/'.join(f'{m:g}' for m in settings.mix)}",
        f"runtime: --queue-target-wait-s {settings.target_wait_s:g} --max-queue-wait-s {settings.max_wait_s:g} "
        f"--free-max-tokens-under-load {settings.free_cap} --high-priority-slots {settings.high_slots} "
        f"--high-priority-max-running {settings.high_max_running} (low priority comes from a free-tier key)",
        "not served: " + (", ".join(f"{k} x{v}" for k, v in sorted(reasons.items())) or "none"),
        f"goal: high p95 <= {GOAL_HIGH_RATIO:g}x unloaded: {ratio:.2f}x, "
        f"{'met' if ratio <= GOAL_HIGH_RATIO else 'NOT met'}",
        f"goal: low work shed with 503 + Retry-After: {len(low_shed)} of {len(low)} shed, "
        f"{sum(o.retry_after for o in low_shed)} with Retry-After, "
        f"{'met' if low_shed and all(o.retry_after for o in low_shed) else 'NOT met'}",
        f"goal: no unbounded wait: {over} admitted requests waited over {bound:g} s for a slot, the longest wait "
        f"(--max-queue-wait-s {settings.max_wait_s:g}) plus one service time, which bounds a request paused for "
        f"high-priority work after it had waited ({over_max_wait} waited over {max_wait_bucket:g} s; the server's "
        f"histogram); the longest 503 came after {longest_shed:.1f} s, the longest request took {longest:.1f} s "
        f"end to end: {'met' if over == 0 else 'NOT met'}",
    ]
    print_table("Overload: 3x capacity with mixed priorities", headers_, rows, notes)


def main(argv: Sequence[str]) -> int:
    settings = parse_args(argv)
    keys = ",".join(":".join(k) for k in KEYS.values())
    prompts = prompt_texts(400, words=settings.prompt_words)
    with runtime_server("--model", settings.model, "--max-batch-size", str(settings.max_batch_size),
                        "--max-queue-depth", "512", "--max-queue-wait-s", str(settings.max_wait_s),
                        "--queue-target-wait-s", str(settings.target_wait_s),
                        "--free-max-tokens-under-load", str(settings.free_cap),
                        "--high-priority-slots", str(settings.high_slots),
                        "--high-priority-max-running", str(settings.high_max_running), "--api-keys", keys,
                        name="overload") as url:
        progress("measuring capacity")
        capacity = measure_capacity(url, settings, prompts[0])
        progress(f"capacity {capacity:.2f} requests/s; timing {settings.unloaded_requests} unloaded high requests")
        unloaded = measure_unloaded(url, settings, prompts[1])
        plan = arrivals(settings, settings.load * capacity)
        progress(f"offering {len(plan)} requests over {settings.seconds:.0f} s")
        outcomes = offer(url, settings, plan, prompts[2:])
        service_s = settings.max_batch_size / capacity
        waits = queue_waits_over(url, Path(settings.model).name, (settings.max_wait_s, settings.max_wait_s + service_s))
    report(settings, capacity, unloaded, outcomes, waits)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
