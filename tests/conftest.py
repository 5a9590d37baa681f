from __future__ import annotations

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
    return Path(__file__).resolve().parent.parent / ".cache" / "models"
