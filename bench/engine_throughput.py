"""Aggregate tokens/s of continuous batching against transformers' static ``generate``.

For each number of concurrent streams N, every stream gets its own prompt of the same length and
generates exactly ``--new-tokens`` tokens (greedy, EOS ignored), measured three ways:

(a) engine  — ``inference.engine.engine.Engine`` fed directly through ``submit()`` with queue
              sinks, all N sequences submitted at once;
(b) static  — ``model.generate`` on one left-padded batch of the same N prompts with
              ``min_new_tokens = max_new_tokens`` (the ceiling for a batch that starts together);
(c) http    — the real server (``python -m inference serve``, its own process) with N concurrent
              streaming clients (httpx, SSE), to show what the API layer costs.

Tokens/s is all completion tokens over the wall time from the first submit to the last token.
TTFT is from a sequence's submit (or request) to its first token (first streamed text for http).
Each figure is the best of ``--repeats`` runs after a warm-up.

    python -m bench engine_throughput [--quick] [--streams 1 8 32] [--new-tokens 64] ...
"""

from __future__ import annotations

import argparse
import queue
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers.utils import logging as hf_logging

from bench.http_load import completion_body, stream_burst
from bench.prompts import encode, prompts_of_length
from bench.report import median, ms, print_table, progress
from bench.servers import MODEL_CACHE_DIR, runtime_server
from inference.engine.engine import Engine, GenerationRequest, GenerationResult
from inference.engine.models import LoadedModel, load_model
from inference.engine.sampling import SamplingParams

GOAL_STREAMS = 32
GOAL_RATIO = 0.90


@dataclass(frozen=True)
class Settings:
    model: str
    streams: tuple[int, ...]
    prompt_tokens: int
    new_tokens: int
    repeats: int
    http: bool


@dataclass(frozen=True)
class Throughput:
    tokens: int
    seconds: float
    ttft_p50_s: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


@dataclass(frozen=True)
class Row:
    streams: int
    engine: Throughput
    static: Throughput
    http: Throughput | None


def parse_args(argv: Sequence[str]) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m bench engine_throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny-random model, 1 and 4 streams, 16+16 tokens, one repeat (checks the script)")
    parser.add_argument("--model", help="smollm2 (default), tiny-random (default with --quick) or a directory")
    parser.add_argument("--streams", type=int, nargs="+", help="concurrent streams (default 1 8 32)")
    parser.add_argument("--prompt-tokens", type=int, help="prompt length in tokens (default 32)")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per stream (default 64)")
    parser.add_argument("--repeats", type=int, help="measurements per figure, best kept (default 2)")
    parser.add_argument("--no-http", action="store_true", help="skip (c), the run through the HTTP server")
    args = parser.parse_args(argv)
    quick = args.quick
    return Settings(
        model=args.model or ("tiny-random" if quick else "smollm2"),
        streams=tuple(args.streams or ((1, 4) if quick else (1, 8, 32))),
        prompt_tokens=args.prompt_tokens or (16 if quick else 32),
        new_tokens=args.new_tokens or (16 if quick else 64),
        repeats=args.repeats or (1 if quick else 2),
        http=not args.no_http,
    )


def load(settings: Settings) -> LoadedModel:
    progress(f"loading {settings.model} (CPU, fp32)")
    hf_logging.set_verbosity_error()  # generate() warns about flags it is given on purpose
    max_len = settings.prompt_tokens + settings.new_tokens + 16
    return load_model(settings.model, device=torch.device("cpu"), cache_dir=MODEL_CACHE_DIR, max_model_len=max_len,
                      dtype="float32")


def measure_engine(engine: Engine, prompts: list[list[int]], new_tokens: int) -> Throughput:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    sinks: list[queue.Queue] = [queue.Queue() for _ in prompts]
    started = time.perf_counter()
    for ids, sink in zip(prompts, sinks, strict=True):
        engine.submit(GenerationRequest(ids, params), sink.put)
    results = [_result(sink) for sink in sinks]
    for r in results:
        if r.finish_reason != "length" or r.completion_tokens != new_tokens:
            raise RuntimeError(f"engine sequence ended with {r.finish_reason} after {r.completion_tokens} "
                               f"tokens ({r.error or 'no error'})")
    ttfts = [r.first_token_at - r.submitted_at for r in results if r.first_token_at is not None]
    return Throughput(sum(r.completion_tokens for r in results),
                      max(r.finished_at for r in results) - started, median(ttfts))


def _result(sink: queue.Queue) -> GenerationResult:
    while True:
        output = sink.get(timeout=600)
        if isinstance(output, GenerationResult):
            return output


