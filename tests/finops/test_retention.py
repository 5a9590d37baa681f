"""Retention drops whole raw-event days only after the rollups have counted them, and expires
samples and minute rollups; hour and day rollups stay."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from django.db import connection
from django.test import override_settings

from finops.telemetry.models import (
    DeviceSample,
    DeviceUseRollup,
    Granularity,
    MarginalRollup,
    RequestEvent,
    Rollup,
    RuntimeSample,
)
from finops.telemetry.partitioning import existing_partition_days
from finops.telemetry.retention import retention_run
from finops.telemetry.rollups import rollup_run
from finops.telemetry.sample_rollups import sample_rollup_run
from tests.finops.test_rollups import assert_rollups_match_raw, event, store

NOW = dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("retention_settings")]


@pytest.fixture
def retention_settings() -> Iterator[None]:
    with override_settings(RAW_RETENTION_DAYS=30, SAMPLE_RETENTION_DAYS=7, MINUTE_ROLLUP_RETENTION_DAYS=7,
                           ROLLUP_SETTLE_SECONDS=5):
        yield


def started_days() -> set[dt.date]:
    return {d.date() for d in RequestEvent.objects.datetimes("started_at", "day", tzinfo=dt.UTC)}


def days_ago(n: int, **extra: float) -> dt.datetime:
    return NOW - n * DAY + dt.timedelta(**extra)


def test_expired_raw_days_are_dropped_once_counted_and_their_rollups_stay() -> None:
    store(*(event(started_at=days_ago(n, hours=-1), received_at=days_ago(n, hours=-1, seconds=2))
            for n in (40, 31, 30, 29, 0)))
    rollup_run(now=NOW)

    result = retention_run(now=NOW)

    assert result.raw_kept_from == days_ago(30).date()
    assert started_days() == {days_ago(n).date() for n in (30, 29, 0)}
    if connection.vendor == "postgresql":  # the days went as whole partitions
        assert result.raw_days_dropped >= 2
        partitions = set(existing_partition_days())
        assert not partitions & {days_ago(40).date(), days_ago(31).date()}
        assert {days_ago(n).date() for n in (30, 29, 0)} <= partitions
    assert Rollup.objects.filter(granularity=Granularity.DAY).count() == 5
    assert sum(Rollup.objects.filter(granularity=Granularity.HOUR).values_list("requests", flat=True)) == 5


def test_nothing_is_dropped_before_the_rollups_have_ever_run() -> None:
    store(event(started_at=days_ago(40), received_at=days_ago(40)))
    result = retention_run(now=NOW)
    assert (result.raw_kept_from, result.raw_days_dropped) == (None, 0)
    assert RequestEvent.objects.count() == 1


def test_raw_days_wait_for_a_stalled_rollup() -> None:
    store(event(started_at=days_ago(40), received_at=days_ago(40, seconds=1)))
    rollup_run(now=days_ago(38))  # counts the event; then the rollups stall for 38 days
    store(event(started_at=days_ago(36), received_at=days_ago(36, seconds=1)))

    retention_run(now=NOW)

    assert started_days() == {days_ago(36).date()}  # uncounted: kept until counted
    rollup_run(now=NOW)
    retention_run(now=NOW)
    assert not RequestEvent.objects.exists()
    assert Rollup.objects.filter(granularity=Granularity.DAY).count() == 2


def test_a_late_event_not_yet_counted_keeps_its_old_day() -> None:
    store(event(started_at=days_ago(31), received_at=days_ago(31, seconds=1)))
    rollup_run(now=NOW - dt.timedelta(minutes=1))
    late = event(started_at=days_ago(35), received_at=NOW - dt.timedelta(seconds=30))
    store(late)

    retention_run(now=NOW)
    assert started_days() == {days_ago(35).date(), days_ago(31).date()}  # nothing from day -35 on goes

    rollup_run(now=NOW)
    # The late event was counted before its day could go (minute rows this old have expired).
    assert_rollups_match_raw(granularities=(Granularity.HOUR, Granularity.DAY))
    retention_run(now=NOW)
    assert not RequestEvent.objects.exists()


def test_a_second_run_drops_nothing_more() -> None:
    store(event(started_at=days_ago(40)), event(started_at=days_ago(1)))
    rollup_run(now=NOW)
    retention_run(now=NOW)
    again = retention_run(now=NOW)
    assert (again.raw_days_dropped, again.minute_rollups_deleted) == (0, 0)
    assert started_days() == {days_ago(1).date()}


def test_samples_and_minute_rollups_expire_while_hours_and_days_stay() -> None:
    for n in (8, 6):
        RuntimeSample.objects.create(runtime_id="rt-1", at=days_ago(n), received_at=days_ago(n), queue_depth=1,
                                     running=1, tokens_per_s=5.0)
        DeviceSample.objects.create(runtime_id="rt-1", at=days_ago(n), received_at=days_ago(n), device="GPU-1",
                                    gpu_util=0.5)
    store(event(started_at=days_ago(8)), event(started_at=days_ago(6)))
    rollup_run(now=NOW)
    sample_rollup_run(now=NOW)  # samples go only once counted

    result = retention_run(now=NOW)

    # One minute row in Rollup, its four marginal rows (total, tenant, feature, model) and the
    # request's device use.
    assert (result.runtime_samples_deleted, result.device_samples_deleted, result.minute_rollups_deleted) == (1, 1, 6)
    assert list(RuntimeSample.objects.values_list("at", flat=True)) == [days_ago(6)]
    assert list(DeviceSample.objects.values_list("at", flat=True)) == [days_ago(6)]
    for table in (Rollup, MarginalRollup, DeviceUseRollup):
        assert set(table.objects.filter(granularity=Granularity.MINUTE).values_list("bucket", flat=True)) == {
            days_ago(6)}
    assert Rollup.objects.filter(granularity=Granularity.HOUR).count() == 2
    assert Rollup.objects.filter(granularity=Granularity.DAY).count() == 2


def test_task_rows_expire_after_their_own_retention_while_recent_tasks_stay() -> None:
    from finops.telemetry.models import ClientTask

    store(event(started_at=days_ago(95), received_at=days_ago(95), task_id="old"),
          event(started_at=days_ago(40), received_at=days_ago(40), task_id="kept"))
    rollup_run(now=days_ago(1))
    assert set(ClientTask.objects.values_list("task_id", flat=True)) == {"old", "kept"}
    with override_settings(TASK_RETENTION_DAYS=90):
        result = retention_run(now=NOW)
    assert result.tasks_deleted == 1
    assert list(ClientTask.objects.values_list("task_id", flat=True)) == ["kept"]
