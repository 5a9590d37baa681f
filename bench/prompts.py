"""Prompts for benchmarks: distinct windows of one plain English text.

Every stream gets a different prompt (so nothing could be shared or cached between them), and
``prompts_of_length`` makes them all the same length in tokens, so a static batch needs no padding
and the engine and ``generate`` do exactly the same work.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

TEXT = """
The harbour town woke slowly on winter mornings. Fishing boats came back before dawn, and the
market opened while the streets were still dark. Traders laid out silver fish on beds of ice,
baskets of bread from the bakery on the hill, and jars of honey from farms further inland. Children
ran between the stalls on their way to school, and old sailors sat by the sea wall telling stories
about storms they had survived and ships that never came home. In the afternoon the wind turned,
the gulls circled over the lighthouse, and the library on the square filled with students reading
about history, mathematics, music and the stars. A small orchestra practised in the town hall every
Thursday evening, and on Sundays families walked along the cliffs to watch the waves break on the
rocks below. Visitors often asked why the town had never grown into a city, and the answer was
always the same: people liked knowing the name of the baker, the teacher and the man who repaired
the nets, and they were happy to trade a little comfort for a life that moved at the pace of the
tides. Summer brought music festivals, long evenings, boats painted in bright colours and a market
that stayed open until midnight, while autumn brought storms, quiet streets and bowls of soup.
"""
WORDS = TEXT.split()


def prompt_texts(count: int, *, words: int = 24) -> list[str]:
    """``count`` different prompts of ``words`` words each (no tokenizer needed)."""
    return [" ".join(_window(start * 7, words)) for start in range(count)]


def prompts_of_length(tokenizer: PreTrainedTokenizerBase, count: int, length: int) -> list[str]:
    """``count`` different prompts that each encode to exactly ``length`` tokens, the way the
    runtime's ``/v1/completions`` encodes them (special tokens included)."""
    found: list[str] = []
    for start in range(len(WORDS)):
        text = _fit(tokenizer, start, length)
        if text is not None and text not in found:
            found.append(text)
            if len(found) == count:
                return found
    raise ValueError(f"could not make {count} prompts of exactly {length} tokens from the text")


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=True))


def _fit(tokenizer: PreTrainedTokenizerBase, start: int, length: int) -> str | None:
    """The shortest run of words from ``start`` that reaches ``length`` tokens, if it hits it exactly."""
    for size in range(1, length + 1):
        text = " ".join(_window(start, size))
        got = len(encode(tokenizer, text))
        if got >= length:
            return text if got == length else None
    return None


def _window(start: int, size: int) -> list[str]:
    return [WORDS[(start + i) % len(WORDS)] for i in range(size)]
