"""The serving pipeline behind the completion endpoints and the job runner.

A request is measured from the start (``RequestMeasurement``), admitted (the ``auto`` alias, the
rules, the cap under load, the response cache, the breaker's fallback chain, the backend's checks,
the reservation, the admission queue) and run as an ``Exchange``: streamed or collected, it frees
its slot once and records exactly one event, however it ends. Its queue wait is written when the
slot is freed (``_release``), a cache replay's from ``NO_QUEUE``. A refusal before it ran is
recorded too, with no queue wait. The routes (``inference.routes``) only hand requests over; the
OpenAI shapes of what comes back are ``inference.responses``'.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from inference.admission import NO_QUEUE, NoQueue, Shed, Slot, effective_priority
from inference.backends import LocalBackend, ObservedOutputs, Output, Outputs, Prepared, UpstreamBackend
from inference.cache import CACHE_HEADER
from inference.config import ApiKey, Tier
from inference.degradation import DEGRADED_HEADER, LOAD_CAP_RULE_ID, cap_under_load
from inference.engine.engine import GenerationResult, TokenDelta
from inference.errors import ApiError
from inference.fallback import CachedReplay, route_around_breaker
from inference.jobs import Attempt, Job
from inference.measurement import RequestMeasurement
from inference.request_parsing import parse_body, request_feature, request_priority
from inference.responses import SSE_DONE, CompletionResponse, finish_reason, sse_event
from inference.retries import start_with_retries
from inference.routing import ROUTE_HEADER
from inference.rules import Match, RuleRejection
from inference.runtime import Backend, Runtime
from inference.schemas import ChatCompletionRequest, CompletionRequest

T = TypeVar("T")

SHUTTING_DOWN = ApiError(503, "The runtime is shutting down; try again shortly.", code="shutting_down",
                         retry_after_s=5)
ENGINE_FAILED = ApiError(500, "The engine failed while generating.", code="engine_error")


async def serve_completion(runtime: Runtime, request: Request,
                           model_cls: type[ChatCompletionRequest] | type[CompletionRequest]) -> Response:
    """Answer a sync completion request: a JSON body, an SSE stream, an error, or a bare 499 for a
    client that went away; whichever, the request is recorded once."""
    key = runtime.authenticate(request.headers.get("authorization"))
    m = RequestMeasurement(runtime_id=runtime.config.runtime_id, tenant=key.tenant, api_key_id=key.key_id,
                           feature="default", priority="normal", model_requested="unknown")
    watcher: asyncio.Future[None] | None = None
    headers: dict[str, str] = {}  # what the runtime did to the request, for the client to see
    try:
        m.feature = request_feature(request)
        m.priority = effective_priority(request_priority(request), key.tier)
        body = await parse_body(request, model_cls)
        m.model_requested, m.end_user = body.model, body.user
        # Only once the body is read may a task listen for the client going away.
        watcher = asyncio.ensure_future(_disconnected(request))
        admitted = await _unless_gone(watcher, _admit(runtime, m, body, tier=key.tier, key=key, headers=headers))
    except (RuleRejection, Shed, ApiError) as exc:
        _stop(watcher)
        raise _refused(runtime, m, exc) from None
    except (_ClientGone, ClientDisconnect):
        _stop(watcher)
        m.fail("cancelled", 499, "client_disconnected")
        runtime.record(m)
        return Response(status_code=499)
    except Exception:  # a bug of ours: the client gets a 500, and the request is still counted
        _stop(watcher)
        m.fail("error", 500, "internal_error")
        runtime.record(m)
        raise
    except BaseException:  # cancelled: no event, but the reservations must not outlive the request
        _stop(watcher)
        runtime.settle(m)
        raise
    assert watcher is not None

    try:
        exchange = _exchange(runtime, m, admitted)
    except ApiError:
        _stop(watcher)
        raise
    try:
        first = await _unless_gone(watcher, exchange.gen.next())
    except _ClientGone:
        exchange.abandon()
        return Response(status_code=499)
    if isinstance(first, ApiError):
        watcher.cancel()
        exchange.close_with_error(first)
        raise first
    if body.stream:
        watcher.cancel()  # from here the streaming response notices a disconnect itself
        return ExchangeStream(exchange, exchange.sse(first, include_usage=body.include_usage()),
                              media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
    try:
        result = await _unless_gone(watcher, exchange.collect(first))
    except _ClientGone:
        exchange.abandon()
        return Response(status_code=499)
    finally:
        watcher.cancel()
    return JSONResponse(result, headers=headers)


async def run_job_attempt(runtime: Runtime, job: Job, attempt: Attempt) -> dict[str, Any]:
    """One attempt at a job, down the sync endpoints' path (rules, breaker, admission, retries,
    one request event); its text goes to ``attempt`` as it comes. Returns the response body the
    sync endpoint would have, or raises the ``ApiError`` it would have answered."""
    body = job.body()
    m = RequestMeasurement(runtime_id=runtime.config.runtime_id, tenant=job.tenant, api_key_id=job.api_key_id,
                           feature=job.feature, priority=job.priority, model_requested=body.model,
                           end_user=body.user)
    try:
        # Streamed from an upstream as well, so that the job's progress shows piece by piece.
        admitted = await _admit(runtime, m, body.model_copy(update={"stream": True}), tier=job.tier)
    except (RuleRejection, Shed, ApiError) as exc:
        raise _refused(runtime, m, exc) from None
    except asyncio.CancelledError:  # cancelled while queued: the attempt ends here, and says why
        m.fail("cancelled", 499, attempt.cancel_reason)
        runtime.record(m)
        raise
    exchange = _exchange(runtime, m, admitted, on_text=attempt.token)
    try:
        return await exchange.collect(await exchange.gen.next())
    except asyncio.CancelledError:  # the engine slot is freed once the backend has stopped
        exchange.abandon(error_type=attempt.cancel_reason)
        raise


class Admitted(NamedTuple):
    backend: Backend
    prepared: Prepared
    slot: Slot
    cache_key: str | None  # where its answer is to be kept (None: not cached)


async def _admit(runtime: Runtime, m: RequestMeasurement, body: ChatCompletionRequest | CompletionRequest, *,
                 tier: Tier, key: ApiKey | None = None, headers: dict[str, str] | None = None
                 ) -> Admitted | CachedReplay:
    """Route, check and queue a parsed request until it holds a running slot, or find its answer
    in the response cache: the ``auto`` alias, the rules, the cap under load, the cache, the
    breaker's fallback chain, the backend's checks, the reservation, admission. The sync endpoints
    and the job runner both come this way (jobs, with no ``key``, skip the response cache).
    ``headers`` gets what was done to the request, for its client to see."""
    headers = headers if headers is not None else {}
    route = runtime.router.route(body) if runtime.router is not None else None
    backend = runtime.backend(route.model if route is not None else body.model)
    if route is not None:
        m.route_reason, headers[ROUTE_HEADER] = route.reason, f"{route.reason}; {route.why}"
    # The rules act after authentication and before the queue: a refusal costs no slot.
    match = runtime.rules.match(m.tenant, m.feature, backend.name, runtime.backends)
    backend, cap = _routed(runtime, m, body, backend, match)
    default_max_tokens = runtime.config.default_max_tokens
    load_cap = cap_under_load(limit=runtime.config.free_max_tokens_under_load, tier=tier,
                              admission=backend.admission, asked=body.requested_max_tokens(), cap=cap,
                              default_max_tokens=default_max_tokens)
    if load_cap is not None:
        cap, headers[DEGRADED_HEADER] = load_cap, f"max_tokens_capped={load_cap}"
        m.rule_id = m.rule_id or LOAD_CAP_RULE_ID
    cache_key = None
    if runtime.cache is not None and key is not None:
        cache_key = runtime.cache.key_for(api_key=key, model=backend.name, body=body, max_tokens_cap=cap,
                                          default_max_tokens=default_max_tokens)
    if cache_key is not None:
        assert runtime.cache is not None
        hit = await runtime.cache.get(cache_key)
        headers[CACHE_HEADER] = "hit" if hit is not None else "miss"
        if hit is not None:  # answered again without a slot or an engine step
            m.cache_hit, m.model_served, m.device = True, backend.name, backend.device_label
            return CachedReplay(hit.replay(), backend.name, hit.kind)
    routed = await route_around_breaker(runtime, m, body, backend, max_tokens_cap=cap)
    if isinstance(routed, CachedReplay):
        return routed
    if routed is not backend:
        cache_key = None  # a fallback model's answer is not this model's
    backend = routed
    m.model_served, m.device = backend.name, backend.device_label
    backend.admission.shed_early(priority=m.priority, tier=tier)
    if isinstance(backend, LocalBackend):
        prepared = await asyncio.to_thread(backend.prepare, body, max_tokens_cap=cap)
    else:
        prepared = backend.prepare(body, max_tokens_cap=cap)
    if match is not None:
        # Checked and taken in one step: nothing awaits between them.
        m.reservation = runtime.rules.reserve(match, prompt_tokens=prepared.prompt_tokens_bound,
                                              max_tokens=prepared.params.max_tokens, model=backend.name)
    slot = await backend.admission.admit(priority=m.priority, tier=tier)
    return Admitted(backend, prepared, slot, cache_key)


def _routed(runtime: Runtime, m: RequestMeasurement, body: ChatCompletionRequest | CompletionRequest,
            backend: Backend, match: Match | None) -> tuple[Backend, int | None]:
    """The backend to serve from and the max_tokens cap, as the matching rules say."""
    if match is None:
        return backend, None
    if match.downgrade is not None and match.downgrade.model is not None:
        backend = runtime.backend(match.downgrade.model)
        m.route_reason, m.rule_id = "downgraded_by_rule", match.downgrade.id
    cap = match.max_tokens_cap
    asked = body.requested_max_tokens()
    if cap is not None and (asked is None or asked > cap) and m.rule_id is None:
        m.rule_id = match.cap.id if match.cap is not None else None
    if cap is None and asked is None and match.metered and isinstance(backend, UpstreamBackend):
        # An upstream's length is open-ended unless asked: bound it, so the worst case is known.
        cap = runtime.config.default_max_tokens
    return backend, cap


def _refused(runtime: Runtime, m: RequestMeasurement, exc: RuleRejection | Shed | ApiError) -> ApiError:
    """Record a request refused before it ran; return the error its client is to see."""
    if isinstance(exc, RuleRejection):
        m.rule_id = exc.rule_id
        m.fail(exc.event_status, exc.status, exc.code)  # type: ignore[arg-type]
        error = ApiError(exc.status, exc.message, code=exc.code, retry_after_s=exc.retry_after_s,
                         error_type=exc.error_type)
    elif isinstance(exc, Shed):
        m.fail("shed", 503, exc.reason)
        error = ApiError(503, str(exc), code=exc.reason, retry_after_s=exc.retry_after_s)
    else:
        m.fail("error", exc.status, exc.code)
        error = exc
    runtime.record(m)
    return error


def _exchange(runtime: Runtime, m: RequestMeasurement, admitted: Admitted | CachedReplay,
              on_text: Callable[[str], None] | None = None) -> Exchange:
    """Start an admitted request (retried on transient failures), or replay the cached answer
    given in its place; a stopping engine is a 503. ``on_text`` also gets the text as it comes."""
    slot: Slot | NoQueue
    if isinstance(admitted, CachedReplay):
        outputs, slot, model, kind = admitted.replay, NO_QUEUE, admitted.model, admitted.kind
    else:
        slot, model, kind = admitted.slot, admitted.backend.name, admitted.prepared.kind
        try:
            outputs = start_with_retries(runtime, admitted.backend, admitted.prepared)
        except RuntimeError:  # the engine is stopping: nothing was started, so nothing is lost
            _release(m, slot)
            m.fail("error", 503, "shutting_down")
            runtime.record(m)
            raise SHUTTING_DOWN from None
        if outputs.pausable is not None:
            slot.attach(outputs.pausable)  # high-priority work may preempt it
        if admitted.cache_key is not None and runtime.cache is not None:
            outputs = runtime.cache.recording(outputs, admitted.cache_key, kind=kind)
    if on_text is not None:
        def text_of(output: Output) -> None:
            if isinstance(output, TokenDelta) and output.text:
                on_text(output.text)
        outputs = ObservedOutputs(outputs, text_of)
    return Exchange(runtime, m, outputs, slot, CompletionResponse(model=model, kind=kind))


def _release(m: RequestMeasurement, slot: Slot | NoQueue) -> None:
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
    """One admitted request from its first output to its event: streamed or collected, finished
    or abandoned, it releases its slot once and records exactly one event."""

    def __init__(self, runtime: Runtime, m: RequestMeasurement, gen: Outputs, slot: Slot | NoQueue,
                 response: CompletionResponse) -> None:
        self.runtime, self.m, self.gen, self.slot, self.response = runtime, m, gen, slot, response
        self._settled = False
        self._recorded = False
        self._abandoned = False

    async def collect(self, first: Output) -> dict[str, Any]:
        output = first
        while not isinstance(output, GenerationResult):
            if isinstance(output, ApiError):
                self.close_with_error(output)
                raise output
            output = await self.gen.next()
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
                output = await self.gen.next()
            if isinstance(output, GenerationResult):
                self.settle(output)
                if output.finish_reason in ("error", "cancelled"):
                    failure = ENGINE_FAILED if output.finish_reason == "error" else SHUTTING_DOWN
                    yield sse_event(failure.body())
                else:
                    yield piece("", finish_reason(output))
                    if include_usage:
                        yield response.usage_chunk(output)
            else:  # an upstream failed mid-stream: say so in the stream, then end it
                self.settle_error(output)
                yield sse_event(output.body())
            # Recorded before the last byte leaves: a client that has read [DONE] has its event
            # recorded (and journaled), whatever happens to the process next.
            self.m.t_end = time.perf_counter()  # the last content byte is with the server
            self.record()
            yield SSE_DONE
        finally:
            if not self._recorded:
                self.abandon()

    def settle(self, result: GenerationResult) -> None:
        """The work is over: free the slot and take the result into the measurement."""
        if self._settled:
            return
        self._settled = True
        _release(self.m, self.slot)
        if result.finish_reason == "error":
            self.m.fail("error", 500, "engine_error")
        elif result.finish_reason == "cancelled":
            self.m.fail("cancelled", 499, "client_disconnected")
        self.m.finish(result)

    def settle_error(self, error: ApiError) -> None:
        if self._settled:
            return
        self._settled = True
        _release(self.m, self.slot)
        self.m.fail("timeout" if error.status == 504 else "error", error.status, error.code)
        self.m.finish()

    def record(self) -> None:
        if not self._recorded:
            self._recorded = True
            self.runtime.record(self.m)

    def close(self, result: GenerationResult) -> None:
        self.settle(result)
        self.record()

    def close_with_error(self, error: ApiError) -> None:
        self.settle_error(error)
        self.record()

    def abandon(self, error_type: str = "client_disconnected") -> None:
        """The client went away (or the job was cancelled: ``error_type`` says which): stop the
        work, and record the event once the backend reports what it had spent (in a task of its
        own, since this may run inside a cancellation)."""
        if self._recorded or self._abandoned:
            return
        if self._settled:  # it had finished; the client left during the last chunks
            self.record()
            return
        # Once only: a second cancel would interrupt the backend's own clean-up (closing the
        # upstream connection, say) while it runs.
        self._abandoned = True
        self.gen.cancel()

        async def account() -> None:
            outcome = await self.gen.result()
            if isinstance(outcome, ApiError):
                self.settle_error(outcome)
            else:
                self.settle(outcome)
            # Whatever the backend managed, the client never got it.
            self.m.fail("cancelled", 499, error_type)
            self.record()

        _background(account())


_tasks: set[asyncio.Task[Any]] = set()


def _background(coro: Awaitable[Any]) -> None:
    task = asyncio.ensure_future(coro)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


class _ClientGone(Exception):
    pass


def _stop(watcher: asyncio.Future[None] | None) -> None:
    if watcher is not None:
        watcher.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(watcher: asyncio.Future[None], work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first (then cancel it and raise)."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise _ClientGone
