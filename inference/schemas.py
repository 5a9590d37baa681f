"""OpenAI-compatible request bodies, validated strictly.

Unknown fields are accepted and ignored (SDKs send fields this runtime does not use), but every
field it does use is type-checked without coercion, so ``"max_tokens": "12"`` is a 400, not 12.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 200
# OpenAI's limits on a request's ``metadata``: string keys and values, at most 16 pairs.
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512


# A stop sequence as the OpenAPI document declares it.
_STOP = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_LENGTH}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


# The names a request gives (its model, its end user) reach pages, URLs, CSV cells and metric
# labels through its event, and the control plane refuses an event whose names hold a control
# character: such a request is refused here, with a 400, rather than answered and never stored.
NO_CONTROL_CHARACTERS = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*$"


class GenerationFields(_Strict):
    """The sampling fields both endpoints share."""

    model: str = Field(min_length=1, max_length=200, pattern=NO_CONTROL_CHARACTERS)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(default=None, json_schema_extra={"anyOf": [  # what _stop_sequences checks
        _STOP, {"type": "array", "items": _STOP, "maxItems": MAX_STOP_SEQUENCES}, {"type": "null"}]})
    seed: StrictInt | None = Field(default=None, ge=0, le=2**63 - 1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256, pattern=NO_CONTROL_CHARACTERS)
    n: StrictInt = Field(default=1, ge=1, le=1)
    # OpenAI's free-form tags; ``task_id`` among them names the task (``request_parsing.request_task``).
    metadata: dict[str, str] | None = Field(default=None, max_length=MAX_METADATA_PAIRS)
    ignore_eos: StrictBool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s or len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"stop sequences must be 1-{MAX_STOP_LENGTH} characters")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_sizes(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key, text in (value or {}).items():
            if not 1 <= len(key) <= MAX_METADATA_KEY or len(text) > MAX_METADATA_VALUE:
                raise ValueError(f"metadata keys must be 1-{MAX_METADATA_KEY} characters and values at most "
                                 f"{MAX_METADATA_VALUE}")
        return value

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    # Read only to know a request uses them (its answer then depends on more than its words: the
    # semantic cache leaves it alone); this runtime's models do not call tools.
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None


class CompletionRequest(GenerationFields):
    prompt: str | list[str] = Field(json_schema_extra={"anyOf": [  # what _single_prompt checks
        {"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1}]})

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

