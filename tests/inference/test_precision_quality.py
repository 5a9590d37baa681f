"""bf16, int8 and int4 weights stay within the documented quality bound of fp32 on SmolLM2 (real weights),
scored through the engine's own prefill and decode steps."""

from __future__ import annotations

import pytest

from bench.precision_quality import MAX_PERPLEXITY_RATIO, MIN_AGREEMENT, QUALITY_PROMPTS, measure
from inference.engine.models import LoadedModel


@pytest.mark.real_model
def test_bf16_int8_and_int4_agree_with_fp32_within_the_documented_bound(smollm2: LoadedModel) -> None:
    # The fixture skips (or, under `make test`, fails) where SmolLM2 is not prepared; measure() loads
    # each precision itself, from the same cache.
    results = {r.variant: r for r in measure("smollm2", ["bfloat16", "int8", "int4"], new_tokens=16)}
    assert len(QUALITY_PROMPTS) >= 12
    for variant in ("bfloat16", "int8", "int4"):
        quality = results[variant]
        assert quality.agreement >= MIN_AGREEMENT, f"{variant}: greedy agreement {quality.agreement:.1%}"
        ratio = quality.perplexity_ratio
        assert ratio <= MAX_PERPLEXITY_RATIO, f"{variant}: perplexity {ratio:.3f}x fp32's"
    assert results["float32"].perplexity_ratio == 1.0
