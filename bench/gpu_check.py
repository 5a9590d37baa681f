"""One script for a session lent a GPU (the device tool: 15 minutes, so run it once): everything
issue 17 asks to see on a real card, printed as one table to copy into docs/BENCHMARKS.md.

Steps, each a row (a step that fails says why and the others still run):

1. the suite's GPU-marked tests (``pytest -m gpu``);
2. the engine on CUDA in bf16 with SmolLM2 (``--model``), greedy, ``--new-tokens`` per stream;
3. energy closure: per-request joules summed against the NVML energy counter's delta over each
   stream count's run (each at least one second; the counter updates every 20-100 ms);
4. tokens/s at 1, 32 and 128 concurrent streams (``--streams``);
5. a power cap set and restored through ``inference.power_caps`` on the engine's GPU (the lowest
   limit the board allows, then its own back), read back through NVML each time.

On the device machine (Python 3.12 with torch, transformers and nvidia-ml-py; see the device
tool's KINDS.md) the runtime's other dependencies travel as wheels. Prepare them here, once::

    pip download --only-binary :all: --python-version 3.12 --platform manylinux2014_x86_64 \\
        -d .cache/gpu-wheels pydantic pydantic-core annotated-types typing-inspection jinja2

then run (``carry``: ``.cache/gpu-wheels`` and the model cache, within the tool's 64 MiB)::

    pip install --no-deps --no-index .cache/gpu-wheels/*.whl && python3 -m bench.gpu_check

``python -m bench.gpu_check --dry-run`` prints the plan and checks the imports, on any machine.
"""

from __future__ import annotations

import argparse
import math
import os
import queue
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.machine import print_machine
from bench.report import print_table
from inference.engine.engine import Engine, GenerationRequest, GenerationResult
from inference.engine.models import load_model
from inference.engine.sampling import SamplingParams
from inference.gpu import GpuMonitor
from inference.power_caps import PowerCaps
from inference.rules.compiled import CompiledPowerCap
from inference.rules.contract import PowerCapAction

CLOSURE_GOAL = 0.05
MIN_WINDOW_S = 1.0


@dataclass
class Row:
    step: str
    result: str
    detail: str


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="model to serve (default smollm2)")
    parser.add_argument("--model-cache-dir", default=os.environ.get("INFERENCE_MODEL_CACHE_DIR", ".cache/models"))
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dry-run", action="store_true", help="print the plan and check imports; use no GPU")
    return parser.parse_args(argv)


def gpu_tests() -> Row:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                             "tests/inference/test_gpu_real.py"], capture_output=True, text=True, check=False)
    last = (result.stdout.strip().splitlines() or ["no output"])[-1]
    return Row("GPU-marked tests", "pass" if result.returncode == 0 else "FAIL",
               f"{last} ({time.perf_counter() - started:.0f} s)")


