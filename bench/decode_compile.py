"""Is a compiled decode step faster? torch.compile (inductor) over a static KV layout, against eager.

One decode step of SmolLM2 at each batch size, three ways, in one process and in turn:

- ``eager dynamic`` — what the engine runs: eager forward over a ``DynamicCache`` (it grows by
  one column each step);
- ``eager static``  — eager forward over a ``StaticCache`` preallocated to the full length;
- ``compiled static`` — ``torch.compile`` (inductor, CPU) of the forward over that ``StaticCache``,
  so every step has the same shapes and one graph serves them all.

Each figure is the median step time over ``--steps`` steps after a warm-up (which, compiled, pays
for the compilation; its time is reported apart). The engine adopts compilation only where this
measures it faster (docs/BENCHMARKS.md, issue 20).

    python -m bench decode_compile [--quick] [--batches 1 8] [--steps 32] [--dtype float32]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel, StaticCache
from transformers.utils import logging as hf_logging

from bench.report import median, print_table, progress
from bench.servers import MODEL_CACHE_DIR
from inference.engine.models import load_model

PROMPT_TOKENS = 32
Step = Callable[[torch.Tensor, int], torch.Tensor]


def prefilled(model: PreTrainedModel, batch: int, cache: DynamicCache | StaticCache) -> torch.Tensor:
    vocab = int(model.config.get_text_config().vocab_size)
    prompt = torch.randint(0, vocab, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=prompt, past_key_values=cache, use_cache=True,
                cache_position=torch.arange(PROMPT_TOKENS), logits_to_keep=1)
    return out.logits[:, -1:].argmax(dim=-1)


def time_steps(step: Step, token: torch.Tensor, steps: int, warmup: int) -> tuple[float, float]:
    """(seconds of the warm-up, median seconds per step after it)."""
    position = PROMPT_TOKENS
    started = time.perf_counter()
    for _ in range(warmup):
        token = step(token, position)
        position += 1
    warm = time.perf_counter() - started
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        token = step(token, position)
        times.append(time.perf_counter() - started)
        position += 1
    return warm, median(times)


def measure(model: PreTrainedModel, batch: int, steps: int, warmup: int) -> dict[str, tuple[float, float]]:
    length = PROMPT_TOKENS + warmup + steps + 1
    results = {}

    dynamic = DynamicCache(config=model.config)
    token = prefilled(model, batch, dynamic)

    def eager_dynamic(token: torch.Tensor, position: int) -> torch.Tensor:
        out = model(input_ids=token, past_key_values=dynamic, use_cache=True,
                    cache_position=torch.tensor([position]))
        return out.logits[:, -1:].argmax(dim=-1)

    results["eager dynamic"] = time_steps(eager_dynamic, token, steps, warmup)

    for label, forward in (("eager static", model.forward),
                           ("compiled static", torch.compile(model.forward, dynamic=False))):
        static = StaticCache(config=model.config, max_cache_len=length)
        token = prefilled(model, batch, static)

        def static_step(token: torch.Tensor, position: int, forward: Callable = forward,
                        static: StaticCache = static) -> torch.Tensor:
            out = forward(input_ids=token, past_key_values=static, use_cache=True,
                          cache_position=torch.tensor([position]))
            return out.logits[:, -1:].argmax(dim=-1)

        progress(f"batch {batch}: {label}")
        results[label] = time_steps(static_step, token, steps, warmup)
    return results


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench decode_compile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny-random model, batch 1, 4 steps")
    parser.add_argument("--model", help="smollm2 (default) or tiny-random")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 8)")
    parser.add_argument("--steps", type=int, help="timed decode steps (default 32)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    model_name = args.model or ("tiny-random" if args.quick else "smollm2")
    steps = args.steps or (4 if args.quick else 32)
    warmup = 3
    loaded = load_model(model_name, device=torch.device("cpu"), cache_dir=MODEL_CACHE_DIR,
                        max_model_len=PROMPT_TOKENS + warmup + steps + 8, dtype=args.dtype)
    rows = []
    with torch.inference_mode():
        for batch in args.batches or ((1,) if args.quick else (1, 8)):
            results = measure(loaded.model, batch, steps, warmup)
            eager = results["eager dynamic"][1]
            for label, (warm, step) in results.items():
                rows.append([batch, label, step * 1000, batch / step, f"{eager / step:.2f}x", warm])
    print_table(f"Decode step: eager vs torch.compile ({model_name}, {args.dtype}, CPU)",
                ["batch", "forward", "step ms (median)", "tokens/s", "vs eager dynamic", "warm-up s"], rows,
                [f"{steps} timed steps after {warmup} warm-up steps (the compiled warm-up includes compilation)"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
