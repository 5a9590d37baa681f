"""Sample rollups count every runtime and device sample exactly once, at every granularity, and
keep GPU history after the raw samples expire.

``raw_runtime_totals`` / ``raw_device_totals`` compute what the rollup rows must hold straight from
the raw samples (energy: the steps of each device's counter, ordered by ``at``, resets skipped).
"""

from __future__ import annotations

import datetime as dt
import itertools
import random
from collections import defaultdict
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.test import override_settings

from finops.telemetry.capacity import runtime_history
from finops.telemetry.models import DeviceRollup, DeviceSample, FillState, Granularity, RuntimeRollup, RuntimeSample
from finops.telemetry.retention import retention_run
from finops.telemetry.sample_rollups import FILL_STATE, sample_rollup_run
from finops.telemetry.tasks import sample_rollup
from tests.finops.test_rollups import bucket_of

T0 = dt.datetime(2026, 11, 20, 23, 50, tzinfo=dt.UTC)  # ranges cross an hour and a day
SECOND = dt.timedelta(seconds=1)
GPU_A, GPU_B = "GPU-aaaa", "GPU-bbbb"
RUNTIME_FIELDS = ("samples", "queue_depth_sum", "queue_depth_max", "running_sum", "running_max", "tokens_per_s_sum")
DEVICE_FIELDS = ("samples", "gpu_util_sum", "gpu_util_count", "mem_used_sum", "mem_used_count", "mem_used_max",
                 "power_w_sum", "power_w_count", "energy_joules", "energy_count", "mem_total_max", "temperature_c_max")
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("sample_settings")]


@pytest.fixture
def sample_settings() -> Any:
    with override_settings(ROLLUP_SETTLE_SECONDS=5, SAMPLE_RETENTION_DAYS=7, MINUTE_ROLLUP_RETENTION_DAYS=7,
                           RAW_RETENTION_DAYS=30):
        yield


def runtime_sample(at: dt.datetime, *, runtime_id: str = "rt-1", received_at: dt.datetime | None = None,
                   **fields: Any) -> RuntimeSample:
    values = {"queue_depth": 2, "running": 4, "tokens_per_s": 100.0, **fields}
    return RuntimeSample(runtime_id=runtime_id, at=at, received_at=received_at or at + 2 * SECOND, **values)


def device_sample(at: dt.datetime, *, device: str = GPU_A, runtime_id: str = "rt-1",
                  received_at: dt.datetime | None = None, **fields: Any) -> DeviceSample:
    values = {"name": "NVIDIA H100", "gpu_util": 50.0, "mem_used": 10 * 2**30, "mem_total": 80 * 2**30,
              "power_w": 300.0, "energy_joules_total": 1000.0, **fields}
    return DeviceSample(runtime_id=runtime_id, at=at, device=device, received_at=received_at or at + 2 * SECOND,
                        **values)


def traffic(seed: int, *, count: int = 300) -> None:
    """Samples of two runtimes (rt-1 with two GPUs, rt-2 a CPU runtime) every ~5 s for ~25 minutes,
    some readings missing, one GPU's energy counter reset midway."""
    rng = random.Random(seed)
    runtime_rows, device_rows = [], []
    energy = {GPU_A: 5e5, GPU_B: 7e5}
    for i in range(count):
        at = T0 + dt.timedelta(seconds=5 * i, milliseconds=rng.randrange(1000))
        for runtime_id in ("rt-1", "rt-2"):
            runtime_rows.append(runtime_sample(at, runtime_id=runtime_id, queue_depth=rng.randrange(20),
                                               running=rng.randrange(16), tokens_per_s=rng.uniform(0, 400)))
        for device in (GPU_A, GPU_B):
            energy[device] = 100.0 if device == GPU_B and i == count // 2 else energy[device] + rng.uniform(0, 3000)
            device_rows.append(device_sample(
                at, device=device,
                gpu_util=rng.choice([None, rng.uniform(0, 100)]),
                mem_used=rng.choice([None, rng.randrange(80 * 2**30)]),
                power_w=rng.choice([None, rng.uniform(50, 700)]),
                temperature_c=rng.choice([None, rng.uniform(30, 90)]),
                energy_joules_total=None if rng.random() < 0.1 else energy[device],
            ))
    RuntimeSample.objects.bulk_create(runtime_rows)
    DeviceSample.objects.bulk_create(device_rows)


