"""Turning generated token ids into text deltas, and finding stop strings in them.

Text is decoded over a short window of recent tokens (the approach TGI and vLLM take), so each new
token costs the same however long the completion is, and a multi-byte character split across
tokens is held back until it is whole. When stop strings are set, the last few characters are held
back too, so a client never sees the beginning of a stop string that is then cut.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

# Prompt tokens decoded ahead of the first generated one, so that tokenizers which strip a leading
# space at the start of a decode (SentencePiece: Llama 2, Mistral) keep the first token's space.
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = (),
                 prompt_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""  # everything decoded so far
        self._emitted = 0  # characters of ``text`` already handed out
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Add one generated token; return the text that is now safe to show."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        current = self._decode(self._ids[self._prefix_offset :])
        if len(current) > len(prefix) and not current.endswith("\ufffd"):
            self.text += current[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The sequence ended for another reason: release whatever was held back."""
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        if self._stop and not self.stopped:
            search_from = max(0, self._emitted - self._holdback)
            hits = [i for i in (self.text.find(s, search_from) for s in self._stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                final = True
        end = len(self.text) if final else max(self._emitted, len(self.text) - self._holdback)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
