"""Device time attributed to an upstream's requests against the upstream's busy time, in front of a
real engine: llama.cpp's ``llama-server`` serving SmolLM2 Q4_1 on this machine's CPU.

Four processes: ``llama-server`` (``bench.llama_server``, built once from source; skipped with the
reason when it cannot be built), the runtime in upstream mode (``--upstream smollm2=URL/v1``,
exporting its events), a collector (``bench.stub_server``) that keeps each event's device figures,
and this one, which sends rounds of streamed completions at 1, 4 and 8 concurrent streams (half of
them unstreamed, so both ways of reading tokens are used).

Per round it prints the sum of the events' ``gpu_seconds`` against two busy times: the runtime's
own (``wattson_upstream_busy_seconds_total``, what conservation makes them add up to exactly) and
the union of the clients' request intervals, measured here independently of the runtime (it is a
little longer: it includes the runtime's own time on each request). The goal: every event has
device seconds, and their sum is within 5% of the clients' busy time.

    python -m bench upstream_attribution [--quick] [--streams 1 4 8] [--requests-per-stream 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from bench.http_load import AUTH, LoadError
from bench.llama_server import LlamaServer, LlamaServerUnavailable, ensure, smollm2_gguf
from bench.prompts import prompt_texts
from bench.report import print_table, progress
from bench.servers import runtime_server, stub_server
from inference.sse import sse_data

UPSTREAM = "smollm2"
GOAL = 0.05


@dataclass(frozen=True)
class Settings:
    streams: list[int]
    requests_per_stream: int
    max_tokens: int


@dataclass(frozen=True)
class Round:
    streams: int
    intervals: list[tuple[float, float]]
    completion_tokens: int
    events: list[dict[str, Any]]
    runtime_busy_s: float

    @property
    def client_busy_s(self) -> float:
        return union_length(self.intervals)

    @property
    def attributed_s(self) -> float:
        return math.fsum(e["gpu_seconds"] or 0.0 for e in self.events)

    @property
    def measured_events(self) -> int:
        return sum(1 for e in self.events if e["gpu_seconds"] is not None)


def parse_args(argv: Sequence[str]) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m bench upstream_attribution", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 and 4 streams, 32 tokens")
    parser.add_argument("--streams", type=int, nargs="+", help="concurrent streams per round (default 1 4 8)")
    parser.add_argument("--requests-per-stream", type=int, help="requests each stream sends in turn (default 2)")
    parser.add_argument("--max-tokens", type=int, help="completion tokens per request (default 48)")
    args = parser.parse_args(argv)
    return Settings(streams=args.streams or ([1, 4] if args.quick else [1, 4, 8]),
                    requests_per_stream=args.requests_per_stream or 2,
                    max_tokens=args.max_tokens or (32 if args.quick else 48))


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def body(prompt: str, max_tokens: int, *, stream: bool) -> dict[str, Any]:
    return {"model": UPSTREAM, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": stream}


async def _one(client: httpx.AsyncClient, request: dict[str, Any]) -> tuple[float, float, int]:
    sent = time.perf_counter()
    tokens = 0
    if not request["stream"]:
        response = await client.post("/v1/completions", json=request)
        if response.status_code != 200:
            raise LoadError(f"HTTP {response.status_code}: {response.text[:300]}")
        return sent, time.perf_counter(), int(response.json()["usage"]["completion_tokens"])
    async with client.stream("POST", "/v1/completions", json=request) as response:
        if response.status_code != 200:
            raise LoadError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for data in sse_data(response):
            chunk = json.loads(data)
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    return sent, time.perf_counter(), tokens


async def _round(url: str, streams: int, settings: Settings) -> list[tuple[float, float, int]]:
    prompts = prompt_texts(streams)
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    async with httpx.AsyncClient(base_url=url, headers=AUTH, limits=limits, timeout=600) as client:

        async def stream_loop(i: int) -> list[tuple[float, float, int]]:
            return [await _one(client, body(prompts[i], settings.max_tokens, stream=(i + n) % 2 == 0))
                    for n in range(settings.requests_per_stream)]

        done = await asyncio.gather(*(stream_loop(i) for i in range(streams)))
    return [r for results in done for r in results]


def runtime_busy_seconds(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    found = re.search(rf'^wattson_upstream_busy_seconds_total{{model="{UPSTREAM}"}} (\S+)$', text, re.MULTILINE)
    if found is None:
        raise LoadError("the runtime's /metrics has no wattson_upstream_busy_seconds_total")
    return float(found.group(1))


def collected(collector: str, count: int, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = httpx.get(collector + "/device-use", timeout=10).json()
        if len(rows) >= count:
            return list(rows)
        if time.monotonic() > deadline:
            raise LoadError(f"the collector has {len(rows)} events of {count} after {timeout_s:.0f} s")
        time.sleep(0.2)


def measure(url: str, collector: str, settings: Settings) -> list[Round]:
    rounds: list[Round] = []
    seen = 0
    asyncio.run(_round(url, 1, Settings([1], 1, 4)))  # warm-up: the model's first use
    seen = len(collected(collector, 1))
    for streams in settings.streams:
        busy_before = runtime_busy_seconds(url)
        results = asyncio.run(_round(url, streams, settings))
        busy_after = runtime_busy_seconds(url)
        events = collected(collector, seen + len(results))[seen:seen + len(results)]
        seen += len(results)
        one = Round(streams, [(s, e) for s, e, _ in results], sum(t for _, _, t in results), events,
                    busy_after - busy_before)
        progress(f"{streams} streams: {len(results)} requests, attributed {one.attributed_s:.2f} s, "
                 f"client busy {one.client_busy_s:.2f} s")
        rounds.append(one)
    return rounds


def report(settings: Settings, rounds: list[Round]) -> bool:
    rows = []
    ok = True
    for r in rounds:
        gap = r.attributed_s / r.client_busy_s - 1 if r.client_busy_s else math.nan
        within = r.measured_events == len(r.events) and abs(gap) <= GOAL
        ok = ok and within
        rows.append([r.streams, len(r.events), r.measured_events, r.completion_tokens / r.client_busy_s,
                     r.attributed_s, r.runtime_busy_s, r.client_busy_s, f"{gap:+.2%}", "yes" if within else "NO"])
    print_table(
        "Upstream attribution: events' device seconds against llama-server's busy time",
        ["streams", "events", "with device s", "tokens/s", "sum of events s", "runtime busy s", "client busy s",
         "events vs client", f"within {GOAL:.0%}"],
        rows,
        [f"llama-server (SmolLM2-135M Q4_1, {max(settings.streams)}+ slots, continuous batching) on this CPU; "
         f"{settings.requests_per_stream} completions of {settings.max_tokens} tokens per stream, every other one "
         "streamed",
         "runtime busy: the union of the runtime's in-flight intervals to the upstream (the events add up to it "
         "by construction); client busy: the union of this process's request intervals (the runtime's own time "
         "included)",
         f"goal: every event has device seconds and their sum is within {GOAL:.0%} of the busy time: "
         f"{'met' if ok else 'NOT met'}"])
    return ok


def main(argv: Sequence[str]) -> int:
    settings = parse_args(argv)
    try:
        binary = ensure()
        gguf = smollm2_gguf()
    except LlamaServerUnavailable as exc:
        print(f"skipped: llama-server cannot be built here: {exc}")
        return 0
    slots = max(8, max(settings.streams))
    with tempfile.TemporaryDirectory(prefix="bench-spool-") as spool, stub_server("collector") as collector, \
            LlamaServer(binary, gguf=gguf, alias=UPSTREAM, slots=slots) as upstream, \
            runtime_server("--upstream", f"{UPSTREAM}={upstream.url}/v1", "--finops-url", collector,
                           "--spool-dir", spool, "--export-interval-s", "0.2", "--upstream-retries", "0",
                           "--upstream-timeout-s", "900",
                           name="runtime-upstream") as url:
        rounds = measure(url, collector, settings)
    return 0 if report(settings, rounds) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
