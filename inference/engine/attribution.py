"""Splitting one engine step's measured cost among the sequences that shared it.

A step's wall time (and its energy delta) is divided by the tokens each sequence processed in that
step, so the attributed amounts always add up to what was measured (DESIGN.md, "Cost model").
"""

from __future__ import annotations

from collections.abc import Sequence


def attribute_step_time(measured: float, tokens: Sequence[int]) -> list[float]:
    """Divide ``measured`` (seconds or joules) among sequences by the tokens each processed.

    The last share takes the rounding remainder, so ``sum(result) == measured`` holds exactly in
    floating point for the running totals that callers keep.
    """
    if measured < 0:
        raise ValueError("a step cannot take negative time or energy")
    if not tokens:
        return []
    if any(t < 0 for t in tokens):
        raise ValueError("token counts cannot be negative")
    total = sum(tokens)
    if total == 0:
        share = measured / len(tokens)
        shares = [share] * len(tokens)
    else:
        shares = [measured * t / total for t in tokens]
    shares[-1] = measured - sum(shares[:-1])
    if shares[-1] < 0:  # only from float rounding when the last sequence processed ~nothing
        shares[-1] = 0.0
    return shares
