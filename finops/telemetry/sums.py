"""What request events add up to: the one definition of every summed measure.

``Sums`` is what a rollup row adds up over the events of its bucket and group, and what every read
adds up over rollup rows and the raw tail. Each field says once how it is computed: its SQL
aggregate over raw events (``event_aggregates``) and over rollup rows (``rollup_aggregates``).
The rollup run writes ``event_aggregates`` into rows; readers count the raw tail with the same
aggregates and the rollups with ``rollup_aggregates``, so the two always agree.

A new summed measure is one field here (plus its ``RollupSums`` column and the event's own field):
the rollup run, re-pricing, every read and ``usage.Measures`` pick it up from this declaration.
"""

from __future__ import annotations

import dataclasses
import decimal
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal

from django.db import connection
from django.db.models import Aggregate, BigIntegerField, Count, F, Max, Q, Sum

from finops.pricing.services import QUANTUM
from finops.telemetry import sketch

if TYPE_CHECKING:
    from finops.telemetry.models import RollupSums

PICO = 10**12  # the cost columns' 12 decimal places, as an integer scale
ZERO = Decimal(0)

# How a field combines: added (integers, floats, costs), the larger kept, or histograms merged.
Kind = Literal["int", "float", "cost", "max", "histogram"]


_SQLITE_DIGITS = decimal.Context(prec=15)  # what SQLite keeps of a decimal (and Django reads back)
_WIDE = decimal.Context(prec=60)


class SqlitePicoSum:
    """SQLite's exact sum of a cost column, ``wattson_cost_sum``: integer pico-dollars in Python,
    which never overflow (SQLite's own integer sum stops at 2**63 pico-dollars, $9.2 million, and
    its REAL sums drift in the last places). The result is an integer while it fits one, else the
    same number as text, zero-padded so that it still sorts after every integer and among itself."""

    def __init__(self) -> None:
        self.total: int | None = None

    def step(self, value: float | int | str | None) -> None:
        if value is None:
            return
        # A REAL read as Django reads one value of the column: its 15 significant digits.
        exact = _SQLITE_DIGITS.create_decimal_from_float(value) if isinstance(value, float) else Decimal(value)
        pico = int(exact.quantize(QUANTUM, context=_WIDE) * PICO)
        self.total = pico if self.total is None else self.total + pico

    def finalize(self) -> int | str | None:
        if self.total is None or -(2**63) <= self.total < 2**63:
            return self.total
        return f"{self.total:040d}"


def sqlite_functions_register(*, connection: Any, **_: Any) -> None:
    """``connection_created`` receiver (TelemetryConfig.ready): SQLite's ``wattson_cost_sum``."""
    if connection.vendor == "sqlite":
        connection.connection.create_aggregate("wattson_cost_sum", 1, SqlitePicoSum)


def cost_sum(column: str, *, filter: Q | None = None) -> Aggregate:
    """An exact SQL sum of a cost column (over the rows ``filter`` keeps), however large. PostgreSQL's
    numeric is exact; SQLite keeps decimals as REAL, whose sums drift in the last places, so there
    the sum is over integer pico-dollars (``SqlitePicoSum``)."""
    if connection.vendor == "sqlite":
        return Aggregate(F(column), function="wattson_cost_sum", output_field=BigIntegerField(), filter=filter)
    return Sum(column, filter=filter)


def cost_value(value: Decimal | int | str | None) -> Decimal:
    """A cost as ``cost_sum`` returns it (SQLite's pico-dollars or PostgreSQL's numeric), exact."""
    if value is None:
        return ZERO
    if isinstance(value, int | str):  # SQLite's pico-dollars
        return (Decimal(int(value)) / PICO).quantize(QUANTUM)
    return Decimal(value).quantize(QUANTUM)


def _measure(kind: Kind, event: Callable[[], Aggregate] | None, *, rollup: Callable[[str], Aggregate] | None = None,
             stored: bool = True) -> dict[str, Any]:
    """A ``Sums`` field's metadata: how raw events add up into it (``event``) and how rollup rows do
    (``rollup``, given the column; by default the column's sum, or max). ``stored`` fields are
    ``RollupSums`` columns; the others are folded by readers from rows of every status class."""
    if rollup is None:
        rollup = {"cost": cost_sum, "max": Max}.get(kind, Sum)
    return {"kind": kind, "event": event, "rollup": rollup, "stored": stored}


