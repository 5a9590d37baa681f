"""Retries of a transient failure, capped, with jittered exponential backoff.

Only an attempt that failed transiently (``ApiError.transient``: an upstream's dropped connection,
timeout or 502/503/504) *before its first output* is started again: once a token has reached the
client a retry would repeat it, and a 4xx or a validation error would only fail again. A retry is
also skipped once the model's breaker is no longer closed: a probe's failure must reopen it, and
retrying into an open breaker is what the breaker is there to stop.

``RetryingGeneration`` looks like the ``Generation`` it wraps, so the HTTP layer and the job runner
read one stream of outputs however many attempts it took, and one request makes one event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from inference.admission import Pausable
from inference.backends import Generation, Output, Prepared
from inference.backoff import backoff_s
from inference.breaker import CircuitBreaker
from inference.engine.engine import GenerationResult
from inference.errors import ApiError

if TYPE_CHECKING:
    from inference.runtime import Backend, Runtime

MAX_BACKOFF_S = 10.0


def start_with_retries(runtime: Runtime, backend: Backend, prepared: Prepared) -> RetryingGeneration:
    """Start ``prepared`` on ``backend`` with the runtime's retry policy and the model's breaker."""
    breakers = runtime.breakers
    return RetryingGeneration(lambda: backend.start(prepared), breakers.of(backend.name),
                              retries=runtime.config.upstream_retries,
                              backoff_base_s=runtime.config.upstream_retry_backoff_s,
                              on_retry=lambda: breakers.retries_total.update([backend.name]))


class RetryingGeneration:
    def __init__(self, start: Callable[[], Generation], breaker: CircuitBreaker, *, retries: int,
                 backoff_base_s: float, on_retry: Callable[[], None] = lambda: None) -> None:
        self._start = start
        self._breaker = breaker
        self._retries = retries
        self._backoff_base_s = backoff_base_s
        self._on_retry = on_retry
        self._gen = start()  # raises as the backend does when it cannot start at all
        self._started_output = False
        self._cancelled = False
        self._ended: GenerationResult | ApiError | None = None
        self.attempts = 1

    async def next(self) -> Output:
        output = self._seen(await self._gen.next())
        while not self._started_output and self._should_retry(output):
            self._breaker.record(None, ok=False)  # this attempt's failure; the last one counts with the event
            if self._breaker.state != "closed":
                break
            self._on_retry()
            await asyncio.sleep(backoff_s(self.attempts, base_s=self._backoff_base_s, cap_s=MAX_BACKOFF_S))
            if self._cancelled:
                break
            self.attempts += 1
            self._gen, self._ended = self._start(), None
            output = self._seen(await self._gen.next())
        self._started_output = True
        return output

    def _seen(self, output: Output) -> Output:
        if isinstance(output, GenerationResult | ApiError):
            self._ended = output  # the current attempt's last word, even if cancelled while backing off
        return output

    def _should_retry(self, output: Output) -> bool:
        return (isinstance(output, ApiError) and output.transient and not self._cancelled
                and self.attempts <= self._retries and self._breaker.state == "closed")

    def cancel(self) -> None:
        self._cancelled = True
        self._gen.cancel()

    @property
    def pausable(self) -> Pausable | None:
        """The first attempt's pausable work: only the local engine's is, and it is never retried."""
        return self._gen.pausable

    async def result(self) -> GenerationResult | ApiError:
        """Read until the end, discarding text: used to account for a cancelled request."""
        if self._ended is not None:
            return self._ended
        return await self._gen.result()
