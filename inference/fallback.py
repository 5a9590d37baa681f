"""Where a request goes when its model cannot answer it: along the model's fallback chain.

``--fallback big=small:cache:503`` gives ``big`` the chain small → cache → 503. A request takes it
when ``big``'s breaker is open (nothing reaches ``big``), and also when an attempt at ``big`` fails
before its first output (``sends_along_chain``: a connection error, a timeout, an upstream's 5xx or
overload, the engine's error — or a breaker that has just opened) once its retries are spent
(``inference.retries``). Within the same request (``inference.attempts``), the steps are tried in
order:

- another served model, if that model's own breaker lets the request through (its own chain is not
  followed in turn): the request is an attempt there, under the same rules, allowances and
  admission as the first (the same throttles and budgets, reserved for that model), and its event
  says ``route_reason="fallback"`` with ``model_served`` the fallback model. A step the rules or
  the queue refuse is passed over, its refusal recorded;
- ``cache``: a cached answer to the same request, asked of ``Runtime.fallback_cache`` (the response
  cache when it is on, ``NO_CACHE`` otherwise). The request is then answered as if the model had
  (JSON or SSE alike) from no slot; its event is a cache hit, so the breaker does not take it for
  the model answering. When no model of the chain could answer, the step also serves an answer
  past its freshness (``stale``: within ``--cache-stale-if-error-s``), marked
  ``x-wattson-cache: stale`` and ``cache_stale`` in its event;
- ``503``: the chain ends. The client gets the last attempt's failure, or, when no attempt could be
  made (every breaker open), 503 ``model_unavailable`` with ``Retry-After`` the breaker's remaining
  cool-down. A model with no chain ends there at once.

Every attempt is an event of its own, numbered within its request (``request_id``, ``attempt``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from inference.backends import Outputs
from inference.breaker import BACKEND_FAILURES
from inference.errors import ApiError
from inference.schemas import ChatCompletionRequest, CompletionRequest

Body = ChatCompletionRequest | CompletionRequest
CACHE_STEP, END_STEP = "cache", "503"


@dataclass(frozen=True)
class CachedReplay:
    """A cached answer served in place of running the request: a response-cache hit, or the
    fallback chain's ``cache`` step (``stale``: past its freshness)."""

    replay: Outputs
    model: str
    kind: Literal["chat", "completion"]
    stale: bool = False


class FallbackCache(Protocol):
    async def cached_answer(self, body: Body, *, tenant: str, model: str, max_tokens_cap: int | None,
                            stale: bool = False) -> CachedReplay | None:
        """The answer held for ``tenant``'s request ``body`` to ``model`` (its length bounded by
        ``max_tokens_cap`` when a rule says so), replayed as a finished generation — its text as
        ``TokenDelta``s, then a ``GenerationResult`` — or None. With ``stale``, an answer past its
        freshness will do too, and says so."""


class _NoCache:
    async def cached_answer(self, body: Body, *, tenant: str, model: str, max_tokens_cap: int | None,
                            stale: bool = False) -> CachedReplay | None:
        return None


NO_CACHE: FallbackCache = _NoCache()


def sends_along_chain(error: ApiError) -> bool:
    """Whether a failure before the first output is the model's (so another step may answer), not
    the request's: the failures a breaker counts."""
    return error.code in BACKEND_FAILURES


def model_unavailable(model: str, retry_after_s: int) -> ApiError:
    return ApiError(503, f"The model '{model}' is failing and is out of service for now; try again later.",
                    code="model_unavailable", retry_after_s=retry_after_s)
