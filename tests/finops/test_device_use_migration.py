"""Migration 0004 fills device use and the new device maxima from the raw rows still kept, up to
each watermark: what later rollup runs will not count again."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from finops.telemetry.models import DeviceRollup, DeviceUseRollup
from finops.telemetry.partitioning import ensure_partitions

BEFORE = [("telemetry", "0003_marginal_rollups")]
T0 = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=3)
SECOND = dt.timedelta(seconds=1)


def migrated_apps() -> MigrationExecutor:
    executor = MigrationExecutor(connection)
    executor.migrate(BEFORE)
    return executor


@pytest.mark.django_db(transaction=True)
def test_device_use_and_maxima_are_filled_from_the_counted_raw_rows() -> None:
    executor = migrated_apps()
    apps = executor.loader.project_state(BEFORE).apps
    event = apps.get_model("telemetry", "RequestEvent")
    fill_state = apps.get_model("telemetry", "FillState")
    device_sample = apps.get_model("telemetry", "DeviceSample")
    device_rollup = apps.get_model("telemetry", "DeviceRollup")
    ensure_partitions({T0.date()})

    def request(at: dt.datetime, gpu_seconds: float | None, device: str | None, received: dt.datetime) -> None:
        event.objects.create(
            event_id=uuid.uuid4(), runtime_id="rt-1", started_at=at, finished_at=at + SECOND, received_at=received,
            tenant="acme", feature="chat", api_key_id="k", model_requested="m", model_served="m",
            route_reason="requested", priority="normal", status="ok", status_class="ok", http_status=200,
            prompt_tokens=1, completion_tokens=1, e2e_ms=1000.0, gpu_seconds=gpu_seconds, device=device)

    request(T0, 2.0, "GPU-1", T0 + SECOND)
    request(T0 + 10 * SECOND, 3.0, "GPU-1", T0 + 11 * SECOND)
    request(T0 + 20 * SECOND, None, "GPU-1", T0 + 21 * SECOND)  # no device time measured
    request(T0 + 30 * SECOND, 5.0, "GPU-1", T0 + 3 * 3600 * SECOND)  # after the watermark: the next run's
    fill_state.objects.create(name="requests", watermark=T0 + 60 * SECOND)
    fill_state.objects.create(name="samples", watermark=T0 + 60 * SECOND)
    for i, temperature in enumerate((61.0, 67.0)):
        device_sample.objects.create(runtime_id="rt-1", at=T0 + i * 5 * SECOND, received_at=T0 + 6 * SECOND,
                                     device="GPU-1", mem_total=80, temperature_c=temperature)
    device_sample.objects.create(runtime_id="rt-1", at=T0 + 20 * SECOND, received_at=T0 + 3600 * SECOND,
                                 device="GPU-1", mem_total=96, temperature_c=99.0)  # not counted yet
    for granularity, bucket in (("minute", T0), ("hour", T0), ("day", T0.replace(hour=0))):
        device_rollup.objects.create(granularity=granularity, bucket=bucket, runtime_id="rt-1", device="GPU-1",
                                     samples=2)

    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(executor.loader.graph.leaf_nodes())

    use = {row.granularity: (row.requests, row.gpu_seconds) for row in DeviceUseRollup.objects.all()}
    assert use == {"minute": (2, 5.0), "hour": (2, 5.0), "day": (2, 5.0)}
    maxima = {row.granularity: (row.mem_total_max, row.temperature_c_max) for row in DeviceRollup.objects.all()}
    assert maxima == {"minute": (80, 67.0), "hour": (80, 67.0), "day": (80, 67.0)}
