"""The serving pipeline behind the completion endpoints and the job runner.

A request is measured from the start (``RequestMeasurement``, with a request id and attempt 1),
given its deadline (``inference.deadline``), routed and checked (``_route``: the ``auto`` alias, the
rules, the cap under load, where the response cache keeps its answer), then answered by its attempts
(``inference.attempts``: the cached answer, or the model, its retries and its fallback chain, each
attempt admitted and recorded) and carried on as an ``Exchange`` (``inference.exchange``): streamed
or collected, it frees its slot once and records its event, however it ends. A refusal before any
attempt ran is recorded too, with no queue wait. The routes (``inference.routes``) only hand
requests over; the OpenAI shapes of what comes back are ``inference.responses``'.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from inference.admission import Shed, effective_priority
from inference.attempts import RequestAttempts, Routed, cap_for, first_output
from inference.config import Tier
from inference.deadline import Deadline
from inference.degradation import DEGRADED_HEADER, LOAD_CAP_RULE_ID, cap_under_load
from inference.errors import ApiError
from inference.exchange import ExchangeStream
from inference.jobs import Attempt, Job
from inference.measurement import RequestMeasurement
from inference.request_parsing import (
    TASK_METADATA_KEY,
    cache_bypassed,
    parse_body,
    request_deadline_s,
    request_feature,
    request_priority,
    request_task,
)
from inference.routing import ROUTE_HEADER
from inference.rules import Match, RuleRejection
from inference.runtime import Backend, Runtime
from inference.schemas import ChatCompletionRequest, CompletionRequest

T = TypeVar("T")
Body = ChatCompletionRequest | CompletionRequest
REQUEST_ID_HEADER = "x-wattson-request-id"


async def serve_completion(runtime: Runtime, request: Request,
                           model_cls: type[ChatCompletionRequest] | type[CompletionRequest]) -> Response:
    """Answer a sync completion request: a JSON body, an SSE stream, an error, or a bare 499 for a
    client that went away; whichever, every attempt it took is recorded once."""
    key = runtime.authenticate(request.headers.get("authorization"))
    request_id = uuid.uuid4().hex
    # A request is its own task until its body names one.
    m = RequestMeasurement(runtime_id=runtime.config.runtime_id, tenant=key.tenant, api_key_id=key.key_id,
                           feature="default", priority="normal", model_requested="unknown",
                           request_id=request_id, attempt=1, task_id=request_id)
    attempts = RequestAttempts(runtime, m, number=itertools.count(2).__next__)
    # What the runtime did to the request, for the client to see.
    headers: dict[str, str] = {REQUEST_ID_HEADER: m.request_id or ""}
    try:
        m.feature = request_feature(request)
        m.priority = effective_priority(request_priority(request), key.tier)
        deadline = Deadline.after(request_deadline_s(request, limit_s=runtime.config.request_deadline_s))
        body = await parse_body(request, model_cls)
        m.model_requested, m.end_user = body.model, body.user
        m.task_id = request_task(request, body.metadata) or m.request_id
        routed = _route(runtime, m, body, tier=key.tier, cache_sampled=key.cache_sampled, deadline=deadline,
                        headers=headers, cache_bypass=cache_bypassed(request))
    except (RuleRejection, Shed, ApiError) as exc:  # refused before any attempt
        raise attempts.refuse(m, exc).with_headers(headers) from None
    except ClientDisconnect:
        attempts.interrupted(error_type="client_disconnected")
        return Response(status_code=499)
    except Exception:  # a bug of ours: the client gets a 500, and the request is still counted
        attempts.interrupted(error_type="internal_error", status="error", http_status=500)
        raise
    # Only once the body is read may a task listen for the client going away.
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        started = await _unless_gone(watcher, first_output(runtime, attempts, routed, headers))
    except ApiError as exc:  # every attempt is recorded, the last one with this error
        watcher.cancel()
        raise exc.with_headers(headers) from None
    except _ClientGone:
        attempts.interrupted(error_type="client_disconnected")
        return Response(status_code=499)
    except Exception:  # a bug of ours: the client gets a 500, and the request is still counted
        watcher.cancel()
        attempts.interrupted(error_type="internal_error", status="error", http_status=500)
        raise
    except BaseException:  # cancelled: no event, but the reservations must not outlive the request
        watcher.cancel()
        attempts.interrupted(error_type=None)
        raise
    exchange, first = started
    if isinstance(first, ApiError):  # the deadline passed as a cached answer began (recorded)
        watcher.cancel()
        raise first.with_headers(headers)
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
    except ApiError as exc:
        raise exc.with_headers(headers) from None
    finally:
        watcher.cancel()
    return JSONResponse(result, headers=headers)


async def run_job_attempt(runtime: Runtime, job: Job, attempt: Attempt) -> dict[str, Any]:
    """One attempt at a job, down the sync endpoints' path (rules, the response cache, retries and
    the fallback chain, admission, one request event per model attempt, all numbered within the job
    and bounded by its deadline); its text goes to ``attempt`` as it comes. Returns the response body
    the sync endpoint would have, or raises the ``ApiError`` it would have answered."""
    body = job.body()
    m = RequestMeasurement(runtime_id=runtime.config.runtime_id, tenant=job.tenant, api_key_id=job.api_key_id,
                           feature=job.feature, priority=job.priority, model_requested=body.model,
                           end_user=body.user, request_id=job.id, attempt=attempt.number(),
                           task_id=(body.metadata or {}).get(TASK_METADATA_KEY) or job.id)
    attempts = RequestAttempts(runtime, m, number=attempt.number)
    try:
        # Streamed from an upstream as well, so that the job's progress shows piece by piece.
        routed = _route(runtime, m, body.model_copy(update={"stream": True}), tier=job.tier,
                        cache_sampled=job.cache_sampled, deadline=_job_deadline(runtime, job), headers={},
                        on_text=attempt.token)
    except (RuleRejection, Shed, ApiError) as exc:
        raise attempts.refuse(m, exc) from None
    try:
        exchange, first = await first_output(runtime, attempts, routed, {})
    except asyncio.CancelledError:  # cancelled while queued: the attempt ends here, and says why
        attempts.interrupted(error_type=attempt.cancel_reason)
        raise
    if isinstance(first, ApiError):
        raise first
    try:
        return await exchange.collect(first)
    except asyncio.CancelledError:  # the engine slot is freed once the backend has stopped
        exchange.abandon(error_type=attempt.cancel_reason)
        raise


def _job_deadline(runtime: Runtime, job: Job) -> Deadline:
    """The job's deadline; a job stored before jobs had one gets the runtime's limit from now."""
    if job.deadline_at is None:
        return Deadline.after(runtime.config.job_deadline_s)
    return Deadline.at_wall_clock(job.deadline_at)


def _route(runtime: Runtime, m: RequestMeasurement, body: Body, *, tier: Tier, cache_sampled: bool,
           deadline: Deadline, headers: dict[str, str], on_text: Callable[[str], None] | None = None,
           cache_bypass: bool = False) -> Routed:
    """Where a parsed request goes and what acts on it, before any attempt: the ``auto`` alias, the
    rules (a block refuses here), a downgrade, the max_tokens caps (the rules' and the load's), and
    the key its answer is cached under (for a key with ``cache_sampled``, sampled answers too).
    ``headers`` gets what was done to the request, for its client to see."""
    route = runtime.router.route(body) if runtime.router is not None else None
    backend = runtime.backend(route.model if route is not None else body.model)
    if route is not None:
        m.route_reason, headers[ROUTE_HEADER] = route.reason, f"{route.reason}; {route.why}"
    # The rules act after authentication and before the queue: a refusal costs no slot.
    match = runtime.rules.match(m.tenant, m.feature, backend.name, runtime.backends)
    backend, cap = _routed(runtime, m, body, backend, match)
    cap = cap_for(runtime, body, match, cap, backend)
    default_max_tokens = runtime.config.default_max_tokens
    load_cap = cap_under_load(limit=runtime.config.free_max_tokens_under_load, tier=tier,
                              admission=backend.admission, asked=body.requested_max_tokens(), cap=cap,
                              default_max_tokens=default_max_tokens)
    if load_cap is not None:
        cap, headers[DEGRADED_HEADER] = load_cap, f"max_tokens_capped={load_cap}"
        m.rule_id = m.rule_id or LOAD_CAP_RULE_ID
    cache_key = None
    if runtime.cache is not None:
        cache_key = runtime.cache.key_for(tenant=m.tenant, cache_sampled=cache_sampled, model=backend.name,
                                          body=body, max_tokens_cap=cap, default_max_tokens=default_max_tokens)
    return Routed(body, tier, backend, match, cap, cache_key, deadline, on_text, cache_sampled=cache_sampled,
                  cache_bypass=cache_bypass)


def _routed(runtime: Runtime, m: RequestMeasurement, body: Body, backend: Backend,
            match: Match | None) -> tuple[Backend, int | None]:
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
    return backend, cap


class _ClientGone(Exception):
    pass


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
