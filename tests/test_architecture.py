"""The structure docs/ARCHITECTURE.md describes, held against the code: which way imports go, how
big a file or a function may grow, and where a new measured field has to be added."""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80


def sources(package: str) -> Iterator[Path]:
    for path in sorted((ROOT / package).rglob("*.py")):
        if "migrations" not in path.parts:
            yield path


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute (``from x import y`` counts as x and x.y)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def importers_of(module: str, package: str) -> list[str]:
    return [str(path.relative_to(ROOT)) for path in sources(package)
            if any(name == module or name.startswith(module + ".") for name in imported_modules(path))]


def test_only_the_dashboards_import_the_dashboards() -> None:
    importers = [path for path in importers_of("finops.dashboards", "finops")
                 if not path.startswith("finops/dashboards/")]
    assert importers == [], "the read model is telemetry's; dashboards are pages only"


def test_the_runtime_never_imports_django_and_the_control_plane_never_imports_torch() -> None:
    assert importers_of("django", "inference") == []
    assert importers_of("finops", "inference") == []
    assert importers_of("torch", "finops") == []
    assert importers_of("inference", "finops") == []


@pytest.mark.parametrize("package", ["finops", "inference"])
def test_no_file_outgrows_a_sitting(package: str) -> None:
    long_files = {str(path.relative_to(ROOT)): lines for path in sources(package)
                  if (lines := len(path.read_text().splitlines())) > MAX_FILE_LINES}
    assert long_files == {}


@pytest.mark.parametrize("package", ["finops", "inference"])
def test_no_function_outgrows_a_screen(package: str) -> None:
    long_functions = {}
    for path in sources(package):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > MAX_FUNCTION_LINES:
                    long_functions[f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"] = lines
    assert long_functions == {}


# -- a new measured field: the contracts, the model and its migration, and Sums -------------------


def test_every_field_of_the_contract_is_a_column_ingest_writes() -> None:
    from finops.telemetry.contracts import RequestEventRecord
    from finops.telemetry.models import RequestEvent
    from finops.telemetry.services import EVENT_COLUMNS

    columns = {field.name for field in RequestEvent._meta.get_fields()}
    assert set(RequestEventRecord.model_fields) <= set(EVENT_COLUMNS) <= columns


def test_every_stored_sum_is_a_rollup_column_and_every_rollup_column_a_stored_sum() -> None:
    from finops.telemetry.models import RollupSums
    from finops.telemetry.sums import STORED_FIELDS

    columns = {field.name for field in RollupSums._meta.get_fields()}
    assert set(STORED_FIELDS) == columns


def test_raw_events_and_rollup_rows_add_up_every_sum_the_same_way() -> None:
    from finops.telemetry.sums import Sums, event_aggregates, rollup_aggregates

    summed = {field.name for field in dataclasses.fields(Sums) if field.metadata["kind"] != "histogram"}
    assert set(event_aggregates("")) == set(rollup_aggregates("")) == summed


def test_every_sum_is_a_measure_pages_can_show() -> None:
    from finops.telemetry.sums import Sums
    from finops.telemetry.usage import Measures, Row, SeriesPoint, Totals

    names = {field.name for field in dataclasses.fields(Sums)}
    for measures in (Measures, Totals, Row, SeriesPoint):
        assert names <= {field.name for field in dataclasses.fields(measures)}
