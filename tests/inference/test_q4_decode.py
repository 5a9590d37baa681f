"""The compiled 4-bit decode step (``q4_decode``) gives PyTorch's 4-bit step's logits within int8
activation rounding, on the engine's cache layout: left padding, a cache prefilled by PyTorch, steps
wider than one kernel call, and a cache handed back and forth between the two paths. Where no compiler
is found or the CPU lacks AVX-512 VNNI, ``--quantization int4`` keeps PyTorch's kernels."""

from __future__ import annotations

import difflib
import platform
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from inference.engine import q4_decode, quantization
from inference.engine.engine import Engine
from inference.engine.llama_forward import LlamaForward
from inference.engine.models import LoadedModel, load_model
from inference.engine.quantization import quantize_weights
from tests.inference.engine_driver import Submitted, submit
from tests.inference.llama_batches import decode, padded

CPU = torch.device("cpu")
QK_SCALE = 4.0


@pytest.fixture(scope="module")
def int4(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The tiny model in bf16 + int4, made less forgiving first: its norms weigh each channel differently
    (they are all ones as built, so a norm applied with the wrong weight would pass unseen), and its
    queries and keys are scaled up so attention is sharp (near-uniform attention hides a wrong rotation)."""
    loaded = load_model("tiny-random", device=CPU, cache_dir=tmp_path_factory.mktemp("models"), max_model_len=256,
                        dtype="bfloat16")
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, parameter in loaded.model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1 + 0.5 * torch.randn(parameter.shape, generator=generator))
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.mul_(QK_SCALE)
    quantize_weights(loaded.model, "int4")
    loaded.quantization = "int4"
    return loaded


@pytest.fixture(scope="module")
def compiled(int4: LoadedModel) -> LlamaForward:
    """The forward with the kernel this CPU builds (AVX-512 VNNI or the portable path), used for decode."""
    forward = LlamaForward(int4.model, compiled=False)
    try:
        forward.compiled = q4_decode.Q4Decode(int4.model, q4_decode.library())
    except q4_decode.KernelUnavailable as exc:
        pytest.fail(f"the kernel did not build ({exc}): make test needs a C compiler (cc)")
    return forward


@pytest.fixture
def fresh_library() -> Iterator[None]:
    """``library()`` as a new process finds it: it keeps one build per process, cleared before and after."""
    q4_decode.library.cache_clear()
    yield
    q4_decode.library.cache_clear()


def test_the_runtime_decodes_with_the_kernel_exactly_where_it_has_avx512_vnni(
    int4: LoadedModel, compiled: LlamaForward
) -> None:
    assert compiled.compiled is not None
    assert (LlamaForward(int4.model).compiled is not None) == (compiled.compiled.isa == "avx512-vnni")


def assert_near(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Within what int8 inputs to the products move the logits (measured: under 2% of their range)."""
    scale = expected.abs().amax(dim=-1, keepdim=True)
    assert ((got - expected).abs() / scale).max() < 0.05
    assert torch.nn.functional.cosine_similarity(got, expected, dim=-1).min() > 0.999


@pytest.mark.parametrize("rows", [1, 3, q4_decode.CALL_ROWS + 3])
def test_the_compiled_step_gives_pytorchs_logits_on_a_padded_batch(
    int4: LoadedModel, compiled: LlamaForward, rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PyTorch's path multiplies a step of more rows than these with the dense weights: keep it in 4 and 8 bits.
    monkeypatch.setattr(quantization, "INT4_MAX_ROWS", q4_decode.MAX_ROWS)
    monkeypatch.setattr(quantization, "INT8_MAX_ROWS", q4_decode.MAX_ROWS)
    reference = LlamaForward(int4.model, compiled=False)
    steps, (our_cache, their_cache) = decode([compiled, reference], int4.model.config, rows, steps=6)
    prefill, decoded = steps[0], steps[1:]
    torch.testing.assert_close(prefill[0], prefill[1])  # the prompt goes through PyTorch either way
    agree = total = 0
    for ours, theirs in decoded:
        assert_near(ours, theirs)
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        total += rows
    assert agree / total >= 0.9
    # Every row's keys, rotated at its own position, and values, as PyTorch wrote them.
    for ours, theirs in zip(our_cache.layers, their_cache.layers, strict=True):
        for got, expected in ((ours.keys, theirs.keys), (ours.values, theirs.values)):
            assert got.shape == expected.shape
            per_row = torch.nn.functional.cosine_similarity(got.flatten(1), expected.flatten(1), dim=-1)
            assert per_row.min() > 0.999, per_row


def test_a_cache_passes_between_the_compiled_and_the_pytorch_step(int4: LoadedModel, compiled: LlamaForward) -> None:
    """The engine switches paths when a batch grows past ``MAX_ROWS``: the keys and values either writes
    are the other's to read."""
    model = int4.model
    reference = LlamaForward(model, compiled=False)
    ids, mask, positions = padded(model.config.vocab_size, 3)
    mixed, pure = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.inference_mode():
        token = reference(ids, mask, positions, pure).argmax(-1, keepdim=True)
        reference(ids, mask, positions, mixed)
        for step in range(6):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=-1)
            positions = mask.sum(-1, keepdim=True) - 1
            expected = reference(token, mask, positions, pure)
            got = (compiled if step % 2 == 0 else reference)(token, mask, positions, mixed)
            assert_near(got, expected)
            token = expected.argmax(-1, keepdim=True)
    for ours, theirs in zip(mixed.layers, pure.layers, strict=True):
        assert ours.keys.shape == theirs.keys.shape
        assert torch.nn.functional.cosine_similarity(ours.keys.flatten(), theirs.keys.flatten(), dim=0) > 0.999


def test_packed_weights_hold_each_weight_within_half_a_step_of_its_group() -> None:
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    nibbles, scale, offset = q4_decode.pack_q4(weight)
    assert nibbles.dtype == torch.uint8 and nibbles.numel() == weight.numel() // 2
    # Undo the layout: [tiles, groups, vectors, rows, inputs] low nibbles are inputs 4v + j, high 16 + 4v + j.
    low, high = nibbles & 0x0F, nibbles >> 4
    q = torch.cat([low, high], dim=2)  # [tiles, groups, 8 (input quads), rows, 4]
    q = q.permute(0, 3, 1, 2, 4).reshape(32, 2, 32).float()
    d = scale.view(torch.float16).float().transpose(1, 2).reshape(32, 2, 1)
    m = offset.view(torch.float16).float().transpose(1, 2).reshape(32, 2, 1)
    restored = (q * d + m).reshape(32, 64)
    assert ((restored - weight).abs() <= d.reshape(32, 2, 1).expand(32, 2, 32).reshape(32, 64) * 0.51 + 1e-3).all()


@pytest.mark.usefixtures("fresh_library")
def test_without_a_compiler_int4_keeps_pytorchs_kernels(
    int4: LoadedModel, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("WATTSON_KERNEL_DIR", str(tmp_path))
    forward = LlamaForward(int4.model)
    assert forward.compiled is None
    assert "no C compiler (no-such-compiler)" in caplog.text
    assert list(tmp_path.iterdir()) == []
    ids, mask, positions = padded(int4.model.config.vocab_size, 2)
    with torch.inference_mode():
        assert torch.isfinite(forward(ids, mask, positions, DynamicCache(config=int4.model.config))).all()


@pytest.mark.usefixtures("fresh_library")
def test_a_cache_directory_that_cannot_be_written_keeps_pytorchs_kernels(
    int4: LoadedModel, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("WATTSON_KERNEL_DIR", str(blocker / "kernels"))  # under a file: mkdir fails
    assert LlamaForward(int4.model).compiled is None
    assert f"into {blocker / 'kernels'} failed" in caplog.text


@pytest.mark.usefixtures("fresh_library")
def test_a_cache_directory_that_cannot_even_be_looked_at_keeps_pytorchs_kernels(
    int4: LoadedModel, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A name past the file system's limit: asking whether the kernel exists raises (ENAMETOOLONG), as
    # an unreadable directory does for a user without permission.
    monkeypatch.setenv("WATTSON_KERNEL_DIR", str(tmp_path / ("k" * 300)))
    assert LlamaForward(int4.model).compiled is None
    assert "File name too long" in caplog.text


@pytest.mark.usefixtures("fresh_library")
def test_a_kernel_file_left_broken_keeps_pytorchs_kernels(
    int4: LoadedModel, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("WATTSON_KERNEL_DIR", str(tmp_path))
    built = q4_decode.kernel_path()
    built.write_bytes(b"not a shared library")  # written by hand, or a disk that answered garbage
    assert LlamaForward(int4.model).compiled is None
    assert f"could not load {built}" in caplog.text


@pytest.mark.usefixtures("fresh_library")
def test_the_kernel_is_built_once_into_the_cache_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WATTSON_KERNEL_DIR", str(tmp_path))
    q4_decode.library()
    built = sorted(p.name for p in tmp_path.iterdir())
    q4_decode.library.cache_clear()
    q4_decode.library()
    assert len(built) == 1 and built[0].startswith("q4_decode-") and built[0].endswith(".so")
    assert sorted(p.name for p in tmp_path.iterdir()) == built, "the second process found it built"


def test_loading_the_kernel_leaves_subnormal_floats_to_the_rest_of_the_process(compiled: LlamaForward) -> None:
    # Linked with -ffast-math, the library would switch the CPU to flush subnormals to zero at load
    # (GCC's crtfastmath), under torch and every other library in the process.
    assert compiled.compiled is not None
    smallest_normal = sys.float_info.min
    assert smallest_normal / 2 > 0.0
    assert torch.tensor(smallest_normal, dtype=torch.float64) / 2 > 0


def test_a_model_the_kernel_cannot_take_says_why(tmp_path: Path) -> None:
    plain = load_model("tiny-random", device=CPU, cache_dir=tmp_path, max_model_len=256)
    assert q4_decode.Q4Decode.fits(plain.model) == "not every layer in 4 bits (--quantization int4) without bias"
    assert LlamaForward(plain.model).compiled is None


def test_a_mask_that_does_not_fit_the_cache_is_refused_before_the_cache_grows(
    int4: LoadedModel, compiled: LlamaForward
) -> None:
    ids, mask, positions = padded(int4.model.config.vocab_size, 2)
    cache = DynamicCache(config=int4.model.config)
    with torch.inference_mode():
        token = compiled(ids, mask, positions, cache).argmax(-1, keepdim=True)
        with pytest.raises(ValueError, match="cached positions and one new"):
            compiled(token, mask, positions[:, -1:] + 1, cache)  # the mask lacks the new token's column
    assert cache.get_seq_length() == ids.shape[1]


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64-v3 names an x86 instruction set")
def test_a_cpu_without_avx512_vnni_gets_the_portable_path_and_the_same_logits(
    int4: LoadedModel, compiled: LlamaForward
) -> None:
    portable = LlamaForward(int4.model, compiled=False)
    portable.compiled = q4_decode.Q4Decode(int4.model, q4_decode.library("x86-64-v3"))  # AVX2, no AVX-512
    assert portable.compiled.isa == "portable"
    reference = LlamaForward(int4.model, compiled=False)
    steps, _ = decode([portable, compiled, reference], int4.model.config, rows=3, steps=4)
    for ours, vnni, theirs in steps[1:]:
        assert_near(ours, theirs)
        if compiled.compiled is not None and compiled.compiled.isa == "avx512-vnni":
            torch.testing.assert_close(ours, vnni, rtol=1e-3, atol=1e-4)
            assert torch.equal(ours.argmax(-1), vnni.argmax(-1))


def test_the_engine_decodes_with_it_and_a_sequence_reads_the_same_alone_as_in_a_changing_batch(
    int4: LoadedModel, compiled: LlamaForward
) -> None:
    """Requests join a running batch one at a time (batches join), one finishes while the others run
    (the batch keeps some rows), and a last one arrives after it: each sequence's text is the one it
    gets alone. Each request is prefilled alone, as it is alone, so the texts agree but for a rare late
    flip of the random tiny model's near-tied logits (decode steps in different batches run in
    different OpenMP chunks); a row that read another row's cache would share nothing with its text."""
    if compiled.compiled is None or compiled.compiled.isa != "avx512-vnni":
        pytest.skip("without AVX-512 VNNI the engine serves int4 with PyTorch's kernels")
    prompts = ["Tell me a story about a lighthouse", "Why is the sky", "The capital of France is", "Two plus two"]
    lengths = [60, 45, 3, 30]

    def start(engine: Engine, i: int) -> Submitted:
        """Submit prompt ``i`` and wait for its first token, so that it is prefilled alone."""
        submitted = submit(engine, int4.tokenizer.encode(prompts[i]), max_tokens=lengths[i], ignore_eos=True)
        first = submitted.outputs.get(timeout=60)
        submitted.outputs.put(first)  # result() reads it again
        return submitted

    def serve(indices: list[int]) -> dict[int, str]:
        engine = Engine(int4, max_batch_size=8)
        assert isinstance(engine._forward, LlamaForward) and engine._forward.compiled is not None
        engine.start()
        try:
            texts, running = {}, {}
            for i in indices:
                running[i] = start(engine, i)
                if lengths[i] < 10 and len(indices) > 1:  # the short one finishes while the others decode
                    texts[i] = running.pop(i).result().text
            return texts | {i: submitted.result().text for i, submitted in running.items()}
        finally:
            engine.stop()

    together = serve([0, 1, 2, 3])
    alone = {i: serve([i])[i] for i in range(len(prompts))}
    assert together.keys() == alone.keys()
    for i, text in alone.items():
        assert difflib.SequenceMatcher(None, together[i], text).ratio() > 0.9, (together[i], text)


def test_the_output_layer_is_its_int8_weights_times_the_int8_quantized_normed_input() -> None:
    """A one-layer model whose layer adds nothing (its output projections are zero): the step's logits
    are the final norm of the embedding, quantized to int8 per group of 32 as the kernel does, times
    the int8 output layer, computed here in float64."""
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    torch.manual_seed(5)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.model.norm.weight.copy_(1 + 0.5 * torch.randn(64))
    quantize_weights(model, "int4")
    step = q4_decode.Q4Decode(model, q4_decode.library())
    rows = 3
    x = torch.randn(rows, 64)
    cache = DynamicCache(config=config)
    with torch.inference_mode():
        got = step.step(x.clone(), torch.ones(rows, 16), torch.zeros(rows, 16), torch.ones(rows, 1), cache)
    h = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)
    h = h * model.model.norm.weight.double()
    groups = h.view(rows, 2, 32)
    scale = groups.abs().amax(-1, keepdim=True) / 127
    quantized = (groups / scale).round() * scale  # what the kernel multiplies: int8 values times their scale
    head = model.lm_head
    expected = quantized.view(rows, 64) @ head.weight_int8.double().T * head.scales.double()
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
