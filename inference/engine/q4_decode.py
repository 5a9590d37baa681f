"""A compiled decode step for Llama models under ``--quantization int4`` on the CPU (issue 20).

At one stream a decode step of SmolLM2 in PyTorch is about 900 small kernel calls around 240 products;
on a 2-core CPU what surrounds the products cost as much as the products themselves, and PyTorch's
4-bit kernel multiplies a bf16 input. ``q4_decode.c`` does the whole step (every layer, the output
layer) in one call and one OpenMP parallel region, with the inputs of each product quantized to int8
per group of 32 so that AVX-512 VNNI multiplies 64 weights by 64 inputs in one instruction (the Q4_1 ×
Q8_1 scheme llama.cpp uses); everything else (residual stream, norms, rotary embedding, attention, the
key/value cache) stays float32, in the same cache buffers ``LlamaForward`` uses, so a step can go
either way.

The weights are the 4-bit ones ``--quantization int4`` makes (groups of 32 inputs, a scale and an
offset each), repacked for the kernel, and the int8 output layer's. The source is compiled on first
use with the machine's C compiler (``$CC``, else ``cc``; ``-O3 -march=native -ffast-math -fopenmp``, linked
without ``-ffast-math`` so the process keeps its floating-point mode) into a cache
directory (``WATTSON_KERNEL_DIR``, else ``~/.cache/wattson/kernels``) under a name that hashes the
source, the compiler and the CPU, so a copy built for another CPU is never loaded. Where there is no
compiler, the build fails or the CPU lacks AVX-512 VNNI (the portable C path is slower than PyTorch's
own 4-bit kernel), ``build()`` logs why and ``LlamaForward`` keeps PyTorch's kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaForCausalLM

from inference.engine.kv_buffers import reserve
from inference.engine.quantization import Int4Linear, Int8Linear

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("q4_decode.c")
# Compiled with -ffast-math but linked without it: linked with it, the library would carry GCC's
# crtfastmath, which at load sets the CPU to flush subnormal floats to zero for the whole process.
COMPILE_FLAGS = ("-O3", "-ffast-math", "-fopenmp", "-fPIC")
LINK_FLAGS = ("-shared", "-fopenmp")
# Output rows a product computes together (one per lane of a 512-bit register), and inputs per
# quantization group.
TILE = 16
GROUP = 32
# Rows one call to the kernel decodes (its MAX_ROWS); a wider step is several calls, each reading the
# weights once for its rows. 16 rather than 8: on a 2-core Xeon a 32-row step of SmolLM2 took 29-32
# ms against 41 (docs/BENCHMARKS.md).
CALL_ROWS = 16
# Rows up to which a decode step runs compiled; wider ones go to the dense weights. Measured on the
# same Xeon (with AMX for bf16), compiled against dense bf16: 17 against 53 ms at 16 rows, 31 against
# 61 at 32, 46 against 70 at 48, 64 against 79 at 64.
MAX_ROWS = 64


class _Q4(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("d", ctypes.c_void_p), ("m", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Q4), ("o", _Q4), ("gate_up", _Q4), ("down", _Q4),
                ("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p)]


class _Model(ctypes.Structure):
    _fields_ = [("layers", ctypes.c_int32), ("hidden", ctypes.c_int32), ("heads", ctypes.c_int32),
                ("kv_heads", ctypes.c_int32), ("head_dim", ctypes.c_int32), ("inter", ctypes.c_int32),
                ("vocab", ctypes.c_int32), ("eps", ctypes.c_float), ("scaling", ctypes.c_float),
                ("layer", ctypes.POINTER(_Layer)), ("final_norm", ctypes.c_void_p),
                ("head_w", ctypes.c_void_p), ("head_s", ctypes.c_void_p)]


class KernelUnavailable(RuntimeError):
    """The compiled step cannot be used here; the message says why."""


def kernel_dir() -> Path:
    configured = os.environ.get("WATTSON_KERNEL_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wattson" / "kernels"


def _cpu_signature() -> str:
    """The machine, and the CPU's model and features as /proc/cpuinfo names them (x86: model name and
    flags; ARM: implementer, part and features), which is what ``-march=native`` compiles for."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    fields = ("model name", "flags", "Features", "CPU implementer", "CPU architecture", "CPU variant", "CPU part")
    wanted = [line for line in lines if line.startswith(fields)]
    return "\n".join([os.uname().machine, *dict.fromkeys(wanted)])


