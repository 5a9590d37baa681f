"""A client request's attempts, up to its first output: the answer held in the response cache, or
an attempt at the model it was routed to, then retries and fallbacks while they are allowed.

``first_output`` walks the routed model's fallback chain (``inference.fallback``) within the one
request. At each model it makes an attempt — admitted (prepared, reserved against the rules, queued
within the deadline), started, read to its first output — and an attempt that fails before that
output is retried at the same model while ``inference.retries`` allows it, then passed on to the
next step. The first attempt that gives an output answers the client; its exchange carries on from
there (``inference.exchange``). Every attempt is a request event of its own with the request's id
and its number (``request_id``, ``attempt``); the one that answers the client is timed from the
request's arrival. Everything spends from the request's deadline (``inference.deadline``).

What the client gets when no attempt answers: the last attempt's failure (a 4xx from the model
itself ends the walk at once, and goes to the client); a 504 once the deadline has passed; a stale
cached answer when the chain has a ``cache`` step and no model of it could answer; or, when no
attempt could be made at all (every breaker open), 503 ``model_unavailable``.

At the routed model a refusal (the rules, the queue, the prompt too long) goes to the client, as it
would without a chain. For a retry or at a fallback step it passes the request on: that model
cannot take it now, which is not a failure of the model, and no event is made.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from inference.admission import NO_QUEUE, Shed, Slot
from inference.backends import LocalBackend, ObservedOutputs, Output, Outputs, Prepared, UpstreamBackend
from inference.cache import CACHE_HEADER
from inference.config import Tier
from inference.contracts import EventStatus
from inference.deadline import DEADLINE_CODE, Deadline, DeadlineExceeded, deadline_error
from inference.engine.engine import GenerationResult, TokenDelta
from inference.errors import ApiError
from inference.exchange import ENGINE_FAILED, SHUTTING_DOWN, Exchange, release
from inference.fair_share import CapReached
from inference.fallback import CACHE_STEP, END_STEP, CachedReplay, model_unavailable, sends_along_chain
from inference.measurement import RequestMeasurement
from inference.responses import CompletionResponse
from inference.rules import Match, RuleRejection
from inference.schemas import ChatCompletionRequest, CompletionRequest
from inference.semantic_cache import BYPASS_HEADER_VALUE, SemanticProbe

if TYPE_CHECKING:
    from inference.runtime import Backend, Runtime

Body = ChatCompletionRequest | CompletionRequest


@dataclass(frozen=True)
class Routed:
    """A request routed and checked, ready for its attempts: what every attempt shares."""

    body: Body
    tier: Tier
    backend: Backend  # the model the request was routed to: its chain is the one walked
    match: Match | None
    cap: int | None  # the max_tokens cap of the rules and of the load
    cache_key: str | None  # where the routed model's answer is kept (None: not cached)
    deadline: Deadline
    on_text: Callable[[str], None] | None = None  # also gets the answer's text as it comes (a job's progress)
    cache_sampled: bool = False  # the key's flag: its sampled answers may be cached
    cache_bypass: bool = False  # the client asked for a fresh answer (x-wattson-cache: bypass)
    semantic: SemanticProbe | None = None  # where the semantic cache keeps the answer, after a miss


class Started(NamedTuple):
    exchange: Exchange
    first: Output


class RequestAttempts:
    """One client request's attempts so far. ``pending`` is an attempt being admitted (no event
    yet) and ``exchange`` one started and not yet answered; whoever awaits ``first_output`` and is
    interrupted accounts for them (``interrupted``)."""

    def __init__(self, runtime: Runtime, first: RequestMeasurement, *, number: Callable[[], int]) -> None:
        self.runtime = runtime
        self.first = first
        self.pending: RequestMeasurement | None = first
        self.exchange: Exchange | None = None
        self._number = number
        self._first_used = False
        self._routed_reason: str | None = None  # why the request went to its model (set by routing)
        self.request_counted = False  # whether the throttles' request rates have counted this request

    def candidate(self, route_reason: str | None) -> RequestMeasurement:
        """The measurement of the next attempt (``route_reason`` None: the request's own): the
        request's first, until an attempt has been made with it (a step passed over leaves it to the
        next), then a new one."""
        if self._routed_reason is None:
            self._routed_reason = self.first.route_reason
        reason = route_reason or self._routed_reason
        if not self._first_used:
            m = self.first
            m.route_reason, m.model_served, m.device, m.reservation = reason, None, None, None
        else:
            m = self.first.next_attempt(0, route_reason=reason)
            m.attempt = None  # numbered once made, so a step passed over leaves no gap
        self.pending = m
        return m

    def made(self, m: RequestMeasurement) -> None:
        """``m`` is an attempt now: give it its number."""
        if m is self.first:
            self._first_used = True
        if m.attempt is None:
            m.attempt = self._number()

    def recorded(self) -> None:
        self.pending = self.exchange = None

    def refuse(self, m: RequestMeasurement, refusal: RuleRejection | Shed | ApiError) -> ApiError:
        """Record ``m`` as an attempt refused before it ran; return the error its client is to see."""
        self.made(m)
        self.recorded()
        return record_refusal(self.runtime, m, refusal)

    def interrupted(self, *, error_type: str | None, status: EventStatus = "cancelled",
                    http_status: int = 499) -> None:
        """The request was stopped while an attempt was under way: the client left or a bug broke it
        off (``error_type`` says which; the attempt is recorded with ``status``), or its task was
        cancelled (None: the attempt's reservations are released, nothing is recorded)."""
        exchange, pending = self.exchange, self.pending
        self.recorded()
        if exchange is not None:
            exchange.abandon(error_type or "cancelled")
        elif pending is not None and error_type is not None:
            self.made(pending)
            pending.fail(status, http_status, error_type)
            self.runtime.record(pending)
        elif pending is not None:
            self.runtime.settle(pending)


def record_refusal(runtime: Runtime, m: RequestMeasurement, exc: RuleRejection | Shed | ApiError) -> ApiError:
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
        m.fail("timeout" if exc.status == 504 else "error", exc.status, exc.code)
        error = exc
    runtime.record(m)
    return error


async def first_output(runtime: Runtime, attempts: RequestAttempts, routed: Routed,
                       headers: dict[str, str]) -> Started:
    """The request's answer up to its first output, from the cache or the first attempt that gives
    one; or raise the ``ApiError`` its client is to get. Every attempt is recorded here, the one
    answering when its exchange ends."""
    found, routed = await _looked_up(runtime, attempts, routed, headers)
    if found is not None:  # answered again without a slot or an engine step
        return await _serve_cached(runtime, attempts, routed, found[0], headers, route_reason=None,
                                   similarity=found[1])
    primary = routed.backend.name
    steps = (primary, *runtime.breakers.chain(primary))
    failure: ApiError | None = None
    for position, step in enumerate(steps):
        if step == END_STEP:
            break
        if step == CACHE_STEP:
            found = await _chain_cache(runtime, attempts, routed, stale=False)
            if found is not None:
                return await _serve_cached(runtime, attempts, routed, found, headers, route_reason="fallback")
            continue
        outcome = await _at_model(runtime, attempts, routed, runtime.backends[step], fallback=position > 0)
        if isinstance(outcome, Started):
            return outcome
        failure = outcome or failure
    if CACHE_STEP in steps and not routed.deadline.passed:
        found = await _chain_cache(runtime, attempts, routed, stale=True)
        if found is not None:
            return await _serve_cached(runtime, attempts, routed, found, headers, route_reason="fallback")
    if failure is not None:
        raise failure
    runtime.breakers.fallbacks_total[(primary, END_STEP)] += 1
    raise attempts.refuse(attempts.candidate(None),
                          model_unavailable(primary, runtime.breakers.of(primary).retry_after_s()))


async def _looked_up(runtime: Runtime, attempts: RequestAttempts, routed: Routed, headers: dict[str, str]
                     ) -> tuple[tuple[CachedReplay, float | None] | None, Routed]:
    """The request looked up in the exact cache, then the semantic one: the cached answer (with its
    similarity, for a semantic hit), and the request as routed on (after a semantic miss, with the
    probe its answer is kept under). The time taken is the first attempt's ``cache_lookup_ms``."""
    if routed.cache_bypass:
        if routed.cache_key is not None or runtime.semantic_cache.thresholds():
            headers[CACHE_HEADER] = BYPASS_HEADER_VALUE
        return None, routed
    started = time.perf_counter()
    m = attempts.first
    found: tuple[CachedReplay, float | None] | None = None
    if routed.cache_key is not None and runtime.cache is not None:
        hit = await runtime.cache.get(routed.cache_key)
        headers[CACHE_HEADER] = "hit" if hit is not None else "miss"
        m.cache_lookup_ms = (time.perf_counter() - started) * 1000
        if hit is not None:
            return (CachedReplay(hit.replay(), routed.backend.name, hit.kind), None), routed
    document = runtime.rules.compiled.document if runtime.rules.compiled is not None else None
    semantic, probe = await runtime.semantic_cache.lookup(
        tenant=m.tenant, feature=m.feature, model=routed.backend.name, body=routed.body, max_tokens_cap=routed.cap,
        default_max_tokens=runtime.config.default_max_tokens, cache_sampled=routed.cache_sampled, document=document)
    if probe is None:
        return None, routed
    m.cache_lookup_ms = (time.perf_counter() - started) * 1000
    if semantic is not None:
        found = (CachedReplay(semantic.answer.replay(), routed.backend.name, semantic.answer.kind), semantic.similarity)
        return found, routed
    headers[CACHE_HEADER] = "miss"
    return None, dataclasses.replace(routed, semantic=probe)


async def _at_model(runtime: Runtime, attempts: RequestAttempts, routed: Routed, backend: Backend, *,
                    fallback: bool) -> Started | ApiError | None:
    """Attempts at one model: the first, then its retries. Returns the attempt that gave an output,
    the last failure (recorded) for the chain to go on, or None when no attempt was made here."""
    breaker = runtime.breakers.of(backend.name)
    failure: ApiError | None = None
    retries_done = 0
    reason = "fallback" if fallback else None
    while True:
        m = attempts.candidate(reason)
        if not breaker.admit(m.event_id):
            attempts.pending = None
            return failure
        try:
            outcome = await _attempt(runtime, attempts, routed, backend, m, retry=retries_done > 0)
        except (RuleRejection, Shed, ApiError) as refusal:
            # The request's own model refusing it is the client's answer; a retry or a fallback that
            # cannot be taken passes the request on.
            if (fallback or failure is not None) and not (isinstance(refusal, ApiError)
                                                          and refusal.code == DEADLINE_CODE):
                _pass_over(runtime, attempts, m, breaker_model=backend.name)
                return failure
            raise attempts.refuse(m, refusal) from None
        if fallback and retries_done == 0:
            runtime.breakers.fallbacks_total[(routed.backend.name, backend.name)] += 1
        if isinstance(outcome, Started):
            return outcome
        failure = outcome
        if not sends_along_chain(failure):
            raise failure
        wait = runtime.retries.backoff_before_retry(backend.name, failure, retries_done=retries_done,
                                                    breaker_closed=breaker.state == "closed",
                                                    deadline=routed.deadline)
        if wait is None:
            return failure
        await asyncio.sleep(wait)
        retries_done += 1
        reason = "retry"


def _pass_over(runtime: Runtime, attempts: RequestAttempts, m: RequestMeasurement, *, breaker_model: str) -> None:
    """A fallback step that cannot take the request: release what it reserved and its probe's place."""
    attempts.pending = None
    runtime.settle(m)
    runtime.breakers.of(breaker_model).record(m.event_id, None)


async def _attempt(runtime: Runtime, attempts: RequestAttempts, routed: Routed, backend: Backend,
                   m: RequestMeasurement, *, retry: bool) -> Started | ApiError:
    """One attempt at ``backend``, admitted, started and read to its first output: the exchange
    with that output, or the attempt's failure (recorded: the model's, the deadline's, or the engine
    stopping). Raises a refusal before it ran, unrecorded."""
    prepared, slot = await _admit(runtime, attempts, routed, backend, m)
    attempts.made(m)
    if not retry:
        runtime.retries.attempted(backend.name)
    try:
        outputs: Outputs = backend.start(prepared)
    except RuntimeError:  # the engine is stopping: nothing was started, so nothing is lost
        release(m, slot)
        m.fail("error", 503, "shutting_down")
        attempts.recorded()
        runtime.record(m)
        return SHUTTING_DOWN
    if outputs.pausable is not None:
        slot.attach(outputs.pausable)  # high-priority work may preempt it
    outputs = ObservedOutputs(outputs, _service_to(slot))
    if backend is routed.backend and routed.cache_key is not None and runtime.cache is not None:
        outputs = runtime.cache.recording(outputs, routed.cache_key, kind=prepared.kind)
    if backend is routed.backend and routed.semantic is not None:
        outputs = runtime.semantic_cache.recording(outputs, routed.semantic, kind=prepared.kind)
    outputs = _observed(outputs, routed)
    exchange = Exchange(runtime, m, outputs, slot, CompletionResponse(model=backend.name, kind=prepared.kind),
                        routed.deadline)
    attempts.exchange, attempts.pending = exchange, None
    try:
        first = await routed.deadline.bound(outputs.next())
    except DeadlineExceeded:
        error = exchange.expire("before the model's first output")
        attempts.recorded()
        return error
    failure = _failure(first)
    if failure is None:
        if m is not attempts.first:
            m.answers_since(attempts.first)
        return Started(exchange, first)
    if isinstance(first, GenerationResult):
        exchange.close(first)  # the engine's error, with what it had spent
    else:
        exchange.close_with_error(failure)
    attempts.recorded()
    return failure


async def _admit(runtime: Runtime, attempts: RequestAttempts, routed: Routed, backend: Backend,
                 m: RequestMeasurement) -> tuple[Prepared, Slot]:
    """Prepare the request for ``backend``, reserve it against the rules, and wait for a slot
    within the deadline; raise the refusal (``RuleRejection``, ``Shed``, ``ApiError``)."""
    if routed.deadline.passed:
        raise deadline_error("before the request could be sent to a model")
    m.model_served, m.device = backend.name, backend.device_label
    backend.admission.shed_early(priority=m.priority, tier=routed.tier, tenant=m.tenant)
    cap = cap_for(runtime, routed.body, routed.match, routed.cap, backend)
    if isinstance(backend, LocalBackend):
        prepared = await asyncio.to_thread(backend.prepare, routed.body, max_tokens_cap=cap)
    else:
        prepared = backend.prepare(routed.body, max_tokens_cap=cap)
    if routed.match is not None:
        # Checked and taken in one step: nothing awaits between them.
        m.reservation = runtime.rules.reserve(routed.match, prompt_tokens=prepared.prompt_tokens_bound,
                                              max_tokens=prepared.params.max_tokens, model=backend.name,
                                              count_request=not attempts.request_counted)
        attempts.request_counted = True
    queue = backend.admission
    try:
        slot = await routed.deadline.bound(queue.admit(
            priority=m.priority, tier=routed.tier, tenant=m.tenant, feature=m.feature,
            prompt_tokens=prepared.prompt_tokens_bound, caps=routed.match.caps if routed.match is not None else ()))
    except DeadlineExceeded:
        raise deadline_error("while the request waited in the queue") from None
    except CapReached as reached:
        raise runtime.rules.cap_rejection(reached.cap, retry_after_s=queue.retry_after_s()) from None
    return prepared, slot


def cap_for(runtime: Runtime, body: Body, match: Match | None, cap: int | None, backend: Backend) -> int | None:
    """The max_tokens cap for ``backend``: the rules' and the load's, and for a metered request to an
    upstream without one, the default length (an upstream's length is open-ended unless asked, and
    a budget needs every request's worst case)."""
    if cap is None and body.requested_max_tokens() is None and match is not None and match.metered \
            and isinstance(backend, UpstreamBackend):
        return runtime.config.default_max_tokens
    return cap


async def _chain_cache(runtime: Runtime, attempts: RequestAttempts, routed: Routed, *,
                       stale: bool) -> CachedReplay | None:
    """The fallback chain's ``cache`` step: the answer held for the routed model's request."""
    primary = routed.backend
    return await runtime.fallback_cache.cached_answer(
        routed.body, tenant=attempts.first.tenant, model=primary.name,
        max_tokens_cap=cap_for(runtime, routed.body, routed.match, routed.cap, primary), stale=stale)


async def _serve_cached(runtime: Runtime, attempts: RequestAttempts, routed: Routed, found: CachedReplay,
                        headers: dict[str, str], *, route_reason: str | None, similarity: float | None = None
                        ) -> Started:
    """Answer from a cached answer, in no slot: a request like any other to the throttles' request
    rates, free to every budget. ``similarity``: a semantic hit's (None: the exact cache's answer)."""
    m = attempts.candidate(route_reason)
    if routed.match is not None:
        try:
            m.reservation = runtime.rules.reserve_cache_hit(routed.match, model=found.model,
                                                            count_request=not attempts.request_counted)
        except RuleRejection as refusal:
            raise attempts.refuse(m, refusal) from None
        attempts.request_counted = True
    attempts.made(m)
    m.cache_hit, m.cache_stale = True, found.stale
    m.cache_kind, m.cache_similarity = ("exact", None) if similarity is None else ("semantic", similarity)
    m.model_served, m.device = found.model, routed.backend.device_label
    if route_reason == "fallback":
        runtime.breakers.fallbacks_total[(routed.backend.name, CACHE_STEP)] += 1
    if similarity is not None:
        # Rounded down: a hit at the threshold never shows a similarity above what it was.
        headers[CACHE_HEADER] = f"semantic; similarity={math.floor(similarity * 100) / 100:.2f}"
    else:
        headers[CACHE_HEADER] = "stale" if found.stale else "hit"
    if m is not attempts.first:
        m.answers_since(attempts.first)
    exchange = Exchange(runtime, m, _observed(found.replay, routed), NO_QUEUE,
                        CompletionResponse(model=found.model, kind=found.kind), routed.deadline)
    attempts.exchange, attempts.pending = exchange, None
    return Started(exchange, await exchange.next())


def _observed(outputs: Outputs, routed: Routed) -> Outputs:
    return outputs if routed.on_text is None else ObservedOutputs(outputs, _text_to(routed.on_text))


def _service_to(slot: Slot) -> Callable[[Output], None]:
    """Charge the tokens each output brings to the slot's tenant's fair share as they are read."""
    def charge(output: Output) -> None:
        if isinstance(output, TokenDelta):
            slot.served(completion_tokens=output.completion_tokens)
        elif isinstance(output, GenerationResult):
            slot.served(prompt_tokens=output.prompt_tokens, completion_tokens=output.completion_tokens)
    return charge


def _failure(first: Output) -> ApiError | None:
    """The attempt's failure when it failed before its first output, else None."""
    if isinstance(first, ApiError):
        return first
    if isinstance(first, GenerationResult) and first.finish_reason == "error":
        return ENGINE_FAILED
    return None


def _text_to(on_text: Callable[[str], None]) -> Callable[[Output], None]:
    def text_of(output: Output) -> None:
        if isinstance(output, TokenDelta) and output.text:
            on_text(output.text)
    return text_of
