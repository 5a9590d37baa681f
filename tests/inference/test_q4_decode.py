"""The compiled 4-bit decode step (``q4_decode``) gives PyTorch's 4-bit step's logits within int8
activation rounding, on the engine's cache layout: left padding, a cache prefilled by PyTorch, steps
wider than one kernel call, and a cache handed back and forth between the two paths. Where no compiler
is found, ``--quantization int4`` keeps PyTorch's kernels."""

from __future__ import annotations

import difflib
import platform
import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, PretrainedConfig

from inference.engine import q4_decode, quantization
from inference.engine.engine import Engine
from inference.engine.llama_forward import LlamaForward
from inference.engine.models import LoadedModel, load_model
from tests.inference.engine_driver import submit

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def int4(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model("tiny-random", device=CPU, cache_dir=tmp_path_factory.mktemp("models"), max_model_len=256,
                      dtype="bfloat16", quantization="int4")


@pytest.fixture(scope="module")
def compiled(int4: LoadedModel) -> LlamaForward:
    forward = LlamaForward(int4.model)
    if forward.compiled is None:
        pytest.fail("the kernel did not build: make test installs on machines with a C compiler (cc)")
    return forward


def padded(vocab: int, rows: int, width: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rows`` prompts left-padded to ``width``, row r with r % 5 padding tokens."""
    ids = torch.randint(0, vocab, (rows, width), generator=torch.Generator().manual_seed(rows))
    mask = torch.ones(rows, width, dtype=torch.long)
    for row in range(rows):
        mask[row, : row % 5] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def decode(forwards: list[LlamaForward], config: PretrainedConfig, rows: int, steps: int) -> list[list[torch.Tensor]]:
    """Each forward's logits per step (the prefill first) over its own cache, all fed the last
    forward's greedy tokens."""
    ids, mask, positions = padded(config.vocab_size, rows)
    caches = [DynamicCache(config=config) for _ in forwards]
    results: list[list[torch.Tensor]] = []
    with torch.inference_mode():
        for _ in range(steps + 1):
            step = [forward(ids, mask, positions, cache) for forward, cache in zip(forwards, caches, strict=True)]
            results.append(step)
            ids = step[-1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.long)], dim=-1)
            positions = mask.sum(-1, keepdim=True) - 1
    return results


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
    steps = decode([compiled, reference], int4.model.config, rows, steps=6)
    prefill, decoded = steps[0], steps[1:]
    torch.testing.assert_close(prefill[0], prefill[1])  # the prompt goes through PyTorch either way
    agree = total = 0
    for ours, theirs in decoded:
        assert_near(ours, theirs)
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        total += rows
    assert agree / total >= 0.9


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


def test_without_a_compiler_int4_keeps_pytorchs_kernels(
    int4: LoadedModel, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("WATTSON_KERNEL_DIR", str(tmp_path))
    q4_decode.library.cache_clear()
    try:
        forward = LlamaForward(int4.model)
    finally:
        q4_decode.library.cache_clear()
    assert forward.compiled is None
    assert "no C compiler (no-such-compiler)" in caplog.text
    assert list(tmp_path.iterdir()) == []
    ids, mask, positions = padded(int4.model.config.vocab_size, 2)
    with torch.inference_mode():
        assert torch.isfinite(forward(ids, mask, positions, DynamicCache(config=int4.model.config))).all()


def test_a_cache_directory_that_cannot_be_written_keeps_pytorchs_kernels(
    int4: LoadedModel, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("WATTSON_KERNEL_DIR", str(blocker / "kernels"))  # under a file: mkdir fails
    q4_decode.library.cache_clear()
    try:
        assert LlamaForward(int4.model).compiled is None
    finally:
        q4_decode.library.cache_clear()
    assert f"into {blocker / 'kernels'} failed" in caplog.text


def test_the_kernel_is_built_once_into_the_cache_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WATTSON_KERNEL_DIR", str(tmp_path))
    q4_decode.library.cache_clear()
    try:
        q4_decode.library()
        built = sorted(p.name for p in tmp_path.iterdir())
        q4_decode.library.cache_clear()
        q4_decode.library()
    finally:
        q4_decode.library.cache_clear()
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
    steps = decode([portable, compiled], int4.model.config, rows=3, steps=4)
    for ours, theirs in steps[1:]:
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-4)
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_the_engine_decodes_with_it_and_a_sequence_reads_the_same_alone_as_in_a_changing_batch(
    int4: LoadedModel, compiled: LlamaForward
) -> None:
    """Rows finish at different steps (the batch keeps some rows) and a request joins late (batches
    join): each sequence's text is the one it gets alone. (Alone, a prompt is prefilled without
    padding, which moves the random tiny model's near-tied logits in the last bits: a late token may
    flip, so the texts are compared as nearly equal; a row read from another row's cache would share
    nothing with its text alone.)"""
    prompts = ["The capital of France is", "Tell me a story about a lighthouse", "Why is the sky", "Two plus two"]
    lengths = [3, 60, 45, 30]

    def serve(indices: list[int], late: int | None = None) -> dict[int, str]:
        engine = Engine(int4, max_batch_size=8)
        assert isinstance(engine._forward, LlamaForward) and engine._forward.compiled is not None
        engine.start()
        try:
            handles = {i: submit(engine, int4.tokenizer.encode(prompts[i]), max_tokens=lengths[i], ignore_eos=True)
                       for i in indices}
            texts = {}
            if late is not None:
                # The first has finished (the others are mid-decode) when the late one arrives.
                texts[indices[0]] = handles.pop(indices[0]).result().text
                handles[late] = submit(engine, int4.tokenizer.encode(prompts[late]), max_tokens=lengths[late],
                                       ignore_eos=True)
            return texts | {i: handle.result().text for i, handle in handles.items()}
        finally:
            engine.stop()

    together = serve([0, 1, 2], late=3)
    alone = {i: serve([i])[i] for i in range(len(prompts))}
    assert together.keys() == alone.keys()
    for i, text in alone.items():
        assert difflib.SequenceMatcher(None, together[i], text).ratio() > 0.9, (together[i], text)
