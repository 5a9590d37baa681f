"""Runtime and device samples summed per minute, hour and day of ``at``, each sample exactly once.

The same shape as ``rollups.rollup_run``, with its own ``FillState`` row ("samples"): one run, in
one transaction, locks that row, sums in SQL every sample received after the watermark and before
``now - ROLLUP_SETTLE_SECONDS`` per minute of ``at`` (a late sample lands in its old bucket), folds
the minutes into hours and days, adds the sums to the ``RuntimeRollup`` / ``DeviceRollup`` rows and
moves the watermark. Raw samples are kept for ``SAMPLE_RETENTION_DAYS``; these rows are the history
after that (minute rows for ``MINUTE_ROLLUP_RETENTION_DAYS``, hours and days for good).

Energy is the one figure that is not a sum of single samples: it is the growth of a device's
cumulative counter between consecutive readings (ordered by ``at``), each step counted in the bucket
of its later reading, a step down (a driver restart reset the counter) skipped. What the rollups hold
is always the steps of the chain of readings received up to the watermark. A run therefore adds the
steps that chain gained and takes away the steps it lost: a late reading that falls between two
counted ones replaces the step across it with two steps. Only the stretch of each device's history
that new readings fall in is read, with one reading either side of it.

As for request rollups, one bad row never stops a run (``quarantine``): a sample out of the
contract's bounds is left out (of the sums and of every energy chain), a rollup row the database
will not store is left out of the writes, and both are logged and counted.
"""

from __future__ import annotations

import datetime as dt
import itertools
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Count, FloatField, Max, Min, Q, QuerySet, Sum
from django.db.models.functions import Cast, TruncMinute

from finops.telemetry.models import DeviceRollup, DeviceSample, FillState, Granularity, RuntimeRollup, RuntimeSample
from finops.telemetry.quarantine import Quarantine, in_bounds
from finops.telemetry.rollups import EPOCH, database_now

FILL_STATE = "samples"

RUNTIME_KEY = ["granularity", "bucket", "runtime_id"]
RUNTIME_SUMS = ("samples", "queue_depth_sum", "running_sum", "tokens_per_s_sum")
RUNTIME_MAXES = ("queue_depth_max", "running_max")
DEVICE_KEY = ["granularity", "bucket", "runtime_id", "device"]
DEVICE_SUMS = ("samples", "gpu_util_sum", "gpu_util_count", "mem_used_sum", "mem_used_count", "power_w_sum",
               "power_w_count", "energy_joules", "energy_count")
DEVICE_MAXES = ("mem_used_max", "mem_total_max", "temperature_c_max")

# (granularity, bucket, runtime_id) and (granularity, bucket, runtime_id, device)
RuntimeKey = tuple[str, dt.datetime, str]
DeviceKey = tuple[str, dt.datetime, str, str]
# One reading of a device's energy counter: (at, joules, received_at).
Reading = tuple[dt.datetime, float, dt.datetime]


@dataclass(frozen=True)
class SampleRollupResult:
    runtime_samples: int  # runtime samples counted by this run
    device_samples: int
    rows: int  # RuntimeRollup and DeviceRollup rows created or changed
    watermark_from: dt.datetime
    watermark_to: dt.datetime
    seconds: float
    left_out: int = 0  # samples and rollup rows left out (RollupQuarantine)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able values, for a Celery result or a log line."""
        return {"runtime_samples": self.runtime_samples, "device_samples": self.device_samples, "rows": self.rows,
                "left_out": self.left_out, "seconds": round(self.seconds, 3),
                "watermark_from": self.watermark_from.isoformat(), "watermark_to": self.watermark_to.isoformat()}


def sample_rollup_run(*, now: dt.datetime | None = None) -> SampleRollupResult:
    """Count every settled sample received since the last run into the minute, hour and day rollups."""
    began = time.perf_counter()
    with transaction.atomic():
        state = sample_fill_state_lock() or _fill_state_start()
        now = now or database_now()
        since, until = state.watermark, now - dt.timedelta(seconds=settings.ROLLUP_SETTLE_SECONDS)
        if until <= since:  # a run with an earlier clock than the last one: never move back
            return SampleRollupResult(0, 0, 0, since, since, time.perf_counter() - began)
        window = Q(received_at__gt=since, received_at__lte=until)
        quarantine = Quarantine(FILL_STATE)
        runtime_minutes = runtime_minute_sums(quarantine.screen(RuntimeSample.objects.filter(window)))
        device_minutes, names = device_minute_sums(quarantine.screen(DeviceSample.objects.filter(window)))
        for key, (energy, steps) in energy_changes(since=since, until=until).items():
            sums = device_minutes.setdefault(key, dict.fromkeys(DEVICE_SUMS, 0) | dict.fromkeys(DEVICE_MAXES))
            sums["energy_joules"] += energy
            sums["energy_count"] += steps
        rows = _add(RuntimeRollup, RUNTIME_KEY, RUNTIME_SUMS, RUNTIME_MAXES, _fold(runtime_minutes), quarantine)
        rows += _add(DeviceRollup, DEVICE_KEY, DEVICE_SUMS, DEVICE_MAXES, _fold(device_minutes), quarantine,
                     names=names)
        quarantine.save()
        state.watermark = until
        state.save(update_fields=["watermark", "updated_at"])
    return SampleRollupResult(sum(s["samples"] for s in runtime_minutes.values()),
                              sum(s["samples"] for s in device_minutes.values()), rows, since, until,
                              time.perf_counter() - began, quarantine.count)


