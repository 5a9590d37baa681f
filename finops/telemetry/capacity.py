"""Capacity: what runtimes and their devices did over a range (queue depth, throughput, GPU
utilisation, memory, power, energy) and the device time paid for but not used (idle capacity).

Read from the sample rollups (``RuntimeRollup``, ``DeviceRollup``) plus the samples received since
their watermark, consistently as ``sources.read_rollups`` reads request rollups; attributed device
time from ``DeviceUseRollup`` plus the raw tail.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

from django.db.models import Case, Count, Expression, IntegerField, Max, Min, QuerySet, Sum, Value, When

from finops.pricing.services import QUANTUM, PriceCatalog, Prices
from finops.runtimes.models import Runtime
from finops.telemetry.models import (
    DeviceRollup,
    DeviceSample,
    DeviceUseRollup,
    FillState,
    Granularity,
    RuntimeRollup,
    RuntimeSample,
)
from finops.telemetry.quarantine import in_bounds
from finops.telemetry.ranges import (
    STEP_LENGTH,
    Filters,
    Plan,
    Step,
    Tile,
    ceil_to,
    check_step,
    floor_to,
    minute_plan,
    rollup_plan,
)
from finops.telemetry.sample_rollups import FILL_STATE as SAMPLES_FILL_STATE_NAME
from finops.telemetry.selectors import device_types_for
from finops.telemetry.sources import in_tiles, read_rollups, tail_events
from finops.telemetry.sums import ZERO

SECONDS_PER_HOUR = Decimal(3600)
T = TypeVar("T")


@dataclass(frozen=True)
class DeviceGauge:
    runtime_id: str
    device: str
    name: str | None
    samples: int
    gpu_util_avg: float | None
    mem_used_max: int | None
    mem_total: int | None
    power_avg_w: float | None
    temperature_max_c: float | None
    energy_joules: float | None  # growth of the device's energy counter over the range


@dataclass(frozen=True)
class RuntimeGauge:
    """A runtime's samples over a range. None where nothing was measured (no samples, or a CPU
    runtime's GPU figures); device figures add up across the runtime's devices."""

    runtime_id: str
    samples: int
    last_sample_at: dt.datetime | None
    queue_depth_avg: float | None
    queue_depth_max: int | None
    running_avg: float | None
    tokens_per_s_avg: float | None
    gpu_util_avg: float | None  # mean over devices
    power_avg_w: float | None  # sum over devices
    energy_joules: float | None  # sum over devices
    devices: tuple[DeviceGauge, ...] = field(default=())


def _samples_watermark() -> dt.datetime | None:
    """How far the sample rollups have counted (by ``received_at``); None before the first run."""
    return FillState.objects.filter(name=SAMPLES_FILL_STATE_NAME).values_list("watermark", flat=True).first()


def _read_sample_rollups(read: Callable[[], T], empty: T) -> tuple[dt.datetime | None, T]:
    return read_rollups(read, empty, before_read=_samples_watermark, after_read=_samples_watermark)


def _samples_tail(model: type[RuntimeSample] | type[DeviceSample], plan: Plan,
                  watermark: dt.datetime | None) -> QuerySet[Any]:
    """Samples taken in the plan's range that the sample rollups have not counted yet (and never
    one they will leave out: ``quarantine``)."""
    samples = in_bounds(model.objects.filter(at__gte=plan.start, at__lt=plan.end)).order_by()
    return samples.filter(received_at__gt=watermark) if watermark is not None else samples


def runtime_gauges(*, start: dt.datetime, end: dt.datetime) -> list[RuntimeGauge]:
    """Queue, throughput and device gauges per runtime over ``[start, end)`` (whole minutes);
    registered runtimes that sent no samples are listed with ``samples == 0``.

    Read from the sample rollups (``RuntimeRollup``, ``DeviceRollup``) tiled like ``rollup_plan``,
    plus the samples received since their watermark. Energy is the growth of each device's
    cumulative counter (the rollups skip a step where a driver restart reset it); the step between
    the last counted reading and the newest raw ones is added by the next rollup run.
    ``last_sample_at`` is the newest raw sample, or the start of the newest rollup bucket where the
    raw samples have expired.
    """
    plan = minute_plan(start, end)

    def read() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        runtime_rows = (RuntimeRollup.objects.filter(in_tiles(plan)).values("runtime_id").annotate(
            samples=Sum("samples"), queue_sum=Sum("queue_depth_sum"), queue_max=Max("queue_depth_max"),
            running_sum=Sum("running_sum"), tokens_sum=Sum("tokens_per_s_sum"), last_bucket=Max("bucket"))
            .order_by())
        device_rows = (DeviceRollup.objects.filter(in_tiles(plan)).values("runtime_id", "device").annotate(
            name=Max("name"), samples=Sum("samples"), util_sum=Sum("gpu_util_sum"), util_n=Sum("gpu_util_count"),
            mem_max=Max("mem_used_max"), mem_total=Max("mem_total_max"), power_sum=Sum("power_w_sum"),
            power_n=Sum("power_w_count"), temperature=Max("temperature_c_max"), energy=Sum("energy_joules"),
            energy_n=Sum("energy_count")).order_by())
        return list(runtime_rows), list(device_rows)

    watermark, (runtime_rows, device_rows) = _read_sample_rollups(read, ([], []))
    runtimes: dict[str, dict[str, Any]] = {}
    for row in runtime_rows:
        runtimes[row["runtime_id"]] = {**row, "last_at": None}
    for row in (_samples_tail(RuntimeSample, plan, watermark).values("runtime_id").annotate(
            samples=Count("id"), queue_sum=Sum("queue_depth"), queue_max=Max("queue_depth"),
            running_sum=Sum("running"), tokens_sum=Sum("tokens_per_s"), last_at=Max("at"))):
        _merge_gauge(runtimes.setdefault(row["runtime_id"], {}), row)
    devices: dict[tuple[str, str], dict[str, Any]] = {(r["runtime_id"], r["device"]): dict(r) for r in device_rows}
    for row in (_samples_tail(DeviceSample, plan, watermark).values("runtime_id", "device").annotate(
            name=Max("name"), samples=Count("id"), util_sum=Sum("gpu_util"), util_n=Count("gpu_util"),
            mem_max=Max("mem_used"), mem_total=Max("mem_total"), power_sum=Sum("power_w"), power_n=Count("power_w"),
            temperature=Max("temperature_c"), energy_first=Min("energy_joules_total"),
            energy_last=Max("energy_joules_total"), energy_n=Count("energy_joules_total"))):
        first, last = row.pop("energy_first"), row.pop("energy_last")
        row["energy"] = last - first if row["energy_n"] > 1 else 0.0
        row["energy_n"] = max(row["energy_n"] - 1, 0)  # n readings are n - 1 counter steps
        _merge_gauge(devices.setdefault((row["runtime_id"], row["device"]), {}), row)

    by_runtime: dict[str, list[DeviceGauge]] = {}
    for (runtime_id, device), row in sorted(devices.items()):
        by_runtime.setdefault(runtime_id, []).append(DeviceGauge(
            runtime_id=runtime_id, device=device, name=row.get("name"), samples=int(row["samples"]),
            gpu_util_avg=row["util_sum"] / row["util_n"] if row["util_n"] else None,
            mem_used_max=row["mem_max"], mem_total=row["mem_total"],
            power_avg_w=row["power_sum"] / row["power_n"] if row["power_n"] else None,
            temperature_max_c=row["temperature"], energy_joules=row["energy"] if row["energy_n"] else None,
        ))
    names = set(runtimes) | set(by_runtime) | set(Runtime.objects.values_list("name", flat=True))
    gauges = []
    for name in sorted(names):
        row = runtimes.get(name)
        own = tuple(by_runtime.get(name, ()))
        samples = int(row["samples"]) if row else 0
        utils = [d.gpu_util_avg for d in own if d.gpu_util_avg is not None]
        powers = [d.power_avg_w for d in own if d.power_avg_w is not None]
        energies = [d.energy_joules for d in own if d.energy_joules is not None]
        gauges.append(RuntimeGauge(
            runtime_id=name,
            samples=samples,
            last_sample_at=_last_sample_at(name, row, plan) if row else None,
            queue_depth_avg=int(row["queue_sum"]) / samples if row and samples else None,
            queue_depth_max=row["queue_max"] if row and samples else None,
            running_avg=int(row["running_sum"]) / samples if row and samples else None,
            tokens_per_s_avg=float(row["tokens_sum"]) / samples if row and samples else None,
            gpu_util_avg=sum(utils) / len(utils) if utils else None,
            power_avg_w=sum(powers) if powers else None,
            energy_joules=sum(energies) if energies else None,
            devices=own,
        ))
    return gauges


def _merge_gauge(total: dict[str, Any], more: Mapping[str, Any]) -> None:
    """Add a group of raw samples to the same group's rollup figures (sums add, maxima take the larger)."""
    for name, value in more.items():
        if value is None or name in ("runtime_id", "device"):
            total.setdefault(name, value)
        elif name in ("name", "last_at"):
            total[name] = value
        elif name.endswith(("_max", "max")) or name in ("mem_total", "temperature"):
            total[name] = value if total.get(name) is None else max(total[name], value)
        else:
            total[name] = (total.get(name) or 0) + value


