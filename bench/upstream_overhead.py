"""What upstream mode adds: the runtime in front of an instant upstream, against that upstream alone.

Three processes: an instant OpenAI-compatible stub (``bench.stub_server``), the real runtime
(``python -m inference serve --upstream stub=URL``, with an API key), and this one, which runs a
closed loop of ``--concurrency`` workers sending non-streamed chat completions (a few tokens each)
either straight to the stub or through the runtime. Rounds alternate direct and via-runtime so
drift in a busy machine hits both alike; latencies are pooled over the rounds.

The difference between the two is what the runtime costs a request on its way: authentication,
validation, admission, the proxying itself, measurement and the event it records.

    python -m bench upstream_overhead [--quick] [--concurrency 8] [--requests 2000] [--rounds 4]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.http_load import AUTH, ClosedLoopResult, closed_loop
from bench.report import percentile, print_table, progress
from bench.servers import runtime_server, stub_server

UPSTREAM_NAME = "stub"
GOAL_ADDED_P50_MS = 10.0


@dataclass(frozen=True)
class Settings:
    concurrency: int
    requests: int
    warmup: int
    rounds: int
    max_tokens: int


@dataclass
class Target:
    """One way to the stub (direct or via the runtime) and everything measured on it."""

    label: str
    url: str
    headers: dict[str, str]
    runs: list[ClosedLoopResult] = field(default_factory=list)

    @property
    def latencies_s(self) -> list[float]:
        return [t for run in self.runs for t in run.latencies_s]

    @property
    def errors(self) -> int:
        return sum(run.errors for run in self.runs)

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies_s) / sum(run.seconds for run in self.runs)


def parse_args(argv: Sequence[str]) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m bench upstream_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round of 100 requests each way")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    parser.add_argument("--requests", type=int, help="requests per round and way (default 2000)")
    parser.add_argument("--warmup", type=int, help="requests each way before measuring (default 200)")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 4)")
    parser.add_argument("--max-tokens", type=int, default=5, help="max_tokens asked for (default 5)")
    args = parser.parse_args(argv)
    return Settings(
        concurrency=args.concurrency,
        requests=args.requests or (100 if args.quick else 2000),
        warmup=args.warmup or (20 if args.quick else 200),
        rounds=args.rounds or (1 if args.quick else 4),
        max_tokens=args.max_tokens,
    )


def chat_body(max_tokens: int) -> dict[str, Any]:
    return {"model": UPSTREAM_NAME, "messages": [{"role": "user", "content": "Say hello in five words."}],
            "max_tokens": max_tokens, "temperature": 0.0}


def load(path: Target, body: dict[str, Any], settings: Settings, requests: int) -> ClosedLoopResult:
    return closed_loop(path.url, body, headers=path.headers, concurrency=settings.concurrency, requests=requests)


def measure(paths: list[Target], body: dict[str, Any], settings: Settings) -> None:
    progress(f"warming up ({settings.warmup} requests each way)")
    for path in paths:
        load(path, body, settings, settings.warmup)
    for i in range(settings.rounds):
        for path in paths if i % 2 == 0 else reversed(paths):
            run = load(path, body, settings, settings.requests)
            path.runs.append(run)
            progress(f"round {i + 1}/{settings.rounds} {path.label}: {run.requests_per_s:.0f} req/s, "
                     f"p50 {percentile(run.latencies_s, 50) * 1000:.2f} ms, {run.errors} errors")


def report(settings: Settings, direct: Target, via: Target) -> None:
    headers = ["path", "requests", "errors", "p50 ms", "p95 ms", "p99 ms", "req/s"]
    rows = [[p.label, len(p.latencies_s), p.errors, *(_ms2(percentile(p.latencies_s, q)) for q in (50, 95, 99)),
             p.requests_per_s] for p in (direct, via)]
    added = {q: (percentile(via.latencies_s, q) - percentile(direct.latencies_s, q)) for q in (50, 95)}
    verdict = "met" if added[50] * 1000 < GOAL_ADDED_P50_MS else "NOT met"
    notes = [
        f"concurrency {settings.concurrency}, non-streamed chat completions (max_tokens {settings.max_tokens}), "
        f"{settings.rounds} alternating round(s) of {settings.requests} requests each way after "
        f"{settings.warmup} warm-up requests",
        f"added by the runtime: p50 {_ms2(added[50])} ms, p95 {_ms2(added[95])} ms; "
        f"throughput {via.requests_per_s / direct.requests_per_s:.0%} of direct",
        f"goal: < {GOAL_ADDED_P50_MS:.0f} ms p50 added at concurrency 8: {verdict}",
    ]
    print_table("Upstream mode overhead: runtime in front of an instant upstream", headers, rows, notes)


def _ms2(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def main(argv: Sequence[str]) -> int:
    settings = parse_args(argv)
    body = chat_body(settings.max_tokens)
    with stub_server("upstream stub") as upstream, \
            runtime_server("--upstream", f"{UPSTREAM_NAME}={upstream}", name="runtime") as runtime:
        direct = Target("direct to stub", upstream + "/v1/chat/completions", {})
        via = Target("via runtime", runtime + "/v1/chat/completions", AUTH)
        measure([direct, via], body, settings)
    if direct.errors or via.errors:
        progress(f"errors: {direct.errors} direct, {via.errors} via the runtime")
    report(settings, direct, via)
    return 0 if not via.errors else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
