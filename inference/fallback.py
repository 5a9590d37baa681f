"""Where a request goes while its model's circuit breaker is open: along the model's fallback chain.

``--fallback big=small:cache:503`` gives ``big`` the chain small → cache → 503. The steps are tried
in order:

- another served model, if that model's own breaker lets the request through (its own chain is not
  followed in turn): the request is served there, and its event says ``route_reason="fallback"``
  with ``model_served`` the fallback model;
- ``cache``: a cached answer to the same request, asked of ``Runtime.fallback_cache``. Until a
  response cache is wired that hook is ``NO_CACHE``, which holds nothing, and the step is passed
  over. A cache plugs in by implementing ``FallbackCache`` (``cached_answer`` returns the finished
  response body it holds for this request and model, one past its freshness included, or None) and
  being set as ``runtime.fallback_cache``; the answer's event is a cache hit, so the breaker does
  not take it for the model answering;
- ``503``: the client is told the model is unavailable, with ``Retry-After`` the breaker's remaining
  cool-down. A chain that runs out ends there too, so a model with no chain answers 503 while open.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from inference.errors import ApiError
from inference.measurement import RequestMeasurement
from inference.schemas import ChatCompletionRequest, CompletionRequest

if TYPE_CHECKING:
    from inference.runtime import Backend, Runtime

Body = ChatCompletionRequest | CompletionRequest


class FallbackCache(Protocol):
    def cached_answer(self, body: Body, *, model: str) -> dict[str, Any] | None:
        """The response body (``chat.completion`` or ``text_completion``) held for this request to
        ``model``, or None."""


class _NoCache:
    def cached_answer(self, body: Body, *, model: str) -> dict[str, Any] | None:
        return None


NO_CACHE: FallbackCache = _NoCache()


@dataclass(frozen=True)
class CachedFallback:
    """A cached answer given in place of a model whose breaker is open."""

    answer: dict[str, Any]


def route_around_breaker(runtime: Runtime, m: RequestMeasurement, body: Body,
                         backend: Backend) -> Backend | CachedFallback:
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
            answer = runtime.fallback_cache.cached_answer(body, model=model)
            if answer is not None:
                breakers.fallbacks_total[(model, step)] += 1
                usage = answer.get("usage") or {}
                m.route_reason, m.cache_hit, m.model_served = "fallback", True, answer.get("model", model)
                m.prompt_tokens = usage.get("prompt_tokens", 0)
                m.completion_tokens = usage.get("completion_tokens", 0)
                return CachedFallback(answer)
        elif breakers.of(step).admit(m.event_id):
            breakers.fallbacks_total[(model, step)] += 1
            m.route_reason = "fallback"
            return runtime.backends[step]
    breakers.fallbacks_total[(model, "503")] += 1
    raise ApiError(503, f"The model '{model}' is failing and is out of service for now; try again later.",
                   code="model_unavailable", retry_after_s=breakers.of(model).retry_after_s())


def answer_chunks(answer: dict[str, Any], *, include_usage: bool) -> list[dict[str, Any]]:
    """A finished answer as the chunks of a streamed one: its whole text in one piece, then the
    finish reason (and the usage when asked), for a streaming client served from the cache."""
    chat = answer.get("object") == "chat.completion"
    choice = answer["choices"][0]
    envelope = {"id": answer["id"], "object": "chat.completion.chunk" if chat else "text_completion",
                "created": answer["created"], "model": answer["model"]}
    if chat:
        pieces = [{"index": 0, "delta": {"role": "assistant", "content": choice["message"]["content"]},
                   "logprobs": None, "finish_reason": None},
                  {"index": 0, "delta": {}, "logprobs": None, "finish_reason": choice["finish_reason"]}]
    else:
        pieces = [{"index": 0, "text": choice["text"], "logprobs": None, "finish_reason": None},
                  {"index": 0, "text": "", "logprobs": None, "finish_reason": choice["finish_reason"]}]
    chunks = [{**envelope, "choices": [piece]} for piece in pieces]
    if include_usage and answer.get("usage"):
        chunks.append({**envelope, "choices": [], "usage": answer["usage"]})
    return chunks
