"""Telemetry ingest: who is sending, and storing what they sent exactly once, priced on arrival.

A batch is one transaction. Samples go first (they name the runtime's GPUs, so events in the same
batch price at their device type), then events, then the runtime's event counts (what it recorded
against what was stored, for completeness; counted here, in the transaction that stores the events,
so a resent event is never counted twice). On PostgreSQL the events are COPYed into a temporary
staging table and moved with ``INSERT … SELECT … ON CONFLICT (event_id, started_at) DO NOTHING``:
the fastest path that also drops resent records (DESIGN.md, "Facts"). Elsewhere (SQLite) one
``INSERT … ON CONFLICT DO NOTHING`` is executed for all the rows. Either way rows are tuples, never
model instances, and nothing is queried per record.
"""

from __future__ import annotations

import bisect
import datetime as dt
import logging
import operator
import threading
import time
import weakref
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import DatabaseError, connection, models, transaction
from django.db.models import F, Value
from django.db.models.functions import Greatest, Now
from django.db.models.signals import post_delete, post_save
from django.utils import timezone

from finops.lib.api import MAX_TOKEN_CHARS
from finops.pricing.models import DevicePrice, ModelPrice, PriceBook
from finops.pricing.services import PriceCatalog, Prices, hardware_cost, served_list_cost
from finops.runtimes.models import Runtime, RuntimeToken, token_digest
from finops.telemetry import partitioning
from finops.telemetry.contracts import (
    COST_LIMIT,
    ParsedBatch,
    Refusal,
    RequestEventRecord,
    RuntimeSampleRecord,
    batch_parse,
)
from finops.telemetry.models import STATUS_CLASSES, Device, DeviceSample, RequestEvent, RuntimeEventCount, RuntimeSample
from finops.telemetry.selectors import device_types_for
from finops.telemetry.sketch import bucket_index

logger = logging.getLogger("finops.telemetry")

# Token and runtime "last seen" stamps are written at most this often, not on every batch.
TOUCH_INTERVAL = dt.timedelta(seconds=5)
# A runtime's clock may run a little ahead; a record from further ahead is refused, which also
# keeps a wrong clock (or a hostile client) from creating partitions for days that never come.
MAX_CLOCK_AHEAD = dt.timedelta(days=1)

# A stored event is the contract's fields as they came, then what ingest derives from them.
EVENT_FIELDS = tuple(RequestEventRecord.model_fields)
DERIVED_COLUMNS = ("status_class", "price_book_id", "list_cost", "hardware_cost", "saved_cost", "e2e_bucket",
                   "ttft_bucket")
EVENT_COLUMNS = EVENT_FIELDS + DERIVED_COLUMNS
_event_fields = operator.itemgetter(*EVENT_FIELDS)
SAMPLE_COLUMNS = ("runtime_id", "at", "queue_depth", "running", "tokens_per_s", "kv_cache_used", "breakers",
                  "events_recorded", "tenants")
DEVICE_SAMPLE_COLUMNS = ("runtime_id", "at", "device", "name", "gpu_util", "mem_used", "mem_total", "power_w",
                         "energy_joules_total", "temperature_c", "power_limit_w")
DEVICE_COLUMNS = ("runtime_id", "uuid", "name", "last_seen_at")
_SEQ = EVENT_COLUMNS.index("seq")

# PostgreSQL binary COPY types of the staging table, by Django field class.
_PG_TYPES = {
    "UUIDField": "uuid", "CharField": "text", "DateTimeField": "timestamptz", "PositiveSmallIntegerField": "int2",
    "SmallIntegerField": "int2", "PositiveIntegerField": "int4", "IntegerField": "int4",
    "BigIntegerField": "int8", "BooleanField": "bool", "FloatField": "float8", "DecimalField": "numeric",
}
_STAGING = "telemetry_requestevent_staging"
# SQLSTATEs worth one retry: a partition that vanished (check_violation: "no partition of relation
# … found for row"), two transactions creating the same new partition at once, a staging table the
# session lost (undefined_table: a pooler handed us another server session), or a deadlock between
# two batches resending the same records in different orders.
_RETRYABLE = {"23514", "42P07", "23505", "42P01", "40P01"}

# Price books change rarely and take effect at a date, so a batch may be priced with books read
# a few seconds ago; a price saved in this process clears the cache at once.
PRICE_CACHE_SECONDS = 5.0

