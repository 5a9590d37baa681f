"""The HTTP layer: OpenAI-compatible endpoints, health and metrics.

It parses and checks what clients send, asks the runtime to authenticate and admit, and turns a
backend's ``Generation`` into a JSON body or an SSE stream. It knows nothing about tensors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, NamedTuple, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from inference import __version__
from inference.admin import install_admin_routes
from inference.admission import Shed, Slot, effective_priority
from inference.backends import LocalBackend, ObservedOutputs, Output, Outputs, Prepared, UpstreamBackend
from inference.cache import CACHE_HEADER
from inference.config import ApiKey, RuntimeConfig, Tier
from inference.degradation import DEGRADED_HEADER, LOAD_CAP_RULE_ID, cap_under_load
from inference.engine.engine import GenerationResult, TokenDelta
from inference.errors import ApiError, install_error_handlers
from inference.fallback import CachedReplay, route_around_breaker
from inference.jobs import Attempt, Job, JobRunner, JobStore
from inference.jobs.routes import install_job_routes
from inference.measurement import RequestMeasurement
from inference.request_parsing import parse_body, request_feature, request_priority
from inference.retries import start_with_retries
from inference.routing import ROUTE_HEADER
from inference.rules import Match, RuleRejection
from inference.runtime import Backend, Runtime
from inference.schemas import ChatCompletionRequest, CompletionRequest, usage_dict

log = logging.getLogger("inference.api")

_FINISH_REASONS = {"stop": "stop", "length": "length"}
T = TypeVar("T")


def create_app(config: RuntimeConfig, runtime: Runtime | None = None) -> FastAPI:
    runtime = runtime or Runtime(config)
    jobs = JobRunner(JobStore(config.resolved_state_dir / "jobs.sqlite3"), partial(_run_job_attempt, runtime),
                     concurrency=config.jobs_concurrency, max_attempts=config.job_max_attempts,
                     ttl_s=config.job_ttl_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        await jobs.start()
        try:
            yield
        finally:
            await jobs.stop()  # first: running jobs are left to the next start, not failed
            await runtime.stop()

    app = FastAPI(title="Wattson inference runtime", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.runtime = runtime
    install_error_handlers(app)
    install_admin_routes(app, runtime)
    install_job_routes(app, runtime, jobs)

    @app.get("/health")
    async def health() -> JSONResponse:
        exporter = runtime.exporter.stats() if runtime.exporter is not None else None
        status = "ok" if runtime.ready else "starting"
        if exporter is not None and (exporter.get("spool_full") or exporter.get("dropped_records")):
            status = "degraded"
        return JSONResponse(
            {"status": status, "runtime_id": config.runtime_id, "models": sorted(runtime.backends),
             "queue_depth": runtime.queue_depth(), "running": runtime.running(), "telemetry": exporter},
            status_code=200 if runtime.ready else 503,
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = runtime.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        runtime.authenticate(request.headers.get("authorization"))
        data = [{"id": name, "object": "model", "created": 0, "owned_by": f"wattson:{b.kind}"}
                for name, b in sorted(runtime.backends.items())]
        if runtime.router is not None:
            data.append({"id": runtime.router.alias, "object": "model", "created": 0, "owned_by": "wattson:alias"})
        return JSONResponse({"object": "list", "data": data})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _serve(runtime, request, ChatCompletionRequest)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _serve(runtime, request, CompletionRequest)

    return app


async def _serve(runtime: Runtime, request: Request,
                 model_cls: type[ChatCompletionRequest] | type[CompletionRequest]) -> Response:
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
        return _ExchangeStream(exchange, exchange.sse(first, include_usage=body.include_usage()),
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
            m.cache_hit, m.queue_wait_s = True, 0.0
            m.model_served, m.device = backend.name, backend.device_label
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
              on_text: Callable[[str], None] | None = None) -> _Exchange:
    """Start an admitted request (retried on transient failures), or replay the cached answer
    given in its place; a stopping engine is a 503. ``on_text`` also gets the text as it comes."""
    if isinstance(admitted, CachedReplay):
        outputs, release, model, kind = admitted.replay, (lambda: None), admitted.model, admitted.kind
    else:
        slot = admitted.slot
        m.queue_wait_s, m.queue_depth_at_admit = slot.queue_wait_s, slot.depth_at_admit
        try:
            outputs = start_with_retries(runtime, admitted.backend, admitted.prepared)
        except RuntimeError:  # the engine is stopping: nothing was started, so nothing is lost
            slot.release()
            m.fail("error", 503, "shutting_down")
            runtime.record(m)
            raise SHUTTING_DOWN from None
        if outputs.pausable is not None:
            slot.attach(outputs.pausable)  # high-priority work may preempt it

        def release() -> None:
            slot.release()
            m.queue_wait_s = slot.queue_wait_s  # with any wait to resume after a preemption

        model, kind = admitted.backend.name, admitted.prepared.kind
        if admitted.cache_key is not None and runtime.cache is not None:
            outputs = runtime.cache.recording(outputs, admitted.cache_key, kind=kind)
    if on_text is not None:
        def text_of(output: Output) -> None:
            if isinstance(output, TokenDelta) and output.text:
                on_text(output.text)
        outputs = ObservedOutputs(outputs, text_of)
    return _Exchange(runtime, m, outputs, release, model=model, kind=kind)


async def _run_job_attempt(runtime: Runtime, job: Job, attempt: Attempt) -> dict[str, Any]:
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


SHUTTING_DOWN = ApiError(503, "The runtime is shutting down; try again shortly.", code="shutting_down",
                         retry_after_s=5)
ENGINE_FAILED = ApiError(500, "The engine failed while generating.", code="engine_error")


class _ExchangeStream(StreamingResponse):
    """A stream that accounts for its exchange however it ends, even when the client leaves
    before the body iterator has started (when its own ``finally`` would never run)."""

    def __init__(self, exchange: _Exchange, content: AsyncIterator[bytes], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._exchange = exchange

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._exchange.abandon()  # nothing to do once the event is recorded


class _Exchange:
    """One admitted request from its first output to its event: streamed or collected, finished
    or abandoned, it releases its slot once and records exactly one event."""

    def __init__(self, runtime: Runtime, m: RequestMeasurement, gen: Outputs, release: Any, *,
                 model: str, kind: str) -> None:
        self.runtime, self.m, self.gen, self._release = runtime, m, gen, release
        self.model, self.kind = model, kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
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
        finish = _FINISH_REASONS.get(output.finish_reason, "stop")
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": output.text},
                      "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": output.text, "logprobs": None, "finish_reason": finish}
        return {"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice],
                "usage": usage_dict(output.prompt_tokens, output.completion_tokens)}

    async def sse(self, first: Output, *, include_usage: bool) -> AsyncIterator[bytes]:
        try:
            if self.kind == "chat":
                yield self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None})
            output = first
            while isinstance(output, TokenDelta):
                yield self._piece(output.text, None)
                output = await self.gen.next()
            if isinstance(output, GenerationResult):
                self.settle(output)
                if output.finish_reason in ("error", "cancelled"):
                    failure = ENGINE_FAILED if output.finish_reason == "error" else SHUTTING_DOWN
                    yield _sse(failure.body())
                else:
                    yield self._piece("", _FINISH_REASONS.get(output.finish_reason, "stop"))
                    if include_usage:
                        yield self._chunk(None, usage=usage_dict(output.prompt_tokens, output.completion_tokens))
            else:  # an upstream failed mid-stream: say so in the stream, then end it
                self.settle_error(output)
                yield _sse(output.body())
            yield b"data: [DONE]\n\n"
            self.m.t_end = time.perf_counter()  # the last byte is with the server
            self.record()
        finally:
            if not self._recorded:
                self.abandon()

    def _piece(self, text: str, finish: str | None) -> bytes:
        if self.kind == "chat":
            delta = {"content": text} if text else {}
            return self._chunk({"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish})
        return self._chunk({"index": 0, "text": text, "logprobs": None, "finish_reason": finish})

    def _chunk(self, choice: dict[str, Any] | None, usage: dict[str, Any] | None = None) -> bytes:
        body: dict[str, Any] = {
            "id": self.id, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created, "model": self.model, "choices": [choice] if choice else [],
        }
        if usage is not None:
            body["usage"] = usage
        return _sse(body)

    def settle(self, result: GenerationResult) -> None:
        """The work is over: free the slot and take the result into the measurement."""
        if self._settled:
            return
        self._settled = True
        self._release()
        if result.finish_reason == "error":
            self.m.fail("error", 500, "engine_error")
        elif result.finish_reason == "cancelled":
            self.m.fail("cancelled", 499, "client_disconnected")
        self.m.finish(result)

    def settle_error(self, error: ApiError) -> None:
        if self._settled:
            return
        self._settled = True
        self._release()
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


def _sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"
