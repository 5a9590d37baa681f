"""What serves a model: the local engine or an upstream OpenAI-compatible server.

Both turn a validated request into a ``Generation``: an asyncio-side stream of ``TokenDelta``s that
ends in one ``GenerationResult`` (or an ``ApiError`` the client should see instead). Admission,
measurement and telemetry sit above this and treat both kinds the same.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import httpx
from jinja2 import TemplateError

from inference.admission import AdmissionQueue, Pausable
from inference.config import Upstream
from inference.engine.engine import Engine, GenerationRequest, GenerationResult, TokenDelta
from inference.engine.models import LoadedModel
from inference.engine.sampling import SamplingParams
from inference.errors import ApiError
from inference.schemas import ChatCompletionRequest, CompletionRequest
from inference.sse import sse_data
from inference.upstream_attribution import InFlight, UpstreamAttribution

log = logging.getLogger("inference.backends")

Body = ChatCompletionRequest | CompletionRequest
Output = TokenDelta | GenerationResult | ApiError


@dataclass(frozen=True)
class Prepared:
    """A request ready to run: the prompt as the backend needs it and the sampling it asked for."""

    kind: Literal["chat", "completion"]
    params: SamplingParams
    prompt_ids: list[int] | None = None
    payload: dict[str, Any] | None = None
    stream: bool = False
    # The most prompt tokens the request can have: exact for the local engine, a bound from the
    # text's UTF-8 length for an upstream (whose tokenizer this runtime does not have).
    prompt_tokens_bound: int = 0


class Generation:
    """A running request's outputs, read from the event loop; ``cancel`` stops the work."""

    def __init__(self) -> None:
        self.outputs: asyncio.Queue[Output] = asyncio.Queue()
        self._cancel = lambda: None
        self._result: GenerationResult | None = None
        self.pausable: Pausable | None = None  # the engine sequence, which admission may preempt

    def put_threadsafe(self, loop: asyncio.AbstractEventLoop, output: Output) -> None:
        loop.call_soon_threadsafe(self.outputs.put_nowait, output)

    async def next(self) -> Output:
        output = await self.outputs.get()
        if isinstance(output, GenerationResult):
            self._result = output
        return output

    def cancel(self) -> None:
        self._cancel()

    async def result(self) -> GenerationResult | ApiError:
        """Read until the end, discarding text: used to account for a cancelled request."""
        while self._result is None:
            output = await self.next()
            if isinstance(output, ApiError):
                return output
        return self._result


class Outputs(Protocol):
    """What reads a running request: a ``Generation``, or one that wraps it (retries, progress)."""

    async def next(self) -> Output: ...

    def cancel(self) -> None: ...

    async def result(self) -> GenerationResult | ApiError: ...


class ObservedOutputs:
    """A running request read through: ``observe`` sees each output as the API reads it (a job's
    progress, the response cache keeping an answer)."""

    def __init__(self, inner: Outputs, observe: Callable[[Output], None]) -> None:
        self._inner = inner
        self._observe = observe

    async def next(self) -> Output:
        output = await self._inner.next()
        self._observe(output)
        return output

    def cancel(self) -> None:
        self._inner.cancel()

    async def result(self) -> GenerationResult | ApiError:
        return await self._inner.result()