def engine_runs(args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    device = torch.device("cuda")
    loaded = load_model(args.model, device=device, cache_dir=Path(args.model_cache_dir),
                        max_model_len=64 + args.new_tokens + 16)
    rows.append(Row("engine on CUDA", str(loaded.dtype).removeprefix("torch."),
                    f"{loaded.name} on {torch.cuda.get_device_name(0)} ({loaded.device_label})"))
    monitor = GpuMonitor()
    index = monitor.index_of(loaded.device_label) if monitor.available else None
    if index is None:
        rows.append(Row("NVML", "n/a", monitor.unavailable_reason or f"{loaded.device_label} not found by NVML"))
    gpu = monitor
    engine = Engine(loaded, max_batch_size=max(args.streams),
                    energy_reader=(lambda: gpu.energy_joules(index)) if index is not None else None)
    engine.start()
    prompt = loaded.tokenizer.encode("The history of the printing press begins", add_special_tokens=True)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)

    def burst(streams: int) -> tuple[list[GenerationResult], float, float | None]:
        sinks: list[queue.Queue] = [queue.Queue() for _ in range(streams)]
        counter_before = gpu.energy_joules(index) if index is not None else None
        started = time.perf_counter()
        for sink in sinks:
            engine.submit(GenerationRequest(list(prompt), params), sink.put)
        results = []
        for sink in sinks:
            while not isinstance(output := sink.get(timeout=600), GenerationResult):
                continue
            results.append(output)
        seconds = time.perf_counter() - started
        counter_after = gpu.energy_joules(index) if index is not None else None
        delta = counter_after - counter_before if counter_before is not None and counter_after is not None else None
        return results, seconds, delta

    try:
        burst(4)  # warm-up: kernels compiled and caches allocated outside the measured runs
        for streams in args.streams:
            results, seconds, delta = burst(streams)
            while seconds < MIN_WINDOW_S:  # the counter needs a window of a second or more
                more, extra, more_delta = burst(streams)
                results, seconds = results + more, seconds + extra
                delta = None if delta is None or more_delta is None else delta + more_delta
            tokens = sum(r.completion_tokens for r in results)
            rows.append(Row(f"tokens/s at {streams} streams", f"{tokens / seconds:.0f}",
                            f"{len(results)} requests x {args.new_tokens} tokens in {seconds:.2f} s"))
            joules = [r.energy_joules for r in results]
            if delta is None or any(j is None for j in joules):
                rows.append(Row(f"energy closure at {streams}", "n/a", "no NVML energy counter"))
                continue
            attributed = math.fsum(j or 0.0 for j in joules)
            gap = attributed / delta - 1 if delta else math.nan
            rows.append(Row(f"energy closure at {streams}",
                            "pass" if abs(gap) <= CLOSURE_GOAL else "FAIL",
                            f"requests {attributed:.1f} J vs counter {delta:.1f} J ({gap:+.1%}) over {seconds:.2f} s; "
                            f"{attributed / tokens * 1000:.1f} J per 1k tokens"))
    finally:
        engine.stop()

    if index is not None:
        rows.append(power_cap_round_trip(gpu, index))
    monitor.close()
    return rows


def power_cap_round_trip(gpu: GpuMonitor, index: int) -> Row:
    nvml = gpu._nvml  # the board's allowed range is only for this check's choice of cap
    uuid = gpu.uuid_of(index) or str(index)
    before = gpu.power_limit_w(index)
    if nvml is None:
        return Row("power cap set + restore", "n/a", "NVML is not running")
    try:
        low_mw, _ = nvml.nvmlDeviceGetPowerManagementLimitConstraints(nvml.nvmlDeviceGetHandleByIndex(index))
    except Exception as exc:
        return Row("power cap set + restore", "n/a", f"range not readable: {exc}")
    watts = math.ceil(low_mw / 1000)
    caps = PowerCaps(gpu)
    caps.reconcile([CompiledPowerCap(id="check", action=PowerCapAction(type="power_cap", watts=watts, device=uuid),
                                     reason="", expires_at=None)])
    during = gpu.power_limit_w(index)
    caps.restore_all()
    after = gpu.power_limit_w(index)
    failures = dict(caps.failures)
    ok = not failures and during == watts and after == before
    return Row("power cap set + restore", "pass" if ok else "FAIL",
               f"{before} W -> {during} W -> {after} W" + (f"; refused: {failures}" if failures else ""))


def print_rows(rows: list[Row]) -> None:
    print_table("GPU check (issue 17)", ["step", "result", "detail"], [[r.step, r.result, r.detail] for r in rows])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    print_machine()
    if args.dry_run:  # the imports above are what the run needs: they have worked if this prints
        print(f"plan: pytest -m gpu; {args.model} on CUDA; streams {args.streams} x {args.new_tokens} tokens with "
              f"energy closure (windows >= {MIN_WINDOW_S:g} s, goal {CLOSURE_GOAL:.0%}); power cap set + restore")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to check (use --dry-run to check the script itself)")
        return 1
    rows = [gpu_tests()]
    try:
        rows += engine_runs(args)
    except Exception as exc:  # one table whatever happens: the rows so far and why it stopped
        rows.append(Row("engine", "FAIL", f"{type(exc).__name__}: {exc}"))
    print_rows(rows)
    return 0 if all(r.result != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
