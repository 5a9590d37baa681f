"""Power limit changes on runtimes' GPUs (a power cap set or lifted) and what each did: energy per
token and throughput on the device in the minutes before the change against the minutes after.

Read from the raw device samples (the board's ``power_limit_w`` and energy counter, kept
``SAMPLE_RETENTION_DAYS``) and the raw request events that name the device; a figure that cannot
be measured (no energy counter, fewer than two samples, no tokens) is ``None``, shown as n/a.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from django.db.models import F, Sum

from finops.telemetry.models import DeviceSample, RequestEvent

WINDOW = dt.timedelta(minutes=10)


@dataclass(frozen=True)
class PowerSide:
    """One side of a change: ``[start, end)`` on one device."""

    start: dt.datetime
    end: dt.datetime
    energy_joules: float | None  # the counter's growth between the side's first and last sample
    tokens: int  # prompt + completion tokens of requests on the device that started in the side
    completion_tokens: int

    @property
    def joules_per_1k_tokens(self) -> float | None:
        return self.energy_joules / self.tokens * 1000 if self.energy_joules is not None and self.tokens else None

    @property
    def tokens_per_s(self) -> float | None:
        seconds = (self.end - self.start).total_seconds()
        return self.completion_tokens / seconds if seconds > 0 and self.completion_tokens else None


@dataclass(frozen=True)
class PowerLimitChange:
    runtime_id: str
    device: str
    name: str | None
    at: dt.datetime  # the first sample with the new limit
    from_w: float
    to_w: float
    before: PowerSide
    after: PowerSide


def power_limit_changes(*, start: dt.datetime, end: dt.datetime, window: dt.timedelta = WINDOW
                        ) -> list[PowerLimitChange]:
    """Each change of a GPU's sampled power limit in ``[start, end)``, newest first, with the
    ``window`` before it (from the previous change at most) against the ``window`` after it (to the
    next change at most)."""
    rows = (DeviceSample.objects.filter(at__gte=start - window, at__lt=end + window, power_limit_w__isnull=False)
            .order_by("runtime_id", "device", "at")
            .values_list("runtime_id", "device", "name", "at", "power_limit_w", "energy_joules_total"))
    series: dict[tuple[str, str], list[tuple[dt.datetime, float, float | None, str | None]]] = {}
    for runtime_id, device, name, at, limit, energy in rows:
        series.setdefault((runtime_id, device), []).append((at, limit, energy, name))
    changes: list[PowerLimitChange] = []
    for (runtime_id, device), points in series.items():
        switches = [i for i in range(1, len(points)) if points[i][1] != points[i - 1][1]]
        for n, i in enumerate(switches):
            at = points[i][0]
            if not start <= at < end:
                continue
            previous = points[switches[n - 1]][0] if n else None
            following = points[switches[n + 1]][0] if n + 1 < len(switches) else None
            before_start = max(at - window, previous) if previous else at - window
            after_end = min(at + window, following) if following else at + window
            changes.append(PowerLimitChange(
                runtime_id=runtime_id, device=device, name=points[i][3], at=at,
                from_w=points[i - 1][1], to_w=points[i][1],
                before=_side(runtime_id, device, points, before_start, at),
                after=_side(runtime_id, device, points, at, after_end),
            ))
    changes.sort(key=lambda c: c.at, reverse=True)
    return changes


def _side(runtime_id: str, device: str, points: list[tuple[dt.datetime, float, float | None, str | None]],
          start: dt.datetime, end: dt.datetime) -> PowerSide:
    energies = [energy for at, _, energy, _ in points if start <= at < end and energy is not None]
    sums = (RequestEvent.objects.filter(runtime_id=runtime_id, device=device, started_at__gte=start,
                                        started_at__lt=end)
            .aggregate(tokens=Sum(F("prompt_tokens") + F("completion_tokens")), completion=Sum("completion_tokens")))
    return PowerSide(start=start, end=end,
                     energy_joules=max(0.0, energies[-1] - energies[0]) if len(energies) >= 2 else None,
                     tokens=sums["tokens"] or 0, completion_tokens=sums["completion"] or 0)