def sample_fill_state_lock() -> FillState | None:
    """The "samples" FillState row, locked until the transaction ends; None before the first run.
    Every writer of the sample rollups (this, retention) queues on it."""
    return FillState.objects.select_for_update().filter(name=FILL_STATE).first()


def _fill_state_start() -> FillState:
    """Start just before the earliest sample received (the epoch when there is none), and lock it."""
    firsts = [model.objects.aggregate(first=Min("received_at"))["first"] for model in (RuntimeSample, DeviceSample)]
    first = min((f for f in firsts if f is not None), default=None)
    start = first - dt.timedelta(microseconds=1) if first else EPOCH
    FillState.objects.get_or_create(name=FILL_STATE, defaults={"watermark": start})
    state = sample_fill_state_lock()
    assert state is not None  # created above; a FillState is never deleted
    return state


def runtime_minute_sums(samples: QuerySet[RuntimeSample]) -> dict[RuntimeKey, dict[str, Any]]:
    """Sum these samples per minute of ``at`` and runtime, in one grouped query."""
    rows = (samples.order_by().annotate(minute=TruncMinute("at", tzinfo=dt.UTC)).values("minute", "runtime_id")
            .annotate(n=Count("id"), queue_sum=Sum("queue_depth"), queue_max=Max("queue_depth"),
                      running_sum=Sum("running"), running_max=Max("running"), tokens_sum=Sum("tokens_per_s")))
    return {
        (Granularity.MINUTE.value, row["minute"], row["runtime_id"]): {
            "samples": row["n"], "queue_depth_sum": int(row["queue_sum"]), "running_sum": int(row["running_sum"]),
            "tokens_per_s_sum": float(row["tokens_sum"]), "queue_depth_max": row["queue_max"],
            "running_max": row["running_max"],
        }
        for row in rows
    }


def device_minute_sums(samples: QuerySet[DeviceSample]
                       ) -> tuple[dict[DeviceKey, dict[str, Any]], dict[tuple[str, str], str]]:
    """Sum these samples per minute of ``at`` and device, in one grouped query; also each device's
    name as last reported in them."""
    rows = (samples.order_by().annotate(minute=TruncMinute("at", tzinfo=dt.UTC))
            .values("minute", "runtime_id", "device")
            .annotate(n=Count("id"), name=Max("name"), util_sum=Sum("gpu_util"), util_n=Count("gpu_util"),
                      mem_sum=Sum(Cast("mem_used", FloatField())), mem_n=Count("mem_used"), mem_max=Max("mem_used"),
                      power_sum=Sum("power_w"), power_n=Count("power_w"), mem_total=Max("mem_total"),
                      temperature=Max("temperature_c")))
    sums: dict[DeviceKey, dict[str, Any]] = {}
    names: dict[tuple[str, str], str] = {}
    for row in rows:
        sums[(Granularity.MINUTE.value, row["minute"], row["runtime_id"], row["device"])] = {
            "samples": row["n"], "gpu_util_sum": float(row["util_sum"] or 0.0), "gpu_util_count": row["util_n"],
            "mem_used_sum": float(row["mem_sum"] or 0.0), "mem_used_count": row["mem_n"],
            "mem_used_max": row["mem_max"], "mem_total_max": row["mem_total"],
            "temperature_c_max": row["temperature"], "power_w_sum": float(row["power_sum"] or 0.0),
            "power_w_count": row["power_n"], "energy_joules": 0.0, "energy_count": 0,
        }
        if row["name"]:
            names[(row["runtime_id"], row["device"])] = row["name"]
    return sums, names