def raw_runtime_totals(granularity: str) -> dict[tuple, dict[str, Any]]:
    totals: dict[tuple, dict[str, Any]] = defaultdict(lambda: dict.fromkeys(RUNTIME_FIELDS, 0))
    for s in RuntimeSample.objects.all():
        row = totals[(bucket_of(s.at, granularity), s.runtime_id)]
        row["samples"] += 1
        row["queue_depth_sum"] += s.queue_depth
        row["queue_depth_max"] = max(row["queue_depth_max"], s.queue_depth)
        row["running_sum"] += s.running
        row["running_max"] = max(row["running_max"], s.running)
        row["tokens_per_s_sum"] += s.tokens_per_s
    return dict(totals)


def raw_device_totals(granularity: str) -> dict[tuple, dict[str, Any]]:
    maxima = ("mem_used_max", "mem_total_max", "temperature_c_max")
    totals: dict[tuple, dict[str, Any]] = defaultdict(lambda: dict.fromkeys(DEVICE_FIELDS, 0) | dict.fromkeys(maxima))
    samples = list(DeviceSample.objects.order_by("runtime_id", "device", "at"))
    for s in samples:
        row = totals[(bucket_of(s.at, granularity), s.runtime_id, s.device)]
        row["samples"] += 1
        for name in ("gpu_util", "mem_used", "power_w"):
            if (value := getattr(s, name)) is not None:
                row[f"{name}_sum"] += value
                row[f"{name}_count"] += 1
        for name, value in (("mem_used_max", s.mem_used), ("mem_total_max", s.mem_total),
                            ("temperature_c_max", s.temperature_c)):
            if value is not None:
                row[name] = value if row[name] is None else max(row[name], value)
    for _, readings in itertools.groupby(samples, key=lambda s: (s.runtime_id, s.device)):
        measured = [s for s in readings if s.energy_joules_total is not None]
        for a, b in itertools.pairwise(measured):
            if b.energy_joules_total >= a.energy_joules_total:
                row = totals[(bucket_of(b.at, granularity), b.runtime_id, b.device)]
                row["energy_joules"] += b.energy_joules_total - a.energy_joules_total
                row["energy_count"] += 1
    return dict(totals)


def rollup_rows(model: type, granularity: str, names: tuple[str, ...]) -> dict[tuple, dict[str, Any]]:
    key_fields = ("bucket", "runtime_id", "device") if model is DeviceRollup else ("bucket", "runtime_id")
    return {tuple(getattr(r, f) for f in key_fields): {n: getattr(r, n) for n in names}
            for r in model.objects.filter(granularity=granularity)}


def assert_rollups_match_raw() -> None:
    for granularity in Granularity.values:
        for model, expected in ((RuntimeRollup, raw_runtime_totals(granularity)),
                                (DeviceRollup, raw_device_totals(granularity))):
            names = RUNTIME_FIELDS if model is RuntimeRollup else DEVICE_FIELDS
            actual = rollup_rows(model, granularity, names)
            assert set(actual) == set(expected), (model.__name__, granularity)
            for key, row in expected.items():
                where = (model.__name__, granularity, key)
                unknown = {name for name, value in row.items() if value is None}  # never measured: None, not 0
                assert {name for name, value in actual[key].items() if value is None} == unknown, where
                assert ({name: value for name, value in actual[key].items() if name not in unknown}
                        == pytest.approx({name: value for name, value in row.items() if name not in unknown},
                                         rel=1e-9, abs=1e-6)), where


def snapshot() -> list[tuple]:
    return [tuple(row.values()) for model in (RuntimeRollup, DeviceRollup)
            for row in model.objects.order_by("granularity", "bucket", "runtime_id").values()]


@pytest.mark.parametrize("seed", [1, 2])
def test_rollups_equal_direct_aggregates_over_raw_samples_at_every_granularity(seed: int) -> None:
    traffic(seed)
    result = sample_rollup_run(now=T0 + dt.timedelta(hours=1))
    assert (result.runtime_samples, result.device_samples) == (600, 600)
    assert_rollups_match_raw()


def test_many_small_runs_add_up_to_the_same_rows_as_one_run() -> None:
    traffic(3)
    for minutes in range(0, 30, 2):  # each run's energy steps start from the reading before its window
        sample_rollup_run(now=T0 + dt.timedelta(minutes=minutes, seconds=37))
    sample_rollup_run(now=T0 + dt.timedelta(hours=1))
    assert_rollups_match_raw()


