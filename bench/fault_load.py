"""The load a fault scenario runs under: chat completions, JSON and streamed, each with a unique
OpenAI ``user`` (stored as the event's ``end_user``), remembering what each one got back.

A request is *answered* when the runtime gave it a whole HTTP answer: the body of a JSON answer,
or a stream through ``data: [DONE]``; the runtime recorded an event for it, so it must be stored
exactly once. It is *complete* when that answer is a 200 with choices and no error in the stream.
A request with no whole answer (refused connection, a stream cut off by a kill) is *unanswered*:
nothing can be owed for it. Requests go out at a steady rate from a few concurrent clients (on one
asyncio loop in a thread of this process) until ``stop``; ``pause`` holds new ones back.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx

MODEL = "tiny-random"
FEATURE = "faults"
REQUEST_TIMEOUT_S = 60.0
_RETRY_PAUSE_S = 0.1  # after a request got no answer, so a dead runtime is not hammered


@dataclass(frozen=True)
class LoadShape:
    """What the requests look like: every ``stream_every``-th one streams (1: all of them)."""

    stream_every: int = 2
    max_tokens: int = 16
    stream_max_tokens: int = 16


@dataclass(frozen=True)
class Outcome:
    user: str
    stream: bool
    status: int | None  # None: no HTTP answer at all
    answered: bool
    complete: bool
    at: float  # time.monotonic() when the request ended


class Load:
    """Requests to ``base_url`` as API key ``key``, ``rate_per_s`` of them a second from
    ``concurrency`` clients, users named ``{tag}-00001`` on."""

    def __init__(self, base_url: str, *, key: str, tag: str, rate_per_s: float, concurrency: int,
                 shape: LoadShape) -> None:
        self.tag = tag
        self._base_url = base_url
        self._headers = {"Authorization": f"Bearer {key}", "X-Wattson-Feature": FEATURE}
        self._interval_s = 1.0 / rate_per_s
        self._concurrency = concurrency
        self._shape = shape
        self._lock = threading.Lock()
        self._outcomes: list[Outcome] = []
        self._sent = 0
        self._streaming = 0  # streams that sent their first chunk and have not ended
        self._running = threading.Event()
        self._running.set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._schedule_start = 0.0

    # -- control, from the scenario's thread ---------------------------------------------------

    def start(self) -> None:
        self._schedule_start = time.monotonic()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name=f"load-{self.tag}",
                                        daemon=True)
        self._thread.start()

    def pause(self) -> None:
        """Start no new request until ``resume`` (those in flight go on)."""
        self._running.clear()

    def resume(self) -> None:
        with self._lock:  # go on at the rate from here, not in a burst to catch up
            self._schedule_start = time.monotonic() - self._sent * self._interval_s
        self._running.set()

    def stop(self) -> None:
        """Send no more; wait for the requests in flight to end."""
        self._stopping = True
        self._running.set()
        if self._thread is not None:
            self._thread.join(REQUEST_TIMEOUT_S + 10)

    # -- what happened -------------------------------------------------------------------------

    @property
    def outcomes(self) -> list[Outcome]:
        with self._lock:
            return list(self._outcomes)

    def answered_users(self) -> set[str]:
        return {o.user for o in self.outcomes if o.answered}

    def streams_in_flight(self) -> int:
        return self._streaming

    def wait_answered(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.answered_users()) < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    # -- the clients ---------------------------------------------------------------------------

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=self._concurrency, max_keepalive_connections=self._concurrency)
        async with httpx.AsyncClient(base_url=self._base_url, headers=self._headers, limits=limits,
                                     timeout=REQUEST_TIMEOUT_S) as client:
            await asyncio.gather(*(self._client_loop(client) for _ in range(self._concurrency)))

    async def _client_loop(self, client: httpx.AsyncClient) -> None:
        while True:
            while not self._running.is_set():
                await asyncio.sleep(0.02)
            if self._stopping:
                return
            with self._lock:
                self._sent += 1
                number = self._sent
                due = self._schedule_start + (number - 1) * self._interval_s
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            stream = number % self._shape.stream_every == 0
            outcome = await self._request(client, number, stream)
            with self._lock:
                self._outcomes.append(outcome)
            if not outcome.answered:
                await asyncio.sleep(_RETRY_PAUSE_S)

    async def _request(self, client: httpx.AsyncClient, number: int, stream: bool) -> Outcome:
        user = f"{self.tag}-{number:05d}"
        body: dict[str, Any] = {
            "model": MODEL, "user": user, "temperature": 0.0, "ignore_eos": True, "stream": stream,
            "max_tokens": self._shape.stream_max_tokens if stream else self._shape.max_tokens,
            # Unique prompts: every request misses the response cache and asks Redis for it.
            "messages": [{"role": "user", "content": f"fault scenario {self.tag}, request {number}"}],
        }
        status: int | None = None
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                status = response.status_code
                if stream and status == 200:
                    answered, complete = await self._read_stream(response)
                else:
                    data = json.loads(await response.aread())
                    answered, complete = True, status == 200 and bool(data.get("choices"))
        except (httpx.HTTPError, ValueError):
            answered = complete = False
        return Outcome(user, stream, status, answered, complete, time.monotonic())

    async def _read_stream(self, response: httpx.Response) -> tuple[bool, bool]:
        """(answered, complete) for a streamed 200: answered once ``[DONE]`` arrived."""
        failed = started = False
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if not started:
                    started = True
                    self._streaming += 1
                if data == "[DONE]":
                    return True, not failed
                failed = failed or "error" in json.loads(data)
            return False, False
        finally:
            if started:
                self._streaming -= 1
