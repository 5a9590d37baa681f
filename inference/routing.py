"""The routing alias: a client asks for ``auto`` and the runtime picks a small or a large model.

The choice is made before the request is tokenized (the chosen model's tokenizer does that), from
signals that are cheap to read and easy to explain:

- the prompt's size, estimated at one token per four characters (a byte-level BPE on English text
  averages about that) — long contexts go to the large model;
- ``max_tokens`` — a long answer asked for is a long task;
- code in the prompt (a fenced block, or lines that look like code) — code wants the larger model.

Anything else goes to the small model. The event's ``route_reason`` is ``auto_small`` or
``auto_large``; the ``x-wattson-route`` response header says which signal decided.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from dataclasses import dataclass

from inference.config import RuntimeConfig, check_auto_route
from inference.schemas import ChatCompletionRequest, CompletionRequest

ROUTE_HEADER = "x-wattson-route"
CHARS_PER_TOKEN = 4
# Lines that read as code: a definition, an import, a statement ending in ';' or '{', an arrow function.
_CODE_LINE = re.compile(
    r"^\s*(def |class |import |from \S+ import |function |#include|public |private |fn |let |const |var )"
    r"|[;{]\s*$|=>",
    re.MULTILINE,
)
_CODE_LINES_NEEDED = 2


@dataclass(frozen=True)
class Route:
    model: str
    reason: str  # the event's route_reason
    why: str  # the signal that decided, for the response header


class ModelRouter:
    def __init__(self, *, alias: str, small: str, large: str, large_prompt_tokens: int, large_max_tokens: int) -> None:
        self.alias = alias
        self.small = small
        self.large = large
        self.large_prompt_tokens = large_prompt_tokens
        self.large_max_tokens = large_max_tokens

    @classmethod
    def from_config(cls, config: RuntimeConfig, served: Collection[str]) -> ModelRouter | None:
        """The configured router, or None when no alias is configured. Raises ``ConfigError`` when
        a target is not among the models actually ``served``."""
        check_auto_route(config, sorted(served))
        if config.auto_small is None or config.auto_large is None:
            return None
        return cls(alias=config.auto_model, small=config.auto_small, large=config.auto_large,
                   large_prompt_tokens=config.auto_large_prompt_tokens, large_max_tokens=config.auto_large_max_tokens)

    def route(self, body: ChatCompletionRequest | CompletionRequest) -> Route | None:
        """Where a request for the alias goes; None for a request naming a model itself."""
        if body.model != self.alias:
            return None
        text = prompt_text(body)
        estimate = math.ceil(len(text) / CHARS_PER_TOKEN)
        if estimate >= self.large_prompt_tokens:
            return self._large(f"prompt_tokens~{estimate}>={self.large_prompt_tokens}")
        asked = body.requested_max_tokens()
        if asked is not None and asked >= self.large_max_tokens:
            return self._large(f"max_tokens={asked}>={self.large_max_tokens}")
        if looks_like_code(text):
            return self._large("code")
        return Route(self.small, "auto_small", f"prompt_tokens~{estimate}, no code")

    def _large(self, why: str) -> Route:
        return Route(self.large, "auto_large", why)


def prompt_text(body: ChatCompletionRequest | CompletionRequest) -> str:
    if isinstance(body, ChatCompletionRequest):
        return "\n".join(m.text() for m in body.messages)
    return body.prompt_text()


def looks_like_code(text: str) -> bool:
    return "```" in text or len(_CODE_LINE.findall(text)) >= _CODE_LINES_NEEDED

