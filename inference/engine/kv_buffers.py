"""Key/value cache layers as views of buffers with room to grow.

``DynamicLayer.update`` concatenates, copying the whole cache every step: at 32 rows that copy took a
quarter of a decode step. Here a layer's keys and values are views of buffers with room, so a step
writes only its own positions. ``KVBatch`` may replace them with tensors of its own (rows selected,
batches joined): those have no room, and get a buffer again here.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

# Positions a layer's key/value buffer grows by beyond what it holds (at least; half again when longer).
KV_HEADROOM = 64


def reserve(layer: DynamicLayer, shape: tuple[int, int, int, int], dtype: torch.dtype,
            device: torch.device) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
    """Make room in ``layer`` for ``shape[2]`` new positions of keys and values shaped ``shape``
    ([rows, kv heads, new, head dim]): its keys and values become views of (key buffer, value
    buffer) [rows, kv heads, capacity, head dim] up to the new positions, which the caller writes.
    Returns the buffers and the number of positions held before."""
    rows, kv_heads, new, head_dim = shape
    if not layer.is_initialized:
        empty = torch.empty(shape, dtype=dtype, device=device)
        layer.lazy_initialization(empty, empty)
    keys, values = layer.keys, layer.values
    length = layer.get_seq_length()
    buffers = getattr(layer, "wattson_buffers", None)
    if buffers is None or length == 0 or not _is_prefix(keys, buffers[0]) or not _is_prefix(values, buffers[1]) \
            or buffers[0].shape[:2] != (rows, kv_heads) or buffers[0].shape[-2] < length + new \
            or buffers[0].dtype != dtype or buffers[0].device != device:
        capacity = length + new + max(KV_HEADROOM, (length + new) // 2)
        buffers = tuple(torch.empty((rows, kv_heads, capacity, head_dim), dtype=dtype, device=device)
                        for _ in range(2))
        if length:
            buffers[0][:, :, :length].copy_(keys)
            buffers[1][:, :, :length].copy_(values)
        layer.wattson_buffers = buffers
    layer.keys, layer.values = buffers[0][:, :, :length + new], buffers[1][:, :, :length + new]
    return buffers, length


def append(layer: DynamicLayer, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Add ``k``, ``v`` ([rows, kv heads, new, d]) to ``layer``; return its keys and values."""
    buffers, length = reserve(layer, tuple(k.shape), k.dtype, k.device)
    new = k.shape[-2]
    buffers[0][:, :, length:length + new].copy_(k)
    buffers[1][:, :, length:length + new].copy_(v)
    return layer.keys, layer.values


def _is_prefix(view: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Whether ``view`` is ``buffer[:, :, :n]`` for some n (what ``reserve`` leaves in a layer)."""
    return (view.data_ptr() == buffer.data_ptr() and view.stride() == buffer.stride()
            and view.shape[:2] == buffer.shape[:2])
