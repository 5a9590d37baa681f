"""Fairness: two backlogged tenants with different request sizes and one light tenant, under fair
share (VTC) and under first come, first served, in the same run.

Each mode runs its own real server (``python -m inference serve``, ``--fair-share on`` / ``off``),
every request a greedy completion of exactly its ``max_tokens`` (EOS ignored), all three tenants on
standard-tier keys, normal priority:

1. unloaded — the light tenant's requests one at a time: the latency the loaded run is held to;
2. loaded — tenants ``heavy`` (``--heavy-tokens`` a request) and ``small`` (``--small-tokens``) each
   keep ``--backlog`` requests outstanding (closed loops, so both stay backlogged with
   ``--max-batch-size`` slots), while ``light`` sends one request at a time with a pause between.

Service is read from the server's ``wattson_tenant_tokens_served_total`` every ``--poll-s``: prompt
tokens when a request starts and completion tokens as they are generated, so it is the service
received up to that moment, as the VTC paper counts it. The gap between the backlogged tenants is
``|served(heavy) − served(small)|`` since the load started; the VTC bound (Sheng et al., OSDI 2024,
Theorem 4.3) for two backlogged clients is ``2 · max(w_p · L_input, w_q · M)`` with weights 1,
``L_input`` the longest prompt in tokens and ``M`` the most tokens a running batch holds: here
``slots × (L_input + heavy max_tokens)``. The table shows the gap over time for both modes, the light
tenant's p50/p95 against its unloaded figures, and each mode's total tokens/s.

    python -m bench fairness [--quick] [--model smollm2] [--seconds 40] [--backlog 12] [--rounds 1] ...
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.prompts import prompt_texts
from bench.report import percentile, print_table, progress
from bench.servers import runtime_server

TENANTS = {"heavy": "sk-bench-heavy-0001", "small": "sk-bench-small-0002", "light": "sk-bench-light-0003"}
GOAL_LIGHT_RATIO = 2.0
GOAL_LIGHT_SLACK_S = 0.25
GOAL_THROUGHPUT_SHARE = 0.95


@dataclass(frozen=True)
class Settings:
    model: str
    max_batch_size: int
    heavy_tokens: int
    small_tokens: int
    light_tokens: int
    prompt_words: int
    backlog: int
    seconds: float
    warmup_s: float
    light_pause_s: float
    unloaded_requests: int
    poll_s: float
    rounds: int


@dataclass
class Run:
    """One mode's loaded phase: the light tenant's latencies, service polled over time, failures."""

    mode: str
    light_latencies_s: list[float] = field(default_factory=list)
    polls: list[tuple[float, dict[str, float]]] = field(default_factory=list)  # (seconds since start, served)
    failures: dict[str, int] = field(default_factory=dict)
    unloaded_s: list[float] = field(default_factory=list)
    longest_prompt: int = 0

    def served_since_start(self, at_index: int) -> dict[str, float]:
        start = self.polls[0][1]
        return {t: self.polls[at_index][1].get(t, 0.0) - start.get(t, 0.0) for t in TENANTS}

    def gap(self, at_index: int) -> float:
        served = self.served_since_start(at_index)
        return abs(served["heavy"] - served["small"])

    def tokens_and_seconds(self) -> tuple[float, float]:
        return sum(self.served_since_start(len(self.polls) - 1).values()), self.polls[-1][0] - self.polls[0][0]

    def max_gap(self) -> float:
        return max(self.gap(i) for i in range(len(self.polls)))


@dataclass
class Rounds:
    """One mode's runs (``--rounds``, alternating with the other mode's), taken together."""

    mode: str
    runs: list[Run]

    @property
    def unloaded_s(self) -> list[float]:
        return [s for run in self.runs for s in run.unloaded_s]

    @property
    def light_latencies_s(self) -> list[float]:
        return [s for run in self.runs for s in run.light_latencies_s]

    @property
    def longest_prompt(self) -> int:
        return max(run.longest_prompt for run in self.runs)

    def failures(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for run in self.runs:
            for key, count in run.failures.items():
                total[key] = total.get(key, 0) + count
        return total

    def tokens_per_s(self) -> float:
        tokens, seconds = (sum(x) for x in zip(*(run.tokens_and_seconds() for run in self.runs), strict=True))
        return tokens / seconds if seconds > 0 else 0.0

    def max_gap(self) -> float:
        return max(run.max_gap() for run in self.runs)


def parse_args(argv: Sequence[str]) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m bench fairness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny-random model, 8 s a mode (checks the script)")
    parser.add_argument("--model", help="smollm2 (default), tiny-random (default with --quick) or a directory")
    parser.add_argument("--max-batch-size", type=int, default=4, help="running slots (default 4)")
    parser.add_argument("--heavy-tokens", type=int, default=64, help="the heavy tenant's tokens a request (64)")
    parser.add_argument("--small-tokens", type=int, default=16, help="the small tenant's tokens a request (16)")
    parser.add_argument("--light-tokens", type=int, default=16, help="the light tenant's tokens a request (16)")
    parser.add_argument("--prompt-words", type=int, default=12, help="words per prompt (default 12)")
    parser.add_argument("--backlog", type=int, default=12, help="requests each backlogged tenant keeps outstanding")
    parser.add_argument("--seconds", type=float, help="length of each mode's loaded phase (default 40)")
    parser.add_argument("--warmup-s", type=float, help="load before the light tenant starts (default 3)")
    parser.add_argument("--light-pause-s", type=float, default=0.2, help="pause between light requests (0.2)")
    parser.add_argument("--unloaded-requests", type=int, help="light requests timed alone (default 15)")
    parser.add_argument("--poll-s", type=float, default=0.25, help="how often service is read (default 0.25)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of the two modes, alternating VTC, FIFO, VTC, ... (default 1): on a shared "
                             "machine more rounds spread others' load over both modes")
    args = parser.parse_args(argv)
    quick = args.quick
    return Settings(
        model=args.model or ("tiny-random" if quick else "smollm2"), max_batch_size=args.max_batch_size,
        heavy_tokens=args.heavy_tokens, small_tokens=args.small_tokens, light_tokens=args.light_tokens,
        prompt_words=args.prompt_words, backlog=args.backlog, seconds=args.seconds or (8.0 if quick else 40.0),
        warmup_s=args.warmup_s if args.warmup_s is not None else (1.0 if quick else 3.0),
        light_pause_s=args.light_pause_s, unloaded_requests=args.unloaded_requests or (5 if quick else 15),
        poll_s=args.poll_s, rounds=max(1, args.rounds),
    )


def body(settings: Settings, prompt: str, max_tokens: int) -> dict[str, Any]:
    return {"model": settings.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True}


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TENANTS[tenant]}"}


def served(text: str) -> dict[str, float]:
    """Each tenant's tokens served, from a /metrics page."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("wattson_tenant_tokens_served_total{"):
            tenant = line.split('tenant="', 1)[1].split('"', 1)[0]
            totals[tenant] = float(line.rsplit(" ", 1)[1])
    return totals


