"""Request events summed per minute, hour and day of ``started_at``, each event exactly once.

Zulip's analytics shape: a ``FillState`` row ("requests") records how far the rollups have got, as
a watermark over ``received_at``. One run, in one transaction: lock that row, sum in SQL every
event received after the watermark and before ``now - ROLLUP_SETTLE_SECONDS`` per minute of
``started_at`` (so a late event lands in its old bucket) and per (tenant, feature, model, status
class), fold the minutes into hours and days, add the sums to the ``Rollup`` rows and the events
to their tasks' ``ClientTask`` rows (``client_tasks``), and move the watermark. A crashed run rolls
back whole; a doubled run waits for the lock and then finds nothing new. Every writer of
``Rollup`` (this, re-pricing, retention) takes the same lock, which is what makes the
read-add-write of rows below safe.

One bad row never stops a run (``quarantine``): an event out of the contract's bounds is left out of
the sums, a rollup row the database will not store is left out of the writes, and both are logged
and counted (``RollupQuarantine``, in the admin) while the run counts the rest and moves on.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import DataError, IntegrityError, connection, transaction
from django.db.models import Count, Min, QuerySet, Sum, Value
from django.db.models.functions import Coalesce, TruncMinute
from django.utils import timezone

from finops.telemetry.client_tasks import client_tasks_add
from finops.telemetry.models import (
    DeviceUseRollup,
    FillState,
    Granularity,
    Marginal,
    MarginalRollup,
    RequestEvent,
    Rollup,
    RollupSums,
)
from finops.telemetry.quarantine import Quarantine
from finops.telemetry.rollup_sql import rollups_upsert
from finops.telemetry.sums import STORED_FIELDS, Sums, event_aggregates

logger = logging.getLogger("finops.telemetry")

FILL_STATE = "requests"
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
GROUP_FIELDS = ("tenant", "feature", "served", "status_class")
UNIQUE_FIELDS = ["granularity", "bucket", "tenant", "feature", "model", "status_class"]
MARGINAL_UNIQUE_FIELDS = ["granularity", "bucket", "dimension", "value", "status_class"]
# (granularity, bucket, tenant, feature, model, status_class): one Rollup row.
RollupKey = tuple[str, dt.datetime, str, str, str, str]
# (granularity, bucket, dimension, value, status_class): one MarginalRollup row.
MarginalKey = tuple[str, dt.datetime, str, str, str]


@dataclass(frozen=True)
class RollupResult:
    events: int  # events counted by this run
    rows: int  # Rollup rows created or changed
    watermark_from: dt.datetime
    watermark_to: dt.datetime
    seconds: float
    left_out: int = 0  # events and rollup rows left out (RollupQuarantine)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able values, for a Celery result or a log line."""
        return {"events": self.events, "rows": self.rows, "left_out": self.left_out, "seconds": round(self.seconds, 3),
                "watermark_from": self.watermark_from.isoformat(), "watermark_to": self.watermark_to.isoformat()}


def rollup_run(*, now: dt.datetime | None = None) -> RollupResult:
    """Count every settled event received since the last run into the minute, hour and day rollups."""
    began = time.perf_counter()
    with transaction.atomic():
        state = fill_state_lock() or fill_state_start()
        now = now or database_now()
        since, until = state.watermark, now - dt.timedelta(seconds=settings.ROLLUP_SETTLE_SECONDS)
        if until <= since:  # a run with an earlier clock than the last one: never move back
            return RollupResult(0, 0, since, since, time.perf_counter() - began)
        quarantine = Quarantine(FILL_STATE)
        window = quarantine.screen(RequestEvent.objects.filter(received_at__gt=since, received_at__lte=until))
        counted, rows = window_count(window, quarantine=quarantine)
        rows += device_use_add(device_use_minutes(window), quarantine=quarantine)
        client_tasks_add(window)
        quarantine.save()
        state.watermark = until
        state.save(update_fields=["watermark", "updated_at"])
    return RollupResult(counted, rows, since, until, time.perf_counter() - began, quarantine.count)


def window_count(window: QuerySet[RequestEvent], *, quarantine: Quarantine) -> tuple[int, int]:
    """Count ``window``'s events into the rollups: (events counted, rows written). On PostgreSQL in
    SQL (``rollup_sql``); where that fails on a total a column cannot hold, and on other databases,
    row by row in Python, which leaves such a row out and counts it in ``quarantine``."""
    if connection.vendor == "postgresql":
        try:
            with transaction.atomic():  # a savepoint: a refused statement leaves the run's transaction usable
                return rollups_upsert(window)
        except (DataError, IntegrityError) as exc:
            logger.warning("rollups: counting in SQL failed (%s); counting row by row", str(exc).splitlines()[0])
    minutes = minute_sums(window)
    return sum(s.requests for s in minutes.values()), rollup_add(fold(minutes), quarantine=quarantine)


