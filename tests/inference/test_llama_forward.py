"""The engine's own Llama forward gives the logits transformers' forward gives, on the cache layout
the engine batches (left padding, rows prefilled together, prompts prefilled in chunks)."""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from inference.engine.llama_forward import LlamaForward, hf_forward, model_forward
from inference.engine.models import LoadedModel, load_model
from inference.engine.quantization import INT8_MAX_ROWS, Int4Linear, Int8Linear
from inference.engine.threads import pin_torch_threads
from tests.inference.llama_batches import decode, padded

CPU = torch.device("cpu")


def load_tiny(cache_dir: Path, **kwargs: str) -> LoadedModel:
    return load_model("tiny-random", device=CPU, cache_dir=cache_dir, max_model_len=256, **kwargs)


def run_both(loaded: LoadedModel, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each step's logits from both forwards, fed the same tokens (the reference's argmax)."""
    model = loaded.model
    ours, theirs = LlamaForward(model, compiled=False), hf_forward(model)  # q4_decode: its own tests
    results, _ = decode([ours, theirs], model.config, rows=3, steps=steps)
    return [(a, b.float()) for a, b in results]


def test_prefill_and_decode_of_a_padded_batch_match_transformers(tmp_path: Path) -> None:
    for ours, theirs in run_both(load_tiny(tmp_path), steps=4):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_a_prompt_prefilled_in_chunks_matches_one_prefill(tmp_path: Path) -> None:
    model = load_tiny(tmp_path).model
    forward = LlamaForward(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3))
    whole, chunked = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.inference_mode():
        expected = forward(ids, torch.ones(1, 20, dtype=torch.long), torch.arange(20)[None], whole)
        for start in (0, 8, 16):
            end = min(start + 8, 20)
            got = forward(ids[:, start:end], torch.ones(1, end, dtype=torch.long),
                          torch.arange(start, end)[None], chunked)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(chunked.layers[0].keys, whole.layers[0].keys, rtol=1e-4, atol=1e-5)


def test_a_padding_token_never_turns_a_real_row_into_nan(tmp_path: Path) -> None:
    model = load_tiny(tmp_path).model
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.tensor([[0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1]])
    with torch.inference_mode():
        logits = LlamaForward(model)(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), DynamicCache(config=model.config))
    assert torch.isfinite(logits).all()


def test_int4_layers_stack_in_whole_packing_blocks_and_the_originals_keep_working() -> None:
    parts = [Int4Linear.from_linear(torch.nn.Linear(64, rows, bias=False)) for rows in (128, 64, 64)]
    x = torch.randn(3, 64)
    separate = [part(x) for part in parts]
    assert Int4Linear.stackable(parts)
    stacked = Int4Linear.stacked(parts)
    torch.testing.assert_close(stacked(x), torch.cat(separate, dim=-1))
    # The separate layers now read views of the stacked rows, and give what they gave.
    assert parts[1].packed.untyped_storage().data_ptr() == stacked.packed.untyped_storage().data_ptr()
    torch.testing.assert_close(parts[1](x), separate[1])
    # 32 rows are half a block of the kernel's interleaved layout: such layers are not joined.
    assert not Int4Linear.stackable([*parts, Int4Linear.from_linear(torch.nn.Linear(64, 32, bias=False))])


def test_int4_stacks_gate_and_up_of_the_tiny_model_and_keeps_its_narrow_kv_apart(tmp_path: Path) -> None:
    loaded = load_tiny(tmp_path, quantization="int4")
    forward = LlamaForward(loaded.model)
    assert forward.layers[0].gate_up is not None and forward.layers[0].qkv is None  # k, v: 32 rows
    assert isinstance(loaded.model.get_output_embeddings(), Int8Linear)
    for ours, theirs in run_both(loaded, steps=3):
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-4)


def test_int4_in_bf16_matches_transformers_within_bf16(tmp_path: Path) -> None:
    loaded = load_tiny(tmp_path, dtype="bfloat16", quantization="int4")
    assert isinstance(loaded.model.model.layers[0].mlp.down_proj, Int4Linear)
    for ours, theirs in run_both(loaded, steps=3):
        cosine = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
        assert cosine.min() > 0.999, cosine


def test_the_engine_uses_it_for_a_llama_on_the_cpu_whose_forward_is_its_own(tmp_path: Path) -> None:
    model = load_tiny(tmp_path).model
    assert isinstance(model_forward(model, CPU), LlamaForward)
    assert not isinstance(model_forward(model, torch.device("cuda")), LlamaForward)
    wrapped = copy.copy(model)
    wrapped.forward = model.forward  # type: ignore[method-assign]
    assert not isinstance(model_forward(wrapped, CPU), LlamaForward)


def test_a_pinned_thread_keeps_its_threads_and_threads_started_later_get_one() -> None:
    seen: dict[str, int] = {}

    def model_thread() -> None:
        pin_torch_threads(2)
        seen["pinned"] = torch.get_num_threads()
        later = threading.Thread(target=lambda: seen.__setitem__("later", torch.get_num_threads()))
        later.start()
        later.join()
        seen["pinned after"] = torch.get_num_threads()

    thread = threading.Thread(target=model_thread)
    thread.start()
    thread.join()
    assert seen == {"pinned": 2, "later": 1, "pinned after": 2}


@pytest.mark.parametrize("rows", [1, INT8_MAX_ROWS])
def test_int8_output_layer_stays_within_a_step_of_its_weights(rows: int) -> None:
    linear = torch.nn.Linear(64, 96, bias=False)
    quantized = Int8Linear(linear)
    x = torch.randn(rows, 64)
    with torch.no_grad():
        exact = linear(x)
        got = quantized(x)
    assert not torch.equal(got, exact)  # int8 rounding: the 8-bit kernel ran
    step = linear.weight.abs().amax(dim=1) / 127  # one int8 step per output channel
    bound = (x.abs().sum(-1, keepdim=True) * step / 2) + 0.02 * exact.abs().amax()
    assert ((got - exact).abs() <= bound).all()


def test_int8_output_layer_multiplies_a_wide_input_with_the_weights_it_kept() -> None:
    linear = torch.nn.Linear(64, 96, bias=False)
    x = torch.randn(INT8_MAX_ROWS + 1, 64)
    with torch.no_grad():
        assert torch.equal(Int8Linear(linear)(x), linear(x))


def test_decode_writes_into_room_left_in_the_cache_and_a_rebuilt_batch_gets_room_again(tmp_path: Path) -> None:
    model = load_tiny(tmp_path).model
    forward = LlamaForward(model)
    ids, mask, positions = padded(model.config.vocab_size, 3)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        token = forward(ids, mask, positions, cache).argmax(-1, keepdim=True)
        held = cache.layers[0].keys.untyped_storage().data_ptr()
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=-1)
        forward(token, mask, mask.sum(-1, keepdim=True) - 1, cache)
        assert cache.layers[0].keys.untyped_storage().data_ptr() == held, "the step wrote in place"
        assert cache.layers[0].keys.shape[-2] == 13
        # A batch rebuilt from some of its rows (as KVBatch.select does) is a fresh tensor without room.
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[1:].clone(), layer.values[1:].clone()
        mask = torch.cat([mask[1:], torch.ones(2, 1, dtype=torch.long)], dim=-1)
        reference = DynamicCache(config=model.config)
        for ours, theirs in zip(cache.layers, reference.layers, strict=True):
            theirs.lazy_initialization(ours.keys, ours.values)
            theirs.keys, theirs.values = ours.keys.clone(), ours.values.clone()
        step = (token[1:], mask, mask.sum(-1, keepdim=True) - 1)
        ours, theirs = forward(*step, cache), hf_forward(model)(*step, reference)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-5)
    assert cache.layers[0].keys.shape[-2] == 14
