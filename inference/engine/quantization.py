"""Weight-only quantization of a loaded model's linear layers (``--quantization``).

``int8`` stores each linear layer's weight as int8 with one scale per output channel, through
torchao's ``Int8WeightOnlyConfig`` (activations stay in the model's dtype), so a decode step reads
about a quarter of fp32's weight bytes. The embedding table is left as it is.

``int4`` (CPU) stores each linear layer's weight but the output layer's as 4-bit integers in groups
of 32 along the input with a bf16 scale and zero per group, and multiplies with PyTorch's own CPU
kernel for that layout (``_weight_int4pack_mm_for_cpu``; activations in bf16 for the product). The
output layer (tied to the embedding table in SmolLM2) goes to int8 with a scale per output
(``_weight_int8pack_mm``): in 4 bits it agreed with fp32's greedy answers on only 87% of tokens; in
8 bits 96.9%, as in bf16, at half bf16's bytes. A layer whose shape the kernel does not take
(outputs not a multiple of 16, inputs not of the group) keeps its weights. The kernels are slow on
many rows at once, so each layer also keeps its dense weights and multiplies inputs of more than
``INT4_MAX_ROWS`` rows (``INT8_MAX_ROWS`` for the output layer) with them: prefill and wide batches
run as in the model's dtype, at the cost of holding both copies (the tied output layer's dense
weights are the embedding table, held anyway).

These PyTorch kernels are what ``--quantization int4`` falls back on: where the machine has a C
compiler and AVX-512 VNNI, a Llama model's decode steps of up to ``q4_decode.MAX_ROWS`` rows run in
one compiled call over the same 4-bit weights repacked (``q4_decode``), several times faster
(docs/BENCHMARKS.md, issue 20).

Whether a method is faster than fp32/bf16 depends on the CPU's kernels: ``python -m bench
precision_quality`` and ``python -m bench engine_vs_llamacpp`` measure quality and speed.
"""

from __future__ import annotations

import logging
import warnings

import torch
from transformers import PreTrainedModel

log = logging.getLogger(__name__)

QUANTIZATION_CHOICES = ("none", "int8", "int4")
# Input channels sharing one scale and zero: with the output layer in 4 bits as well, groups of 64 kept
# 68% of SmolLM2's greedy tokens, groups of 32 87% (bench precision_quality).
INT4_GROUP = 32
# Output rows the CPU kernel interleaves in its packed layout: packed layers join along their rows
# only in whole blocks.
INT4_PACK_BLOCK = 64
# Rows up to which the 4-bit kernel beats the dense weights: it reads a quarter of bf16's bytes, but
# its cost grows with the rows where a dense product's barely does (on a quiet 2-core AMD EPYC, a
# 3072x576 layer took 0.09 ms in 4 bits against 0.35 in bf16 at 1 row, 0.28 against 0.46 at 8, 0.60
# against 0.48 at 16, 0.79 against 0.54 at 32). Wider inputs (prefill, wide decode batches) use the
# dense weights, which ``--quantization int4`` keeps.
INT4_MAX_ROWS = 8
# The same for the int8 output layer: SmolLM2's (49152 x 576) took 2.3 ms in int8 against 4.6 in bf16
# at 1 row, 3.1 against 4.2 at 4, 6.0 against 5.4 at 8, 23.6 against 8.6 at 32.
INT8_MAX_ROWS = 4


class QuantizationError(ValueError):
    """A ``--quantization`` that cannot be applied here; the message says why."""


def quantize_weights(model: PreTrainedModel, method: str) -> PreTrainedModel:
    """Quantize ``model``'s linear weights in place by ``method`` and return it."""
    if method == "none":
        return model
    if method not in QUANTIZATION_CHOICES:
        raise QuantizationError(f"--quantization {method!r} must be one of {', '.join(QUANTIZATION_CHOICES)}")
    if method == "int4":
        return _int4_linears(model)
    # torchao announces at import which of its optional CUDA kernels it could not load; none is used here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torchao").setLevel(logging.ERROR)
        try:
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
        except ImportError as exc:
            raise QuantizationError(
                f"--quantization int8 needs torchao (pip install torchao==0.18.0): {exc}") from exc
    quantize_(model, Int8WeightOnlyConfig())
    return model