def _last_sample_at(runtime_id: str, row: Mapping[str, Any], plan: Plan) -> dt.datetime | None:
    """The runtime's newest sample in the plan's range: from the raw tail, else the newest raw
    sample in its newest rollup bucket (the bucket's start once raw samples have expired)."""
    if row.get("last_at") is not None:
        return row["last_at"]
    bucket = row.get("last_bucket")
    if bucket is None:
        return None
    tile = next((t for t in reversed(plan.tiles) if t.start <= bucket < t.end), None)
    bucket_end = min(bucket + STEP_LENGTH[tile.granularity] if tile else plan.end, plan.end)
    newest = (RuntimeSample.objects.filter(runtime_id=runtime_id, at__gte=bucket, at__lt=bucket_end)
              .aggregate(newest=Max("at"))["newest"])
    return newest or bucket


@dataclass(frozen=True)
class RuntimeHistoryPoint:
    """One runtime over one step, from the sample rollups. None where nothing was measured: no
    samples, or no device reported the figure (a CPU runtime, a driver without power readings)."""

    runtime_id: str
    bucket: dt.datetime
    samples: int
    queue_depth_avg: float | None
    queue_depth_max: int | None
    tokens_per_s_avg: float | None
    gpu_util_avg: float | None  # mean over the devices' readings
    power_avg_w: float | None  # sum over devices of each one's mean power
    energy_joules: float | None  # sum over devices