@functools.cache
def library(march: str = "native") -> ctypes.CDLL:
    """The compiled kernel, built on first use for ``-march={march}``; raises ``KernelUnavailable`` with
    the reason, whatever went wrong. (An older ``march``, such as ``x86-64-v3``, builds the portable path,
    which ``build`` does not serve with.)"""
    try:
        return _load(march)
    except KernelUnavailable:
        raise
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
        raise KernelUnavailable(f"{type(exc).__name__}: {exc}") from exc


def _compiler() -> list[str]:
    compiler = shlex.split(os.environ.get("CC") or "cc")  # CC="ccache gcc" is a compiler too
    if not compiler or shutil.which(compiler[0]) is None:
        raise KernelUnavailable(f"no C compiler ({' '.join(compiler)}) on PATH")
    return compiler


def kernel_path(march: str = "native") -> Path:
    """Where ``library(march)`` keeps its build: named by a hash of the source, the compiler, the flags
    and the CPU. Raises ``KernelUnavailable`` without a compiler, ``OSError`` when the source is missing."""
    compiler = _compiler()
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), version.encode(),
                                     " ".join(_flags(march) + LINK_FLAGS).encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    return kernel_dir() / f"q4_decode-{key}.so"


def _flags(march: str) -> tuple[str, ...]:
    return (*COMPILE_FLAGS, f"-march={march}")


def _load(march: str) -> ctypes.CDLL:
    target = kernel_path(march)
    if not target.exists():
        _build(_compiler(), _flags(march), target)
        logger.info("compiled %s into %s", SOURCE.name, target)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:  # a directory mounted noexec, a file another process left broken
        raise KernelUnavailable(f"could not load {target}: {exc}") from exc
    lib.q4_decode_isa.restype = ctypes.c_char_p
    lib.q4_decode_max_rows.restype = ctypes.c_int
    if lib.q4_decode_max_rows() < CALL_ROWS:
        raise KernelUnavailable(f"{target.name} decodes {lib.q4_decode_max_rows()} rows a call, not {CALL_ROWS}")
    lib.q4_decode_step.restype = ctypes.c_int
    lib.q4_decode_step.argtypes = [
        ctypes.POINTER(_Model), ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int,
    ]
    return lib


def _build(compiler: list[str], flags: tuple[str, ...], target: Path) -> None:
    """Compile and link ``SOURCE`` into ``target``; raises ``KernelUnavailable`` with the reason."""
    partial: str | None = None
    objects: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Built beside the target and renamed over it: processes starting together never load half a file.
        handle, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
        os.close(handle)
        objects = Path(partial).with_suffix(".o")
        for command in ([*compiler, *flags, "-c", "-o", str(objects), str(SOURCE)],
                        [*compiler, *LINK_FLAGS, "-o", partial, str(objects), "-lm"]):
            built = subprocess.run(command, capture_output=True, text=True, timeout=300)
            if built.returncode != 0:
                raise KernelUnavailable(f"{compiler[0]} could not build {SOURCE.name}: {built.stderr.strip()[-500:]}")
        os.replace(partial, target)
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailable(f"building {SOURCE.name} into {target.parent} failed: {exc}") from exc
    finally:
        for leftover in (partial, objects):
            if leftover is not None:
                Path(leftover).unlink(missing_ok=True)