def measure_static(loaded: LoadedModel, prompts: list[list[int]], new_tokens: int) -> Throughput:
    tokenizer = loaded.tokenizer
    batch = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")  # left padding
    started = time.perf_counter()
    with torch.inference_mode():
        out = loaded.model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    seconds = time.perf_counter() - started
    generated = out.shape[1] - batch["input_ids"].shape[1]
    if generated != new_tokens:
        raise RuntimeError(f"generate() made {generated} tokens, not {new_tokens}")
    return Throughput(len(prompts) * new_tokens, seconds)


def measure_http(base_url: str, model: str, texts: list[str], new_tokens: int) -> Throughput:
    burst = stream_burst(base_url, [completion_body(model, text, new_tokens) for text in texts])
    if burst.completion_tokens != len(texts) * new_tokens:
        raise RuntimeError(f"the server made {burst.completion_tokens} tokens, not {len(texts) * new_tokens}")
    return Throughput(burst.completion_tokens, burst.seconds, median(burst.ttfts()))


def best_of(label: str, repeats: int, measure: Callable[[], Throughput]) -> Throughput:
    runs = []
    for i in range(repeats):
        run = measure()
        progress(f"{label} run {i + 1}/{repeats}: {run.tokens_per_s:.1f} tokens/s in {run.seconds:.2f} s")
        runs.append(run)
    return max(runs, key=lambda r: r.tokens_per_s)


def run_in_process(settings: Settings, loaded: LoadedModel,
                   texts: list[str]) -> dict[int, tuple[Throughput, Throughput]]:
    """(a) then (b) for each stream count in turn, so drift in the machine hits both alike."""
    ids = [encode(loaded.tokenizer, t) for t in texts]
    engine = Engine(loaded, max_batch_size=max(32, *settings.streams))
    engine.start()
    try:
        progress("warming up the engine and generate()")
        measure_engine(engine, ids[:2], min(8, settings.new_tokens))
        measure_static(loaded, ids[:2], min(8, settings.new_tokens))
        results = {}
        for n in settings.streams:
            engine_run = best_of(f"engine  N={n}", settings.repeats,
                                 lambda n=n: measure_engine(engine, ids[:n], settings.new_tokens))
            static_run = best_of(f"static  N={n}", settings.repeats,
                                 lambda n=n: measure_static(loaded, ids[:n], settings.new_tokens))
            results[n] = (engine_run, static_run)
        return results
    finally:
        engine.stop()


def run_over_http(settings: Settings, model_name: str, texts: list[str]) -> dict[int, Throughput]:
    """(c): the same streams through the real server in its own process."""
    results = {}
    with runtime_server("--model", settings.model, "--dtype", "float32",
                        "--max-batch-size", str(max(32, *settings.streams)), name="runtime") as url:
        progress("warming up the server")
        measure_http(url, model_name, texts[:2], min(8, settings.new_tokens))
        for n in settings.streams:
            results[n] = best_of(f"http    N={n}", settings.repeats,
                                 lambda n=n: measure_http(url, model_name, texts[:n], settings.new_tokens))
    return results


def report(settings: Settings, rows: list[Row]) -> None:
    headers = ["streams", "engine tok/s", "static tok/s", "engine/static", "http tok/s", "http/engine",
               "engine TTFT p50 ms", "http TTFT p50 ms"]
    table = []
    for r in rows:
        http = r.http
        table.append([
            r.streams, r.engine.tokens_per_s, r.static.tokens_per_s,
            f"{r.engine.tokens_per_s / r.static.tokens_per_s:.0%}",
            http.tokens_per_s if http else None,
            f"{http.tokens_per_s / r.engine.tokens_per_s:.0%}" if http else None,
            ms(r.engine.ttft_p50_s), ms(http.ttft_p50_s) if http else None,
        ])
    notes = [f"model {settings.model}, prompt {settings.prompt_tokens} tokens, {settings.new_tokens} new tokens "
             f"per stream (greedy, EOS ignored), best of {settings.repeats} after a warm-up; "
             "static generate() has no TTFT (its tokens arrive together)"]
    goal = next((r for r in rows if r.streams == GOAL_STREAMS), None)
    if goal is not None:
        ratio = goal.engine.tokens_per_s / goal.static.tokens_per_s
        verdict = "met" if ratio >= GOAL_RATIO else "NOT met"
        notes.append(f"goal: engine >= {GOAL_RATIO:.0%} of static at {GOAL_STREAMS} streams: {ratio:.0%}, {verdict}")
    print_table("Engine throughput: continuous batching vs static generate()", headers, table, notes)


def main(argv: Sequence[str]) -> int:
    settings = parse_args(argv)
    loaded = load(settings)
    texts = prompts_of_length(loaded.tokenizer, max(settings.streams), settings.prompt_tokens)
    in_process = run_in_process(settings, loaded, texts)
    over_http = run_over_http(settings, loaded.name, texts) if settings.http else {}
    rows = [Row(n, *in_process[n], over_http.get(n)) for n in settings.streams]
    report(settings, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