# Partition days known to exist in this process; filled only after the creating transaction commits.
_known_partition_days: set[dt.date] = set()
# Database sessions (raw connections) whose staging table is committed.
_sessions_with_staging: weakref.WeakSet[Any] = weakref.WeakSet()
_price_cache_lock = threading.Lock()
_price_cache: tuple[float, PriceCatalog] | None = None


def telemetry_caches_clear(**_: Any) -> None:
    """Forget cached prices and known partitions (a price was saved; tests start clean)."""
    global _price_cache
    with _price_cache_lock:
        _price_cache = None
    _known_partition_days.clear()


for _model in (PriceBook, ModelPrice, DevicePrice):
    post_save.connect(telemetry_caches_clear, sender=_model, dispatch_uid=f"telemetry-prices-{_model.__name__}")
    post_delete.connect(telemetry_caches_clear, sender=_model, dispatch_uid=f"telemetry-prices-{_model.__name__}")


def _price_catalog() -> PriceCatalog:
    global _price_cache
    now = time.monotonic()
    cached = _price_cache
    if cached is not None and now - cached[0] < PRICE_CACHE_SECONDS:
        return cached[1]
    catalog = PriceCatalog.load()
    with _price_cache_lock:
        _price_cache = (now, catalog)
    return catalog


@dataclass(frozen=True)
class AuthenticatedRuntime:
    token_id: int
    runtime_pk: int
    name: str


@dataclass(frozen=True)
class IngestResult:
    received: int
    accepted: int
    duplicates: int
    refused: list[Refusal]

    @property
    def all_refused(self) -> bool:
        return self.received > 0 and len(self.refused) == self.received

    def as_dict(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "duplicates": self.duplicates,
                "refused": [refusal.as_dict() for refusal in self.refused]}


def runtime_token_authenticate(*, token: str, now: dt.datetime | None = None) -> AuthenticatedRuntime | None:
    """The runtime a bearer token belongs to, or None for an unknown or revoked token."""
    if not token or len(token) > MAX_TOKEN_CHARS:
        return None
    rows = list(
        RuntimeToken.objects.filter(digest=token_digest(token), revoked_at__isnull=True)
        .values_list("id", "runtime_id", "runtime__name", "last_used_at")[:1]
    )
    if not rows:
        return None
    token_id, runtime_pk, name, last_used_at = rows[0]
    now = now or timezone.now()
    if last_used_at is None or now - last_used_at >= TOUCH_INTERVAL:
        RuntimeToken.objects.filter(id=token_id).update(last_used_at=now)
        Runtime.objects.filter(id=runtime_pk).update(last_seen_at=now)
    return AuthenticatedRuntime(token_id, runtime_pk, name)


def telemetry_ingest(*, runtime: AuthenticatedRuntime, body: bytes, now: dt.datetime | None = None
                     ) -> IngestResult:
    """Validate and store one batch sent by ``runtime``.

    Raises ``contracts.BatchMalformed`` / ``contracts.BatchTooLarge`` when the body as a whole is
    refused; otherwise every record is stored, counted as a duplicate, or refused with reasons.
    """
    parsed = batch_parse(body, max_records=settings.INGEST_MAX_RECORDS)
    now = now or timezone.now()
    refused = list(parsed.refused)
    for attempt in (1, 2):
        try:
            with transaction.atomic():
                accepted, duplicates = _store(parsed, runtime=runtime, now=now, refused=refused)
            break
        except DatabaseError as exc:
            if attempt == 2 or _sqlstate(exc) not in _RETRYABLE:
                raise
            logger.info("ingest: retrying a batch once (%s)", exc)
            _known_partition_days.clear()
            _sessions_with_staging.clear()
            refused = list(parsed.refused)
    refused.sort(key=lambda r: (r.kind != "event", r.index))
    result = IngestResult(parsed.received, accepted, duplicates, refused)
    if refused:
        first = refused[0]
        logger.warning("ingest: runtime %s: %d of %d records refused; first (%s %d): %s", runtime.name,
                       len(refused), result.received, first.kind, first.index, "; ".join(first.errors))
    return result


def _sqlstate(exc: BaseException) -> str | None:
    cause = exc.__cause__
    return getattr(cause, "sqlstate", None)


