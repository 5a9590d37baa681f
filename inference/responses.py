"""OpenAI's response shapes for one completion: the JSON body of a collected answer, and the
server-sent event chunks of a streamed one (``/v1/chat/completions`` and ``/v1/completions``
alike). Request shapes are ``inference.schemas``'; what is served, and when, is ``inference.serving``'s.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from inference.engine.engine import GenerationResult

SSE_DONE = b"data: [DONE]\n\n"
_FINISH_REASONS = {"stop": "stop", "length": "length"}


def finish_reason(result: GenerationResult) -> str:
    """The OpenAI ``finish_reason`` of a generation that ended normally."""
    return _FINISH_REASONS.get(result.finish_reason, "stop")


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse_event(body: dict[str, Any]) -> bytes:
    """``body`` as one server-sent event's ``data`` line."""
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


class CompletionResponse:
    """The response to one completion request, as its client reads it: one id, creation time and
    model, written either as a whole body or chunk by chunk."""

    def __init__(self, *, model: str, kind: Literal["chat", "completion"]) -> None:
        self.model, self.kind = model, kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def body(self, result: GenerationResult) -> dict[str, Any]:
        finish = finish_reason(result)
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                      "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish}
        return {"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice],
                "usage": usage_dict(result.prompt_tokens, result.completion_tokens)}

    def opening_chunk(self) -> bytes | None:
        """What a stream starts with before any text: a chat stream names the assistant's role."""
        if self.kind != "chat":
            return None
        return self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None})

    def piece(self, text: str, finish: str | None) -> bytes:
        """A chunk of new text (``finish`` set on the last one, whose text is empty)."""
        if self.kind == "chat":
            delta = {"content": text} if text else {}
            return self._chunk({"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish})
        return self._chunk({"index": 0, "text": text, "logprobs": None, "finish_reason": finish})

    def usage_chunk(self, result: GenerationResult) -> bytes:
        """The chunk with no choices that carries usage (``stream_options.include_usage``)."""
        return self._chunk(None, usage=usage_dict(result.prompt_tokens, result.completion_tokens))

    def _chunk(self, choice: dict[str, Any] | None, usage: dict[str, Any] | None = None) -> bytes:
        body: dict[str, Any] = {
            "id": self.id, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created, "model": self.model, "choices": [choice] if choice else [],
        }
        if usage is not None:
            body["usage"] = usage
        return sse_event(body)