def test_a_second_run_counts_nothing_again() -> None:
    traffic(4, count=60)
    sample_rollup_run(now=T0 + dt.timedelta(hours=1))
    before = snapshot()

    again = sample_rollup_run(now=T0 + dt.timedelta(hours=1, seconds=30))

    assert (again.runtime_samples, again.device_samples, again.rows) == (0, 0, 0)
    assert snapshot() == before
    assert FillState.objects.get(name=FILL_STATE).watermark == T0 + dt.timedelta(hours=1, seconds=25)


def test_samples_inside_the_settle_time_wait_for_the_next_run() -> None:
    RuntimeSample.objects.bulk_create([runtime_sample(T0), runtime_sample(T0 + 10 * SECOND)])
    first = sample_rollup_run(now=T0 + 14 * SECOND)  # counts up to T0+9s: the second is received at T0+12s
    assert first.runtime_samples == 1
    second = sample_rollup_run(now=T0 + 20 * SECOND)
    assert second.runtime_samples == 1
    assert RuntimeRollup.objects.get(granularity=Granularity.MINUTE).samples == 2


def test_a_late_sample_is_folded_into_its_old_bucket_and_splits_the_energy_step_across_it() -> None:
    readings = {0: 1000.0, 60: 2000.0, 180: 5000.0}  # seconds after T0: counter
    DeviceSample.objects.bulk_create([device_sample(T0 + s * SECOND, energy_joules_total=e)
                                      for s, e in readings.items()])
    RuntimeSample.objects.bulk_create([runtime_sample(T0 + s * SECOND) for s in readings])
    sample_rollup_run(now=T0 + dt.timedelta(minutes=10))
    step_minute = T0 + dt.timedelta(minutes=3)
    assert DeviceRollup.objects.get(granularity="minute", bucket=step_minute).energy_joules == 3000.0

    late_at = T0 + 130 * SECOND  # minute T0+2, between the readings at +60 s and +180 s
    DeviceSample.objects.bulk_create([device_sample(late_at, energy_joules_total=2500.0, power_w=400.0,
                                                    received_at=T0 + dt.timedelta(minutes=15))])
    RuntimeSample.objects.bulk_create([runtime_sample(late_at, queue_depth=9,
                                                      received_at=T0 + dt.timedelta(minutes=15))])
    result = sample_rollup_run(now=T0 + dt.timedelta(minutes=20))

    assert (result.runtime_samples, result.device_samples) == (1, 1)
    assert_rollups_match_raw()
    minute = {r.bucket: r for r in DeviceRollup.objects.filter(granularity="minute")}
    assert (minute[late_at.replace(second=0)].energy_joules, minute[step_minute].energy_joules) == (500.0, 2500.0)
    assert RuntimeRollup.objects.get(granularity="minute", bucket=late_at.replace(second=0)).queue_depth_max == 9
    day = DeviceRollup.objects.get(granularity="day")
    assert (day.energy_joules, day.energy_count, day.samples) == (4000.0, 3, 4)


def test_energy_steps_skip_a_counter_reset() -> None:
    counters = [100.0, 200.0, 50.0, 80.0]  # the driver restarted before the third reading
    DeviceSample.objects.bulk_create([device_sample(T0 + i * dt.timedelta(minutes=1), energy_joules_total=e)
                                      for i, e in enumerate(counters)])
    sample_rollup_run(now=T0 + dt.timedelta(hours=1))

    minutes = DeviceRollup.objects.filter(granularity="minute").order_by("bucket")
    assert [(r.energy_joules, r.energy_count) for r in minutes] == [(0.0, 0), (100.0, 1), (0.0, 0), (30.0, 1)]
    hour = DeviceRollup.objects.get(granularity="hour", bucket=T0.replace(minute=0))
    assert (hour.energy_joules, hour.energy_count) == (130.0, 2)
    assert_rollups_match_raw()


