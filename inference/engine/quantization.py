"""Weight-only quantization of a loaded model's linear layers (``--quantization``).

``int8`` stores each linear layer's weight as int8 with one scale per output channel, through
torchao's ``Int8WeightOnlyConfig`` (activations stay in the model's dtype), so a decode step reads
about a quarter of fp32's weight bytes. The embedding table is left as it is.

``int4`` (CPU) stores each linear layer's weight but the output layer's as 4-bit integers in groups
of 32 along the input with a bf16 scale and zero per group, and multiplies with PyTorch's own CPU
kernel for that layout (``_weight_int4pack_mm_for_cpu``; activations in bf16 for the product). On a
2-core Xeon SmolLM2 then decoded one stream at 67 tokens/s against 35 in bf16 (served: 55.5 against
31.4), with greedy answers agreeing with fp32's on 97% of tokens; but the kernel is slow on many
rows at once, so prefill and wide batches lose (32 streams served: 348 tokens/s against 517, first
token 1.5 s against 0.37 s): a choice for a runtime that serves few streams at a time
(docs/BENCHMARKS.md, issue 20). The output layer (tied to
the embedding table in SmolLM2) keeps its weights: in 4 bits too it decoded at 82 tokens/s but
agreed on only 87%. So does a layer whose shape the kernel does not take (outputs not a multiple
of 16, inputs not of the group).

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

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed, scales_and_zeros = quantize_int4(linear.weight.detach())
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.bias = linear.bias

    @staticmethod
    def fits(linear: torch.nn.Linear) -> bool:
        return (linear.weight.device.type == "cpu" and linear.out_features % 16 == 0
                and linear.in_features % INT4_GROUP == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch._weight_int4pack_mm_for_cpu(rows, self.packed, INT4_GROUP, self.scales_and_zeros).to(x.dtype)
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
    # The output layer stays as it is: in 4 bits SmolLM2's greedy answers agreed with fp32's on 87%
    # of tokens (the bound is 90%), against 97% with it kept (bench precision_quality).
    output = model.get_output_embeddings()
    kept = []

    def swap(module: torch.nn.Module, path: str) -> None:
        for name, child in module.named_children():
            if isinstance(child, torch.nn.Linear):
                if child is not output and Int4Linear.fits(child):
                    setattr(module, name, Int4Linear(child))
                else:
                    kept.append(f"{path}{name}")
            else:
                swap(child, f"{path}{name}.")

    swap(model, "")
    if kept:
        log.info("--quantization int4: %d linear layer(s) the kernel cannot take keep their weights (%s)",
                 len(kept), ", ".join(kept[:5]))
    return model
