from __future__ import annotations

from collections.abc import Iterator

import pytest

from inference.engine.models import LoadedModel
from tests.inference.collector import Collector
from tests.inference.live import LiveRuntime, serve, tiny_config


@pytest.fixture(scope="module")
def live(tiny_model: LoadedModel) -> Iterator[LiveRuntime]:
    """One runtime on the tiny model shared by a module's tests (they only read from it)."""
    with serve(tiny_config(), preloaded=(tiny_model,)) as server:
        yield server


@pytest.fixture
def collector() -> Iterator[Collector]:
    """A real telemetry collector on 127.0.0.1, up until the test ends."""
    collector = Collector()
    collector.up()
    yield collector
    collector.down()