class LocalBackend:
    kind = "local"

    def __init__(self, loaded: LoadedModel, engine: Engine, admission: AdmissionQueue,
                 *, default_max_tokens: int) -> None:
        self.loaded = loaded
        self.engine = engine
        self.admission = admission
        self.default_max_tokens = default_max_tokens
        self.name = loaded.name
        self.device_label = loaded.device_label

    def prepare(self, body: Body, *, max_tokens_cap: int | None = None) -> Prepared:
        """Tokenize and check the request against the model's context, its completion clipped to
        ``max_tokens_cap`` when a rule says so. Runs off the event loop."""
        tokenizer = self.loaded.tokenizer
        if isinstance(body, ChatCompletionRequest):
            if not tokenizer.chat_template:
                raise ApiError(400, f"Model '{self.name}' has no chat template; use /v1/completions.",
                               code="chat_template_missing", param="model")
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            try:
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except TemplateError as exc:
                raise ApiError(400, f"The messages do not fit the model's chat template: {exc}",
                               code="invalid_messages", param="messages") from None
            kind: Literal["chat", "completion"] = "chat"
        else:
            text, kind = body.prompt_text(), "completion"
        prompt_ids = tokenizer.encode(text, add_special_tokens=kind == "completion")
        if not prompt_ids:
            raise ApiError(400, "The prompt is empty.", code="empty_prompt", param="prompt")
        limit = self.loaded.max_context
        room = limit - len(prompt_ids)
        asked = body.requested_max_tokens()
        if asked is not None and max_tokens_cap is not None:
            asked = min(asked, max_tokens_cap)
        if room <= 0 or (asked is not None and asked > room):
            raise ApiError(
                400,
                f"This model's maximum context length is {limit} tokens. The request has "
                f"{len(prompt_ids)} prompt tokens" + (f" and asks for {asked} more." if asked else "."),
                code="context_length_exceeded",
                param="max_tokens" if asked is not None and room > 0 else "messages",
            )
        params = SamplingParams(
            max_tokens=asked if asked is not None else min(self.default_max_tokens, room,
                                                           max_tokens_cap or self.default_max_tokens),
            temperature=1.0 if body.temperature is None else float(body.temperature),
            top_p=1.0 if body.top_p is None else float(body.top_p),
            seed=body.seed,
            stop=body.stop_sequences(),
            ignore_eos=body.ignore_eos,
        )
        return Prepared(kind=kind, params=params, prompt_ids=prompt_ids, stream=body.stream,
                        prompt_tokens_bound=len(prompt_ids))

    def start(self, prepared: Prepared) -> Generation:
        assert prepared.prompt_ids is not None
        gen = Generation()
        loop = asyncio.get_running_loop()
        handle = self.engine.submit(
            GenerationRequest(prepared.prompt_ids, prepared.params),
            lambda output: gen.put_threadsafe(loop, output),
        )
        gen._cancel, gen.pausable = handle.cancel, handle
        return gen

    def in_flight(self) -> int:
        return self.engine.stats.running + self.engine.stats.waiting


