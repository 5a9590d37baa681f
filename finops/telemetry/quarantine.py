"""What a rollup run leaves out rather than stop: one bad row never stops a run.

Two kinds of row are left out, each logged and counted in a ``RollupQuarantine`` row written in the
run's transaction (so with its watermark: a row is left out once, never at every run):

* **raw records out of the contract's bounds** (``contracts.py``, "Bounds") — stored before ingest
  bounded them, or written around ingest. Every read of raw rows that a rollup also counts leaves
  them out too (``in_bounds``), so the rollups and the raw tail always agree on what counts.
* **rollup rows the database will not store** — a total past its column (checked before writing,
  the same on SQLite, which would store anything, as on PostgreSQL), or any row the database
  refuses as data (a chunk that fails is written again row by row, each in a savepoint, and only
  the rows that fail alone are left out). A failure that is not about the data (a lost connection)
  still fails the run, which then rolls back whole and is done again by the next one.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.db import DataError, IntegrityError, connection, models, transaction
from django.db.models import Q, QuerySet
from pydantic import BaseModel

from finops.telemetry.contracts import (
    COST_LIMIT,
    INT8_MAX,
    DeviceSampleRecord,
    RequestEventRecord,
    RuntimeSampleRecord,
)
from finops.telemetry.models import DeviceSample, RequestEvent, RollupQuarantine, RuntimeSample

logger = logging.getLogger("finops.telemetry")

EXAMPLES = 20  # ids or keys kept per quarantine row
# (lowest, highest allowed, whether the highest itself is refused) per bounded column.
Bounds = dict[str, tuple[float | None, float | None, bool]]


def _contract_bounds(record: type[BaseModel]) -> Bounds:
    """Each number's bounds as the contract declares them (read from its JSON schema, which says
    them once for required and nullable fields alike)."""
    bounds: Bounds = {}
    for name, schema in record.model_json_schema()["properties"].items():
        for option in schema.get("anyOf", [schema]):
            if option.get("type") in ("integer", "number"):
                highest = option.get("maximum")
                bounds[name] = (option.get("minimum"), highest if highest is None or highest < INT8_MAX else None,
                                False)
    return bounds


@functools.cache
def column_bounds(model: type[models.Model]) -> Bounds:
    """The bounds of a raw model's columns: its contract record's, and for events their costs."""
    if model is RequestEvent:
        costs = {name: (0, COST_LIMIT, True) for name in ("list_cost", "hardware_cost", "saved_cost")}
        return _contract_bounds(RequestEventRecord) | costs
    return _contract_bounds({RuntimeSample: RuntimeSampleRecord, DeviceSample: DeviceSampleRecord}[model])


@functools.cache
def out_of_bounds(model: type[models.Model]) -> Q:
    """Rows of a raw model with a number out of its bounds (infinities and PostgreSQL's NaN, which
    sorts above every number, included)."""
    condition = Q()
    for name, (lowest, highest, exclusive) in column_bounds(model).items():
        if lowest is not None:
            condition |= Q(**{f"{name}__lt": lowest})
        if highest is not None:
            condition |= Q(**{f"{name}__{'gte' if exclusive else 'gt'}": highest})
    return condition


def in_bounds(rows: QuerySet[Any]) -> QuerySet[Any]:
    """``rows`` without the raw records a rollup leaves out."""
    return rows.exclude(out_of_bounds(rows.model))


def _out_of_bounds_names(model: type[models.Model], row: dict[str, Any]) -> list[str]:
    names = []
    for name, (lowest, highest, exclusive) in column_bounds(model).items():
        value = row.get(name)
        if value is None:
            continue
        if (isinstance(value, float) and math.isnan(value)) or (lowest is not None and value < lowest) or (
                highest is not None and (value >= highest if exclusive else value > highest)):
            names.append(name)
    return names


@dataclass
class Quarantine:
    """What one rollup run (``stat``: its FillState) left out; ``save`` writes and logs it."""

    stat: str
    entries: list[RollupQuarantine] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(entry.count for entry in self.entries)

    def add(self, *, source: str, count: int, examples: list[Any], reason: str) -> None:
        entry = RollupQuarantine(stat=self.stat, source=source, count=count, examples=examples[:EXAMPLES],
                                 reason=reason[:2000])
        self.entries.append(entry)
        logger.warning("rollups (%s): left out %d %s: %s (first: %s)", self.stat, count, source, entry.reason,
                       entry.examples[:5])

    def save(self) -> None:
        RollupQuarantine.objects.bulk_create(self.entries)

    def screen(self, rows: QuerySet[Any]) -> QuerySet[Any]:
        """``rows`` without the raw records out of bounds, which are left out and counted here."""
        model = rows.model
        bad = rows.filter(out_of_bounds(model))
        examples = list(bad.order_by("id").values("id", *column_bounds(model))[:EXAMPLES])
        if examples:
            count = bad.count() if len(examples) == EXAMPLES else len(examples)
            names = sorted({name for row in examples for name in _out_of_bounds_names(model, row)})
            self.add(source=model.__name__, count=count, examples=[row["id"] for row in examples],
                     reason=f"out of the contract's bounds: {', '.join(names)}")
        return in_bounds(rows)

    def write(self, model: type[models.Model], rows: list[models.Model], *, unique_fields: list[str],
              update_fields: list[str]) -> int:
        """Upsert rollup rows, leaving out (and counting here) each one the database will not
        store; return how many were written."""
        refused: list[tuple[models.Model, str]] = []
        storable = []
        for row in rows:
            if problem := _unstorable(row):
                refused.append((row, problem))
            else:
                storable.append(row)

        def upsert(chunk: list[models.Model]) -> None:
            with transaction.atomic():  # a savepoint: a refused chunk leaves the run's transaction usable
                model.objects.bulk_create(chunk, update_conflicts=True, unique_fields=unique_fields,
                                          update_fields=update_fields, batch_size=500)

        try:
            upsert(storable)
            written = len(storable)
        except (DataError, IntegrityError):
            written = 0
            for row in storable:
                try:
                    upsert([row])
                    written += 1
                except (DataError, IntegrityError) as exc:
                    refused.append((row, f"the database refused it: {str(exc).splitlines()[0]}"))
        if refused:
            self.add(source=model.__name__, count=len(refused),
                     examples=[[str(getattr(row, name)) for name in unique_fields] for row, _ in refused],
                     reason="; ".join(sorted({problem for _, problem in refused})))
        return written


def _unstorable(row: models.Model) -> str | None:
    """Why a column of ``row`` cannot hold its value (a total past its column), if one cannot."""
    for f in row._meta.concrete_fields:
        value = getattr(row, f.attname)
        if value is None or f.primary_key:
            continue
        if isinstance(f, models.FloatField) and not math.isfinite(value):
            return f"{f.name}: {value} is not a finite number"
        if isinstance(f, models.DecimalField) and abs(value) >= Decimal(10) ** (f.max_digits - f.decimal_places):
            return f"{f.name}: {value} does not fit numeric({f.max_digits}, {f.decimal_places})"
        if isinstance(f, models.IntegerField):
            lowest, highest = connection.ops.integer_field_range(f.get_internal_type())
            if not lowest <= value <= highest:
                return f"{f.name}: {value} does not fit a {f.get_internal_type()}"
    return None