@dataclass
class _Stored:
    """What one list of records came to: stored, duplicates, and what it adds to the runtime's
    event counts (``RuntimeEventCount``)."""

    accepted: int = 0
    duplicates: int = 0
    recorded: int | None = None  # the highest events_recorded of the samples
    with_seq: int = 0  # events with a seq stored now (not duplicates)
    highest_seq: int | None = None  # the highest seq among the events, stored now or before


def _store(parsed: ParsedBatch, *, runtime: AuthenticatedRuntime, now: dt.datetime, refused: list[Refusal]
           ) -> tuple[int, int]:
    samples = _store_samples(parsed.samples, runtime=runtime, now=now, refused=refused)
    events = _store_events(parsed.events, runtime=runtime, now=now, refused=refused)
    # Last, so the row lock on the runtime's counts is held only until the commit that follows.
    _count_events(runtime.name, recorded=samples.recorded, stored=events.with_seq, highest=events.highest_seq)
    return samples.accepted + events.accepted, samples.duplicates + events.duplicates


def _count_events(runtime_id: str, *, recorded: int | None, stored: int, highest: int | None) -> None:
    """Add a batch to the runtime's event counts: one row per runtime, created on its first seq."""
    if recorded is None and highest is None:
        return
    RuntimeEventCount.objects.bulk_create([RuntimeEventCount(runtime_id=runtime_id)], ignore_conflicts=True)
    RuntimeEventCount.objects.filter(runtime_id=runtime_id).update(
        recorded=Greatest(F("recorded"), Value(recorded or 0)), stored=F("stored") + stored,
        highest_stored=Greatest(F("highest_stored"), Value(highest or 0)), updated_at=Now())


# -- samples ----------------------------------------------------------------------------------


def _store_samples(samples: list[tuple[int, RuntimeSampleRecord]], *, runtime: AuthenticatedRuntime, now: dt.datetime,
                   refused: list[Refusal]) -> _Stored:
    result = _Stored()
    if not samples:
        return result
    earliest = now - dt.timedelta(days=settings.SAMPLE_RETENTION_DAYS)
    latest = now + MAX_CLOCK_AHEAD
    rows: dict[tuple[str, dt.datetime], tuple] = {}
    device_rows: list[tuple] = []
    # Each GPU as the sample received last names it (the later record of a batch): a sample dated
    # ahead cannot pin a name, and the time kept is never later than the sample's arrival.
    devices: dict[tuple[str, str], tuple] = {}
    for index, sample in samples:
        problem = _sender_problem(sample.runtime_id, runtime) or _time_problem("at", sample.at, earliest, latest,
                                                                               settings.SAMPLE_RETENTION_DAYS)
        if problem:
            refused.append(Refusal("sample", index, None, [problem]))
            continue
        at = sample.at.astimezone(dt.UTC)
        key = (sample.runtime_id, at)
        if key in rows:
            result.duplicates += 1
            continue
        rows[key] = (sample.runtime_id, at, sample.queue_depth, sample.running, sample.tokens_per_s,
                     sample.kv_cache_used, sample.breakers, sample.events_recorded,
                     None if sample.tenants is None else [t.model_dump() for t in sample.tenants])
        if sample.events_recorded is not None:
            result.recorded = max(result.recorded or 0, sample.events_recorded)
        for d in sample.devices:
            device_rows.append((sample.runtime_id, at, d.device, d.name, d.gpu_util, d.mem_used, d.mem_total,
                                d.power_w, d.energy_joules_total, d.temperature_c, d.power_limit_w))
            if d.name and d.device != "cpu":
                devices[(sample.runtime_id, d.device)] = (sample.runtime_id, d.device, d.name, min(at, now))
    if not rows:
        return result
    result.accepted = _insert_ignoring_conflicts(RuntimeSample, SAMPLE_COLUMNS, list(rows.values()))
    result.duplicates += len(rows) - result.accepted
    _insert_ignoring_conflicts(DeviceSample, DEVICE_SAMPLE_COLUMNS, _unique(device_rows, key=slice(0, 3)))
    if devices:
        _upsert_devices(list(devices.values()))
    return result


def _unique(rows: list[tuple], *, key: slice) -> list[tuple]:
    seen: dict[tuple, tuple] = {}
    for row in rows:
        seen.setdefault(row[key], row)
    return list(seen.values())