class Int4Linear(torch.nn.Module):
    """A linear layer whose weight is held as 4-bit groups (``quantize_int4``) for PyTorch's CPU
    int4 kernel; the input is multiplied in bf16 and the output given back in the input's dtype."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, in_features: int,
                 bias: torch.Tensor | None = None, dense: torch.nn.Linear | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, int(packed.shape[0])
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.bias = bias
        self.dense = dense  # the layer as it was, for inputs of more than INT4_MAX_ROWS rows

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> Int4Linear:
        packed, scales_and_zeros = quantize_int4(linear.weight.detach())
        return cls(packed, scales_and_zeros, linear.in_features, linear.bias, dense=linear)

    def wide(self, rows: int) -> bool:
        """Whether an input of ``rows`` rows goes through the kept dense weights instead."""
        return self.dense is not None and rows > INT4_MAX_ROWS

    @staticmethod
    def stackable(layers: list[torch.nn.Module]) -> bool:
        """Whether ``stacked`` can join ``layers``: 4-bit layers of one input size, each a whole number of
        the kernel's packing blocks (its packed rows are interleaved within blocks of 64 outputs)."""
        return (all(isinstance(layer, Int4Linear) for layer in layers)
                and len({layer.in_features for layer in layers}) == 1
                and all(layer.out_features % INT4_PACK_BLOCK == 0 for layer in layers))

    @classmethod
    def stacked(cls, layers: list[Int4Linear]) -> Int4Linear:
        """One layer computing ``layers``' outputs side by side (for the same input), so a decode step
        calls the kernel once where it called it ``len(layers)`` times. The packed rows are shared
        with ``layers``, which keep working on views of them."""
        packed = torch.cat([layer.packed for layer in layers])
        scales_and_zeros = torch.cat([layer.scales_and_zeros for layer in layers], dim=1).contiguous()
        biases = [layer.bias for layer in layers]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else packed.new_zeros(layer.out_features, dtype=torch.bfloat16)
                              for b, layer in zip(biases, layers, strict=True)])
        start = 0
        for layer in layers:
            layer.packed = packed[start:start + layer.out_features]
            start += layer.out_features
        return cls(packed, scales_and_zeros, layers[0].in_features, bias)

    @staticmethod
    def fits(linear: torch.nn.Linear) -> bool:
        return (linear.weight.device.type == "cpu" and linear.out_features % 16 == 0
                and linear.in_features % INT4_GROUP == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wide(x.numel() // self.in_features):
            return self.dense(x)
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch._weight_int4pack_mm_for_cpu(rows, self.packed, INT4_GROUP, self.scales_and_zeros).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class Int8Linear(torch.nn.Module):
    """A linear layer whose weight is held as int8 with one bf16 scale per output channel, for
    PyTorch's CPU int8 weight-only kernel (``_weight_int8pack_mm``); used for the output layer under
    ``--quantization int4``, where 4 bits cost too much agreement and bf16 twice the bytes."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-8)
        self.register_buffer("weight_int8", (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.bias = linear.bias
        # The layer as it was, for inputs of more than INT8_MAX_ROWS rows (tied to the embedding
        # table in SmolLM2, so keeping it costs nothing).
        self.dense = linear

    def wide(self, rows: int) -> bool:
        return rows > INT8_MAX_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wide(x.numel() // self.in_features):
            return self.dense(x)
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch._weight_int8pack_mm(rows, self.weight_int8, self.scales).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` [out, in] as the CPU int4 kernel takes it: each group of ``INT4_GROUP`` inputs
    mapped onto 0..15 between its minimum and maximum (asymmetric: the kernel computes
    ``(q - 8) · scale + zero``), packed; and the groups' scales and zeros, [in / group, out, 2]."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-8)
    q = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(out_features, in_features)
    zero = low + 8 * scale
    scales_and_zeros = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], dim=-1).transpose(0, 1)
    return torch._convert_weight_to_int4pack_for_cpu(q, 2), scales_and_zeros.contiguous().to(torch.bfloat16)


def _int4_linears(model: PreTrainedModel) -> PreTrainedModel:
    if model.device.type != "cpu":
        raise QuantizationError("--quantization int4 runs on PyTorch's CPU int4 kernel: on CUDA use --dtype bfloat16")
    # The output layer goes to 8 bits, not 4: in 4 bits SmolLM2's greedy answers agreed with fp32's
    # on 87% of tokens (the bound is 90%), against 97% with it kept in bf16 (bench precision_quality).
    output = model.get_output_embeddings()
    kept = []

    def swap(module: torch.nn.Module, path: str) -> None:
        for name, child in module.named_children():
            if isinstance(child, torch.nn.Linear):
                if child is output:
                    setattr(module, name, Int8Linear(child))
                elif Int4Linear.fits(child):
                    setattr(module, name, Int4Linear.from_linear(child))
                else:
                    kept.append(f"{path}{name}")
            else:
                swap(child, f"{path}{name}.")

    swap(model, "")
    if kept:
        log.info("--quantization int4: %d linear layer(s) the kernel cannot take keep their weights (%s)",
                 len(kept), ", ".join(kept[:5]))
    return model
