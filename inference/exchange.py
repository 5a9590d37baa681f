"""One admitted attempt from its first output to its event (``Exchange``), and the streaming
response that accounts for it however the client leaves (``ExchangeStream``).

Streamed or collected, finished, failed or abandoned, an exchange frees its slot once and records
exactly one event. It reads its outputs within the request's deadline: past it, the work is stopped,
what it had spent is still counted, and the client gets a 504 (``inference.deadline``). Its queue
wait is written when the slot is freed (``release``), a cache replay's from ``NO_QUEUE``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi.responses import StreamingResponse

from inference.admission import NoQueue, Slot
from inference.backends import Output, Outputs
from inference.deadline import Deadline, DeadlineExceeded, deadline_error
from inference.engine.engine import GenerationResult, TokenDelta
from inference.errors import ApiError
from inference.measurement import RequestMeasurement
from inference.responses import SSE_DONE, CompletionResponse, finish_reason, sse_event

if TYPE_CHECKING:
    from inference.runtime import Runtime

SHUTTING_DOWN = ApiError(503, "The runtime is shutting down; try again shortly.", code="shutting_down",
                         retry_after_s=5)
ENGINE_FAILED = ApiError(500, "The engine failed while generating.", code="engine_error")


def release(m: RequestMeasurement, slot: Slot | NoQueue) -> None:
    """Give the request's slot back and complete its measurement's queue wait from it: the one way
    a slot is freed once its request has been admitted."""
    slot.release()
    m.slot_released(slot)


class ExchangeStream(StreamingResponse):
    """A stream that accounts for its exchange however it ends, even when the client leaves
    before the body iterator has started (when its own ``finally`` would never run)."""

    def __init__(self, exchange: Exchange, content: AsyncIterator[bytes], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._exchange = exchange

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._exchange.abandon()  # nothing to do once the event is recorded


class Exchange:
    """One admitted attempt from its first output to its event: streamed or collected, finished,
    expired or abandoned, it releases its slot once and records exactly one event."""

    def __init__(self, runtime: Runtime, m: RequestMeasurement, gen: Outputs, slot: Slot | NoQueue,
                 response: CompletionResponse, deadline: Deadline) -> None:
        self.runtime, self.m, self.gen, self.slot, self.response = runtime, m, gen, slot, response
        self.deadline = deadline
        self._settled = False
        self._recorded = False
        self._abandoned = False

    async def collect(self, first: Output) -> dict[str, Any]:
        output = first
        while not isinstance(output, GenerationResult):
            if isinstance(output, ApiError):
                self.close_with_error(output)
                raise output
            output = await self.next()
        self.close(output)
        if output.finish_reason == "error":
            raise ENGINE_FAILED
        if output.finish_reason == "cancelled":  # the engine stopped under a client still waiting
            raise SHUTTING_DOWN
        return self.response.body(output)

    async def sse(self, first: Output, *, include_usage: bool) -> AsyncIterator[bytes]:
        response = self.response
        try:
            if (opening := response.opening_chunk()) is not None:
                yield opening
            piece, output = response.piece, first
            while isinstance(output, TokenDelta):
                yield piece(output.text, None)
                output = await self.next()
            if isinstance(output, GenerationResult):
                self.settle(output)
                if output.finish_reason in ("error", "cancelled"):
                    failure = ENGINE_FAILED if output.finish_reason == "error" else SHUTTING_DOWN
                    yield sse_event(failure.body())
                else:
                    yield piece("", finish_reason(output))
                    if include_usage:
                        yield response.usage_chunk(output)
            else:  # an upstream failed mid-stream, or the deadline passed: say so in the stream, then end it
                self.settle_error(output)
                yield sse_event(output.body())
            # Recorded before the last byte leaves: a client that has read [DONE] has its event
            # recorded (and journaled), whatever happens to the process next.
            if not self._abandoned:
                self.m.t_end = time.perf_counter()  # the last content byte is with the server
            self.record()
            yield SSE_DONE
        finally:
            if not self._recorded:
                self.abandon()

    async def next(self) -> Output:
        """The next output, or the deadline's 504 once it has passed (the work stopped)."""
        try:
            return await self.deadline.bound(self.gen.next())
        except DeadlineExceeded:
            return self.expire("before the answer was complete")

    def expire(self, waiting_for: str) -> ApiError:
        """The deadline passed: stop the work, and return the error its client is to get at once.
        The attempt is recorded as a timeout with what it had spent once the backend has stopped
        (in a task of its own: the client does not wait for it, and cannot interrupt it)."""
        error = deadline_error(waiting_for)
        self._hand_off(lambda outcome: self._settle_error(
            error, spent=outcome if isinstance(outcome, GenerationResult) else None))
        return error

    def abandon(self, error_type: str = "client_disconnected") -> None:
        """The client went away (or the job was cancelled: ``error_type`` says which): stop the
        work, and record the event once the backend reports what it had spent (in a task of its
        own, since this may run inside a cancellation)."""
        if self._settled and not self._recorded and not self._abandoned:
            self._record()  # it had finished; the client left during the last chunks
            return

        def settle(outcome: GenerationResult | ApiError) -> None:
            if isinstance(outcome, ApiError):
                self._settle_error(outcome)
            else:
                self._settle(outcome)
            # Whatever the backend managed, the client never got it.
            self.m.fail("cancelled", 499, error_type)

        self._hand_off(settle)

    def _hand_off(self, settle: Callable[[GenerationResult | ApiError], None]) -> None:
        """Stop the work and leave its settling and its event to a task of its own, once the backend
        has reported what it spent; from here the exchange's own calls to settle or record do
        nothing. Once only: a second cancel would interrupt the backend's own clean-up (closing the
        upstream connection, say) while it runs."""
        if self._recorded or self._abandoned:
            return
        self._abandoned = True
        self.gen.cancel()

        async def account() -> None:
            settle(await self.gen.result())
            self._record()

        background(account())

    # The exchange's own path settles and records through these; once the work is handed off
    # (``expire``, ``abandon``) they do nothing and the hand-off's task does it.

    def settle(self, result: GenerationResult) -> None:
        """The work is over: free the slot and take the result into the measurement."""
        if not self._abandoned:
            self._settle(result)

    def settle_error(self, error: ApiError) -> None:
        if not self._abandoned:
            self._settle_error(error)

    def record(self) -> None:
        if not self._abandoned:
            self._record()

    def close(self, result: GenerationResult) -> None:
        self.settle(result)
        self.record()

    def close_with_error(self, error: ApiError) -> None:
        self.settle_error(error)
        self.record()

    def _settle(self, result: GenerationResult) -> None:
        if self._settled:
            return
        self._settled = True
        release(self.m, self.slot)
        if result.finish_reason == "error":
            self.m.fail("error", 500, "engine_error")
        elif result.finish_reason == "cancelled":
            self.m.fail("cancelled", 499, "client_disconnected")
        self.m.finish(result)

    def _settle_error(self, error: ApiError, *, spent: GenerationResult | None = None) -> None:
        """The attempt failed with ``error``: free the slot; ``spent`` is what the work had used."""
        if self._settled:
            return
        self._settled = True
        release(self.m, self.slot)
        self.m.fail("timeout" if error.status == 504 else "error", error.status, error.code)
        self.m.finish(spent)

    def _record(self) -> None:
        if not self._recorded:
            self._recorded = True
            self.runtime.record(self.m)


_tasks: set[asyncio.Task[Any]] = set()


def background(coro: Awaitable[Any]) -> asyncio.Task[Any]:
    """Run ``coro`` in a task of its own, kept until it is done."""
    task = asyncio.ensure_future(coro)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return task


