"""--dtype and --quantization: the precision a model is served in, named or chosen by measurement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from inference.config import ConfigError, load_config
from inference.engine import precision
from inference.engine.engine import Engine
from inference.engine.models import LoadedModel, ModelLoadError, load_model
from inference.engine.precision import CHOICE_FILE, choice_key, choose_cpu_dtype, decode_score, decode_tokens_per_s
from inference.engine.quantization import INT4_GROUP, INT4_MAX_ROWS, Int4Linear, Int8Linear, quantize_int4
from tests.inference.engine_driver import submit

CPU = torch.device("cpu")


def load_tiny(cache_dir: Path, **kwargs: str) -> LoadedModel:
    return load_model("tiny-random", device=CPU, cache_dir=cache_dir, max_model_len=256, **kwargs)


def model_dtype(model: PreTrainedModel) -> torch.dtype:
    return next(model.parameters()).dtype


def greedy(loaded: LoadedModel, text: str = "The capital of France is", new_tokens: int = 8) -> list[int]:
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    out = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=loaded.tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    """The tiny model saved as a model directory: loaded by path, ``auto`` applies to it."""
    loaded = load_tiny(tmp_path / "build")
    target = tmp_path / "tiny-dir"
    loaded.model.save_pretrained(target)
    loaded.tokenizer.save_pretrained(target)
    return target


def test_flags_and_variables_name_the_precision() -> None:
    config = load_config(["--dtype", "bfloat16", "--quantization", "int8"], environ={})
    assert (config.dtype, config.quantization) == ("bfloat16", "int8")
    config = load_config([], environ={"INFERENCE_DTYPE": "float32"})
    assert (config.dtype, config.quantization) == ("float32", "none")
    assert (load_config([], environ={}).dtype, load_config([], environ={}).quantization) == ("auto", "none")


@pytest.mark.parametrize(("argv", "env", "message"), [
    ([], {"INFERENCE_DTYPE": "float64"}, "must be one of"),
    ([], {"INFERENCE_QUANTIZATION": "int3"}, "must be one of"),
    (["--dtype", "float16", "--device", "cpu"], {}, "float16 runs only on CUDA"),
])
def test_a_precision_the_device_cannot_serve_is_refused(argv: list[str], env: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(argv, environ=env)


def test_bfloat16_loads_the_weights_in_bf16(tmp_path: Path) -> None:
    loaded = load_tiny(tmp_path, dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert len(greedy(loaded)) == 8


def test_float16_on_the_cpu_is_a_load_error_that_says_so(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="float16 runs only on CUDA"):
        load_tiny(tmp_path, dtype="float16")


def test_auto_keeps_the_tiny_test_model_in_fp32_without_measuring(tmp_path: Path) -> None:
    loaded = load_tiny(tmp_path, dtype="auto")
    assert loaded.dtype == torch.float32 and model_dtype(loaded.model) == torch.float32
    assert not (tmp_path / CHOICE_FILE).exists()


def test_auto_on_a_cpu_without_native_bf16_is_fp32_and_measures_nothing(tmp_path: Path) -> None:
    model = load_tiny(tmp_path).model

    def never(_: PreTrainedModel) -> float:
        raise AssertionError("nothing should be measured")

    choice = choose_cpu_dtype(model, model_name="m", cache_dir=tmp_path, measure=never, native_bf16=False)
    assert choice.dtype == torch.float32 and "no native bf16" in choice.reason


@pytest.mark.parametrize(("fp32_rate", "bf16_rate", "expected"), [
    (20.0, 35.0, torch.bfloat16),
    (40.0, 30.0, torch.float32),
])
def test_auto_measures_both_precisions_once_and_keeps_the_faster(
    tmp_path: Path, fp32_rate: float, bf16_rate: float, expected: torch.dtype,
) -> None:
    model = load_tiny(tmp_path).model
    measured: list[torch.dtype] = []

    def measure(candidate: PreTrainedModel) -> float:
        measured.append(model_dtype(candidate))
        if model_dtype(candidate) == torch.bfloat16:
            assert all(p.requires_grad for p in candidate.parameters()), "measured as it would be served"
        return bf16_rate if model_dtype(candidate) == torch.bfloat16 else fp32_rate

    first = choose_cpu_dtype(model, model_name="m", cache_dir=tmp_path, measure=measure, native_bf16=True)
    again = choose_cpu_dtype(model, model_name="m", cache_dir=tmp_path, measure=measure, native_bf16=True)
    assert (first.dtype, again.dtype) == (expected, expected)
    assert measured == [torch.float32, torch.bfloat16], "the second start reads the cached verdict"
    assert model_dtype(model) == torch.float32, "the model measured in bf16 was a copy"
    record = json.loads((tmp_path / CHOICE_FILE).read_text())[choice_key("m")]
    assert record["float32_tokens_per_s"] == fp32_rate and record["bfloat16_tokens_per_s"] == bf16_rate
    assert "cached" in again.reason


def test_the_cached_verdict_is_per_model_and_per_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_tiny(tmp_path).model
    rates = iter([10.0, 20.0, 30.0, 5.0, 10.0, 20.0])
    choose = dict(cache_dir=tmp_path, measure=lambda _: next(rates), native_bf16=True)
    assert choose_cpu_dtype(model, model_name="a", **choose).dtype == torch.bfloat16
    assert choose_cpu_dtype(model, model_name="b", **choose).dtype == torch.float32
    monkeypatch.setattr(precision, "cpu_name", lambda: "another CPU")
    assert choose_cpu_dtype(model, model_name="a", **choose).dtype == torch.bfloat16
    assert len(json.loads((tmp_path / CHOICE_FILE).read_text())) == 3


def test_auto_loads_a_model_directory_in_the_cached_verdict(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / CHOICE_FILE).write_text(json.dumps({choice_key("tiny-dir"): {"dtype": "bfloat16"}}))
    loaded = load_model(str(tiny_dir), device=CPU, cache_dir=cache, max_model_len=256, dtype="auto")
    assert loaded.dtype == torch.bfloat16 and model_dtype(loaded.model) == torch.bfloat16
    assert all(p.requires_grad for p in loaded.model.parameters()), "served like --dtype bfloat16"


def test_auto_measures_a_model_directory_when_nothing_is_cached(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    loaded = load_model(str(tiny_dir), device=CPU, cache_dir=tmp_path, max_model_len=256, dtype="auto")
    record = json.loads((tmp_path / CHOICE_FILE).read_text())[choice_key("tiny-dir")]
    assert record["float32_tokens_per_s"] > 0 and record["bfloat16_tokens_per_s"] > 0
    assert loaded.dtype == precision.DTYPES[record["dtype"]]


def test_an_unreadable_cache_is_measured_again(tmp_path: Path) -> None:
    model = load_tiny(tmp_path).model
    (tmp_path / CHOICE_FILE).write_text("{not json")
    choice = choose_cpu_dtype(model, model_name="m", cache_dir=tmp_path, measure=lambda _: 1.0, native_bf16=True)
    assert choice.dtype == torch.float32 and "measured" in choice.reason


def test_decode_probe_counts_every_sequence_of_the_batch(tmp_path: Path) -> None:
    model = load_tiny(tmp_path).model
    assert decode_tokens_per_s(model, 1) > 0 and decode_tokens_per_s(model, 4) > 0
    assert decode_score(model) > 0


def test_int8_quantizes_the_linear_weights_and_stays_close_to_fp32(tmp_path: Path) -> None:
    reference = load_tiny(tmp_path / "a")
    quantized = load_tiny(tmp_path / "b", quantization="int8")
    assert quantized.quantization == "int8"
    linear = quantized.model.model.layers[0].self_attn.q_proj
    assert "Int8" in type(linear.weight).__name__
    ids = reference.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = reference.model(ids).logits[0], quantized.model(ids).logits[0]
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.99
    assert len(greedy(quantized)) == 8


def test_int4_packs_the_linear_weights_for_the_cpu_kernel_and_stays_close_to_fp32(tmp_path: Path) -> None:
    reference = load_tiny(tmp_path / "a")
    quantized = load_tiny(tmp_path / "b", quantization="int4")
    assert quantized.quantization == "int4"
    layer = quantized.model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, Int4Linear) and isinstance(layer.mlp.down_proj, Int4Linear)
    assert isinstance(quantized.model.get_output_embeddings(), Int8Linear), "the output layer goes to 8 bits, not 4"
    ids = reference.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = reference.model(ids).logits[0], quantized.model(ids).logits[0]
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.95
    assert len(greedy(quantized)) == 8


def test_the_engine_serves_an_int4_model_in_a_batch_as_it_generates_alone(tmp_path: Path) -> None:
    quantized = load_tiny(tmp_path, quantization="int4")
    for module in quantized.model.modules():  # every product in 4 bits, however wide the batch
        if isinstance(module, Int4Linear):
            module.dense = None
    prompts = ["The capital of France is", "Tell me a story about", "Why is the sky"]
    engine = Engine(quantized, max_batch_size=4)
    engine.start()
    try:
        batched = [submit(engine, quantized.tokenizer.encode(text), max_tokens=6, ignore_eos=True) for text in prompts]
        texts = [handle.result().text for handle in batched]
    finally:
        engine.stop()
    alone = [quantized.tokenizer.decode(greedy(quantized, text, 6), skip_special_tokens=True) for text in prompts]
    assert texts == alone


def test_int4_multiplies_few_rows_in_4_bits_and_more_with_the_weights_it_kept() -> None:
    linear = torch.nn.Linear(64, 64, bias=False)
    quantized = Int4Linear.from_linear(linear)
    with torch.no_grad():
        few, many = torch.randn(INT4_MAX_ROWS, 64), torch.randn(INT4_MAX_ROWS + 1, 64)
        assert not torch.equal(quantized(few), linear(few))  # 4-bit rounding
        assert torch.nn.functional.cosine_similarity(quantized(few), linear(few), dim=-1).min() > 0.99
        assert torch.equal(quantized(many), linear(many))


def test_int4_groups_reproduce_a_weight_within_half_a_step() -> None:
    weight = torch.randn(32, 128)
    packed, scales_and_zeros = quantize_int4(weight)
    eye = torch.eye(128, dtype=torch.bfloat16)
    restored = torch._weight_int4pack_mm_for_cpu(eye, packed, INT4_GROUP, scales_and_zeros).float().T  # [out, in]
    groups = weight.reshape(32, 128 // INT4_GROUP, INT4_GROUP)
    step = (groups.amax(-1) - groups.amin(-1)) / 15
    error = (restored - weight).abs().reshape(32, 128 // INT4_GROUP, INT4_GROUP).amax(-1)
    assert (error <= step / 2 + 0.02 * weight.abs().max()).all()  # half a step, plus bf16's rounding


def test_an_unknown_quantization_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="--quantization 'int3' must be one of none, int8, int4"):
        load_tiny(tmp_path, quantization="int3")


def test_bf16_weights_on_the_cpu_keep_requires_grad_and_the_engine_records_no_grad(tmp_path: Path) -> None:
    # torch's CPU bf16 linear is 10-20x slower in prefill on weights that do not require grad
    # (docs/BENCHMARKS.md, issue 20), so load_model leaves the flag; inference_mode makes it moot.
    loaded = load_tiny(tmp_path, dtype="bfloat16")
    assert all(p.requires_grad for p in loaded.model.parameters())
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = loaded.model(ids).logits
    assert not logits.requires_grad
