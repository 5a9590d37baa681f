"""Output quality of each ``--dtype`` / ``--quantization`` against fp32, on a fixed prompt set.

fp32 is the reference: it generates ``--new-tokens`` greedy tokens for each prompt in
``QUALITY_PROMPTS`` (chat-formatted). Each candidate precision then reads the same prompt plus that
continuation the way the engine serves it, through the engine's forward (``model_forward``): the
prompt prefilled in one call, then the continuation fed back one token per decode step (teacher
forcing), so that the decode path a precision ships with (under ``--quantization int4``, the 4-bit
kernels; prefill runs on the dense weights) is the one scored. It is scored by

- greedy agreement: the share of continuation positions where its top-1 token is fp32's token;
- perplexity: over the continuation tokens, as a ratio to fp32's on the same tokens.

Teacher forcing scores every position on the same context, so one early divergence does not count
as thirty. A candidate passes when agreement >= ``MIN_AGREEMENT`` and the perplexity ratio <=
``MAX_PERPLEXITY_RATIO`` (the bound docs/BENCHMARKS.md documents, issue 20).

    python -m bench precision_quality [--quick] [--variants bfloat16 int8 bfloat16+int8 int4] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PretrainedConfig
from transformers.utils import logging as hf_logging

from bench.report import print_table, progress
from bench.servers import MODEL_CACHE_DIR
from inference.engine.llama_forward import ModelForward, model_forward
from inference.engine.models import LoadedModel, load_model

MIN_AGREEMENT = 0.90
MAX_PERPLEXITY_RATIO = 1.05

# Fixed: change a prompt and every figure recorded against it moves.
QUALITY_PROMPTS = (
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about a lighthouse keeper.",
    "List three uses of a paperclip.",
    "How do I boil an egg so that the yolk stays soft?",
    "What is the difference between weather and climate?",
    "Translate 'good morning, how are you?' into Spanish.",
    "Give me a tip for saving money on groceries.",
    "What does a compiler do?",
    "Summarize the story of Little Red Riding Hood in one paragraph.",
    "Why do cats purr?",
    "Name the planets of the solar system in order.",
)

VARIANTS = {  # name -> (--dtype, --quantization)
    "bfloat16": ("bfloat16", "none"),
    "int8": ("float32", "int8"),
    "bfloat16+int8": ("bfloat16", "int8"),
    "int4": ("bfloat16", "int4"),
}


@dataclass(frozen=True)
class Sample:
    ids: list[int]  # prompt then fp32's greedy continuation
    prompt_len: int


@dataclass(frozen=True)
class Quality:
    variant: str
    agreement: float
    perplexity: float
    reference_perplexity: float

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity / self.reference_perplexity

    @property
    def passes(self) -> bool:
        return self.agreement >= MIN_AGREEMENT and self.perplexity_ratio <= MAX_PERPLEXITY_RATIO


def load_variant(model: str, variant: str, max_model_len: int = 512) -> LoadedModel:
    dtype, quantization = VARIANTS.get(variant, ("float32", "none"))
    return load_model(model, device=torch.device("cpu"), cache_dir=MODEL_CACHE_DIR, max_model_len=max_model_len,
                      dtype=dtype, quantization=quantization)


def reference_samples(
    reference: LoadedModel, new_tokens: int, prompts: Sequence[str] = QUALITY_PROMPTS,
) -> list[Sample]:
    """fp32's greedy continuation of every prompt (EOS ignored, so each has ``new_tokens``)."""
    tokenizer = reference.tokenizer
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = reference.model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                       do_sample=False, pad_token_id=tokenizer.pad_token_id)
    width = batch["input_ids"].shape[1]
    samples = []
    for row, mask in enumerate(batch["attention_mask"]):
        prompt = batch["input_ids"][row][mask.bool()].tolist()
        samples.append(Sample(prompt + out[row, width:].tolist(), len(prompt)))
    return samples


def served_logits(forward: ModelForward, config: PretrainedConfig, sample: Sample) -> torch.Tensor:
    """The logits predicting each continuation token, [continuation, vocab]: the prompt prefilled,
    then each continuation token but the last decoded, as the engine does for one stream."""
    cache = DynamicCache(config=config)
    prompt = torch.tensor([sample.ids[:sample.prompt_len]])
    logits = [forward(prompt, torch.ones_like(prompt), torch.arange(sample.prompt_len)[None], cache)]
    for position in range(sample.prompt_len, len(sample.ids) - 1):
        token = torch.tensor([[sample.ids[position]]])
        logits.append(forward(token, torch.ones(1, position + 1, dtype=torch.long), torch.tensor([[position]]), cache))
    return torch.cat(logits).float()


def score(loaded: LoadedModel, samples: Sequence[Sample]) -> tuple[float, float]:
    """(greedy agreement with the samples' continuations, perplexity over the continuations)."""
    forward = model_forward(loaded.model, loaded.model.device)
    agree = positions = 0
    nll = 0.0
    with torch.inference_mode():
        for sample in samples:
            logits = served_logits(forward, loaded.model.config, sample)
            targets = torch.tensor(sample.ids[sample.prompt_len:])
            nll += float(F.cross_entropy(logits, targets, reduction="sum"))
            agree += int((logits.argmax(dim=-1) == targets).sum())
            positions += targets.numel()
    return agree / positions, math.exp(nll / positions)


def measure(model: str, variants: Sequence[str], new_tokens: int,
            prompts: Sequence[str] = QUALITY_PROMPTS) -> list[Quality]:
    reference = load_variant(model, "float32")
    progress(f"fp32 generating {new_tokens} greedy tokens for {len(prompts)} prompts")
    samples = reference_samples(reference, new_tokens, prompts)
    ref_agreement, ref_ppl = score(reference, samples)
    results = [Quality("float32", ref_agreement, ref_ppl, ref_ppl)]
    del reference
    for variant in variants:
        progress(f"scoring {variant}")
        agreement, ppl = score(load_variant(model, variant), samples)
        results.append(Quality(variant, agreement, ppl, ref_ppl))
    return results


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench precision_quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny-random model, 8 tokens (checks the script)")
    parser.add_argument("--model", help="smollm2 (default) or a model directory")
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--new-tokens", type=int, help="fp32's greedy tokens per prompt (default 32)")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    model = args.model or ("tiny-random" if args.quick else "smollm2")
    new_tokens = args.new_tokens or (8 if args.quick else 32)
    results = measure(model, args.variants, new_tokens)
    rows = [[r.variant, f"{r.agreement:.1%}", f"{r.perplexity:.3f}", f"{r.perplexity_ratio:.3f}",
             "pass" if r.passes else "FAIL"] for r in results]
    print_table(f"Precision quality against fp32 ({model}, {len(QUALITY_PROMPTS)} prompts x {new_tokens} tokens)",
                ["variant", "greedy agreement", "perplexity", "ppl / fp32", "bound"], rows,
                [f"bound: agreement >= {MIN_AGREEMENT:.0%} and perplexity <= {MAX_PERPLEXITY_RATIO:.2f}x fp32's"])
    return 0 if all(r.passes for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
