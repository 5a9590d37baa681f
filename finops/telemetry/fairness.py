"""Fair share as the runtimes measured it: each tenant's share of the service given (tokens/s)
against its share of the demand (requests waiting and running), per chart step, from the raw
runtime samples' ``tenants`` (docs/TELEMETRY.md). A tenant that gets a share of service close to
its share of demand, or more when it asks little, is being served fairly; a flooder's demand share
far above its service share is the queue holding it back so that the others are served.

Read from raw samples, so it reaches back ``SAMPLE_RETENTION_DAYS`` (samples carry no rollup of
their tenants); only the two columns it needs are loaded.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass

from finops.telemetry.models import RuntimeSample
from finops.telemetry.ranges import Step, check_step, floor_to


@dataclass(frozen=True)
class FairnessPoint:
    at: dt.datetime  # the step's start
    value: str  # the tenant
    service_share: float | None  # of every tenant's tokens/s in the step; None when nothing was served
    demand_share: float | None  # of every tenant's requests waiting or running; None when none were
    tokens_per_s: float  # the tenant's mean service over the step, summed over runtimes
    queue_wait_ms: float | None  # mean of its samples' mean waits; None when none of its requests started


def tenant_fairness(*, start: dt.datetime, end: dt.datetime, step: Step) -> list[FairnessPoint]:
    """Each tenant's shares per ``step`` in ``[start, end)``, ordered by step then tenant."""
    check_step(step)
    samples: dict[tuple[dt.datetime, str], int] = defaultdict(int)  # (step, runtime) -> samples
    service: dict[tuple[dt.datetime, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    demand: dict[dt.datetime, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    waits: dict[tuple[dt.datetime, str], list[float]] = defaultdict(list)
    rows = (RuntimeSample.objects.filter(at__gte=start, at__lt=end, tenants__isnull=False)
            .values_list("runtime_id", "at", "tenants").order_by())
    for runtime_id, at, tenants in rows.iterator(chunk_size=2000):
        bucket = floor_to(at.astimezone(dt.UTC), step)
        samples[(bucket, runtime_id)] += 1
        for row in tenants or []:
            tenant = row["tenant"]
            service[(bucket, runtime_id)][tenant] += row["tokens_per_s"]
            demand[bucket][tenant] += row["waiting"] + row["running"]
            if row["queue_wait_ms"] is not None:
                waits[(bucket, tenant)].append(row["queue_wait_ms"])
    rates: dict[dt.datetime, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for (bucket, runtime_id), per_tenant in service.items():
        count = samples[(bucket, runtime_id)]
        for tenant, total in per_tenant.items():
            rates[bucket][tenant] += total / count  # the runtime's mean over the step
    points = []
    for bucket in sorted(set(rates) | set(demand)):
        served, asked = rates.get(bucket, {}), demand.get(bucket, {})
        served_total, asked_total = sum(served.values()), sum(asked.values())
        for tenant in sorted(set(served) | set(asked)):
            wait = waits.get((bucket, tenant))
            points.append(FairnessPoint(
                at=bucket, value=tenant,
                service_share=served.get(tenant, 0.0) / served_total if served_total > 0 else None,
                demand_share=asked.get(tenant, 0) / asked_total if asked_total > 0 else None,
                tokens_per_s=served.get(tenant, 0.0),
                queue_wait_ms=sum(wait) / len(wait) if wait else None,
            ))
    return points
