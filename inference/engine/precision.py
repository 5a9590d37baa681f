"""Weight precision per device: the dtype a model is served in, by flag or by measurement.

Single-stream decode reads every weight once per token, so on a CPU the weights' bytes, not Python,
set the ceiling: bf16 halves them. But bf16 is only fast where the CPU has native bf16 (AVX-512 BF16
or AMX); elsewhere torch emulates it and fp32 wins. ``--dtype auto`` therefore decides on a CPU with
native bf16 by measuring a few decode steps of the model in both precisions at start-up (at one
stream and at 16: with AMX, bf16 wins most in a batch, where fp32 is compute-bound), and keeps
the verdict in ``{model cache dir}/dtype-choice.json`` under a key naming the CPU, the torch version,
the thread count and the model, so the next start on the same machine skips the measurement. A GPU
gets bf16 where it has it, else fp16; a CPU without native bf16 gets fp32 without measuring.
"""

from __future__ import annotations

import copy
import fcntl
import json
import logging
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache, PreTrainedModel

from inference.engine.llama_forward import model_forward

log = logging.getLogger(__name__)

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHOICE_FILE = "dtype-choice.json"
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})

# The start-up measurement: decode steps after a short prompt, best of a few rounds, at each batch
# size; a precision's score is the geometric mean of its tokens/s over them.
PROBE_BATCHES = (1, 16)
PROBE_PROMPT_TOKENS = 16
PROBE_STEPS = 8
PROBE_ROUNDS = 3


class PrecisionError(ValueError):
    """A ``--dtype`` that this device cannot serve; the message says what to use instead."""


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str  # why this dtype, for the start-up log


Measure = Callable[[PreTrainedModel], float]


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        log.debug("no /proc/cpuinfo; naming the CPU by platform.processor()")
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    return bool(NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags))


def explicit_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """The dtype ``--dtype`` names, ``None`` for ``auto``; refuses fp16 off CUDA and bf16 on a GPU without it."""
    if choice == "auto":
        return None
    if choice not in DTYPES:
        raise PrecisionError(f"--dtype {choice!r} must be one of {', '.join(DTYPE_CHOICES)}")
    dtype = DTYPES[choice]
    if dtype == torch.float16 and device.type != "cuda":
        raise PrecisionError("--dtype float16 runs only on CUDA; on the CPU use float32, bfloat16 or auto")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PrecisionError("--dtype bfloat16: this GPU has no bf16; use float16 or auto")
    return dtype


def gpu_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def choose_cpu_dtype(
    model: PreTrainedModel, *, model_name: str, cache_dir: Path, measure: Measure | None = None,
    native_bf16: bool | None = None,
) -> DtypeChoice:
    """fp32 or bf16 for ``model`` (loaded in fp32) on this CPU: cached, or measured and cached."""
    if not (cpu_has_native_bf16() if native_bf16 is None else native_bf16):
        return DtypeChoice(torch.float32, "the CPU has no native bf16 (AVX-512 BF16 / AMX)")
    key = choice_key(model_name)
    path = Path(cache_dir) / CHOICE_FILE
    cached = _read_choices(path).get(key)
    if cached is not None and cached.get("dtype") in ("float32", "bfloat16"):
        return DtypeChoice(DTYPES[cached["dtype"]], f"cached measurement in {path} ({_rates(cached)})")
    measure = measure or decode_score
    fp32 = measure(model)
    # Measured as it would be served: bf16 weights on the CPU keep requires_grad (models.set_grad_flags).
    bf16_model = copy.deepcopy(model).to(torch.bfloat16).requires_grad_(True)
    bf16 = measure(bf16_model)
    del bf16_model
    verdict = "bfloat16" if bf16 > fp32 else "float32"
    record = {"dtype": verdict, "float32_tokens_per_s": round(fp32, 2), "bfloat16_tokens_per_s": round(bf16, 2),
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_choice(path, key, record)
    return DtypeChoice(DTYPES[verdict], f"measured at start-up ({_rates(record)}), kept in {path}")


def choice_key(model_name: str) -> str:
    return f"{cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {model_name}"


def decode_score(model: PreTrainedModel) -> float:
    """The geometric mean of ``model``'s decode tokens/s at each of ``PROBE_BATCHES``."""
    rates = [decode_tokens_per_s(model, batch) for batch in PROBE_BATCHES]
    return math.prod(rates) ** (1 / len(rates))


def decode_tokens_per_s(model: PreTrainedModel, batch: int = 1) -> float:
    """Decode tokens/s of ``model`` on its device at ``batch`` sequences, through the forward pass the
    engine would use (``model_forward``): the best of a few short rounds."""
    vocab = int(model.config.get_text_config().vocab_size)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (batch, PROBE_PROMPT_TOKENS), generator=generator)
    forward = model_forward(model, model.device)
    best = 0.0
    with torch.inference_mode():
        for _ in range(PROBE_ROUNDS):
            cache = DynamicCache(config=model.config)
            mask = torch.ones_like(prompt)
            token = forward(prompt, mask, torch.arange(PROBE_PROMPT_TOKENS).expand(batch, -1), cache).argmax(-1)
            started = time.perf_counter()
            for _ in range(PROBE_STEPS):
                mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=-1)
                token = forward(token[:, None], mask, mask.sum(-1, keepdim=True) - 1, cache).argmax(-1)
            best = max(best, batch * PROBE_STEPS / (time.perf_counter() - started))
    return best


def _rates(record: dict) -> str:
    batches = "/".join(str(b) for b in PROBE_BATCHES)
    return (f"fp32 {record.get('float32_tokens_per_s')}, bf16 {record.get('bfloat16_tokens_per_s')} "
            f"tokens/s, geometric mean over batches {batches}")


def _read_choices(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s (%s); measuring again", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _write_choice(path: Path, key: str, record: dict) -> None:
    """Merge one machine's verdict into the file, under a lock (two runtimes may start at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        choices = _read_choices(path)
        choices[key] = record
        staged = path.with_suffix(".tmp")
        staged.write_text(json.dumps(choices, indent=2, sort_keys=True) + "\n")
        staged.replace(path)
