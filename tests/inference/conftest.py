from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from inference.engine.models import LoadedModel
from inference.telemetry.exporter import TelemetryExporter
from tests.inference.collector import Collector
from tests.inference.live import LiveRuntime, serve, tiny_config
from tests.inference.telemetry_helpers import TOKEN as EXPORT_TOKEN


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


@pytest.fixture
def exporters() -> Iterator[list[TelemetryExporter]]:
    made: list[TelemetryExporter] = []
    yield made
    for exporter in made:
        exporter.close(timeout=0.5)


@pytest.fixture
def make_exporter(tmp_path: Path, collector: Collector, exporters: list[TelemetryExporter]) -> Any:
    """Makes exporters over ``tmp_path/spool`` aimed at the collector (options as TelemetryExporter's),
    closed when the test ends."""

    def make(*, start: bool = True, **overrides: Any) -> TelemetryExporter:
        options: dict[str, Any] = {
            "url": collector.url,
            "token": EXPORT_TOKEN,
            "spool_dir": tmp_path / "spool",
            "spool_max_bytes": 4 << 20,
            "batch_size": 50,
            "interval_s": 0.05,
            "timeout_s": 0.5,
            "backoff_initial_s": 0.02,
            "backoff_max_s": 0.1,
        }
        options.update(overrides)
        exporter = TelemetryExporter(**options)
        exporters.append(exporter)
        if start:
            exporter.start()
        return exporter

    return make