def runtime_history(*, start: dt.datetime, end: dt.datetime, step: Step) -> list[RuntimeHistoryPoint]:
    """Runtime and device figures per runtime and ``step`` bucket in ``[start, end)``, ordered by
    runtime then bucket, read from ``RuntimeRollup`` / ``DeviceRollup`` only: it reaches back past
    ``SAMPLE_RETENTION_DAYS`` (minute steps as far as ``MINUTE_ROLLUP_RETENTION_DAYS``), and leaves
    out the last seconds the sample rollups have not yet counted (``runtime_gauges`` has those)."""
    check_step(step)
    in_range = {"granularity": step, "bucket__gte": start, "bucket__lt": end}
    devices: dict[tuple[str, dt.datetime], list[DeviceRollup]] = {}
    for row in DeviceRollup.objects.filter(**in_range).order_by():
        devices.setdefault((row.runtime_id, row.bucket), []).append(row)
    runtimes = {(row.runtime_id, row.bucket): row for row in RuntimeRollup.objects.filter(**in_range).order_by()}
    points = []
    for key in sorted(set(runtimes) | set(devices)):
        runtime, own = runtimes.get(key), devices.get(key, [])
        samples = runtime.samples if runtime else 0
        util_count = sum(d.gpu_util_count for d in own)
        powers = [d.power_w_sum / d.power_w_count for d in own if d.power_w_count]
        energies = [d.energy_joules for d in own if d.energy_count]
        points.append(RuntimeHistoryPoint(
            runtime_id=key[0],
            bucket=key[1],
            samples=samples,
            queue_depth_avg=runtime.queue_depth_sum / samples if runtime and samples else None,
            queue_depth_max=runtime.queue_depth_max if runtime and samples else None,
            tokens_per_s_avg=runtime.tokens_per_s_sum / samples if runtime and samples else None,
            gpu_util_avg=sum(d.gpu_util_sum for d in own) / util_count if util_count else None,
            power_avg_w=sum(powers) if powers else None,
            energy_joules=sum(energies) if energies else None,
        ))
    return points