async def measure(url: str, settings: Settings, mode: str, prompts: list[str]) -> Run:
    run = Run(mode)
    tokens = {"heavy": settings.heavy_tokens, "small": settings.small_tokens, "light": settings.light_tokens}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
        counter = iter(range(10**9))

        async def one(tenant: str) -> float | None:
            prompt = prompts[next(counter) % len(prompts)]
            sent = time.perf_counter()
            response = await client.post("/v1/completions", json=body(settings, prompt, tokens[tenant]),
                                         headers=auth(tenant))
            if response.status_code != 200:
                key = f"{tenant} {response.status_code}"
                run.failures[key] = run.failures.get(key, 0) + 1
                return None
            run.longest_prompt = max(run.longest_prompt, response.json()["usage"]["prompt_tokens"])
            return time.perf_counter() - sent

        progress(f"{mode}: timing {settings.unloaded_requests} unloaded light requests")
        for _ in range(settings.unloaded_requests + 1):
            latency = await one("light")
            if latency is not None:
                run.unloaded_s.append(latency)
        run.unloaded_s = run.unloaded_s[1:]  # the first one warms the server up

        stop = asyncio.Event()

        async def backlogged(tenant: str) -> None:
            while not stop.is_set():
                await one(tenant)

        async def light() -> None:
            await asyncio.sleep(settings.warmup_s)
            while not stop.is_set():  # a request sent before the end counts, however long it then takes
                latency = await one("light")
                if latency is not None:
                    run.light_latencies_s.append(latency)
                await asyncio.sleep(settings.light_pause_s)

        async def poll() -> None:
            started = time.perf_counter()
            while not stop.is_set():
                text = (await client.get("/metrics")).text
                run.polls.append((time.perf_counter() - started, served(text)))
                await asyncio.sleep(settings.poll_s)

        progress(f"{mode}: loading for {settings.seconds:.0f} s")
        workers = [asyncio.create_task(backlogged(t)) for t in ("heavy", "small") for _ in range(settings.backlog)]
        await asyncio.sleep(0.5)  # both tenants backlogged before service is counted
        tasks = [asyncio.create_task(poll()), asyncio.create_task(light())]
        await asyncio.sleep(settings.seconds)
        stop.set()
        await asyncio.gather(*tasks)
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return run


def vtc_bound(settings: Settings, longest_prompt: int) -> float:
    """2 · max(w_p · L_input, w_q · M), weights 1, M = slots × (L_input + the heavy tenant's tokens)."""
    batch_tokens = settings.max_batch_size * (longest_prompt + settings.heavy_tokens)
    return 2.0 * max(longest_prompt, batch_tokens)