def _upsert_devices(rows: list[tuple]) -> None:
    """Remember what each of the runtime's GPUs is called, so its events price at its type."""
    table = Device._meta.db_table
    sql = (f"INSERT INTO {table} ({', '.join(DEVICE_COLUMNS)}) VALUES ({', '.join(['%s'] * len(DEVICE_COLUMNS))}) "
           "ON CONFLICT (runtime_id, uuid) DO UPDATE SET name = excluded.name, last_seen_at = excluded.last_seen_at")
    with connection.cursor() as cursor:
        cursor.executemany(sql, _adapt(Device, DEVICE_COLUMNS, rows))


def _insert_ignoring_conflicts(model: type, columns: tuple[str, ...], rows: list[tuple]) -> int:
    """Insert rows, skipping those a unique constraint already holds; return how many went in."""
    if not rows:
        return 0
    sql = (f"INSERT INTO {model._meta.db_table} ({', '.join(columns)}) "
           f"VALUES ({', '.join(['%s'] * len(columns))}) ON CONFLICT DO NOTHING")
    with connection.cursor() as cursor:
        cursor.executemany(sql, _adapt(model, columns, rows))
        return cursor.rowcount


def _adapt(model: type, columns: tuple[str, ...], rows: list[tuple]) -> list[tuple]:
    """Values as the ORM would write them (on SQLite: UUIDs as hex, datetimes as UTC text; JSON
    columns as JSON on either database)."""
    fields = [model._meta.get_field(name) for name in columns]
    if connection.vendor == "postgresql":
        if not any(isinstance(f, models.JSONField) for f in fields):
            return rows
        return [tuple(f.get_db_prep_save(value, connection) if isinstance(f, models.JSONField) else value
                      for f, value in zip(fields, row, strict=True)) for row in rows]
    return [tuple(f.get_db_prep_save(value, connection) for f, value in zip(fields, row, strict=True))
            for row in rows]


# -- events -----------------------------------------------------------------------------------


def _sender_problem(runtime_id: str, runtime: AuthenticatedRuntime) -> str | None:
    if runtime_id == runtime.name:
        return None
    return f"runtime_id: '{runtime_id[:100]}' is not the runtime this token belongs to ('{runtime.name}')"


def _time_problem(name: str, moment: dt.datetime, earliest: dt.datetime, latest: dt.datetime, days: int
                  ) -> str | None:
    if moment < earliest:
        return f"{name}: older than the {days} days such records are kept"
    if moment > latest:
        return f"{name}: more than {MAX_CLOCK_AHEAD.days} day ahead of the control plane's clock; check the runtime's"
    return None


def _store_events(events: list[tuple[int, RequestEventRecord]], *, runtime: AuthenticatedRuntime, now: dt.datetime,
                  refused: list[Refusal]) -> _Stored:
    result = _Stored()
    if not events:
        return result
    days = settings.RAW_RETENTION_DAYS
    earliest = now - dt.timedelta(days=days)
    latest = now + MAX_CLOCK_AHEAD
    catalog = _price_catalog()
    books = catalog.books
    book_starts = [book.effective_from for book in books]
    name = runtime.name
    device_types = {device: kind for (_, device), kind in
                    device_types_for(devices={(name, e.device) for _, e in events}).items()}
    rows: dict[tuple, tuple] = {}
    for index, e in events:
        fields = e.__dict__  # the validated values; read once per field, as a tuple, in C
        started, finished = fields["started_at"], fields["finished_at"]
        if fields["runtime_id"] != name or started < earliest or finished > latest or finished < started:
            problem = (_sender_problem(e.runtime_id, runtime)
                       or _time_problem("started_at", started, earliest, latest, days)
                       or _time_problem("finished_at", finished, earliest, latest, days)
                       or "finished_at: is before started_at")
            refused.append(Refusal("event", index, str(e.event_id), [problem]))
            continue
        # Aware datetimes compare and hash by instant, whatever offset they were written with.
        key = (fields["event_id"], started)
        if key in rows:
            result.duplicates += 1
            continue
        position = bisect.bisect_right(book_starts, started)
        prices: Prices | None = books[position - 1] if position else None
        listed, saved = served_list_cost(prices, model=fields["model_served"], prompt_tokens=fields["prompt_tokens"],
                                         completion_tokens=fields["completion_tokens"], cache_hit=fields["cache_hit"])
        hardware = hardware_cost(prices, device_type=device_types.get(fields["device"]),
                                 gpu_seconds=fields["gpu_seconds"], energy_joules=fields["energy_joules"])
        if problem := _cost_problem(listed, saved, hardware):
            refused.append(Refusal("event", index, str(e.event_id), [problem]))
            continue
        rows[key] = (
            *_event_fields(fields), STATUS_CLASSES[fields["status"]], prices.book_id if prices else None, listed,
            hardware, saved, bucket_index(fields["e2e_ms"]), bucket_index(fields["ttft_ms"]),
        )
    if not rows:
        return result
    values = list(rows.values())
    if connection.vendor == "postgresql":
        _ensure_partitions({started.astimezone(dt.UTC).date() for _, started in rows})
        result.accepted, result.with_seq = _copy_events(values)
    else:
        with_seq = [row for row in values if row[_SEQ] is not None]
        result.with_seq = _insert_ignoring_conflicts(RequestEvent, EVENT_COLUMNS, with_seq)
        result.accepted = result.with_seq + _insert_ignoring_conflicts(
            RequestEvent, EVENT_COLUMNS, [row for row in values if row[_SEQ] is None])
    result.duplicates += len(values) - result.accepted
    # Every event of the batch is stored now, whether this batch or an earlier one stored it.
    result.highest_seq = max((row[_SEQ] for row in values if row[_SEQ] is not None), default=None)
    return result