def _paid_minutes(start: dt.datetime, end: dt.datetime, part_of: Callable[[str], Expression],
                  part_at: Callable[[dt.datetime], int]
                  ) -> tuple[dict[tuple[str, str], dict[int, float]], dict[tuple[str, str], str | None]]:
    """Seconds paid per (runtime, device) and price-book part (see ``idle_capacity``), and each
    device's name as sampled."""
    minute_rows = {"granularity": Granularity.MINUTE.value, "bucket__gte": start, "bucket__lt": end, "samples__gt": 0}

    def read() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        devices = (DeviceRollup.objects.filter(**minute_rows).annotate(part=part_of("bucket"))
                   .values("runtime_id", "device", "part").annotate(minutes=Count("id"), name=Max("name")).order_by())
        runtimes = (RuntimeRollup.objects.filter(**minute_rows).annotate(part=part_of("bucket"))
                    .values("runtime_id", "part").annotate(minutes=Count("id")).order_by())
        return list(devices), list(runtimes)

    plan = Plan(start, end, (Tile("minute", start, end),))
    watermark, (device_rows, runtime_rows) = _read_sample_rollups(read, ([], []))
    minutes: dict[tuple[str, str], dict[int, int]] = {}
    names: dict[tuple[str, str], str | None] = {}
    for row in device_rows:
        minutes.setdefault((row["runtime_id"], row["device"]), {})[row["part"]] = row["minutes"]
        names[(row["runtime_id"], row["device"])] = row["name"]
    # Minutes sampled since the watermark that no minute row holds yet.
    device_tail = {(r, d, at.astimezone(dt.UTC).replace(second=0, microsecond=0)): name for r, d, at, name
                   in _samples_tail(DeviceSample, plan, watermark).values_list("runtime_id", "device", "at", "name")}
    counted = set(DeviceRollup.objects.filter(**minute_rows, bucket__in={k[2] for k in device_tail})
                  .values_list("runtime_id", "device", "bucket")) if device_tail else set()
    for key, name in device_tail.items():
        names[key[:2]] = names.get(key[:2]) or name
        if key not in counted:
            part = minutes.setdefault(key[:2], {})
            part[part_at(key[2])] = part.get(part_at(key[2]), 0) + 1
    gpu_runtimes = {runtime_id for runtime_id, _ in minutes}
    for row in runtime_rows:
        if row["runtime_id"] not in gpu_runtimes:
            minutes.setdefault((row["runtime_id"], CPU), {})[row["part"]] = row["minutes"]
    runtime_tail = {(r, at.astimezone(dt.UTC).replace(second=0, microsecond=0)) for r, at
                    in _samples_tail(RuntimeSample, plan, watermark).values_list("runtime_id", "at")
                    if r not in gpu_runtimes}
    counted_runtime = set(RuntimeRollup.objects.filter(**minute_rows, bucket__in={k[1] for k in runtime_tail})
                          .values_list("runtime_id", "bucket")) if runtime_tail else set()
    for runtime_id, minute in runtime_tail - counted_runtime:
        part = minutes.setdefault((runtime_id, CPU), {})
        part[part_at(minute)] = part.get(part_at(minute), 0) + 1
    seconds = SAMPLED_SLOT.total_seconds()
    return {key: {part: n * seconds for part, n in parts.items()} for key, parts in minutes.items()}, names


def _attributed_seconds(start: dt.datetime, end: dt.datetime) -> dict[tuple[str, str], float]:
    """Device seconds attributed to requests that started in ``[start, end)``, per (runtime, device)."""
    plan = rollup_plan(filters=Filters(start=start, end=end))

    def read() -> list[tuple[str, str, float]]:
        return list(DeviceUseRollup.objects.filter(in_tiles(plan)).values("runtime_id", "device")
                    .annotate(seconds=Sum("gpu_seconds")).order_by().values_list("runtime_id", "device", "seconds"))

    watermark, rows = read_rollups(read, [])
    tail = (tail_events(plan, Filters(start=start, end=end), watermark).filter(device__isnull=False)
            .values("runtime_id", "device").annotate(seconds=Sum("gpu_seconds")).order_by()
            .values_list("runtime_id", "device", "seconds"))
    seconds: dict[tuple[str, str], float] = {}
    for runtime_id, device, used in [*rows, *tail]:
        seconds[(runtime_id, device)] = seconds.get((runtime_id, device), 0.0) + (used or 0.0)
    return seconds