class UpstreamBackend:
    """A model served elsewhere; its tokens come from the upstream's ``usage``, its device time and
    energy are attributed from outside (``attribution``), and its events name ``device_label``: the
    upstream's GPU when it is visible here, else ``upstream``."""

    kind = "upstream"

    def __init__(self, upstream: Upstream, client: httpx.AsyncClient, admission: AdmissionQueue, *,
                 attribution: UpstreamAttribution | None = None, device_label: str = "upstream") -> None:
        self.upstream = upstream
        self.client = client
        self.admission = admission
        self.attribution = attribution if attribution is not None else UpstreamAttribution()
        self.device_label = device_label
        self.name = upstream.name
        self._in_flight = 0
        self.completion_tokens_total = 0

    def prepare(self, body: Body, *, max_tokens_cap: int | None = None) -> Prepared:
        """The upstream's payload; with ``max_tokens_cap`` its completion length is bounded (a rule's
        cap, or the default length when a budget needs every request's worst case)."""
        # stream_options only with stream: vLLM refuses them otherwise, even {"include_usage": false}.
        payload = body.model_dump(exclude_none=True, exclude={"ignore_eos", "stream_options"})
        payload["model"] = self.upstream.upstream_model
        if body.ignore_eos:
            payload["ignore_eos"] = True
        if body.stream:
            payload["stream_options"] = {"include_usage": True}
        asked = body.requested_max_tokens()
        if max_tokens_cap is not None:
            asked = min(asked, max_tokens_cap) if asked is not None else max_tokens_cap
            payload.pop("max_completion_tokens", None)
            payload["max_tokens"] = asked
        kind: Literal["chat", "completion"] = "chat" if isinstance(body, ChatCompletionRequest) else "completion"
        params = SamplingParams(max_tokens=asked or 0, stop=body.stop_sequences())
        return Prepared(kind=kind, params=params, payload=payload, stream=body.stream,
                        prompt_tokens_bound=_prompt_tokens_bound(body))

    def start(self, prepared: Prepared) -> Generation:
        gen = Generation()
        task = asyncio.get_running_loop().create_task(self._run(prepared, gen))
        gen._cancel = task.cancel
        return gen

    def in_flight(self) -> int:
        return self._in_flight

    async def _run(self, prepared: Prepared, gen: Generation) -> None:
        submitted = time.perf_counter()
        state = _UpstreamProgress(submitted, self.attribution, self.attribution.begin(),
                                  prompt_tokens_estimate=_prompt_tokens_estimate(prepared.prompt_tokens_bound))
        path = "/v1/chat/completions" if prepared.kind == "chat" else "/v1/completions"
        self._in_flight += 1
        try:
            if prepared.stream:
                await self._stream(path, prepared, gen, state)
            else:
                await self._call(path, prepared, gen, state)
        except asyncio.CancelledError:
            gen.outputs.put_nowait(state.result("cancelled"))
            raise
        except httpx.TimeoutException:
            gen.outputs.put_nowait(ApiError(504, f"Upstream '{self.name}' timed out.", code="upstream_timeout",
                                            transient=True))
        except httpx.TransportError as exc:  # refused, reset or dropped: the next try may find it back
            log.warning("upstream %s unreachable: %s: %s", self.name, type(exc).__name__, exc)
            gen.outputs.put_nowait(ApiError(502, f"Upstream '{self.name}' failed: {type(exc).__name__}.",
                                            code="upstream_error", transient=True))
        except Exception as exc:  # whatever an upstream sends, the request must end, never hang
            log.warning("upstream %s failed: %s: %s", self.name, type(exc).__name__, exc)
            gen.outputs.put_nowait(
                ApiError(502, f"Upstream '{self.name}' failed: {type(exc).__name__}.", code="upstream_error")
            )
        finally:
            self._in_flight -= 1
            self.completion_tokens_total += state.completion_tokens
            state.leave()  # an error or a cancellation ends its share of the upstream too

    async def _call(self, path: str, prepared: Prepared, gen: Generation, state: _UpstreamProgress) -> None:
        response = await self.client.post(self.upstream.url + path, json=prepared.payload)
        if response.status_code >= 400:
            gen.outputs.put_nowait(_relay_error(self.name, response, response.content))
            return
        body = response.json()
        choice = body["choices"][0]
        text = (choice["message"].get("content") if prepared.kind == "chat" else choice.get("text")) or ""
        state.take_usage(body.get("usage"))
        state.text = text
        if text:
            gen.outputs.put_nowait(TokenDelta(text, state.completion_tokens))
        gen.outputs.put_nowait(state.result(choice.get("finish_reason") or "stop"))

    async def _stream(self, path: str, prepared: Prepared, gen: Generation, state: _UpstreamProgress) -> None:
        async with self.client.stream("POST", self.upstream.url + path, json=prepared.payload) as response:
            if response.status_code >= 400:
                gen.outputs.put_nowait(_relay_error(self.name, response, await response.aread()))
                return
            finish_reason = "stop"
            async for data in sse_data(response):
                chunk = json.loads(data)
                state.take_usage(chunk.get("usage"))
                for choice in chunk.get("choices") or ():
                    piece = (choice.get("delta") or {}).get("content") if prepared.kind == "chat" \
                        else choice.get("text")
                    if piece:
                        state.add_piece(piece)
                        gen.outputs.put_nowait(TokenDelta(piece, state.completion_tokens))
                    finish_reason = choice.get("finish_reason") or finish_reason
            gen.outputs.put_nowait(state.result(finish_reason))


