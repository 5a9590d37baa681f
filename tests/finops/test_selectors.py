"""The dashboard selectors: rollups for whole buckets plus the raw tail, so nothing is missed or
counted twice.

Raw events are written straight to the database; a past rollup run is simulated here (``roll_up``
sums the events received up to a watermark into minute, hour and day rows and sets the
``requests`` FillState), so these tests pin the selectors' contract independently of the rollup
service.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
import random
import uuid
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from finops.runtimes.models import Runtime
from finops.telemetry import sketch
from finops.telemetry.capacity import idle_capacity, runtime_gauges
from finops.telemetry.latency import latency_percentiles, latency_series, latency_summary
from finops.telemetry.models import (
    STATUS_CLASSES,
    Device,
    DeviceSample,
    FillState,
    MarginalRollup,
    RequestEvent,
    Rollup,
    RuntimeSample,
)
from finops.telemetry.partitioning import ensure_partitions
from finops.telemetry.ranges import Filters, Tile, rollup_plan
from finops.telemetry.rollups import rollup_run
from finops.telemetry.sample_rollups import sample_rollup_run
from finops.telemetry.tail import tail_snapshot
from finops.telemetry.usage import Measures, dimension_values, spend_series, usage_by, usage_series, usage_totals
from tests.finops.factories import price_book

pytestmark = pytest.mark.django_db

UTC = dt.UTC
TODAY = timezone.now().astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
SECOND = dt.timedelta(seconds=1)
MINUTE = dt.timedelta(minutes=1)
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)


# -- building data --------------------------------------------------------------------------------


def event(started_at: dt.datetime, **fields: Any) -> RequestEvent:
    """A request event with every field set; ``fields`` override the defaults."""
    status = fields.pop("status", "ok")
    e2e_ms = fields.pop("e2e_ms", 250.0)
    ttft_ms = fields.pop("ttft_ms", 40.0)
    values: dict[str, Any] = {
        "event_id": uuid.uuid4(),
        "runtime_id": "gpu-1",
        "started_at": started_at,
        "finished_at": started_at + dt.timedelta(milliseconds=e2e_ms),
        "received_at": started_at + 2 * SECOND,
        "tenant": "acme",
        "feature": "chat",
        "end_user": None,
        "api_key_id": "key-1",
        "model_requested": "smollm2",
        "model_served": "smollm2",
        "route_reason": "requested",
        "rule_id": None,
        "priority": "standard",
        "status": status,
        "status_class": STATUS_CLASSES[status],
        "http_status": 200 if status == "ok" else 429,
        "error_type": None,
        "prompt_tokens": 100,
        "completion_tokens": 50,
        "cache_hit": False,
        "queue_wait_ms": 5.0,
        "ttft_ms": ttft_ms,
        "e2e_ms": e2e_ms,
        "tpot_ms": 4.0,
        "queue_depth_at_admit": 1,
        "mean_batch_size": 2.0,
        "gpu_seconds": 0.2,
        "energy_joules": 60.0,
        "device": "GPU-aaa",
        "price_book_id": None,
        "list_cost": Decimal("0.000030000000"),
        "hardware_cost": Decimal("0.000200000000"),
        "e2e_bucket": sketch.bucket_index(e2e_ms),
        "ttft_bucket": sketch.bucket_index(ttft_ms),
    }
    values.update(fields)
    return RequestEvent(**values)


def store(events: Iterable[RequestEvent]) -> list[RequestEvent]:
    events = list(events)
    ensure_partitions({e.started_at.date() for e in events})
    return RequestEvent.objects.bulk_create(events)


def floor(moment: dt.datetime, granularity: str) -> dt.datetime:
    moment = moment.replace(second=0, microsecond=0)
    if granularity in ("hour", "day"):
        moment = moment.replace(minute=0)
    if granularity == "day":
        moment = moment.replace(hour=0)
    return moment


def roll_up(events: Iterable[RequestEvent], *, watermark: dt.datetime) -> None:
    """What a finished rollup run leaves behind: every event received up to ``watermark`` summed
    into minute, hour and day rows — per (tenant, feature, model, status class) in ``Rollup``, and
    per one dimension or none in ``MarginalRollup`` — and the FillState at the watermark."""
    rows: dict[tuple[Any, ...], Rollup | MarginalRollup] = {}
    for e in events:
        if e.received_at > watermark:
            continue
        model = e.model_served or ""
        for granularity in ("minute", "hour", "day"):
            bucket = floor(e.started_at, granularity)
            groups: list[tuple[type[Rollup | MarginalRollup], dict[str, str]]] = [
                (Rollup, {"tenant": e.tenant, "feature": e.feature, "model": model}),
                (MarginalRollup, {"dimension": "", "value": ""}),
                (MarginalRollup, {"dimension": "tenant", "value": e.tenant}),
                (MarginalRollup, {"dimension": "feature", "value": e.feature}),
                (MarginalRollup, {"dimension": "model", "value": model}),
            ]
            for table, group in groups:
                key = (table, granularity, bucket, *group.values(), e.status_class)
                row = rows.get(key)
                if row is None:
                    row = rows[key] = table(granularity=granularity, bucket=bucket, status_class=e.status_class,
                                            e2e_hist={}, ttft_hist={}, list_cost=Decimal(0),
                                            hardware_cost=Decimal(0), **group)
                add_event(row, e)
    Rollup.objects.bulk_create(row for row in rows.values() if isinstance(row, Rollup))
    MarginalRollup.objects.bulk_create(row for row in rows.values() if isinstance(row, MarginalRollup))
    FillState.objects.update_or_create(name="requests", defaults={"watermark": watermark})


def add_event(row: Rollup | MarginalRollup, e: RequestEvent) -> None:
    row.requests += 1
    row.prompt_tokens += e.prompt_tokens
    row.completion_tokens += e.completion_tokens
    row.cache_hits += e.cache_hit
    row.saved_tokens += (e.prompt_tokens + e.completion_tokens) if e.cache_hit else 0
    row.gpu_seconds += e.gpu_seconds or 0.0
    if e.energy_joules is not None:
        row.energy_joules += e.energy_joules
        row.energy_measured += 1
    if e.list_cost is None:
        row.unpriced += 1
    row.list_cost += e.list_cost or 0
    row.hardware_cost += e.hardware_cost or 0
    row.saved_cost += e.saved_cost or 0
    if e.queue_wait_ms is not None:
        row.queue_waits += 1
        row.queue_wait_ms_sum += e.queue_wait_ms
        row.queue_wait_ms_max = max(row.queue_wait_ms_max or 0.0, e.queue_wait_ms)
    if e.status in ("rejected_rule", "rejected_budget", "shed"):
        setattr(row, e.status, getattr(row, e.status) + 1)
    for hist, index in ((row.e2e_hist, e.e2e_bucket), (row.ttft_hist, e.ttft_bucket)):
        if index is not None:
            hist[str(index)] = hist.get(str(index), 0) + 1


def expected(events: Iterable[RequestEvent], filters: Filters) -> dict[str, Any]:
    """The measures computed straight from raw events."""
    chosen = [
        e for e in events
        if filters.start <= e.started_at < filters.end
        and (not filters.tenants or e.tenant in filters.tenants)
        and (not filters.features or e.feature in filters.features)
        and (not filters.models or (e.model_served or "") in filters.models)
    ]
    measured = [e.energy_joules for e in chosen if e.energy_joules is not None]
    waits = [e.queue_wait_ms for e in chosen if e.queue_wait_ms is not None]
    return {
        "requests": len(chosen),
        "ok": sum(e.status_class == "ok" for e in chosen),
        "errors": sum(e.status_class == "error" for e in chosen),
        "rejections": sum(e.status_class == "rejected" for e in chosen),
        "cancelled": sum(e.status_class == "cancelled" for e in chosen),
        "prompt_tokens": sum(e.prompt_tokens for e in chosen),
        "completion_tokens": sum(e.completion_tokens for e in chosen),
        "cache_hits": sum(e.cache_hit for e in chosen),
        "saved_tokens": sum(e.prompt_tokens + e.completion_tokens for e in chosen if e.cache_hit),
        "gpu_seconds": pytest.approx(sum(e.gpu_seconds or 0.0 for e in chosen)),
        "energy_joules": pytest.approx(sum(measured)) if measured else None,
        "list_cost": sum((e.list_cost for e in chosen if e.list_cost is not None), Decimal(0)),
        "hardware_cost": sum((e.hardware_cost for e in chosen if e.hardware_cost is not None), Decimal(0)),
        "saved_cost": sum((e.saved_cost for e in chosen if e.saved_cost is not None), Decimal(0)),
        "unpriced": sum(e.list_cost is None for e in chosen),
        "queue_wait_ms_mean": pytest.approx(sum(waits) / len(waits)) if waits else None,
        "queue_wait_ms_max": max(waits, default=None),
        **{status: sum(e.status == status for e in chosen) for status in ("rejected_rule", "rejected_budget", "shed")},
    }


def measured(measures: Measures) -> dict[str, Any]:
    return {name: getattr(measures, name) for name in (
        "requests", "ok", "errors", "rejections", "cancelled", "prompt_tokens", "completion_tokens",
        "cache_hits", "saved_tokens", "gpu_seconds", "energy_joules", "list_cost", "hardware_cost", "saved_cost",
        "unpriced", "queue_wait_ms_mean", "queue_wait_ms_max", "rejected_rule", "rejected_budget", "shed")}


STATUSES = ["ok"] * 8 + ["error", "timeout", "cancelled", "rejected_rule", "rejected_budget", "shed"]


def traffic(rng: random.Random, *, start: dt.datetime, end: dt.datetime, count: int,
            late_after: dt.datetime, late_share: float = 0.2) -> list[RequestEvent]:
    """Mixed traffic started in [start, end): tenants, features, models, statuses, cache hits,
    unpriced and unmeasured requests; ``late_share`` of it is received after ``late_after``."""
    span = (end - start).total_seconds()
    events = []
    for _ in range(count):
        started = start + dt.timedelta(seconds=rng.uniform(0, span))
        status = rng.choice(STATUSES)
        rejected = STATUS_CLASSES[status] == "rejected"
        model = None if rejected else rng.choice(["smollm2", "smollm2", "llama-8b"])
        measured_energy = rng.random() < 0.7
        priced = rng.random() < 0.9
        late = rng.random() < late_share
        hit = not rejected and rng.random() < 0.15
        price = Decimal(rng.randint(0, 10**7)) / 10**12 if priced else None
        events.append(event(
            started,
            status=status,
            tenant=rng.choice(["acme", "globex", "initech"]),
            feature=rng.choice(["chat", "search", "summaries"]),
            model_served=model,
            prompt_tokens=rng.randint(0 if rejected else 1, 2000),
            completion_tokens=0 if rejected else rng.randint(0, 500),
            cache_hit=hit,
            queue_wait_ms=None if rejected or hit else round(rng.uniform(0, 500), 3),
            e2e_ms=rng.lognormvariate(5, 1.2),
            ttft_ms=None if rejected else rng.lognormvariate(3.5, 1),
            gpu_seconds=None if rejected else round(rng.uniform(0.01, 3), 6),
            energy_joules=round(rng.uniform(1, 900), 3) if measured_energy and not rejected else None,
            list_cost=Decimal(0) if hit and priced else price,
            saved_cost=price if hit else None,
            hardware_cost=Decimal(rng.randint(0, 10**7)) / 10**12 if priced and not rejected else None,
            received_at=(late_after + dt.timedelta(seconds=rng.uniform(1, 600)) if late
                         else started + dt.timedelta(seconds=rng.uniform(0.1, 5))),
        ))
    return events


@pytest.fixture
def history() -> list[RequestEvent]:
    """About a thousand requests over three days ending yesterday, rolled up to a watermark an hour
    ago; a fifth of them arrived late (after the watermark) and are only in the raw tail."""
    rng = random.Random(20261123)
    watermark = timezone.now() - HOUR
    events = store(traffic(rng, start=TODAY - 3 * DAY + 20 * HOUR, end=TODAY - DAY + 5 * HOUR, count=1000,
                           late_after=watermark))
    roll_up(events, watermark=watermark)
    return events


# A range with ragged edges: 22:17 two days before yesterday to 03:42 yesterday (UTC).
RAGGED = Filters(start=TODAY - 3 * DAY + dt.timedelta(hours=22, minutes=17),
                 end=TODAY - DAY + dt.timedelta(hours=3, minutes=42))


# -- filters and the plan -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        (dt.datetime(2026, 11, 1, 10, 0), dt.datetime(2026, 11, 1, 11, 0), "aware UTC"),
        (dt.datetime(2026, 11, 1, 10, 0, tzinfo=dt.timezone(dt.timedelta(hours=1))),
         dt.datetime(2026, 11, 1, 11, 0, tzinfo=UTC), "aware UTC"),
        (dt.datetime(2026, 11, 1, 10, 0, 30, tzinfo=UTC), dt.datetime(2026, 11, 1, 11, 0, tzinfo=UTC), "whole minute"),
        (dt.datetime(2026, 11, 1, 11, 0, tzinfo=UTC), dt.datetime(2026, 11, 1, 11, 0, tzinfo=UTC), "before end"),
    ],
)
def test_filters_need_a_minute_aligned_utc_range(start: dt.datetime, end: dt.datetime, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Filters(start=start, end=end)


def test_the_plan_reads_whole_days_then_whole_hours_then_minutes() -> None:
    plan = rollup_plan(filters=RAGGED)

    d1, d2 = TODAY - 2 * DAY, TODAY - DAY
    assert plan.start == RAGGED.start and plan.end == RAGGED.end
    assert plan.tiles == (
        Tile("minute", RAGGED.start, d1 - HOUR),
        Tile("hour", d1 - HOUR, d1),
        Tile("day", d1, d2),
        Tile("hour", d2, d2 + 3 * HOUR),
        Tile("minute", d2 + 3 * HOUR, RAGGED.end),
    )


def test_the_plan_inside_one_hour_is_all_minutes_and_an_aligned_day_is_one_day_tile() -> None:
    inside = Filters(start=TODAY - DAY + dt.timedelta(hours=5, minutes=10), end=TODAY - DAY + 5 * HOUR + 50 * MINUTE)
    whole_day = Filters(start=TODAY - DAY, end=TODAY)

    assert rollup_plan(filters=inside).tiles == (Tile("minute", inside.start, inside.end),)
    assert rollup_plan(filters=whole_day).tiles == (Tile("day", TODAY - DAY, TODAY),)
    assert rollup_plan(filters=whole_day, coarsest="hour").tiles == (Tile("hour", TODAY - DAY, TODAY),)


def test_whole_days_are_read_from_day_rollups_not_minute_rows() -> None:
    """Counting a day reads one row per group, not 1,440: a minute row that disagrees with its
    day row shows which one was read."""
    day = TODAY - 2 * DAY
    FillState.objects.create(name="requests", watermark=timezone.now())
    MarginalRollup.objects.create(granularity="day", bucket=day, requests=7, status_class="ok")
    MarginalRollup.objects.create(granularity="minute", bucket=day + 5 * HOUR, requests=1000, status_class="ok")

    assert usage_totals(filters=Filters(start=day, end=day + DAY)).requests == 7
    assert usage_totals(filters=Filters(start=day + 5 * HOUR, end=day + 5 * HOUR + MINUTE)).requests == 1000


def test_expired_minute_edges_widen_the_range_to_whole_hours(settings: Any) -> None:
    settings.MINUTE_ROLLUP_RETENTION_DAYS = 7
    old = Filters(start=TODAY - 10 * DAY + dt.timedelta(hours=9, minutes=17),
                  end=TODAY - 9 * DAY + dt.timedelta(hours=14, minutes=5))
    watermark = timezone.now() - HOUR
    inside = event(old.start + 5 * MINUTE)
    widened_in = event(TODAY - 10 * DAY + 9 * HOUR + 2 * MINUTE)  # before 09:17, in the 09:00 hour
    outside = event(TODAY - 10 * DAY + 8 * HOUR + 59 * MINUTE)
    events = store([inside, widened_in, outside])
    roll_up(events, watermark=watermark)
    for table in (Rollup, MarginalRollup):
        table.objects.filter(granularity="minute").delete()  # what retention does

    plan = rollup_plan(filters=old)
    totals = usage_totals(filters=old)

    assert (plan.start, plan.end) == (TODAY - 10 * DAY + 9 * HOUR, TODAY - 9 * DAY + 15 * HOUR)
    assert all(tile.granularity != "minute" for tile in plan.tiles)
    assert (totals.start, totals.end) == (plan.start, plan.end)
    assert totals.requests == 2


def test_a_recent_range_keeps_its_minute_edges(settings: Any) -> None:
    settings.MINUTE_ROLLUP_RETENTION_DAYS = 7
    plan = rollup_plan(filters=RAGGED)
    assert (plan.start, plan.end) == (RAGGED.start, RAGGED.end)


def test_a_minute_series_past_the_minute_retention_is_refused(settings: Any) -> None:
    settings.MINUTE_ROLLUP_RETENTION_DAYS = 7
    with pytest.raises(ValueError, match="minute detail is kept for 7 days"):
        usage_series(filters=Filters(start=TODAY - 8 * DAY, end=TODAY - 8 * DAY + HOUR), step="minute")


# -- totals: rollups plus tail --------------------------------------------------------------------


def test_totals_equal_direct_sums_over_the_raw_events(history: list[RequestEvent]) -> None:
    assert RequestEvent.objects.filter(received_at__gt=FillState.objects.get().watermark).count() > 100

    totals = usage_totals(filters=RAGGED)

    want = expected(history, RAGGED)
    assert measured(totals) == want
    assert want["saved_cost"] > 0  # cache hits cost nothing and add up what they saved
    assert totals.tokens == want["prompt_tokens"] + want["completion_tokens"]
    assert 0 < want["saved_tokens"] < totals.tokens
    assert totals.spent_tokens == totals.tokens - want["saved_tokens"], "a cache hit's tokens are saved, not spent"
    assert totals.error_rate == pytest.approx(want["errors"] / want["requests"])
    assert totals.rejection_rate == pytest.approx(want["rejections"] / want["requests"])
    assert totals.cache_hit_rate == pytest.approx(want["cache_hits"] / want["requests"])
    assert totals.cost_per_1k_tokens == want["list_cost"] * 1000 / totals.tokens
    assert totals.hardware_cost_per_1k_tokens == want["hardware_cost"] * 1000 / totals.tokens
    assert totals.energy_per_1k_tokens == pytest.approx(totals.energy_joules * 1000 / totals.tokens)


def test_an_event_received_after_the_watermark_is_counted_from_the_tail() -> None:
    now = timezone.now()
    minute = floor(now, "minute") - 10 * MINUTE
    rolled = event(minute + SECOND, received_at=minute + 2 * SECOND)
    roll_up(store([rolled]), watermark=minute + 30 * SECOND)
    just_in = store([event(minute + 5 * SECOND, received_at=now, prompt_tokens=7, completion_tokens=3)])

    totals = usage_totals(filters=Filters(start=minute, end=floor(now, "minute") + MINUTE))

    assert totals.requests == 2
    assert totals.prompt_tokens == 100 + 7
    assert just_in[0].received_at > FillState.objects.get().watermark


def test_nothing_is_counted_twice_where_rollups_and_tail_share_a_minute() -> None:
    minute = floor(timezone.now(), "minute") - 30 * MINUTE
    watermark = minute + 40 * SECOND
    events = store([
        event(minute + 1 * SECOND, received_at=minute + 10 * SECOND),  # rolled up
        event(minute + 2 * SECOND, received_at=minute + 20 * SECOND),  # rolled up
        event(minute + 3 * SECOND, received_at=minute + 50 * SECOND),  # after the watermark: tail
        event(minute - 5 * SECOND, received_at=minute + 55 * SECOND),  # late, previous minute: tail
    ])
    roll_up(events, watermark=watermark)

    this_minute = usage_totals(filters=Filters(start=minute, end=minute + MINUTE))
    both = usage_totals(filters=Filters(start=minute - MINUTE, end=minute + MINUTE))

    assert Rollup.objects.get(granularity="minute", bucket=minute).requests == 2
    assert this_minute.requests == 3
    assert both.requests == 4
    assert latency_percentiles(filters=Filters(start=minute, end=minute + MINUTE), quantiles=[0.5])[0.5] == \
        pytest.approx(250.0, rel=0.02)


def test_a_rollup_run_that_commits_mid_read_is_not_counted_twice() -> None:
    """The rollup rows and the watermark must describe the same moment: a run that lands between
    reading one and the other would otherwise count its events in both rollups and tail."""
    minute = floor(timezone.now(), "minute") - 30 * MINUTE
    events = store([event(minute + SECOND, received_at=minute + 2 * SECOND),
                    event(minute + 3 * SECOND, received_at=minute + 50 * SECOND)])
    roll_up(events[:1], watermark=minute + 10 * SECOND)
    landed: list[bool] = []

    def next_run_lands_now(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        if not landed and "rollup" in sql and "SUM(" in sql:
            landed.append(True)
            Rollup.objects.all().delete()
            MarginalRollup.objects.all().delete()
            roll_up(events, watermark=minute + 55 * SECOND)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(next_run_lands_now):
        totals = usage_totals(filters=Filters(start=minute, end=minute + MINUTE))

    assert landed
    assert totals.requests == 2


def test_without_a_fill_state_everything_is_the_tail() -> None:
    start = floor(timezone.now(), "hour") - 2 * HOUR
    events = store([event(start + i * 7 * MINUTE) for i in range(10)])

    totals = usage_totals(filters=Filters(start=start, end=start + 3 * HOUR))

    assert not FillState.objects.exists()
    assert totals.requests == len(events) == 10


def test_an_empty_range_has_zero_counts_and_no_rates() -> None:
    totals = usage_totals(filters=Filters(start=TODAY - DAY, end=TODAY))
    assert (totals.requests, totals.list_cost, totals.gpu_seconds) == (0, Decimal(0), 0.0)
    assert (totals.error_rate, totals.cache_hit_rate, totals.cost_per_1k_tokens, totals.energy_joules) == (
        None, None, None, None)


def test_unmeasured_energy_stays_none_not_zero() -> None:
    start = floor(timezone.now(), "hour") - 3 * HOUR
    watermark = timezone.now() - HOUR
    events = store([event(start + i * MINUTE, energy_joules=None, device="cpu", runtime_id="cpu-1",
                          received_at=start + i * MINUTE + SECOND if i < 3 else timezone.now())
                    for i in range(5)])
    roll_up(events, watermark=watermark)  # three rolled up, two in the tail

    totals = usage_totals(filters=Filters(start=start, end=start + HOUR))
    (row,) = usage_by(filters=Filters(start=start, end=start + HOUR), dimension="tenant")
    points = usage_series(filters=Filters(start=start, end=start + HOUR), step="hour")

    assert totals.requests == 5
    assert totals.energy_joules is None and totals.energy_per_1k_tokens is None
    assert row.energy_joules is None
    assert [p.energy_joules for p in points] == [None]


def test_energy_measured_for_some_requests_sums_only_those() -> None:
    start = floor(timezone.now(), "hour") - 3 * HOUR
    store([event(start, energy_joules=None), event(start + MINUTE, energy_joules=0.0),
           event(start + 2 * MINUTE, energy_joules=12.5)])
    assert usage_totals(filters=Filters(start=start, end=start + HOUR)).energy_joules == 12.5


# -- filters and breakdowns -----------------------------------------------------------------------

FILTER_CASES = [
    {"tenants": ("acme",)},
    {"features": ("search", "summaries")},
    {"models": ("llama-8b",)},
    {"models": ("",)},  # requests no model served (rejections)
    {"tenants": ("globex", "initech"), "features": ("chat",)},
    {"tenants": ("acme",), "features": ("search",), "models": ("smollm2", "")},
    {"tenants": ("nobody",)},
]


@pytest.mark.parametrize("chosen", FILTER_CASES, ids=lambda c: ",".join(f"{k}={'|'.join(v)}" for k, v in c.items()))
def test_filters_by_tenant_feature_and_model_match_the_raw_events(
    history: list[RequestEvent], chosen: dict[str, tuple[str, ...]]
) -> None:
    filters = Filters(start=RAGGED.start, end=RAGGED.end, **chosen)
    assert measured(usage_totals(filters=filters)) == expected(history, filters)


@pytest.mark.parametrize("dimension", ["tenant", "feature", "model"])
def test_usage_by_a_dimension_gives_each_value_its_own_sums_highest_list_cost_first(
    history: list[RequestEvent], dimension: str
) -> None:
    rows = usage_by(filters=RAGGED, dimension=dimension)

    values = sorted({(getattr(e, "model_served" if dimension == "model" else dimension) or "") for e in history})
    assert sorted(row.value for row in rows) == values
    for row in rows:
        only = Filters(start=RAGGED.start, end=RAGGED.end, **{f"{dimension}s": (row.value,)})
        assert measured(row) == expected(history, only), row.value
        assert row.dimension == dimension
    assert [row.list_cost for row in rows] == sorted((row.list_cost for row in rows), reverse=True)
    assert sum(row.requests for row in rows) == usage_totals(filters=RAGGED).requests


def test_usage_by_respects_the_other_filters(history: list[RequestEvent]) -> None:
    filters = Filters(start=RAGGED.start, end=RAGGED.end, tenants=("acme",))
    rows = usage_by(filters=filters, dimension="feature")
    assert sum(row.requests for row in rows) == expected(history, filters)["requests"]


def test_an_unknown_dimension_is_refused() -> None:
    with pytest.raises(ValueError, match="dimension must be one of"):
        usage_by(filters=RAGGED, dimension="colour")  # type: ignore[arg-type]


def test_dimension_values_lists_what_was_seen_in_rollups_and_tail(history: list[RequestEvent]) -> None:
    tenants = dimension_values(filters=RAGGED, dimension="tenant")
    models = dimension_values(filters=RAGGED, dimension="model")
    assert tenants == ["acme", "globex", "initech"]
    assert models == ["", "llama-8b", "smollm2"]


# -- series ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", ["minute", "hour", "day"])
def test_series_points_add_up_to_the_totals(history: list[RequestEvent], step: str) -> None:
    points = usage_series(filters=RAGGED, step=step)
    totals = usage_totals(filters=RAGGED)

    assert sum(p.requests for p in points) == totals.requests
    assert sum(p.tokens for p in points) == totals.tokens
    assert sum((p.list_cost for p in points), Decimal(0)) == totals.list_cost
    assert sum((p.hardware_cost for p in points), Decimal(0)) == totals.hardware_cost
    assert sum(p.errors for p in points) == totals.errors


def test_a_series_has_every_step_in_order_with_zeros_where_nothing_happened(history: list[RequestEvent]) -> None:
    points = usage_series(filters=RAGGED, step="hour")

    ats = [p.at for p in points]
    assert ats[0] == floor(RAGGED.start, "hour") and ats[-1] == floor(RAGGED.end - MINUTE, "hour")
    assert all(b - a == HOUR for a, b in itertools.pairwise(ats))
    for p in points:  # each hour, clipped to the range, equals the raw events in it
        clip = Filters(start=max(p.at, RAGGED.start), end=min(p.at + HOUR, RAGGED.end))
        assert p.requests == expected(history, clip)["requests"], p.at


def test_a_series_split_by_a_dimension_sums_to_each_values_total(history: list[RequestEvent]) -> None:
    points = usage_series(filters=RAGGED, step="day", dimension="tenant")

    by_value: dict[str | None, int] = {}
    for p in points:
        by_value[p.value] = by_value.get(p.value, 0) + p.requests
    assert by_value == {row.value: row.requests for row in usage_by(filters=RAGGED, dimension="tenant")}
    assert len(points) == 3 * 3  # three days touched, three tenants, every combination present


def test_a_series_includes_requests_still_in_the_tail() -> None:
    start = floor(timezone.now(), "hour") - HOUR
    roll_up(store([event(start + MINUTE)]), watermark=start + 30 * MINUTE)
    store([event(start + 2 * MINUTE, received_at=start + 45 * MINUTE), event(start + 61 * MINUTE,
                                                                              received_at=timezone.now())])

    points = usage_series(filters=Filters(start=start, end=start + 2 * HOUR), step="hour")

    assert [(p.at, p.requests) for p in points] == [(start, 2), (start + HOUR, 1)]


def test_a_spend_series_is_what_the_split_usage_series_says_of_spend_and_requests(
    history: list[RequestEvent]
) -> None:
    spend = spend_series(filters=RAGGED, step="hour", dimension="feature")

    split = usage_series(filters=RAGGED, step="hour", dimension="feature")
    assert [(p.at, p.value, p.requests, p.list_cost) for p in spend] == [
        (p.at, p.value, p.requests, p.list_cost) for p in split]
    assert sum(p.requests for p in spend) == usage_totals(filters=RAGGED).requests


# -- one tail read per page -----------------------------------------------------------------------


def test_inside_a_tail_snapshot_selectors_answer_as_they_do_outside_one(history: list[RequestEvent]) -> None:
    def everything() -> tuple[Any, ...]:
        return (usage_totals(filters=RAGGED), usage_by(filters=RAGGED, dimension="tenant"),
                usage_series(filters=RAGGED, step="hour", dimension="model"),
                latency_series(filters=RAGGED, step="hour"), dimension_values(filters=RAGGED, dimension="model"))

    outside = everything()
    with tail_snapshot():
        inside = everything()

    assert inside == outside


def test_a_snapshot_narrows_tail_queries_to_the_days_the_tail_started_in() -> None:
    now = timezone.now()
    old, recent = floor(now, "day") - 10 * DAY, floor(now, "minute") - 5 * MINUTE
    events = store([event(old + HOUR, received_at=old + HOUR + SECOND),
                    event(recent, received_at=recent + SECOND)])
    roll_up(events[:1], watermark=old + 2 * HOUR)
    month = Filters(start=floor(now, "day") - 20 * DAY, end=floor(now, "minute") + MINUTE)

    with tail_snapshot() as snapshot, CaptureQueriesContext(connection) as queries:
        totals = usage_totals(filters=month)

    assert (snapshot.first, snapshot.last) == (recent, recent)
    assert totals.requests == 2
    tail_sql = [q["sql"] for q in queries.captured_queries if "telemetry_requestevent" in q["sql"]]
    assert len(tail_sql) == 1


def test_with_an_empty_tail_no_selector_reads_raw_events(history: list[RequestEvent]) -> None:
    Rollup.objects.all().delete()
    MarginalRollup.objects.all().delete()
    roll_up(history, watermark=timezone.now())  # a run that caught up with everything
    outside = usage_totals(filters=RAGGED), latency_percentiles(filters=RAGGED)

    with tail_snapshot(), CaptureQueriesContext(connection) as queries:
        inside = (usage_totals(filters=RAGGED), latency_percentiles(filters=RAGGED))
        usage_by(filters=RAGGED, dimension="tenant"), dimension_values(filters=RAGGED, dimension="model")

    assert inside == outside
    assert not [q["sql"] for q in queries.captured_queries if "telemetry_requestevent" in q["sql"]]


def test_events_a_rollup_run_counts_after_the_snapshot_are_not_counted_twice() -> None:
    minute = floor(timezone.now(), "minute") - 30 * MINUTE
    events = store([event(minute + SECOND, received_at=minute + 2 * SECOND),
                    event(minute + 3 * SECOND, received_at=minute + 50 * SECOND)])
    roll_up(events[:1], watermark=minute + 10 * SECOND)
    filters = Filters(start=minute, end=minute + MINUTE)

    with tail_snapshot() as snapshot:
        Rollup.objects.all().delete()
        MarginalRollup.objects.all().delete()
        roll_up(events, watermark=minute + 55 * SECOND)  # the next run lands while the page renders
        totals = usage_totals(filters=filters)

    assert snapshot.first == snapshot.last == minute + 3 * SECOND  # the second event was still raw
    assert totals.requests == 2


# -- latency --------------------------------------------------------------------------------------


def exact_quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[math.floor(q * (len(ordered) - 1))]


@pytest.mark.parametrize("metric", ["e2e", "ttft"])
def test_percentiles_are_within_two_percent_of_the_exact_ones(history: list[RequestEvent], metric: str) -> None:
    quantiles = (0.5, 0.9, 0.95, 0.99)
    result = latency_percentiles(filters=RAGGED, metric=metric, quantiles=quantiles)

    values = [getattr(e, f"{metric}_ms") for e in history if RAGGED.start <= e.started_at < RAGGED.end]
    values = [v for v in values if v is not None]
    for q in quantiles:
        exact = exact_quantile(values, q)
        assert result[q] == pytest.approx(exact, rel=sketch.ALPHA + 1e-9), q


def test_percentiles_with_filters_and_of_nothing(history: list[RequestEvent]) -> None:
    filters = Filters(start=RAGGED.start, end=RAGGED.end, tenants=("globex",), features=("search",))
    values = [e.e2e_ms for e in history if filters.start <= e.started_at < filters.end
              and e.tenant == "globex" and e.feature == "search"]

    p95 = latency_percentiles(filters=filters, quantiles=[0.95])[0.95]
    nothing = latency_percentiles(filters=Filters(start=RAGGED.start, end=RAGGED.end, models=("",)), metric="ttft")

    assert p95 == pytest.approx(exact_quantile(values, 0.95), rel=sketch.ALPHA + 1e-9)
    assert nothing == {0.5: None, 0.95: None, 0.99: None}


@pytest.mark.parametrize("step", ["hour", "day"])
def test_a_latency_series_gives_each_step_the_percentiles_of_its_own_requests(
    history: list[RequestEvent], step: str
) -> None:
    """Rollups and tail merged per step: each point is what latency_percentiles says over that
    step alone (the range's ragged edges cut the first and last steps)."""
    filters = Filters(start=RAGGED.start, end=RAGGED.end, features=("search",))
    points = latency_series(filters=filters, metric="e2e", step=step, quantiles=(0.5, 0.99))

    length = {"hour": HOUR, "day": DAY}[step]
    assert [p.at for p in points] == [floor(RAGGED.start, step) + i * length for i in range(len(points))]
    assert points[-1].at < RAGGED.end <= points[-1].at + length
    for point in points:
        window = Filters(start=max(point.at, RAGGED.start), end=min(point.at + length, RAGGED.end),
                         features=("search",))
        in_step = [e for e in history if window.start <= e.started_at < window.end and e.feature == "search"]
        assert point.requests == len(in_step)
        assert point.quantiles == latency_percentiles(filters=window, metric="e2e", quantiles=(0.5, 0.99))
    assert sum(p.requests for p in points) > 0


@pytest.mark.parametrize("step", ["hour", "day"])
@pytest.mark.parametrize("metric", ["e2e", "ttft"])
def test_a_latency_summary_is_the_percentiles_and_the_series_from_one_read(
    history: list[RequestEvent], step: str, metric: str
) -> None:
    with CaptureQueriesContext(connection) as queries:
        summary = latency_summary(filters=RAGGED, metric=metric, step=step)

    assert summary.overall == latency_percentiles(filters=RAGGED, metric=metric)
    assert summary.points == latency_series(filters=RAGGED, metric=metric, step=step)
    assert len([q for q in queries.captured_queries if "hist" in q["sql"]]) == 1


def test_tail_events_stored_without_a_bucket_are_bucketed_on_read() -> None:
    start = floor(timezone.now(), "hour") - HOUR
    store([event(start + i * MINUTE, e2e_ms=100.0 * (i + 1), e2e_bucket=None) for i in range(10)])

    median = latency_percentiles(filters=Filters(start=start, end=start + HOUR), quantiles=[0.5])[0.5]

    assert median == pytest.approx(500.0, rel=sketch.ALPHA)


# -- runtimes and idle capacity -------------------------------------------------------------------


def samples(runtime_id: str, start: dt.datetime, minutes: int, every: dt.timedelta = 5 * SECOND,
            **fields: Any) -> list[RuntimeSample]:
    count = int(minutes * MINUTE / every)
    return RuntimeSample.objects.bulk_create(
        RuntimeSample(runtime_id=runtime_id, at=start + i * every, queue_depth=fields.get("queue_depth", i % 4),
                      running=2, tokens_per_s=fields.get("tokens_per_s", 100.0)) for i in range(count))


def device_samples(runtime_id: str, device: str, start: dt.datetime, minutes: int, *, name: str = "NVIDIA H100",
                   every: dt.timedelta = 5 * SECOND, power_w: float = 300.0) -> list[DeviceSample]:
    count = int(minutes * MINUTE / every)
    return DeviceSample.objects.bulk_create(
        DeviceSample(runtime_id=runtime_id, at=start + i * every, device=device, name=name, gpu_util=50.0 + i % 2 * 10,
                     mem_used=1000 + i, mem_total=80_000, power_w=power_w,
                     energy_joules_total=1_000_000.0 + i * every.total_seconds() * power_w, temperature_c=60.0)
        for i in range(count))


def count_if(counted: bool) -> None:
    """With ``counted``, run the request and sample rollups over everything stored so far, so the
    selector reads rollup rows instead of raw rows: both must give the same answer."""
    if counted:
        rollup_run(now=timezone.now() + MINUTE)
        sample_rollup_run(now=timezone.now() + MINUTE)


@pytest.mark.parametrize("counted", [False, True], ids=["raw", "rolled-up"])
def test_idle_capacity_is_paid_time_minus_attributed_time_priced_per_gpu_hour(counted: bool) -> None:
    start = floor(timezone.now(), "hour") - 2 * HOUR
    Device.objects.create(uuid="GPU-aaa", name="NVIDIA H100", runtime_id="gpu-1", last_seen_at=start)
    price_book(effective_from=start - DAY, devices={"NVIDIA H100": ("3.60", "0.10")})
    device_samples("gpu-1", "GPU-aaa", start, minutes=10)
    samples("gpu-1", start, minutes=10)
    store([event(start + i * MINUTE, gpu_seconds=30.0) for i in range(4)]  # 120 s attributed
          + [event(start + MINUTE, gpu_seconds=999.0, device="GPU-other")]  # another device
          + [event(start + 30 * MINUTE, gpu_seconds=999.0)])  # outside the range

    count_if(counted)
    (gpu,) = idle_capacity(start=start, end=start + 20 * MINUTE)

    assert (gpu.runtime_id, gpu.device, gpu.device_type) == ("gpu-1", "GPU-aaa", "NVIDIA H100")
    assert gpu.paid_seconds == 600.0
    assert gpu.attributed_seconds == pytest.approx(120.0)
    assert gpu.idle_seconds == pytest.approx(480.0)
    assert gpu.idle_fraction == pytest.approx(0.8)
    assert gpu.idle_cost == pytest.approx(Decimal("0.48"))


@pytest.mark.parametrize("counted", [False, True], ids=["raw", "rolled-up"])
def test_idle_is_never_negative_and_uses_the_wildcard_price(counted: bool) -> None:
    start = floor(timezone.now(), "hour") - 2 * HOUR
    price_book(effective_from=start - DAY, devices={"*": ("2.00", "0.10")})
    device_samples("gpu-1", "GPU-aaa", start, minutes=1, name="NVIDIA L4")
    store([event(start + SECOND, gpu_seconds=100.0)])

    count_if(counted)
    (gpu,) = idle_capacity(start=start, end=start + HOUR)

    assert gpu.device_type == "NVIDIA L4"
    assert (gpu.paid_seconds, gpu.idle_seconds, gpu.idle_cost) == (60.0, 0.0, Decimal(0))


@pytest.mark.parametrize("counted", [False, True], ids=["raw", "rolled-up"])
def test_a_gap_in_the_samples_is_not_paid_time(counted: bool) -> None:
    start = floor(timezone.now(), "hour") - 2 * HOUR
    device_samples("gpu-1", "GPU-aaa", start, minutes=5)
    device_samples("gpu-1", "GPU-aaa", start + 30 * MINUTE, minutes=5)

    count_if(counted)
    (gpu,) = idle_capacity(start=start, end=start + HOUR)

    assert gpu.paid_seconds == 600.0
    assert gpu.idle_cost is None  # no price book at all


@pytest.mark.parametrize("counted", [False, True], ids=["raw", "rolled-up"])
def test_a_cpu_runtime_is_paid_for_the_minutes_its_runtime_samples_cover(counted: bool) -> None:
    start = floor(timezone.now(), "hour") - 2 * HOUR
    price_book(effective_from=start - DAY, devices={"cpu": ("0.36", "0.10")})
    samples("cpu-1", start, minutes=3)
    store([event(start + SECOND, runtime_id="cpu-1", device="cpu", gpu_seconds=18.0, energy_joules=None)])

    count_if(counted)
    (cpu,) = idle_capacity(start=start, end=start + HOUR)

    assert (cpu.runtime_id, cpu.device, cpu.device_type) == ("cpu-1", "cpu", "cpu")
    assert (cpu.paid_seconds, cpu.attributed_seconds, cpu.idle_seconds) == (180.0, 18.0, 162.0)
    assert cpu.idle_cost == pytest.approx(Decimal("0.0162"))


@pytest.mark.parametrize("counted", [False, True], ids=["raw", "rolled-up"])
def test_idle_cost_follows_the_price_book_in_force_at_each_minute(counted: bool) -> None:
    start = floor(timezone.now(), "hour") - 2 * HOUR
    price_book(effective_from=start - DAY, devices={"NVIDIA H100": ("3.60", "0.10")})
    price_book(effective_from=start + 5 * MINUTE, devices={"NVIDIA H100": ("7.20", "0.10")})
    device_samples("gpu-1", "GPU-aaa", start, minutes=10)

    count_if(counted)
    (gpu,) = idle_capacity(start=start, end=start + HOUR)

    # 300 s at $3.60/h and 300 s at $7.20/h
    assert gpu.idle_seconds == 600.0
    assert gpu.idle_cost == pytest.approx(Decimal("0.90"))


def test_a_minute_partly_rolled_up_and_partly_raw_is_paid_once(settings: Any) -> None:
    start = floor(timezone.now(), "hour") - 2 * HOUR
    rows = device_samples("gpu-1", "GPU-aaa", start, minutes=10)
    for row in rows:  # each received a second after it was taken
        DeviceSample.objects.filter(pk=row.pk).update(received_at=row.at + SECOND)
    store([event(start + i * MINUTE, gpu_seconds=6.0) for i in range(10)])
    halfway = start + dt.timedelta(minutes=4, seconds=30)  # minute 4 is half counted
    settle = dt.timedelta(seconds=settings.ROLLUP_SETTLE_SECONDS)
    sample_rollup_run(now=halfway + settle)
    rollup_run(now=halfway + settle)

    (gpu,) = idle_capacity(start=start, end=start + HOUR)

    assert FillState.objects.get(name="samples").watermark == halfway
    assert gpu.paid_seconds == 600.0
    assert gpu.attributed_seconds == pytest.approx(60.0)


@pytest.mark.parametrize("counted", [False, True], ids=["raw", "rolled-up"])
def test_runtime_gauges_summarise_samples_and_leave_unmeasured_figures_empty(counted: bool) -> None:
    start = floor(timezone.now(), "hour") - 2 * HOUR
    Runtime.objects.create(name="idle-1", base_url="http://idle-1:8080")
    samples("gpu-1", start, minutes=2, tokens_per_s=120.0)  # queue depths cycle 0..3
    samples("cpu-1", start, minutes=2, queue_depth=1, tokens_per_s=20.0)
    device_samples("gpu-1", "GPU-aaa", start, minutes=2, power_w=300.0)
    device_samples("gpu-1", "GPU-bbb", start, minutes=2, power_w=200.0)

    count_if(counted)
    gauges = {g.runtime_id: g for g in runtime_gauges(start=start, end=start + HOUR)}

    gpu, cpu, idle = gauges["gpu-1"], gauges["cpu-1"], gauges["idle-1"]
    assert gpu.samples == 24 and gpu.queue_depth_max == 3 and gpu.queue_depth_avg == pytest.approx(1.5)
    assert gpu.tokens_per_s_avg == pytest.approx(120.0)
    assert gpu.gpu_util_avg == pytest.approx(55.0)
    assert gpu.power_avg_w == pytest.approx(500.0)
    # each counter grows power x 5 s per sample over 23 intervals
    assert gpu.energy_joules == pytest.approx(23 * 5 * 300.0 + 23 * 5 * 200.0)
    assert [d.device for d in gpu.devices] == ["GPU-aaa", "GPU-bbb"]
    assert (cpu.gpu_util_avg, cpu.power_avg_w, cpu.energy_joules, cpu.devices) == (None, None, None, ())
    assert cpu.queue_depth_avg == 1.0
    assert (idle.samples, idle.queue_depth_avg, idle.last_sample_at) == (0, None, None)