def _status_count(status_class: str) -> dict[str, Any]:
    return _measure("int", lambda: Count("id", filter=Q(status_class=status_class)),
                    rollup=lambda _: Sum("requests", filter=Q(status_class=status_class)), stored=False)


def _status(status: str) -> dict[str, Any]:
    return _measure("int", lambda: Count("id", filter=Q(status=status)))


@dataclass
class Sums:
    """What a rollup row adds up over the events of its bucket and group; also what a read adds up
    over rollup rows and raw events, and a difference to apply to a row (re-pricing)."""

    requests: int = field(default=0, metadata=_measure("int", lambda: Count("id")))  # events: attempts
    # Requests clients sent: the first attempt of each (an event of an older runtime is one of its own).
    client_requests: int = field(default=0, metadata=_measure(
        "int", lambda: Count("id", filter=Q(attempt__isnull=True) | Q(attempt=1))))
    prompt_tokens: int = field(default=0, metadata=_measure("int", lambda: Sum("prompt_tokens")))
    completion_tokens: int = field(default=0, metadata=_measure("int", lambda: Sum("completion_tokens")))
    cache_hits: int = field(default=0, metadata=_measure("int", lambda: Count("id", filter=Q(cache_hit=True))))
    # The tokens of cache hits (prompt + completion): answered again from the cache, so saved, not spent.
    saved_tokens: int = field(default=0, metadata=_measure(
        "int", lambda: Sum(F("prompt_tokens") + F("completion_tokens"), filter=Q(cache_hit=True))))
    gpu_seconds: float = field(default=0.0, metadata=_measure("float", lambda: Sum("gpu_seconds")))
    energy_joules: float = field(default=0.0, metadata=_measure("float", lambda: Sum("energy_joules")))
    # Events whose energy was measured: a sum of none is unmeasured, not 0 joules.
    energy_measured: int = field(default=0, metadata=_measure("int", lambda: Count("energy_joules")))
    list_cost: Decimal = field(default=ZERO, metadata=_measure("cost", lambda: cost_sum("list_cost")))
    hardware_cost: Decimal = field(default=ZERO, metadata=_measure("cost", lambda: cost_sum("hardware_cost")))
    # The list price cache hits did not cost.
    saved_cost: Decimal = field(default=ZERO, metadata=_measure("cost", lambda: cost_sum("saved_cost")))
    # The semantic cache's hits and what they saved: part of cache_hits and saved_cost above.
    semantic_hits: int = field(default=0, metadata=_measure(
        "int", lambda: Count("id", filter=Q(cache_hit=True, cache_kind="semantic"))))
    semantic_saved_cost: Decimal = field(default=ZERO, metadata=_measure(
        "cost", lambda: cost_sum("saved_cost", filter=Q(cache_hit=True, cache_kind="semantic"))))
    # Events no list price applied to.
    unpriced: int = field(default=0, metadata=_measure("int", lambda: Count("id", filter=Q(list_cost__isnull=True))))
    # Queue wait of the events that waited in a runtime's queue (rejected ones did not).
    queue_wait_ms_sum: float = field(default=0.0, metadata=_measure("float", lambda: Sum("queue_wait_ms")))
    queue_waits: int = field(default=0, metadata=_measure("int", lambda: Count("queue_wait_ms")))
    # None: no queue wait measured (or, in a difference, unchanged).
    queue_wait_ms_max: float | None = field(default=None, metadata=_measure("max", lambda: Max("queue_wait_ms")))
    # Rejections by reason (their status).
    rejected_rule: int = field(default=0, metadata=_status("rejected_rule"))
    rejected_budget: int = field(default=0, metadata=_status("rejected_budget"))
    shed: int = field(default=0, metadata=_status("shed"))
    # Latency sketches (sketch bucket index -> count), counted apart from the aggregates above: the
    # rollup run by a grouped count per bucket index, reads by ``latency``.
    e2e_hist: dict[int, int] = field(default_factory=dict, metadata=_measure("histogram", None))
    ttft_hist: dict[int, int] = field(default_factory=dict, metadata=_measure("histogram", None))
    # Requests by status class. Rollup rows are kept per status class, so these are no columns: a
    # read folds them out of ``requests`` of the rows of each class.
    ok: int = field(default=0, metadata=_status_count("ok"))
    errors: int = field(default=0, metadata=_status_count("error"))  # status error or timeout
    rejections: int = field(default=0, metadata=_status_count("rejected"))  # rejected by a rule or budget, or shed
    cancelled: int = field(default=0, metadata=_status_count("cancelled"))

    def add(self, other: Sums) -> None:
        for name, kind in _COMBINED:
            mine, theirs = getattr(self, name), getattr(other, name)
            if kind == "max":
                if theirs is not None and (mine is None or theirs > mine):
                    setattr(self, name, theirs)
            elif kind == "histogram":
                for index, count in theirs.items():
                    mine[index] = mine.get(index, 0) + count
            else:
                setattr(self, name, mine + theirs)

    def add_row(self, row: Mapping[str, Any], prefix: str) -> None:
        """Add a row of ``event_aggregates(prefix)`` or ``rollup_aggregates(prefix)``: the fields it
        has (a sum over no value is 0). Written for speed: a split series adds thousands of rows."""
        values = self.__dict__
        ints, floats, costs = _read_keys(prefix)
        for key, name in ints:
            if key in row:
                values[name] += int(row[key] or 0)
        for key, name in floats:
            if key in row:
                values[name] += float(row[key] or 0.0)
        for key, name in costs:
            if key in row:
                values[name] += cost_value(row[key])
        value = row.get(prefix + "queue_wait_ms_max")
        if value is not None and (self.queue_wait_ms_max is None or value > self.queue_wait_ms_max):
            self.queue_wait_ms_max = float(value)

    def added_to(self, row: RollupSums) -> dict[str, Any]:
        """The stored fields of ``row`` + self, ready to store (histograms as JSON objects)."""
        total = Sums(**{name: _stored_value(row, name, kind) for name, kind in _STORED})
        total.add(self)
        values = {name: getattr(total, name) for name, _ in _STORED}
        for name, kind in _STORED:
            if kind == "histogram":
                values[name] = {str(index): count for index, count in sorted(values[name].items()) if count}
        return values