def database_now() -> dt.datetime:
    """The database's clock: it stamps received_at (db_default=Now()), so a worker whose clock runs
    ahead of it must not move the watermark past events the database has yet to stamp."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT STATEMENT_TIMESTAMP()")
            return cursor.fetchone()[0]
    return timezone.now()  # SQLite is a file on this machine: its clock is ours


def fill_state_lock() -> FillState | None:
    """The "requests" FillState row, locked until the transaction ends; None before the first run.

    On PostgreSQL this is the row lock every writer of rollups queues on; on SQLite the IMMEDIATE
    transaction (settings) already holds the database's one write lock.
    """
    return FillState.objects.select_for_update().filter(name=FILL_STATE).first()


def fill_state_start() -> FillState:
    """Start the watermark just before the earliest event received (the epoch when there is none),
    and lock it."""
    first = RequestEvent.objects.aggregate(first=Min("received_at"))["first"]
    start = first - dt.timedelta(microseconds=1) if first else EPOCH
    # Two first runs may race here: get_or_create lets the loser read the winner's committed row,
    # and the lock below then waits for the winner's whole run.
    FillState.objects.get_or_create(name=FILL_STATE, defaults={"watermark": start})
    state = fill_state_lock()
    assert state is not None  # created above, and a FillState is never deleted (read-only in the admin)
    return state


def minute_sums(events: QuerySet[RequestEvent]) -> dict[RollupKey, Sums]:
    """Sum these events per minute of started_at and group, in three grouped queries."""
    grouped = events.order_by().annotate(
        minute=TruncMinute("started_at", tzinfo=dt.UTC), served=Coalesce("model_served", Value(""))
    )
    sums: dict[RollupKey, Sums] = {}
    for row in grouped.values("minute", *GROUP_FIELDS).annotate(**event_aggregates("sum_", stored_only=True)):
        sums[_key(row)] = group = Sums()
        group.add_row(row, "sum_")
    for column, histogram in (("e2e_bucket", "e2e_hist"), ("ttft_bucket", "ttft_hist")):
        counts = (grouped.filter(**{f"{column}__isnull": False}).values("minute", *GROUP_FIELDS, column)
                  .annotate(n=Count("id")).values_list("minute", *GROUP_FIELDS, column, "n"))
        for row in counts:
            # Same range, same lock: a group here is in the sums above (unless an ingest commits
            # later than ROLLUP_SETTLE_SECONDS, the one thing the watermark cannot see).
            if (group := sums.get(_key(row[:5]))) is not None:
                getattr(group, histogram)[row[5]] = row[6]
    return sums


def fold(minutes: Mapping[RollupKey, Sums]) -> dict[RollupKey, Sums]:
    """The minute sums plus the hour and day sums they add up to (UTC buckets)."""
    folded: dict[RollupKey, Sums] = {}
    for key, sums in minutes.items():
        _, minute, *group = key
        for granularity, bucket in ((Granularity.MINUTE, minute), (Granularity.HOUR, minute.replace(minute=0)),
                                    (Granularity.DAY, minute.replace(hour=0, minute=0))):
            folded.setdefault((granularity.value, bucket, *group), Sums()).add(sums)
    return folded


def rollup_add(sums: Mapping[RollupKey, Sums], *, create: bool = True, quarantine: Quarantine | None = None) -> int:
    """Add ``sums`` to their Rollup rows and to the MarginalRollup rows they add up to (inserting
    missing rows when ``create``); rows written. With a ``quarantine``, a row the database will not
    store is left out and counted there; without one (re-pricing), it fails the caller.

    The caller holds the FillState lock, so reading a row, adding in Python (exact Decimals,
    histogram merge) and upserting the total back cannot lose a concurrent writer's addition.
    """
    written = _add(Rollup, UNIQUE_FIELDS, sums, create=create, quarantine=quarantine)
    return written + _add(MarginalRollup, MARGINAL_UNIQUE_FIELDS, marginals(sums), create=create,
                          quarantine=quarantine)


def marginals(sums: Mapping[RollupKey, Sums]) -> dict[MarginalKey, Sums]:
    """``sums`` added up per bucket and status class, keeping one dimension or none."""
    added: dict[MarginalKey, Sums] = {}
    for (granularity, bucket, tenant, feature, model, status_class), group in sums.items():
        for dimension, value in ((Marginal.TOTAL, ""), (Marginal.TENANT, tenant), (Marginal.FEATURE, feature),
                                 (Marginal.MODEL, model)):
            added.setdefault((granularity, bucket, dimension.value, value, status_class), Sums()).add(group)
    return added


# (granularity, bucket, runtime_id, device): one DeviceUseRollup row; its (requests, gpu_seconds).
DeviceUseKey = tuple[str, dt.datetime, str, str]
DEVICE_USE_FIELDS = ["granularity", "bucket", "runtime_id", "device"]


def device_use_minutes(events: QuerySet[RequestEvent]) -> dict[DeviceUseKey, tuple[int, float]]:
    """Requests and their attributed device seconds per minute of started_at, runtime and device."""
    rows = (events.filter(gpu_seconds__isnull=False, device__isnull=False).order_by()
            .annotate(minute=TruncMinute("started_at", tzinfo=dt.UTC)).values("minute", "runtime_id", "device")
            .annotate(n=Count("id"), seconds=Sum("gpu_seconds")))
    return {(Granularity.MINUTE.value, row["minute"], row["runtime_id"], row["device"]): (row["n"], row["seconds"])
            for row in rows}


def device_use_add(minutes: Mapping[DeviceUseKey, tuple[int, float]], *, quarantine: Quarantine | None = None
                   ) -> int:
    """Add per-minute device use, and the hours and days it folds into, to the DeviceUseRollup rows
    (under the FillState lock, as ``rollup_add``); rows written."""
    folded: dict[DeviceUseKey, tuple[int, float]] = {}
    for (_, minute, runtime_id, device), (requests, seconds) in minutes.items():
        for granularity, bucket in ((Granularity.MINUTE, minute), (Granularity.HOUR, minute.replace(minute=0)),
                                    (Granularity.DAY, minute.replace(hour=0, minute=0))):
            key = (granularity.value, bucket, runtime_id, device)
            before = folded.get(key, (0, 0.0))
            folded[key] = (before[0] + requests, before[1] + seconds)
    written = 0
    for chunk in _batched(sorted(folded), 300):
        existing = {(r.granularity, r.bucket, r.runtime_id, r.device): r for granularity, group in
                    itertools.groupby(chunk, key=lambda k: k[0])
                    for r in DeviceUseRollup.objects.filter(granularity=granularity,
                                                            bucket__in={k[1] for k in group})}
        rows = []
        for key in chunk:
            requests, seconds = folded[key]
            if (row := existing.get(key)) is not None:
                requests, seconds = requests + row.requests, seconds + row.gpu_seconds
            rows.append(DeviceUseRollup(**dict(zip(DEVICE_USE_FIELDS, key, strict=True)), requests=requests,
                                        gpu_seconds=seconds))
        written += _write(DeviceUseRollup, rows, DEVICE_USE_FIELDS, ["requests", "gpu_seconds"], quarantine)
    return written


def _add(model: type[RollupSums], unique_fields: list[str], sums: Mapping[tuple[Any, ...], Sums], *,
         create: bool, quarantine: Quarantine | None) -> int:
    written = 0
    keys = sorted(sums)  # by granularity, then bucket: a chunk reads few buckets
    for chunk in _batched(keys, 300):
        existing = {tuple(getattr(row, name) for name in unique_fields): row for row in _rows_for(model, chunk)}
        rows = []
        for key in chunk:
            row = existing.get(key)
            if row is None:
                if not create:
                    continue
                row = model(**dict(zip(unique_fields, key, strict=True)))
            rows.append(model(**dict(zip(unique_fields, key, strict=True)), **sums[key].added_to(row)))
        if rows:
            written += _write(model, rows, unique_fields, STORED_FIELDS, quarantine)
    return written


def _write(model: type[Any], rows: list[Any], unique_fields: list[str], update_fields: list[str],
           quarantine: Quarantine | None) -> int:
    if quarantine is not None:
        return quarantine.write(model, rows, unique_fields=unique_fields, update_fields=update_fields)
    model.objects.bulk_create(rows, update_conflicts=True, unique_fields=unique_fields, update_fields=update_fields,
                              batch_size=500)
    return len(rows)


def _key(row: Mapping[str, Any] | tuple[Any, ...]) -> RollupKey:
    if isinstance(row, Mapping):
        row = (row["minute"], row["tenant"], row["feature"], row["served"], row["status_class"])
    minute, tenant, feature, served, status_class = row
    return (Granularity.MINUTE.value, minute, tenant, feature, served, status_class)


def _rows_for(model: type[RollupSums], keys: list[tuple[Any, ...]]) -> Iterator[RollupSums]:
    """The stored rows of these keys (and a few neighbours: the filter is per column)."""
    for granularity, group in itertools.groupby(keys, key=lambda k: k[0]):
        chunk = list(group)
        # The third key column (a Rollup's tenant, a MarginalRollup's dimension) narrows the read.
        third = "tenant" if model is Rollup else "dimension"
        yield from model.objects.filter(granularity=granularity, bucket__in={k[1] for k in chunk},
                                        **{f"{third}__in": {k[2] for k in chunk}})


def _batched(items: Iterable[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk
