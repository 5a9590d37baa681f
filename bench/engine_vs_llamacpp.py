"""Wattson's engine against llama.cpp's ``llama-server`` on the same CPU, in one run.

Every engine is a real server in its own process, all started before the first measurement and
measured in turn at each stream count, so drift in a shared machine hits them alike:

- ``wattson-<dtype>[+int8|+int4]`` — ``python -m inference serve --model smollm2 --dtype <dtype>``
  (``--quantization int8`` or ``int4`` for such a variant), 32 running slots;
- ``llama-server`` — llama.cpp serving SmolLM2's Q4_1 GGUF with 32 slots, started through
  ``bench.llama_server`` (its ``locate``, ``smollm2_gguf`` and ``LlamaServer``); where that module or
  its built binary is missing, the row is skipped with the reason.

Each stream count N sends N concurrent streamed completions of exactly ``--new-tokens`` tokens
(greedy, EOS ignored). Tokens/s is all completion tokens over the wall time from the first request
to the last token; TTFT is from a request to its first streamed text.

A memory-bandwidth probe (the best of several sums of a 512 MiB tensor) gives the machine's read
bandwidth. Decoding one step reads every weight once, whatever the batch, so an engine's ceiling at
N streams is ``N x bandwidth / weight bytes``: each row reports tokens/s as a fraction of it. Weight
bytes are what one decode step reads: every linear layer's weight (the LM head included, the
embedding table only through it) as stored, for Wattson; the GGUF file's size for llama-server.

    python -m bench engine_vs_llamacpp [--quick] [--variants float32 bfloat16 bfloat16+int4] [--streams 1 8 32]
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel

from bench.http_load import LoadError, StreamBurst, completion_body, stream_burst
from bench.report import ms, percentile, print_table, progress
from bench.servers import MODEL_CACHE_DIR, runtime_server

LLAMA = "llama-server"
PROBE_BYTES = 512 * 1024 * 1024
PROBE_ROUNDS = 5
GOAL_ONE_STREAM_RATIO = 1.0  # the "Done when": at 1 stream at least llama-server's tokens/s
GOAL_MANY_STREAMS_RATIO = 1.5  # and at 32 streams at least 1.5x
GOAL_TTFT_P95_S = 1.0


@dataclass(frozen=True)
class Settings:
    model: str
    variants: tuple[str, ...]
    streams: tuple[int, ...]
    prompt_tokens: int
    new_tokens: int
    repeats: int
    llama: bool
    llama_gguf: Path | None
    threads: int | None


@dataclass(frozen=True)
class Measured:
    tokens: int
    seconds: float
    ttft_p50_s: float | None
    ttft_p95_s: float | None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


@dataclass
class Contender:
    name: str
    url: str
    model: str  # the model name requests carry
    weight_bytes: int | None


def parse_args(argv: Sequence[str]) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m bench engine_vs_llamacpp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny-random model, 1 and 4 streams, 8 tokens, no llama-server (checks the script)")
    parser.add_argument("--model", help="smollm2 (default), tiny-random (with --quick) or a model directory")
    parser.add_argument("--variants", nargs="+",
                        help="Wattson precisions: DTYPE, DTYPE+int8 or DTYPE+int4 "
                             "(default float32 bfloat16 bfloat16+int4)")
    parser.add_argument("--streams", type=int, nargs="+", help="concurrent streams (default 1 8 32)")
    parser.add_argument("--prompt-tokens", type=int, help="prompt length in tokens (default 32)")
    parser.add_argument("--new-tokens", type=int, help="tokens per stream (default 128)")
    parser.add_argument("--repeats", type=int, help="bursts per figure, best kept (default 1)")
    parser.add_argument("--no-llama", action="store_true", help="leave llama-server out")
    parser.add_argument("--llama-gguf", type=Path, help="the GGUF llama-server serves (default: SmolLM2 Q4_1)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for every engine (--torch-threads, llama-server --threads); default: each "
                             "engine's own choice. On a machine shared with other work, 1 avoids OpenMP threads "
                             "spinning on a busy core")
    args = parser.parse_args(argv)
    quick = args.quick
    variants = tuple(args.variants or ("float32", "bfloat16", "bfloat16+int4"))
    for variant in variants:
        dtype, _, quantization = variant.partition("+")
        if dtype not in ("auto", "float32", "bfloat16") or quantization not in ("", "int8", "int4"):
            parser.error(f"variant {variant!r} must be DTYPE, DTYPE+int8 or DTYPE+int4 with DTYPE auto, float32 or "
                         "bfloat16")
    return Settings(
        model=args.model or ("tiny-random" if quick else "smollm2"),
        variants=variants,
        streams=tuple(args.streams or ((1, 4) if quick else (1, 8, 32))),
        prompt_tokens=args.prompt_tokens or (16 if quick else 32),
        new_tokens=args.new_tokens or (8 if quick else 128),
        repeats=args.repeats or 1,
        llama=not (args.no_llama or quick),
        llama_gguf=args.llama_gguf,
        threads=args.threads,
    )


# -- the bandwidth ceiling ------------------------------------------------------------------------


def read_bandwidth_bytes_per_s(size: int = PROBE_BYTES, rounds: int = PROBE_ROUNDS) -> float:
    """The best of ``rounds`` full reads (a sum) of a ``size``-byte fp32 tensor, in bytes/s."""
    data = torch.ones(size // 4, dtype=torch.float32)
    data.sum()  # fault the pages in before timing
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return size / best


def decode_weight_bytes(model: PreTrainedModel) -> int:
    """Bytes one decode step reads from weights: each linear layer's weight as stored (quantized
    tensors by their parts, packed 4- and 8-bit layers by their buffers), each counted once; norms
    are included, embedding rows are not."""
    seen: set[int] = set()
    # --quantization int4 keeps each layer's dense weights for prefill and wide batches: a
    # one-stream decode step does not read them.
    kept_dense = {id(module.dense) for module in model.modules() if getattr(module, "dense", None) is not None}
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) or id(module) in kept_dense:
            continue
        for param in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            if id(param) not in seen:
                seen.add(id(param))
                total += _stored_bytes(param)
    return total


def _stored_bytes(tensor: torch.Tensor) -> int:
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = flatten()
        return sum(_stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def wattson_weight_bytes(model: str, variant: str) -> int:
    """Load the variant in this process (as the server does) just to weigh what a step reads."""
    from inference.engine.models import load_model

    dtype, _, quantization = variant.partition("+")
    loaded = load_model(model, device=torch.device("cpu"), cache_dir=MODEL_CACHE_DIR, max_model_len=512,
                        dtype=dtype, quantization=quantization or "none")
    return decode_weight_bytes(loaded.model)


# -- the contenders -------------------------------------------------------------------------------


@contextmanager
def wattson(settings: Settings, variant: str) -> Iterator[Contender]:
    dtype, _, quantization = variant.partition("+")
    options = ["--model", settings.model, "--dtype", dtype, "--quantization", quantization or "none",
               "--max-batch-size", str(max(32, *settings.streams)),
               "--max-model-len", str(settings.prompt_tokens + settings.new_tokens + 64)]
    if settings.threads:
        options += ["--torch-threads", str(settings.threads)]
    with runtime_server(*options, name=f"wattson-{variant}") as url:
        yield Contender(f"wattson-{variant}", url, Path(settings.model).name,
                        wattson_weight_bytes(settings.model, variant))


def llama_server(settings: Settings, stack: ExitStack) -> Contender | str:
    """llama-server started on ``stack``, or the reason it is skipped."""
    try:
        module = importlib.import_module("bench.llama_server")
    except ImportError as exc:
        return f"bench.llama_server is not here ({exc}): llama-server skipped"
    binary = module.locate(Path(os.environ.get("WATTSON_LLAMA_SERVER_DIR", module.CACHE_DIR)))
    if binary is None:
        return "no llama-server binary is built (python -m bench.llama_server --build): llama-server skipped"
    try:
        gguf = settings.llama_gguf or module.smollm2_gguf()
        server = stack.enter_context(module.LlamaServer(binary, gguf=gguf, slots=max(32, *settings.streams),
                                                        slot_context=settings.prompt_tokens + settings.new_tokens + 64,
                                                        threads=settings.threads))
    except Exception as exc:  # a build or start failure is reported as the reason for the skip
        return f"llama-server could not start ({type(exc).__name__}: {exc}): llama-server skipped"
    return Contender(LLAMA, server.url, server.alias, gguf.stat().st_size)


# -- measuring ------------------------------------------------------------------------------------


def measure(contender: Contender, texts: list[str], new_tokens: int) -> Measured:
    burst = stream_burst(contender.url, [_body(contender, text, new_tokens) for text in texts])
    expected = len(texts) * new_tokens
    if burst.completion_tokens != expected:
        raise LoadError(f"{contender.name} made {burst.completion_tokens} tokens, not {expected}")
    return _measured(burst)


def _body(contender: Contender, text: str, new_tokens: int) -> dict:
    body = completion_body(contender.model, text, new_tokens)
    if contender.name == LLAMA:
        body["n_predict"] = new_tokens  # llama-server's own name for max_tokens, to be sure
    return body


def _measured(burst: StreamBurst) -> Measured:
    ttfts = burst.ttfts()
    return Measured(burst.completion_tokens, burst.seconds,
                    percentile(ttfts, 50) if ttfts else None, percentile(ttfts, 95) if ttfts else None)


def best_of(label: str, repeats: int, run: Callable[[], Measured]) -> Measured:
    results = []
    for i in range(repeats):
        result = run()
        progress(f"{label} {i + 1}/{repeats}: {result.tokens_per_s:.1f} tokens/s, "
                 f"TTFT p95 {ms(result.ttft_p95_s) or 0:.0f} ms")
        results.append(result)
    return max(results, key=lambda r: r.tokens_per_s)


def prompts(settings: Settings) -> list[str]:
    from bench.prompts import prompts_of_length
    from inference.engine.models import SMOLLM2, TINY_RANDOM, load_model

    if settings.model == TINY_RANDOM:
        tokenizer = load_model(TINY_RANDOM, device=torch.device("cpu"), cache_dir=MODEL_CACHE_DIR,
                               max_model_len=512, dtype="float32").tokenizer
    else:
        path = MODEL_CACHE_DIR / SMOLLM2 if settings.model == SMOLLM2 else Path(settings.model)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return prompts_of_length(tokenizer, max(settings.streams), settings.prompt_tokens)


# -- the report -----------------------------------------------------------------------------------


def report(settings: Settings, bandwidth: float, contenders: list[Contender],
           results: dict[tuple[str, int], Measured], skipped: str | None) -> None:
    headers = ["engine", "streams", "tokens/s", "TTFT p50 ms", "TTFT p95 ms", "weights MB",
               "ceiling tok/s", "of ceiling"]
    rows = []
    for n in settings.streams:
        for c in contenders:
            r = results[(c.name, n)]
            ceiling = n * bandwidth / c.weight_bytes if c.weight_bytes else None
            rows.append([c.name, n, r.tokens_per_s, ms(r.ttft_p50_s), ms(r.ttft_p95_s),
                         c.weight_bytes / 1e6 if c.weight_bytes else None, ceiling,
                         f"{r.tokens_per_s / ceiling:.0%}" if ceiling else None])
    notes = [f"memory read bandwidth (best sum of a {PROBE_BYTES >> 20} MiB tensor): {bandwidth / 1e9:.1f} GB/s; "
             "ceiling = streams x bandwidth / weight bytes (one read of every weight per decode step)",
             f"model {settings.model}, prompt {settings.prompt_tokens} tokens, {settings.new_tokens} new tokens per "
             f"stream (greedy, EOS ignored), streamed /v1/completions, best of {settings.repeats}, "
             f"threads per engine: {settings.threads or 'each engine default'}"]
    if skipped:
        notes.append(skipped)
    notes.extend(_verdicts(settings, contenders, results))
    print_table("Engine vs llama-server on this CPU", headers, rows, notes)


def _verdicts(settings: Settings, contenders: list[Contender], results: dict[tuple[str, int], Measured]) -> list[str]:
    lines = []
    if not any(c.name == LLAMA for c in contenders):
        return ["goals against llama-server: n/a (llama-server not measured)"]
    ours = [c for c in contenders if c.name != LLAMA]
    for c in ours:
        for n, goal in ((1, GOAL_ONE_STREAM_RATIO), (32, GOAL_MANY_STREAMS_RATIO)):
            if n in settings.streams:
                ratio = results[(c.name, n)].tokens_per_s / results[(LLAMA, n)].tokens_per_s
                lines.append(f"goal {c.name} >= {goal:.1f}x llama-server at {n} stream(s): {ratio:.2f}x, "
                             f"{'met' if ratio >= goal else 'NOT met'}")
        if 32 in settings.streams:
            p95 = results[(c.name, 32)].ttft_p95_s
            met = p95 is not None and p95 < GOAL_TTFT_P95_S
            lines.append(f"goal {c.name} TTFT p95 < {GOAL_TTFT_P95_S:.0f} s at 32 streams: "
                         f"{'n/a' if p95 is None else f'{p95:.2f} s'}, {'met' if met else 'NOT met'}")
    return lines


def main(argv: Sequence[str]) -> int:
    settings = parse_args(argv)
    texts = prompts(settings)
    progress("probing memory bandwidth")
    bandwidth = read_bandwidth_bytes_per_s()
    progress(f"read bandwidth {bandwidth / 1e9:.1f} GB/s")
    with ExitStack() as stack:
        contenders = [stack.enter_context(wattson(settings, v)) for v in settings.variants]
        skipped = None
        if settings.llama:
            llama = llama_server(settings, stack)
            if isinstance(llama, str):
                skipped = llama
                progress(llama)
            else:
                contenders.append(llama)
        else:
            skipped = "llama-server left out (--no-llama or --quick)"
        progress("warming up every engine")
        for c in contenders:
            measure(c, texts[:2], min(8, settings.new_tokens))
        results = {}
        for n in settings.streams:
            for c in contenders:  # in turn at each stream count: drift hits every engine alike
                results[(c.name, n)] = best_of(f"{c.name} N={n}", settings.repeats,
                                               lambda c=c, n=n: measure(c, texts[:n], settings.new_tokens))
    report(settings, bandwidth, contenders, results, skipped)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
