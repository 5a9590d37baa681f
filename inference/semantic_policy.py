"""A semantic cache policy: which feature's questions may be answered from the semantic cache, at
what similarity and for how long (``inference.semantic_cache``); read from ``--semantic-cache`` and
from the ruleset's ``semantic_cache`` entries (docs/RULESET.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Chosen on bench/data/semantic_questions.txt so that under 1% of near-miss pairs are taken for the
# same question (docs/BENCHMARKS.md, "semantic_cache").
DEFAULT_THRESHOLD = 0.93
DEFAULT_TTL_S = 24 * 3600.0


@dataclass(frozen=True)
class SemanticPolicy:
    """The semantic cache on for ``feature`` (of ``tenant``, or every tenant: ``*``)."""

    feature: str
    tenant: str = "*"
    threshold: float = DEFAULT_THRESHOLD
    ttl_s: float = DEFAULT_TTL_S
    flushed_at: float | None = None  # answers stored at or before it are never served
    source: Literal["flag", "ruleset"] = "flag"


def parse_semantic_flag(value: str) -> SemanticPolicy:
    """``FEATURE`` or ``FEATURE=THRESHOLD`` (a similarity above 0 and at most 1)."""
    feature, _, threshold = value.partition("=")
    feature = feature.strip()
    if not feature:
        raise ValueError(value)
    similarity = float(threshold) if threshold else DEFAULT_THRESHOLD
    if not 0 < similarity <= 1:
        raise ValueError(value)
    return SemanticPolicy(feature=feature, threshold=similarity)


# What --help and a refusal call the flag's value.
parse_semantic_flag.__name__ = "FEATURE[=THRESHOLD] (a threshold above 0 and at most 1)"