def pack_q4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight`` [out, in] in the kernel's 4-bit layout (see ``q4_decode.c``): the nibbles
    [out/16, in/32, 4, 16, 4] uint8, and each group's scale and offset as fp16 bits [out/16, in/32, 16]
    int16. Each group of 32 inputs maps its minimum to 0 and its maximum to 15, as ``quantize_int4``
    does for PyTorch's kernel."""
    out_features, in_features = weight.shape
    tiles, groups = out_features // TILE, in_features // GROUP
    values = weight.detach().float().reshape(out_features, groups, GROUP)
    low = values.amin(dim=-1, keepdim=True).to(torch.float16)
    scale = ((values.amax(dim=-1, keepdim=True) - low.float()) / 15).clamp(min=1e-7).to(torch.float16)
    if not (torch.isfinite(low).all() and torch.isfinite(scale).all()):
        raise ValueError("weights beyond fp16's range: the kernel's scales and offsets are fp16")
    q = ((values - low.float()) / scale.float()).round().clamp(0, 15).to(torch.uint8)
    # [tiles, 16 rows, groups, 2 halves, 4 vectors, 4 inputs] -> [tiles, groups, halves, vectors, rows, inputs]
    q = q.reshape(tiles, TILE, groups, 2, 4, 4).permute(0, 2, 3, 4, 1, 5)
    nibbles = (q[:, :, 0] | (q[:, :, 1] << 4)).contiguous()

    def per_tile(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(tiles, TILE, groups).transpose(1, 2).contiguous().view(torch.int16)

    return nibbles, per_tile(scale), per_tile(low)


def pack_head(weight_int8: torch.Tensor) -> torch.Tensor:
    """The int8 output layer [vocab, hidden] as the kernel reads it: uint8 (w + 128) in
    [vocab/16, hidden/32, 8, 16, 4]."""
    out_features, in_features = weight_int8.shape
    shifted = (weight_int8.to(torch.int16) + 128).to(torch.uint8)
    return shifted.reshape(out_features // TILE, TILE, in_features // GROUP, 8, 4).permute(0, 2, 3, 1, 4).contiguous()


def _dense_weight(module: torch.nn.Module) -> torch.Tensor:
    linear = module.dense if isinstance(module, Int4Linear) else module
    return linear.weight


class Q4Decode:
    """The compiled decode step over one int4 ``LlamaForCausalLM``'s weights (repacked at build)."""

    def __init__(self, model: LlamaForCausalLM, lib: ctypes.CDLL) -> None:
        config, inner = model.config, model.model
        attn = inner.layers[0].self_attn
        self.lib = lib
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, attn.head_dim
        self.hidden, self.inter, self.vocab = config.hidden_size, config.intermediate_size, model.lm_head.out_features
        self._keep: list[torch.Tensor] = []  # every tensor the C structs point into
        layers = (_Layer * len(inner.layers))()
        for index, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            layers[index] = _Layer(
                qkv=self._q4(torch.cat([_dense_weight(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj)])),
                o=self._q4(_dense_weight(attn.o_proj)),
                gate_up=self._q4(torch.cat([_dense_weight(mlp.gate_proj), _dense_weight(mlp.up_proj)])),
                down=self._q4(_dense_weight(mlp.down_proj)),
                input_norm=self._floats(layer.input_layernorm.weight),
                post_norm=self._floats(layer.post_attention_layernorm.weight),
            )
        head = model.lm_head if isinstance(model.lm_head, Int8Linear) else Int8Linear(model.lm_head)
        self._layers = layers
        self.model = _Model(
            layers=len(inner.layers), hidden=self.hidden, heads=self.heads, kv_heads=self.kv_heads,
            head_dim=self.head_dim, inter=self.inter, vocab=self.vocab, eps=config.rms_norm_eps,
            scaling=attn.scaling, layer=layers, final_norm=self._floats(inner.norm.weight),
            head_w=self._pin(pack_head(head.weight_int8)),
            head_s=self._floats(head.scales),
        )
        self.isa = lib.q4_decode_isa().decode()

    @staticmethod
    def fits(model: torch.nn.Module) -> str | None:
        """Why ``model`` cannot take the compiled step, or None when it can."""
        if not isinstance(model, LlamaForCausalLM):
            return "not a Llama model"
        config, inner = model.config, model.model
        head_dim = inner.layers[0].self_attn.head_dim
        if getattr(config, "hidden_act", None) != "silu" or getattr(config, "pretraining_tp", 1) != 1:
            return "not a plain SiLU Llama"
        inputs = (config.hidden_size, config.intermediate_size, config.num_attention_heads * head_dim)
        outputs = ((config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim, config.hidden_size,
                   2 * config.intermediate_size, model.lm_head.out_features)
        if any(width % GROUP for width in inputs) or any(width % TILE for width in outputs):
            return f"inputs not a multiple of {GROUP} ({inputs}) or outputs not of {TILE} ({outputs})"
        for layer in inner.layers:
            modules = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                       layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
            if not all(isinstance(m, Int4Linear) and m.dense is not None and m.bias is None for m in modules):
                return "not every layer in 4 bits (--quantization int4) without bias"
        if model.lm_head.bias is not None:
            return "an output layer with a bias"
        return None

    def _pin(self, tensor: torch.Tensor) -> int:
        tensor = tensor.contiguous()
        self._keep.append(tensor)
        return tensor.data_ptr()

    def _floats(self, tensor: torch.Tensor) -> int:
        return self._pin(tensor.detach().float())

    def _q4(self, weight: torch.Tensor) -> _Q4:
        nibbles, scale, offset = pack_q4(weight)
        return _Q4(w=self._pin(nibbles), d=self._pin(scale), m=self._pin(offset))

    def step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
             cache: DynamicCache) -> torch.Tensor:
        """One new token per row: ``x`` [rows, hidden] float32 embeddings (overwritten), ``cos``/``sin``
        [rows, head_dim] float32, ``mask`` [rows, length + 1] (1 real, 0 padding); the cache grows by
        one position. Returns the logits [rows, vocab] float32. Raises before the cache grows when the
        mask or the cache does not fit; if the kernel itself fails, the cache holds an unwritten
        position and the step's sequences fail with it (as the engine fails a step that raises)."""
        rows = x.shape[0]
        held = cache.get_seq_length()
        if mask.shape != (rows, held + 1):
            raise ValueError(f"a mask of {tuple(mask.shape)} for {rows} rows of {held} cached positions and one new")
        if any(layer.get_seq_length() != held for layer in cache.layers):
            raise ValueError("the cache's layers hold different lengths")
        shape = (rows, self.kv_heads, 1, self.head_dim)
        layers = len(self._layers)
        buffers = []
        length = 0
        for index in range(layers):
            pair, length = reserve(cache.layers[index], shape, torch.float32, x.device)
            buffers.append(pair)
        capacities = (ctypes.c_int32 * layers)(*(pair[0].shape[-2] for pair in buffers))
        real = None if bool(mask.all()) else mask.to(torch.uint8).contiguous()
        logits = torch.empty(rows, self.vocab, dtype=torch.float32)
        threads = torch.get_num_threads()
        # Each call's rows start `start` rows into every buffer ([rows, kv heads, capacity, d], contiguous).
        key_rows = [(pair[0].data_ptr(), pair[0].stride(0) * pair[0].element_size()) for pair in buffers]
        value_rows = [(pair[1].data_ptr(), pair[1].stride(0) * pair[1].element_size()) for pair in buffers]
        for start in range(0, rows, CALL_ROWS):
            count = min(CALL_ROWS, rows - start)
            keys = (ctypes.c_void_p * layers)(*(base + start * stride for base, stride in key_rows))
            values = (ctypes.c_void_p * layers)(*(base + start * stride for base, stride in value_rows))
            status = self.lib.q4_decode_step(
                ctypes.byref(self.model), count, x[start].data_ptr(), cos[start].data_ptr(), sin[start].data_ptr(),
                keys, values, capacities, length, None if real is None else real[start].data_ptr(),
                logits[start].data_ptr(), threads)
            if status == -1:
                raise MemoryError("the compiled decode step could not allocate its working memory")
            if status != 0:
                raise RuntimeError(f"the compiled decode step refused {count} rows (status {status})")
        return logits


def build(model: torch.nn.Module) -> Q4Decode | None:
    """The compiled step for ``model``, or None (logged) where it does not apply or cannot be built.

    Only the AVX-512 VNNI build serves: the portable one is correct but, unpacking every tile again
    for each row, slower than PyTorch's own 4-bit kernel (on SmolLM2's shapes, 5.0 against 2.8 ms for
    4 layers at 1 row, 35.7 against 7.7 at 8)."""
    if Q4Decode.fits(model) is not None:
        return None
    try:
        step = Q4Decode(model, library())
    except (KernelUnavailable, ValueError) as exc:
        logger.warning("--quantization int4: PyTorch's 4-bit kernels, not the compiled step: %s", exc)
        return None
    if step.isa != "avx512-vnni":
        logger.warning("--quantization int4: PyTorch's 4-bit kernels, not the compiled step: this CPU lacks "
                       "AVX-512 VNNI, and the compiled step's portable path is slower than PyTorch's")
        return None
    logger.info("--quantization int4: decode steps run compiled (%s)", step.isa)
    return step
