"""Weight-only quantization of a loaded model's linear layers (``--quantization``).

``int8`` stores each linear layer's weight as int8 with one scale per output channel, through
torchao's ``Int8WeightOnlyConfig`` (activations stay in the model's dtype), so a decode step reads
about a quarter of fp32's weight bytes. The embedding table is left as it is. Whether it is faster
than fp32/bf16 depends on the CPU's kernels: ``python -m bench precision_quality`` and
``python -m bench engine_vs_llamacpp`` measure quality and speed (docs/BENCHMARKS.md, issue 20).
"""

from __future__ import annotations

import logging
import warnings

from transformers import PreTrainedModel

log = logging.getLogger(__name__)

QUANTIZATION_CHOICES = ("none", "int8")


class QuantizationError(ValueError):
    """A ``--quantization`` that cannot be applied here; the message says why."""


def quantize_weights(model: PreTrainedModel, method: str) -> PreTrainedModel:
    """Quantize ``model``'s linear weights in place by ``method`` and return it."""
    if method == "none":
        return model
    if method != "int8":
        raise QuantizationError(f"--quantization {method!r} must be one of {', '.join(QUANTIZATION_CHOICES)}")
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