class _UpstreamProgress:
    def __init__(self, submitted: float, attribution: UpstreamAttribution, share: InFlight, *,
                 prompt_tokens_estimate: int) -> None:
        self.submitted = submitted
        self.attribution = attribution
        self.share = share
        self.prompt_tokens_estimate = prompt_tokens_estimate
        self.first_token_at: float | None = None
        self.text = ""
        self.pieces = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._usage_seen = False

    def add_piece(self, piece: str) -> None:
        # The prompt's prefill ran before the first piece: it counts in the window that piece closes.
        self.attribution.tokens(self.share, 1 + (self.prompt_tokens_estimate if self.first_token_at is None else 0))
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.text += piece
        self.pieces += 1
        if not self._usage_seen:  # until the upstream reports usage, each streamed piece is a token
            self.completion_tokens = self.pieces

    def take_usage(self, usage: dict[str, Any] | None) -> None:
        if usage:
            self._usage_seen = True
            # An upstream's numbers are external input: a negative or non-numeric count is not a count.
            self.prompt_tokens = _count(usage.get("prompt_tokens"))
            self.completion_tokens = _count(usage.get("completion_tokens"))

    def leave(self) -> tuple[float, float | None]:
        """End the request's share of the upstream (once): its attributed seconds and joules."""
        use = self.attribution.end(self.share, total_tokens=self.prompt_tokens + self.completion_tokens)
        return use.seconds, use.joules

    def result(self, finish_reason: str) -> GenerationResult:
        gpu_seconds, energy_joules = self.leave()
        return GenerationResult(
            text=self.text,
            finish_reason=finish_reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            submitted_at=self.submitted,
            first_token_at=self.first_token_at,
            finished_at=time.perf_counter(),
            gpu_seconds=gpu_seconds,
            energy_joules=energy_joules,
            mean_batch_size=None,
            device_use_source="attributed",
        )


# A byte-level BPE never needs more tokens than the text has UTF-8 bytes; the allowance covers a chat
# template's markers around each message.
_TEMPLATE_TOKENS_PER_MESSAGE = 16


def _prompt_tokens_bound(body: Body) -> int:
    if isinstance(body, ChatCompletionRequest):
        return sum(len(m.text().encode()) + _TEMPLATE_TOKENS_PER_MESSAGE for m in body.messages) + \
            _TEMPLATE_TOKENS_PER_MESSAGE
    return len(body.prompt_text().encode()) + _TEMPLATE_TOKENS_PER_MESSAGE


# English text in a byte-level BPE runs about four bytes a token; the bound is in bytes.
_BYTES_PER_TOKEN = 4


def _prompt_tokens_estimate(bytes_bound: int) -> int:
    return max(1, bytes_bound // _BYTES_PER_TOKEN)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _relay_error(name: str, response: httpx.Response, content: bytes) -> ApiError:
    """Pass an upstream's refusal on: its 4xx is the client's problem, its overload (429, 503) is
    passed on with when to retry, any other failure of its own is ours (502)."""
    status = response.status_code
    transient = status in (502, 503, 504)  # a gateway's or an overloaded server's answer, not the request's
    message = f"Upstream '{name}' answered {status}."
    detail = _error_message(content)
    if detail:
        message += f" {detail[:500]}"
    if status in (429, 503):
        retry_after = response.headers.get("retry-after", "")
        seconds = int(retry_after) if retry_after.isdigit() else 1
        return ApiError(status, message, code="upstream_overloaded", retry_after_s=min(max(seconds, 1), 600),
                        transient=transient)
    if 400 <= status < 500 and status not in (401, 403, 408):
        return ApiError(status, message, code="upstream_rejected")
    return ApiError(502, message, code="upstream_error", transient=transient)


def _error_message(content: bytes) -> str | None:
    """The message in an error body: OpenAI, llama.cpp and newer vLLM nest it in ``error``, older vLLM
    puts it at the top level, TGI sends ``error`` as a string."""
    try:
        body = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict):
        error = error.get("message")
    detail = error if isinstance(error, str) else body.get("message")
    return detail if isinstance(detail, str) and detail else None
