"""Left-padded batches for the engine's forward passes, and a greedy decode through several forwards
side by side (test_llama_forward, test_q4_decode)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache, PretrainedConfig

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache], torch.Tensor]


def padded(vocab: int, rows: int, width: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rows`` prompts left-padded to ``width``, row r with r % 5 padding tokens: ids, mask, positions."""
    ids = torch.randint(0, vocab, (rows, width), generator=torch.Generator().manual_seed(rows))
    mask = torch.ones(rows, width, dtype=torch.long)
    for row in range(rows):
        mask[row, : row % 5] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def decode(forwards: Sequence[Forward], config: PretrainedConfig, rows: int,
           steps: int) -> tuple[list[list[torch.Tensor]], list[DynamicCache]]:
    """Each forward's logits per step (the prefill first) over its own cache, all fed the last
    forward's greedy tokens; and the caches."""
    ids, mask, positions = padded(config.vocab_size, rows)
    caches = [DynamicCache(config=config) for _ in forwards]
    results: list[list[torch.Tensor]] = []
    with torch.inference_mode():
        for _ in range(steps + 1):
            step = [forward(ids, mask, positions, cache) for forward, cache in zip(forwards, caches, strict=True)]
            results.append(step)
            ids = step[-1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.long)], dim=-1)
            positions = mask.sum(-1, keepdim=True) - 1
    return results, caches