def test_unmeasured_readings_stay_unknown_not_zero() -> None:
    DeviceSample.objects.bulk_create([
        device_sample(T0 + i * 5 * SECOND, power_w=None, gpu_util=None, mem_used=None, energy_joules_total=None)
        for i in range(4)])
    RuntimeSample.objects.bulk_create([runtime_sample(T0 + i * 5 * SECOND) for i in range(4)])
    sample_rollup_run(now=T0 + dt.timedelta(hours=1))

    row = DeviceRollup.objects.get(granularity="minute")
    assert row.samples == 4
    assert (row.power_w_count, row.gpu_util_count, row.mem_used_count, row.energy_count) == (0, 0, 0, 0)
    assert row.mem_used_max is None
    [point] = runtime_history(start=T0, end=T0 + dt.timedelta(minutes=1), step="minute")
    assert (point.samples, point.queue_depth_avg) == (4, 2.0)
    assert (point.power_avg_w, point.gpu_util_avg, point.energy_joules) == (None, None, None)


def test_history_outlives_the_raw_samples_and_minute_rows_expire() -> None:
    now = T0 + dt.timedelta(days=10)
    DeviceSample.objects.bulk_create([device_sample(T0, energy_joules_total=0.0),
                                      device_sample(T0 + 30 * SECOND, energy_joules_total=600.0),
                                      device_sample(now - dt.timedelta(hours=1))])
    RuntimeSample.objects.bulk_create([runtime_sample(T0), runtime_sample(now - dt.timedelta(hours=1))])
    late = runtime_sample(T0 + SECOND, received_at=now)  # not yet counted: retention keeps it
    RuntimeSample.objects.bulk_create([late])
    sample_rollup_run(now=now - dt.timedelta(minutes=1))

    result = retention_run(now=now)

    assert (result.runtime_samples_deleted, result.device_samples_deleted) == (1, 2)
    assert result.minute_sample_rollups_deleted == 2
    assert set(RuntimeSample.objects.values_list("at", flat=True)) == {now - dt.timedelta(hours=1), late.at}
    assert not DeviceRollup.objects.filter(granularity="minute", bucket__lt=now - dt.timedelta(days=7)).exists()
    [point] = runtime_history(start=T0.replace(hour=0, minute=0), end=T0 + dt.timedelta(days=1), step="day")
    assert (point.samples, point.energy_joules, point.power_avg_w) == (1, 600.0, 300.0)


def test_runtime_history_averages_per_step_over_runtimes_and_devices() -> None:
    at = T0 + 10 * SECOND
    RuntimeSample.objects.bulk_create([runtime_sample(at, queue_depth=2, tokens_per_s=100.0),
                                       runtime_sample(at + 5 * SECOND, queue_depth=6, tokens_per_s=300.0),
                                       runtime_sample(at, runtime_id="rt-cpu", queue_depth=1)])
    DeviceSample.objects.bulk_create([
        device_sample(at, device=GPU_A, gpu_util=40.0, power_w=200.0, energy_joules_total=0.0),
        device_sample(at + 5 * SECOND, device=GPU_A, gpu_util=60.0, power_w=400.0, energy_joules_total=1500.0),
        device_sample(at, device=GPU_B, gpu_util=None, power_w=100.0, energy_joules_total=None),
    ])
    sample_rollup_run(now=T0 + dt.timedelta(hours=1))

    points = runtime_history(start=T0, end=T0 + dt.timedelta(minutes=1), step="minute")

    assert [(p.runtime_id, p.bucket) for p in points] == [("rt-1", T0), ("rt-cpu", T0)]
    gpu, cpu = points
    assert (gpu.samples, gpu.queue_depth_avg, gpu.queue_depth_max, gpu.tokens_per_s_avg) == (2, 4.0, 6, 200.0)
    assert (gpu.gpu_util_avg, gpu.power_avg_w, gpu.energy_joules) == (50.0, 400.0, 1500.0)
    assert (cpu.samples, cpu.gpu_util_avg, cpu.power_avg_w, cpu.energy_joules) == (1, None, None, None)
    assert runtime_history(start=T0.replace(minute=0), end=T0, step="hour")[0].samples == 2
    with pytest.raises(ValueError):
        runtime_history(start=T0, end=T0, step="week")  # type: ignore[arg-type]


def test_the_task_runs_the_service_and_beat_schedules_it() -> None:
    assert sample_rollup()["watermark_to"]
    entry = django_settings.CELERY_BEAT_SCHEDULE["telemetry-sample-rollup"]
    assert entry["task"] == "finops.telemetry.tasks.sample_rollup"
    assert entry["options"]["expires"] < entry["schedule"]
