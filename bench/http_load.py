"""Load generators over HTTP: concurrent streaming completions, and a closed loop of plain requests.

Both run on one asyncio loop in the benchmark's process with ``httpx.AsyncClient`` over kept-alive
connections, so the client's own cost is the same whichever server it is pointed at.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from bench.servers import BENCH_KEY
from inference.sse import sse_data

AUTH = {"Authorization": f"Bearer {BENCH_KEY}"}


class LoadError(RuntimeError):
    """The server answered something other than what the benchmark counts as a success."""


@dataclass(frozen=True)
class StreamOutcome:
    sent_at: float
    first_text_at: float | None
    finished_at: float
    completion_tokens: int

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_text_at is None else self.first_text_at - self.sent_at


@dataclass(frozen=True)
class StreamBurst:
    """What concurrent streaming clients got, from the first request sent to the last stream's end."""

    started_at: float
    outcomes: list[StreamOutcome]

    @property
    def completion_tokens(self) -> int:
        return sum(o.completion_tokens for o in self.outcomes)

    @property
    def seconds(self) -> float:
        return max(o.finished_at for o in self.outcomes) - self.started_at

    def ttfts(self) -> list[float]:
        return [o.ttft_s for o in self.outcomes if o.ttft_s is not None]


@dataclass(frozen=True)
class ClosedLoopResult:
    latencies_s: list[float]
    seconds: float
    errors: int

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies_s) / self.seconds if self.seconds > 0 else 0.0


def completion_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """A streamed greedy completion of exactly ``max_tokens`` tokens, with usage at the end."""
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


def stream_burst(base_url: str, bodies: Sequence[dict[str, Any]], *, requests_per_client: int = 1) -> StreamBurst:
    """One client per body, all at once; each sends its body ``requests_per_client`` times in turn."""
    return asyncio.run(_stream_burst(base_url, bodies, requests_per_client))


async def _stream_burst(base_url: str, bodies: Sequence[dict[str, Any]], requests_per_client: int) -> StreamBurst:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=base_url, headers=AUTH, limits=limits, timeout=600) as client:

        async def client_loop(body: dict[str, Any]) -> list[StreamOutcome]:
            return [await _stream_one(client, body) for _ in range(requests_per_client)]

        started = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(body) for body in bodies))
    return StreamBurst(started, [o for outcomes in per_client for o in outcomes])


async def _stream_one(client: httpx.AsyncClient, body: dict[str, Any]) -> StreamOutcome:
    sent = time.perf_counter()
    first_text: float | None = None
    tokens: int | None = None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise LoadError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for data in sse_data(response):
            chunk = json.loads(data)
            if "error" in chunk:
                raise LoadError(f"error in stream: {chunk['error']}")
            if first_text is None and any(c.get("text") for c in chunk.get("choices") or ()):
                first_text = time.perf_counter()
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    if tokens is None:
        raise LoadError("the stream ended without usage")
    return StreamOutcome(sent, first_text, time.perf_counter(), tokens)


def closed_loop(url: str, body: dict[str, Any], *, headers: dict[str, str], concurrency: int,
                requests: int) -> ClosedLoopResult:
    """``concurrency`` workers each send the next request as soon as their last one is answered,
    until ``requests`` have been sent; every answer but a 200 counts as an error."""
    return asyncio.run(_closed_loop(url, body, headers, concurrency, requests))


async def _closed_loop(url: str, body: dict[str, Any], headers: dict[str, str], concurrency: int,
                       requests: int) -> ClosedLoopResult:
    latencies: list[float] = []
    errors = 0
    remaining = requests
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=60) as client:

        async def worker() -> None:
            nonlocal remaining, errors
            while remaining > 0:
                remaining -= 1
                sent = time.perf_counter()
                response = await client.post(url, json=body)
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - sent)
                else:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return ClosedLoopResult(latencies, seconds, errors)
