"""Per-sequence sampling parameters and the batched choice of each sequence's next token."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

MIN_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class SamplingParams:
    """What a request asked for; validated by the API before it reaches the engine."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        # Below this, dividing logits by the temperature overflows float32 (and bf16) to inf/nan:
        # such a temperature is greedy in all but name.
        return self.temperature < MIN_TEMPERATURE


@dataclass
class SamplerState:
    """A sequence's sampling parameters with its own random generator, so a seed is reproducible
    whichever other sequences share the batch."""

    params: SamplingParams
    generator: torch.Generator | None = field(default=None, repr=False)

    @classmethod
    def create(cls, params: SamplingParams, device: torch.device) -> SamplerState:
        if params.greedy:
            return cls(params)
        gen = torch.Generator(device=device)
        gen.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        return cls(params, gen)


def sample_next_tokens(logits: torch.Tensor, states: Sequence[SamplerState]) -> list[int]:
    """Choose one token per row of ``logits`` ([batch, vocab]) under each row's parameters."""
    logits = logits.float()
    chosen = torch.argmax(logits, dim=-1)
    sampled_rows = [i for i, s in enumerate(states) if not s.params.greedy]
    if sampled_rows:
        rows = torch.tensor(sampled_rows, device=logits.device)
        temps = torch.tensor([states[i].params.temperature for i in sampled_rows],
                             device=logits.device).unsqueeze(-1)
        probs = torch.softmax(logits.index_select(0, rows) / temps, dim=-1)
        top_ps = [states[i].params.top_p for i in sampled_rows]
        if any(p < 1.0 for p in top_ps):
            probs = _apply_top_p(probs, torch.tensor(top_ps, device=logits.device).unsqueeze(-1))
        # A row whose distribution is not finite (a model that emitted nan) keeps its argmax rather
        # than failing every sequence in the batch.
        usable = torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)
        for j, i in enumerate(sampled_rows):
            if usable[j]:
                chosen[i] = torch.multinomial(probs[j], 1, generator=states[i].generator)[0]
    return chosen.tolist()


def _apply_top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches ``top_p`` (at least one)."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    cumulative = sorted_probs.cumsum(dim=-1)
    drop = (cumulative - sorted_probs) >= top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)