_FIELDS = dataclasses.fields(Sums)
# (name, kind) of every field a Sums adds up, and of the ones a rollup row stores.
_COMBINED = tuple((f.name, f.metadata["kind"]) for f in _FIELDS)
_STORED = tuple((f.name, f.metadata["kind"]) for f in _FIELDS if f.metadata["stored"])


@functools.cache
def _read_keys(prefix: str) -> tuple[tuple[tuple[str, str], ...], ...]:
    """What ``add_row`` reads: (row key, field) of the integer, float and cost fields (the largest
    queue wait is kept apart: the larger value wins)."""
    return tuple(tuple((prefix + name, name) for name, kind in _COMBINED if kind == wanted)
                 for wanted in ("int", "float", "cost"))


# The columns a rollup run writes into a RollupSums row.
STORED_FIELDS = [name for name, _ in _STORED]


def event_aggregates(prefix: str, *, stored_only: bool = False) -> dict[str, Aggregate]:
    """How raw events add up into ``Sums``: an SQL aggregate per field, named ``prefix`` + the field
    (the status-class counts left out with ``stored_only``: rows grouped by status class)."""
    return {prefix + f.name: f.metadata["event"]() for f in _FIELDS
            if f.metadata["event"] is not None and (f.metadata["stored"] or not stored_only)}


def rollup_aggregates(prefix: str) -> dict[str, Aggregate]:
    """``event_aggregates`` of rollup rows: how rows of finer buckets or groups add up."""
    return {prefix + f.name: f.metadata["rollup"](f.name) for f in _FIELDS if f.metadata["event"] is not None}


def _stored_value(row: RollupSums, name: str, kind: Kind) -> Any:
    value = getattr(row, name)
    if kind == "cost":
        return Decimal(value or 0)
    if kind == "max":
        return value
    if kind == "histogram":
        return sketch.merge([value or {}])
    return value or 0
