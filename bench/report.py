"""Output for benchmarks: plain-text tables on stdout, progress on stderr, and small statistics."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence


def progress(message: str) -> None:
    """A progress line on stderr, so ``python -m bench > results.txt`` keeps only the tables."""
    print(f"  .. {message}", file=sys.stderr, flush=True)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell; the first column left-aligned, the rest right-aligned."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(header), *(len(row[i]) for row in cells)]) for i, header in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(headers)), rule, *(line(row) for row in cells)])


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]],
                notes: Sequence[str] = ()) -> None:
    print(f"\n{title}\n")
    print(format_table(headers, rows))
    for note in notes:
        print(note)
    sys.stdout.flush()


def _cell(value: object) -> str:
    # A number the benchmark could not measure is "n/a", never zero.
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return str(value)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), interpolating linearly between the nearest samples."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None or math.isnan(seconds) else seconds * 1000