def energy_changes(*, since: dt.datetime, until: dt.datetime) -> dict[DeviceKey, tuple[float, int]]:
    """Per minute bucket and device: the energy (and the number of counter steps) that the chain of
    readings received up to ``until`` has beyond the chain of readings received up to ``since``.

    Per device with new readings, three queries: the readings between its earliest and latest new
    one, the reading just before and the one just after (both received by ``since``).
    """
    measured = in_bounds(DeviceSample.objects.filter(energy_joules_total__isnull=False, received_at__lte=until)
                         ).order_by()
    spans = (measured.filter(received_at__gt=since).values("runtime_id", "device")
             .annotate(first=Min("at"), last=Max("at")).values_list("runtime_id", "device", "first", "last"))
    changes: dict[DeviceKey, tuple[float, int]] = {}
    fields = ("at", "energy_joules_total", "received_at")
    for runtime_id, device, first, last in spans:
        history = measured.filter(runtime_id=runtime_id, device=device)
        chain: list[Reading] = [
            *history.filter(at__lt=first).order_by("-at").values_list(*fields)[:1],
            *history.filter(at__gte=first, at__lte=last).order_by("at").values_list(*fields),
            *history.filter(at__gt=last).order_by("at").values_list(*fields)[:1],
        ]
        gained = _steps(chain)
        lost = _steps([reading for reading in chain if reading[2] <= since])
        for sign, steps in ((1, gained.keys() - lost.keys()), (-1, lost.keys() - gained.keys())):
            for step in steps:
                later_at, joules = step[1], (gained if sign == 1 else lost)[step]
                if joules is None:  # a reset: no energy, and not a measured step
                    continue
                key = (Granularity.MINUTE.value, _minute(later_at), runtime_id, device)
                energy, count = changes.get(key, (0.0, 0))
                changes[key] = (energy + sign * joules, count + sign)
    return changes


def _steps(chain: list[Reading]) -> dict[tuple[dt.datetime, dt.datetime], float | None]:
    """Each pair of consecutive readings (by their times) and the counter's growth between them,
    None where it went down."""
    return {(a[0], b[0]): (b[1] - a[1] if b[1] >= a[1] else None) for a, b in itertools.pairwise(chain)}


def _minute(moment: dt.datetime) -> dt.datetime:
    return moment.astimezone(dt.UTC).replace(second=0, microsecond=0)


def _fold(minutes: Mapping[tuple, dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """The minute sums plus the hour and day sums they add up to (UTC buckets)."""
    folded: dict[tuple, dict[str, Any]] = {}
    for key, sums in minutes.items():
        _, minute, *group = key
        for granularity, bucket in ((Granularity.MINUTE, minute), (Granularity.HOUR, minute.replace(minute=0)),
                                    (Granularity.DAY, minute.replace(hour=0, minute=0))):
            total = folded.get((granularity.value, bucket, *group))
            folded[(granularity.value, bucket, *group)] = _combine(total, sums) if total else dict(sums)
    return folded


def _combine(total: Mapping[str, Any], more: Mapping[str, Any]) -> dict[str, Any]:
    combined = dict(total)
    for name, value in more.items():
        if name.endswith("_max"):
            if value is not None:
                combined[name] = value if combined.get(name) is None else max(combined[name], value)
        else:
            combined[name] = combined.get(name, 0) + value
    return combined


def _add(model: type[RuntimeRollup] | type[DeviceRollup], key_fields: list[str], sum_fields: tuple[str, ...],
         max_fields: tuple[str, ...], sums: Mapping[tuple, dict[str, Any]], quarantine: Quarantine,
         names: Mapping[tuple[str, str], str] | None = None) -> int:
    """Add ``sums`` to their rollup rows, inserting missing ones; rows written. The caller holds
    the "samples" FillState lock, so read, add and upsert cannot lose a concurrent writer's addition."""
    written = 0
    update_fields = [*sum_fields, *max_fields, *(["name"] if names is not None else [])]
    for chunk in _batched(sorted(sums), 300):
        existing = {tuple(getattr(row, f) for f in key_fields): row for row in _rows_for(model, chunk)}
        rows = []
        for key in chunk:
            row = existing.get(key)
            current = {name: getattr(row, name) for name in (*sum_fields, *max_fields)} if row else {}
            values = _combine(current, sums[key]) if current else dict(sums[key])
            if names is not None:
                values["name"] = names.get((key[2], key[3])) or (row.name if row else None)
            rows.append(model(**dict(zip(key_fields, key, strict=True)), **values))
        written += quarantine.write(model, rows, unique_fields=key_fields, update_fields=update_fields)
    return written


def _rows_for(model: type[RuntimeRollup] | type[DeviceRollup], keys: list[tuple]) -> Iterator[Any]:
    for granularity, group in itertools.groupby(keys, key=lambda k: k[0]):
        chunk = list(group)
        yield from model.objects.filter(granularity=granularity, bucket__in={k[1] for k in chunk},
                                        runtime_id__in={k[2] for k in chunk})


def _batched(items: Iterable[tuple], size: int) -> Iterator[list[tuple]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk
