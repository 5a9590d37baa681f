"""What is kept, and for how long: raw events (by the day), samples, and minute rollups.

Raw events go a whole day at a time (one ``DROP TABLE`` per day partition on PostgreSQL), and
only once the rollups have counted them: a day is dropped when it lies wholly before both
``now - RAW_RETENTION_DAYS`` and every event the rollups have not yet counted. Samples likewise go
after ``SAMPLE_RETENTION_DAYS`` once the sample rollups have counted them. Hour and day rollups are
kept for good; minute rollups (of events and of samples) and samples expire, and so do task rows
(``ClientTask``: one per request or named task) whose first attempt is older than
``TASK_RETENTION_DAYS`` (never shorter than the raw events' retention, so that no attempt ingest still
accepts can find its task gone).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Min
from django.utils import timezone

from finops.telemetry.models import (
    ClientTask,
    DeviceRollup,
    DeviceSample,
    DeviceUseRollup,
    Granularity,
    MarginalRollup,
    RequestEvent,
    Rollup,
    RuntimeRollup,
    RuntimeSample,
)
from finops.telemetry.partitioning import drop_days_before
from finops.telemetry.rollups import fill_state_lock
from finops.telemetry.sample_rollups import sample_fill_state_lock

# A partition drop waits for every query reading raw events, and everything else waits behind it:
# give up after a few seconds and try again at the next run instead of stalling ingest.
DROP_LOCK_TIMEOUT = "5s"


@dataclass(frozen=True)
class RetentionResult:
    raw_kept_from: dt.date | None  # raw events of days before this are gone; None: nothing dropped yet
    raw_days_dropped: int
    runtime_samples_deleted: int
    device_samples_deleted: int
    minute_rollups_deleted: int  # Rollup, MarginalRollup and DeviceUseRollup minute rows
    minute_sample_rollups_deleted: int = 0  # RuntimeRollup and DeviceRollup minute rows
    tasks_deleted: int = 0  # ClientTask rows past TASK_RETENTION_DAYS

    def as_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["raw_kept_from"] = self.raw_kept_from.isoformat() if self.raw_kept_from else None
        return values


def raw_retention_start(now: dt.datetime) -> dt.datetime:
    """The start (UTC midnight) of the oldest day whose raw events retention still keeps whole."""
    day = (now - dt.timedelta(days=settings.RAW_RETENTION_DAYS)).astimezone(dt.UTC).date()
    return dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)


def retention_run(*, now: dt.datetime | None = None) -> RetentionResult:
    """Drop expired raw-event days, samples and minute rollups."""
    now = now or timezone.now()
    with transaction.atomic():
        # The rollups' lock: no run is counting the events we drop or writing the rows we delete.
        state = fill_state_lock()
        minute_cutoff = now - dt.timedelta(days=settings.MINUTE_ROLLUP_RETENTION_DAYS)
        minutes = 0
        for model in (Rollup, MarginalRollup, DeviceUseRollup):
            deleted, _ = model.objects.filter(granularity=Granularity.MINUTE, bucket__lt=minute_cutoff).delete()
            minutes += deleted
        tasks, _ = ClientTask.objects.filter(
            first_started_at__lt=now - dt.timedelta(days=settings.TASK_RETENTION_DAYS)).delete()
        keep_from, dropped = None, 0
        if state is not None:  # before the first rollup nothing has been counted, so nothing goes
            keep = min(raw_retention_start(now), state.watermark)
            uncounted = RequestEvent.objects.filter(received_at__gt=state.watermark).aggregate(
                first=Min("started_at"))["first"]
            if uncounted is not None:
                keep = min(keep, uncounted)
            keep_from = keep.astimezone(dt.UTC).date()
            if connection.vendor == "postgresql":
                with connection.cursor() as cursor:
                    cursor.execute(f"SET LOCAL lock_timeout = '{DROP_LOCK_TIMEOUT}'")
            dropped = drop_days_before(keep_from)
    with transaction.atomic():
        # The sample rollups' lock, in a transaction of its own (so never held with the one above):
        # no run is counting the samples we delete or writing the rows we delete.
        samples_state = sample_fill_state_lock()
        sample_minutes = 0
        for model in (RuntimeRollup, DeviceRollup):
            deleted, _ = model.objects.filter(granularity=Granularity.MINUTE, bucket__lt=minute_cutoff).delete()
            sample_minutes += deleted
        runtime_samples = device_samples = 0
        if samples_state is not None:  # a sample the rollups have not counted yet is history still to keep
            sample_cutoff = now - dt.timedelta(days=settings.SAMPLE_RETENTION_DAYS)
            expired = {"at__lt": sample_cutoff, "received_at__lte": samples_state.watermark}
            runtime_samples, _ = RuntimeSample.objects.filter(**expired).delete()
            device_samples, _ = DeviceSample.objects.filter(**expired).delete()
    return RetentionResult(keep_from, dropped, runtime_samples, device_samples, minutes, sample_minutes, tasks)