def report(settings: Settings, fair_rounds: Rounds, fifo_rounds: Rounds) -> bool:
    bound = vtc_bound(settings, max(fair_rounds.longest_prompt, fifo_rounds.longest_prompt))
    fair, fifo = fair_rounds.runs[0], fifo_rounds.runs[0]
    rows = []
    marks = sorted({min(range(len(fair.polls)), key=lambda i: abs(fair.polls[i][0] - s))
                    for s in [settings.seconds * k / 8 for k in range(1, 9)]})
    for i in marks:
        at = fair.polls[i][0]
        j = min(range(len(fifo.polls)), key=lambda k: abs(fifo.polls[k][0] - at))
        f, g = fair.served_since_start(i), fifo.served_since_start(j)
        rows.append([f"{at:.0f}", f["heavy"], f["small"], fair.gap(i), g["heavy"], g["small"], fifo.gap(j), bound])
    print_table("Fairness: service of the two backlogged tenants since the load started (tokens; first round)",
                ["s", "VTC heavy", "VTC small", "VTC gap", "FIFO heavy", "FIFO small", "FIFO gap", "VTC bound"], rows)

    light_rows = []
    for mode in (fair_rounds, fifo_rounds):
        light = mode.light_latencies_s
        light_rows.append([mode.mode, len(mode.unloaded_s), percentile(mode.unloaded_s, 50) * 1000,
                           percentile(mode.unloaded_s, 95) * 1000, len(light),
                           percentile(light, 50) * 1000 if light else None,
                           percentile(light, 95) * 1000 if light else None, mode.tokens_per_s(),
                           ", ".join(f"{k} x{v}" for k, v in sorted(mode.failures().items())) or "none"])
    fair_gap, fifo_gap = fair_rounds.max_gap(), fifo_rounds.max_gap()
    # Both servers timed the same unloaded requests: the lower p95 is the stricter baseline (on a
    # shared machine either may have been slowed by others' load).
    unloaded_p95 = min(percentile(fair_rounds.unloaded_s, 95), percentile(fifo_rounds.unloaded_s, 95))
    light = fair_rounds.light_latencies_s
    light_p95 = percentile(light, 95) if light else float("inf")
    light_goal = GOAL_LIGHT_RATIO * unloaded_p95 + GOAL_LIGHT_SLACK_S
    fair_rate, fifo_rate = fair_rounds.tokens_per_s(), fifo_rounds.tokens_per_s()
    share = fair_rate / fifo_rate if fifo_rate else float("nan")
    goals = [
        ("light p95 under load <= 2x unloaded p95 + 0.25 s (the lower of the two servers' unloaded p95)",
         f"{light_p95 * 1000:.0f} ms vs {light_goal * 1000:.0f} ms", light_p95 <= light_goal),
        ("backlogged tenants' service gap within the VTC bound", f"max {fair_gap:.0f} vs {bound:.0f} tokens "
         f"(FIFO: max {fifo_gap:.0f})", fair_gap <= bound),
        ("total throughput within 5% of FIFO's", f"{fair_rate:.0f} vs {fifo_rate:.0f} tokens/s ({share:.1%})",
         share >= GOAL_THROUGHPUT_SHARE),
    ]
    notes = [
        f"model {settings.model}, {settings.max_batch_size} slots; heavy {settings.heavy_tokens} tokens a request, "
        f"small {settings.small_tokens}, light {settings.light_tokens} (greedy, EOS ignored), prompts of "
        f"{settings.prompt_words} words (longest {fair_rounds.longest_prompt} tokens); heavy and "
        f"small keep {settings.backlog} requests outstanding each; light sends one at a time, "
        f"{settings.light_pause_s:g} s apart, from {settings.warmup_s:g} s on; {settings.seconds:.0f} s a mode, "
        f"{settings.rounds} round(s) of each, alternating",
        *[f"goal: {what}: {figure}: {'met' if ok else 'NOT met'}" for what, figure, ok in goals],
    ]
    print_table("Fairness: the light tenant's latency and total throughput",
                ["mode", "unloaded n", "unloaded p50 ms", "unloaded p95 ms", "loaded n", "loaded p50 ms",
                 "loaded p95 ms", "tokens/s", "not served"], light_rows, notes)
    return all(ok for _, _, ok in goals)


def main(argv: Sequence[str]) -> int:
    settings = parse_args(argv)
    keys = ",".join(f"{key}:{tenant}:standard" for tenant, key in TENANTS.items())
    prompts = prompt_texts(400, words=settings.prompt_words)
    runs: dict[str, Rounds] = {"VTC": Rounds("VTC", []), "FIFO": Rounds("FIFO", [])}
    for round_ in range(settings.rounds):
        for mode, flag in (("VTC", "on"), ("FIFO", "off")):
            with runtime_server("--model", settings.model, "--max-batch-size", str(settings.max_batch_size),
                                "--max-queue-depth", "512", "--max-queue-wait-s", "600", "--fair-share", flag,
                                "--api-keys", keys, name=f"fairness-{flag}-{round_ + 1}") as url:
                runs[mode].runs.append(asyncio.run(measure(url, settings, mode, prompts)))
    report(settings, runs["VTC"], runs["FIFO"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
