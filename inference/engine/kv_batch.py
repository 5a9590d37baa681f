"""The running batch's KV cache: one row per sequence, left-padded to a shared length.

Continuous batching over a stock transformers model: every row of a ``DynamicCache`` has the same
length, shorter sequences are padded on the left and masked out, and rows are added (after their
own prefill) or removed between decode steps. This is the scheme TGI used for causal LMs before
paged attention; it needs nothing from the model beyond ``past_key_values``, ``attention_mask`` and
``position_ids``, so any full-attention Hugging Face causal LM batches this way.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class UnsupportedCacheError(RuntimeError):
    """The model's cache is not a plain full-attention cache (sliding windows, recurrent state)."""


class KVBatch:
    """A left-padded batch of sequences' keys and values, with its attention mask."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        for layer in cache.layers:
            if type(layer) is not DynamicLayer:
                raise UnsupportedCacheError(
                    f"cache layer {type(layer).__name__} is not supported by the batching engine; "
                    "only full-attention models batch continuously here"
                )
        self.cache = cache
        self.mask = mask  # [rows, length], 1 for a real token, 0 for left padding

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def next_positions(self) -> torch.Tensor:
        """Each row's position for its next token: the count of its real tokens so far."""
        return self.mask.sum(dim=-1, keepdim=True)

    def append_step(self) -> torch.Tensor:
        """Extend the mask by the token each row is about to feed; return the new mask."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.rows, 1))], dim=-1)
        return self.mask

    def select(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order), then drop leading columns no row uses any more."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else self.length
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:, :]
            layer.values = layer.values.index_select(0, index)[:, :, start:, :]

    def split(self, rows: list[int]) -> KVBatch:
        """Take ``rows`` out into a batch of their own (kept aside while paused, to ``extend`` the
        batch again later), leaving the rest here."""
        cache = copy.copy(self.cache)
        cache.layers = [copy.copy(layer) for layer in self.cache.layers]  # the same tensors, until select
        taken = KVBatch(cache, self.mask)
        taken.select(rows)
        taken_set = set(rows)
        self.select([i for i in range(self.rows) if i not in taken_set])
        return taken

    def extend(self, other: KVBatch) -> None:
        """Append ``other``'s rows below this batch's, padding the shorter one on the left."""
        length = max(self.length, other.length)
        self.mask = torch.cat([_pad_left(self.mask, length), _pad_left(other.mask, length)], dim=0)
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, length), _pad_left(theirs.keys, length)], dim=0)
            mine.values = torch.cat(
                [_pad_left(mine.values, length), _pad_left(theirs.values, length)], dim=0
            )

    def tokens_held(self) -> int:
        """Cache slots in use, padding included (what the cache costs in memory)."""
        return self.rows * self.length


def _pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    """Pad the sequence axis (-2 for keys/values, -1 for a mask) on the left with zeros."""
    if t.dim() == 2:
        missing = length - t.shape[1]
        return F.pad(t, (missing, 0)) if missing else t
    missing = length - t.shape[-2]
    return F.pad(t, (0, 0, missing, 0)) if missing else t
