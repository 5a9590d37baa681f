"""Where a request goes while its model's circuit breaker is open: along the model's fallback chain.

``--fallback big=small:cache:503`` gives ``big`` the chain small → cache → 503. The steps are tried
in order:

- another served model, if that model's own breaker lets the request through (its own chain is not
  followed in turn): the request is served there, and its event says ``route_reason="fallback"``
  with ``model_served`` the fallback model;
- ``cache``: a cached answer to the same request, asked of ``Runtime.fallback_cache``. Until a
  response cache is wired that hook is ``NO_CACHE``, which holds nothing, and the step is passed
  over. A cache plugs in by implementing ``FallbackCache`` and being set as
  ``runtime.fallback_cache``: ``cached_answer`` returns the answer it holds for this tenant, model
  and request (one past its freshness included, if it keeps those) replayed as a generation — its
  text as ``TokenDelta``s, then a ``GenerationResult`` — or None. The request is then answered as
  if the model had (JSON or SSE alike) from no slot; its event is a cache hit, so the breaker does
  not take it for the model answering;
- ``503``: the client is told the model is unavailable, with ``Retry-After`` the breaker's remaining
  cool-down. A chain that runs out ends there too, so a model with no chain answers 503 while open.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from inference.backends import Outputs
from inference.errors import ApiError
from inference.measurement import RequestMeasurement
from inference.schemas import ChatCompletionRequest, CompletionRequest

if TYPE_CHECKING:
    from inference.runtime import Backend, Runtime

Body = ChatCompletionRequest | CompletionRequest


class FallbackCache(Protocol):
    async def cached_answer(self, body: Body, *, tenant: str, model: str,
                            max_tokens_cap: int | None) -> Outputs | None:
        """The answer held for ``tenant``'s request ``body`` to ``model`` (its length bounded by
        ``max_tokens_cap`` when a rule says so), replayed as a finished generation; or None."""


class _NoCache:
    async def cached_answer(self, body: Body, *, tenant: str, model: str,
                            max_tokens_cap: int | None) -> Outputs | None:
        return None


NO_CACHE: FallbackCache = _NoCache()


@dataclass(frozen=True)
class CachedReplay:
    """A cached answer served in place of running the request: a response-cache hit, or the
    fallback chain's ``cache`` step for a model whose breaker is open."""

    replay: Outputs
    model: str
    kind: Literal["chat", "completion"]


async def route_around_breaker(runtime: Runtime, m: RequestMeasurement, body: Body, backend: Backend, *,
                               max_tokens_cap: int | None) -> Backend | CachedReplay:
    """``backend`` if its breaker lets the request through, else the first step of its fallback
    chain that can take it; raise the 503 when none can."""
    breakers = runtime.breakers
    model = backend.name
    if breakers.of(model).admit(m.event_id):
        return backend
    for step in breakers.chain(model):
        if step == "503":
            break
        if step == "cache":
            replay = await runtime.fallback_cache.cached_answer(body, tenant=m.tenant, model=model,
                                                                max_tokens_cap=max_tokens_cap)
            if replay is not None:
                breakers.fallbacks_total[(model, step)] += 1
                m.route_reason, m.cache_hit, m.model_served = "fallback", True, model
                kind: Literal["chat", "completion"] = "chat" if isinstance(body, ChatCompletionRequest) \
                    else "completion"
                return CachedReplay(replay, model, kind)
        elif breakers.of(step).admit(m.event_id):
            breakers.fallbacks_total[(model, step)] += 1
            m.route_reason = "fallback"
            return runtime.backends[step]
    breakers.fallbacks_total[(model, "503")] += 1
    raise ApiError(503, f"The model '{model}' is failing and is out of service for now; try again later.",
                   code="model_unavailable", retry_after_s=breakers.of(model).retry_after_s())