def _cost_problem(*costs: Decimal | None) -> str | None:
    """Why an event's costs cannot be stored (a rollup sums them: contracts.py, "Bounds")."""
    largest = max((cost for cost in costs if cost is not None), default=None)
    if largest is None or largest < COST_LIMIT:
        return None
    return (f"cost: ${largest:,.2f} is more than one request can cost (under ${COST_LIMIT:,}); "
            "check the prices")


def _ensure_partitions(days: set[dt.date]) -> None:
    missing = days - _known_partition_days
    if not missing:
        return
    partitioning.ensure_partitions(missing)
    # Remember them only once they are committed: a rolled-back transaction takes them with it.
    transaction.on_commit(lambda: _known_partition_days.update(missing))


def _staging_sql() -> tuple[str, str, list[str]]:
    fields = [RequestEvent._meta.get_field(name) for name in EVENT_COLUMNS]
    types = [_PG_TYPES[f.get_internal_type()] for f in fields]
    columns = ", ".join(f'"{f.column}"' for f in fields)
    create = (f"CREATE TEMP TABLE IF NOT EXISTS {_STAGING} ("
              + ", ".join(f'"{f.column}" {t}' for f, t in zip(fields, types, strict=True))
              + ") ON COMMIT DELETE ROWS")
    return create, columns, types


_STAGING_CREATE, _EVENT_COLUMN_LIST, _EVENT_COPY_TYPES = _staging_sql()


def _copy_events(rows: list[tuple]) -> tuple[int, int]:
    """COPY into the session's staging table, then move what is new; return the rows inserted and
    how many of them carry a seq."""
    table = RequestEvent._meta.db_table
    with connection.cursor() as cursor:
        session = connection.connection
        if session not in _sessions_with_staging:
            cursor.execute(_STAGING_CREATE)
            transaction.on_commit(lambda: _sessions_with_staging.add(session))
        with cursor.cursor.copy(f"COPY {_STAGING} ({_EVENT_COLUMN_LIST}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(_EVENT_COPY_TYPES)
            for row in rows:
                copy.write_row(row)
        # One round trip; the DELETE matters only where no commit follows before the next batch
        # (nested in a caller's transaction, as in tests): a commit empties the table anyway.
        cursor.execute(
            f"WITH moved AS (INSERT INTO {table} ({_EVENT_COLUMN_LIST}) SELECT {_EVENT_COLUMN_LIST} FROM {_STAGING} "
            f"ON CONFLICT (event_id, started_at) DO NOTHING RETURNING seq) SELECT count(*), count(seq) FROM moved; "
            f"DELETE FROM {_STAGING}"
        )
        inserted, with_seq = cursor.fetchone()  # the first statement's result
        return inserted, with_seq