@dataclass(frozen=True)
class DeviceIdle:
    """Device time paid for against the time requests were attributed, and what the gap cost."""

    runtime_id: str
    device: str  # GPU uuid, or "cpu"
    device_type: str | None  # NVML's name, "cpu", or None when unknown
    paid_seconds: float
    attributed_seconds: float
    idle_seconds: float
    idle_fraction: float | None
    idle_cost: Decimal | None  # None when no price book prices the device type


CPU = "cpu"
SAMPLED_SLOT = dt.timedelta(minutes=1)


def idle_capacity(*, start: dt.datetime, end: dt.datetime) -> list[DeviceIdle]:
    """Idle capacity per device over ``[start, end)`` (whole minutes), most costly first.

    *Paid* time is the number of distinct minutes in which the device was sampled, times 60 s: the
    runtime samples every few seconds, so a minute with a sample is a minute the device was up, and
    a stretch without samples (the runtime was down) is not counted. Partial minutes at a runtime's
    start and stop count as whole ones. A runtime with no device samples is a CPU runtime: its
    device ``"cpu"`` is paid for the minutes its runtime samples cover. The sampled minutes are the
    minute rows of the sample rollups (kept ``MINUTE_ROLLUP_RETENTION_DAYS``, so ``start`` should
    be within that) plus the minutes of samples they have not counted yet.

    *Attributed* time is the ``gpu_seconds`` of requests that started in the range on that device
    (``DeviceUseRollup`` plus the raw tail). Idle = paid − attributed, never negative. It is priced
    at the ``per_gpu_hour`` of the device type (the runtime's ``telemetry.Device`` name, ``"*"`` fallback) in the
    price book in force at each minute — the range is split at book changes, and idle is clamped at
    zero in each part. Only devices with samples in the range are listed.
    """
    start, end = floor_to(start, "minute"), ceil_to(end, "minute")
    catalog = PriceCatalog.load()
    books = [book for book in catalog.books if start < book.effective_from < end]
    # Each part of the range is labelled by the index of its book in `parts` (0: in force at start).
    parts: list[Prices | None] = [catalog.at(start), *books]
    bounds = [start, *(ceil_to(book.effective_from, "minute") for book in books), end]

    def part_of(moment: str) -> Expression:
        if not books:
            return Value(0, output_field=IntegerField())
        whens = [When(**{f"{moment}__gte": bound}, then=Value(i + 1)) for i, bound in enumerate(bounds[1:-1])]
        return Case(*reversed(whens), default=Value(0), output_field=IntegerField())

    def part_at(moment: dt.datetime) -> int:
        return sum(1 for bound in bounds[1:-1] if moment >= bound)

    paid, device_names = _paid_minutes(start, end, part_of, part_at)
    if not paid:
        return []
    attributed: dict[tuple[str, str], dict[int, float]] = {}
    for part, (part_start, part_end) in enumerate(itertools.pairwise(bounds)):
        if part_start < part_end:
            for key, seconds in _attributed_seconds(part_start, part_end).items():
                if key in paid:
                    attributed.setdefault(key, {})[part] = seconds

    known_types = device_types_for(devices=paid)
    result = []
    for key, paid_parts in paid.items():
        runtime_id, device = key
        device_type = CPU if device == CPU else known_types.get(key) or device_names.get(key)
        used_parts = attributed.get(key, {})
        idle_seconds = 0.0
        idle_cost: Decimal | None = ZERO
        for part in set(paid_parts) | set(used_parts):
            idle = max(0.0, paid_parts.get(part, 0.0) - used_parts.get(part, 0.0))
            idle_seconds += idle
            price = parts[part].for_device(device_type) if parts[part] else None
            if price is None:
                if idle:
                    idle_cost = None
            elif idle_cost is not None:
                idle_cost += (Decimal(str(idle)) * price[0] / SECONDS_PER_HOUR).quantize(QUANTUM)
        paid_seconds = sum(paid_parts.values())
        result.append(DeviceIdle(
            runtime_id=runtime_id,
            device=device,
            device_type=device_type,
            paid_seconds=paid_seconds,
            attributed_seconds=sum(used_parts.values()),
            idle_seconds=idle_seconds,
            idle_fraction=idle_seconds / paid_seconds if paid_seconds else None,
            idle_cost=idle_cost,
        ))
    result.sort(key=lambda d: (-(d.idle_cost or ZERO), -d.idle_seconds, d.runtime_id, d.device))
    return result
