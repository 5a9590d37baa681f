"""Rollups count every event exactly once: re-run, raced, late, and summed at every granularity.

The helpers here (``event``, ``store``, ``raw_totals``, ``rollup_totals``) build raw events the way
ingest stores them and compute what the rollups must hold straight from the raw table; the
retention and pricing tests use them too.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import math
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection, transaction
from django.test import override_settings
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finops.telemetry import sketch
from finops.telemetry.models import STATUS_CLASSES, FillState, Granularity, MarginalRollup, RequestEvent, Rollup
from finops.telemetry.partitioning import ensure_partitions
from finops.telemetry.rollups import FILL_STATE, rollup_run

T0 = dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.UTC)
SECOND = dt.timedelta(seconds=1)
COUNTS = ("requests", "prompt_tokens", "completion_tokens", "cache_hits", "energy_measured", "unpriced", "queue_waits",
          "rejected_rule", "rejected_budget", "shed", "queue_wait_ms_max")
COSTS = ("list_cost", "hardware_cost", "saved_cost")


def event(**fields: Any) -> RequestEvent:
    """A raw event as ingest stores it (sketch buckets and status class derived), unsaved."""
    started = fields.pop("started_at", T0)
    status = fields.pop("status", "ok")
    e2e = fields.pop("e2e_ms", 120.0)
    ttft = fields.pop("ttft_ms", 30.0)
    values: dict[str, Any] = {
        "event_id": uuid.uuid4(), "runtime_id": "rt-1", "started_at": started,
        "finished_at": started + dt.timedelta(milliseconds=e2e), "received_at": started + 2 * SECOND,
        "tenant": "acme", "feature": "chat", "api_key_id": "key-1", "model_requested": "smollm2",
        "model_served": "smollm2", "route_reason": "requested", "priority": "normal", "status": status,
        "status_class": STATUS_CLASSES[status], "http_status": 200 if status == "ok" else 429,
        "prompt_tokens": 10, "completion_tokens": 20, "e2e_ms": e2e, "ttft_ms": ttft,
        "e2e_bucket": sketch.bucket_index(e2e), "ttft_bucket": sketch.bucket_index(ttft),
        "gpu_seconds": 0.25, "energy_joules": None, "device": "cpu",
        "list_cost": Decimal("0.000009"), "hardware_cost": Decimal("0.000001"),
    }
    values.update(fields)
    return RequestEvent(**values)


def store(*events: RequestEvent) -> list[RequestEvent]:
    """Insert events in one statement, creating the day partitions they need (PostgreSQL)."""
    ensure_partitions({e.started_at.astimezone(dt.UTC).date() for e in events})
    return RequestEvent.objects.bulk_create(events)


def bucket_of(moment: dt.datetime, granularity: str) -> dt.datetime:
    moment = moment.astimezone(dt.UTC).replace(second=0, microsecond=0)
    if granularity != Granularity.MINUTE:
        moment = moment.replace(minute=0)
    if granularity == Granularity.DAY:
        moment = moment.replace(hour=0)
    return moment


def raw_totals(granularity: str, events: list[RequestEvent] | None = None, *,
               marginal: bool = False) -> dict[tuple, dict[str, Any]]:
    """What every Rollup row of a granularity must hold, summed in Python from raw events; with
    ``marginal``, every MarginalRollup row (keyed by bucket, dimension, value, status class)."""
    totals: dict[tuple, dict[str, Any]] = defaultdict(
        lambda: {**dict.fromkeys(COUNTS, 0), "queue_wait_ms_max": None, "queue_wait_ms_sum": 0.0,
                 "gpu_seconds": 0.0, "energy_joules": 0.0,
                 **dict.fromkeys(COSTS, Decimal(0)), "e2e_hist": {}, "ttft_hist": {}})
    for e in RequestEvent.objects.all() if events is None else events:
        bucket, model = bucket_of(e.started_at, granularity), e.model_served or ""
        if marginal:
            keys = [(bucket, "", "", e.status_class), (bucket, "tenant", e.tenant, e.status_class),
                    (bucket, "feature", e.feature, e.status_class), (bucket, "model", model, e.status_class)]
        else:
            keys = [(bucket, e.tenant, e.feature, model, e.status_class)]
        for key in keys:
            add_event(totals[key], e)
    return dict(totals)


def add_event(row: dict[str, Any], e: RequestEvent) -> None:
        row["requests"] += 1
        row["prompt_tokens"] += e.prompt_tokens
        row["completion_tokens"] += e.completion_tokens
        row["cache_hits"] += e.cache_hit
        row["gpu_seconds"] += e.gpu_seconds or 0.0
        row["energy_joules"] += e.energy_joules or 0.0
        row["energy_measured"] += e.energy_joules is not None
        row["list_cost"] += e.list_cost or 0
        row["hardware_cost"] += e.hardware_cost or 0
        row["saved_cost"] += e.saved_cost or 0
        row["unpriced"] += e.list_cost is None
        if e.queue_wait_ms is not None:
            row["queue_waits"] += 1
            row["queue_wait_ms_sum"] += e.queue_wait_ms
            row["queue_wait_ms_max"] = max(row["queue_wait_ms_max"] or 0.0, e.queue_wait_ms)
        if e.status in ("rejected_rule", "rejected_budget", "shed"):
            row[e.status] += 1
        for column, histogram in (("e2e_bucket", "e2e_hist"), ("ttft_bucket", "ttft_hist")):
            if (index := getattr(e, column)) is not None:
                row[histogram][index] = row[histogram].get(index, 0) + 1


def rollup_totals(granularity: str, *, marginal: bool = False) -> dict[tuple, dict[str, Any]]:
    rows = (MarginalRollup if marginal else Rollup).objects.filter(granularity=granularity)
    return {
        ((r.bucket, r.dimension, r.value, r.status_class) if marginal
         else (r.bucket, r.tenant, r.feature, r.model, r.status_class)): {
            **{name: getattr(r, name) for name in (*COUNTS, *COSTS, "gpu_seconds", "energy_joules",
                                                   "queue_wait_ms_sum")},
            "e2e_hist": sketch.merge([r.e2e_hist]), "ttft_hist": sketch.merge([r.ttft_hist]),
        }
        for r in rows
    }


def assert_rollups_match_raw(events: list[RequestEvent] | None = None,
                             granularities: tuple[str, ...] = tuple(Granularity.values)) -> None:
    """Rollup and MarginalRollup rows hold exactly the raw sums (no row missing, none extra)."""
    for granularity, marginal in itertools.product(granularities, (False, True)):
        expected = raw_totals(granularity, events, marginal=marginal)
        actual = rollup_totals(granularity, marginal=marginal)
        assert set(actual) == set(expected), (granularity, marginal)
        for key, row in expected.items():
            got = actual[key]
            assert {n: got[n] for n in (*COUNTS, *COSTS, "e2e_hist", "ttft_hist")} == {
                n: row[n] for n in (*COUNTS, *COSTS, "e2e_hist", "ttft_hist")}, (granularity, key)
            assert got["gpu_seconds"] == pytest.approx(row["gpu_seconds"], rel=1e-9, abs=1e-9)
            assert got["energy_joules"] == pytest.approx(row["energy_joules"], rel=1e-9, abs=1e-9)
            assert got["queue_wait_ms_sum"] == pytest.approx(row["queue_wait_ms_sum"], rel=1e-9, abs=1e-9)


def snapshot() -> list[tuple]:
    detail = Rollup.objects.values_list("id", "granularity", "bucket", "tenant", "feature", "model",
                                        "status_class", *COUNTS, *COSTS, "gpu_seconds", "e2e_hist")
    marginal = MarginalRollup.objects.values_list("id", "granularity", "bucket", "dimension", "value", "value",
                                                  "status_class", *COUNTS, *COSTS, "gpu_seconds", "e2e_hist")
    return sorted(detail) + sorted(marginal)


def watermark() -> dt.datetime:
    return FillState.objects.get(name=FILL_STATE).watermark


# -- counting ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_run_counts_settled_events_per_minute_hour_and_day() -> None:
    store(event(queue_wait_ms=12.0), event(queue_wait_ms=30.0, started_at=T0 + SECOND),
          event(tenant="globex", started_at=T0 + 61 * SECOND, cache_hit=True, energy_joules=3.5),
          event(status="shed", model_served=None, list_cost=None, hardware_cost=None, gpu_seconds=None,
                ttft_ms=None, ttft_bucket=None))
    result = rollup_run(now=T0 + dt.timedelta(minutes=5))

    assert result.events == 4
    assert Rollup.objects.filter(granularity="minute").count() == 3
    rejected = Rollup.objects.get(granularity="day", status_class="rejected")
    assert (rejected.model, rejected.unpriced, rejected.list_cost, rejected.ttft_hist) == ("", 1, 0, {})
    assert (rejected.shed, rejected.rejected_rule, rejected.queue_waits, rejected.queue_wait_ms_max) == (1, 0, 0, None)
    globex = Rollup.objects.get(granularity="minute", tenant="globex")
    assert globex.bucket == T0 + dt.timedelta(minutes=1)
    assert (globex.cache_hits, globex.energy_measured, globex.energy_joules) == (1, 1, 3.5)
    ok_hour = Rollup.objects.get(granularity="hour", tenant="acme", status_class="ok")
    assert (ok_hour.bucket, ok_hour.requests, ok_hour.list_cost) == (T0, 2, Decimal("0.000018"))
    assert (ok_hour.queue_waits, ok_hour.queue_wait_ms_sum, ok_hour.queue_wait_ms_max) == (2, 42.0, 30.0)
    assert ok_hour.e2e_hist == {str(sketch.bucket_index(120.0)): 2}
    assert_rollups_match_raw()


@pytest.mark.django_db
def test_on_postgresql_a_run_adds_to_existing_rows_in_sql(caplog: pytest.LogCaptureFixture) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("the set-based write is PostgreSQL's; other databases count row by row")
    store(event(queue_wait_ms=40.0), event(tenant="globex", e2e_ms=900.0))
    rollup_run(now=T0 + 10 * SECOND)
    # Later events land in the same minute, hour and day rows: sums add, the larger queue wait
    # stays, sketches merge bucket by bucket.
    store(event(started_at=T0 + 20 * SECOND, queue_wait_ms=70.0, e2e_ms=900.0),
          event(started_at=T0 + 30 * SECOND, queue_wait_ms=5.0, ttft_ms=None, ttft_bucket=None),
          event(started_at=T0 + dt.timedelta(hours=2), tenant="globex", status="shed", model_served=None))
    with caplog.at_level("WARNING", logger="finops.telemetry"):
        result = rollup_run(now=T0 + dt.timedelta(hours=3))

    assert "row by row" not in caplog.text
    assert result.events == 3
    minute = Rollup.objects.get(granularity="minute", bucket=T0, tenant="acme")
    assert (minute.requests, minute.queue_wait_ms_max, minute.queue_wait_ms_sum) == (3, 70.0, 115.0)
    assert minute.e2e_hist == {str(sketch.bucket_index(120.0)): 2, str(sketch.bucket_index(900.0)): 1}
    assert_rollups_match_raw()


@pytest.mark.django_db
def test_events_stamped_on_arrival_by_the_database_are_counted_by_a_run_on_its_clock(post_batch: Any) -> None:
    from tests.finops.factories import batch_body, event_dict, price_book

    price_book(effective_from=timezone.now() - dt.timedelta(days=1))
    sent = [event_dict(tenant=tenant) for tenant in ("acme", "acme", "globex")]
    assert post_batch(batch_body(events=sent)).status_code == 202

    with override_settings(ROLLUP_SETTLE_SECONDS=0):
        result = rollup_run()  # no clock given: the database's, which stamped received_at

    assert result.events == 3
    assert watermark() >= max(RequestEvent.objects.values_list("received_at", flat=True))
    assert_rollups_match_raw()
    assert Rollup.objects.get(granularity="day", tenant="acme").list_cost == Decimal("0.0006")


@pytest.mark.django_db
def test_events_inside_the_settle_window_wait_for_the_next_run() -> None:
    store(event(received_at=T0), event(received_at=T0 + 10 * SECOND))
    with override_settings(ROLLUP_SETTLE_SECONDS=5):
        first = rollup_run(now=T0 + 12 * SECOND)  # the second event is 2 s old: not settled yet
        second = rollup_run(now=T0 + 20 * SECOND)
    assert (first.events, second.events) == (1, 1)
    assert watermark() == T0 + 15 * SECOND
    assert_rollups_match_raw()


@pytest.mark.django_db
def test_a_first_run_starts_from_the_earliest_event_received() -> None:
    long_ago = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    store(event(started_at=long_ago, received_at=long_ago), event())
    assert not FillState.objects.exists()
    assert rollup_run(now=T0 + dt.timedelta(hours=1)).events == 2
    assert_rollups_match_raw()


@pytest.mark.django_db
def test_a_first_run_with_no_events_starts_the_watermark() -> None:
    result = rollup_run(now=T0)
    assert (result.events, result.rows) == (0, 0)
    assert watermark() == result.watermark_to


@pytest.mark.django_db
def test_rerunning_never_counts_twice() -> None:
    store(*(event(started_at=T0 + i * 17 * SECOND) for i in range(20)))
    now = T0 + dt.timedelta(hours=1)
    rollup_run(now=now)
    before = snapshot()

    again = rollup_run(now=now)
    later = rollup_run(now=now + dt.timedelta(hours=1))

    assert (again.events, again.rows, later.events, later.rows) == (0, 0, 0, 0)
    assert snapshot() == before
    assert_rollups_match_raw()


@pytest.mark.django_db
def test_a_run_with_an_earlier_clock_never_moves_the_watermark_back() -> None:
    store(event())
    ahead = rollup_run(now=T0 + dt.timedelta(hours=2))
    store(event(received_at=T0 + dt.timedelta(minutes=30)))  # behind the watermark: a broken clock
    result = rollup_run(now=T0 + dt.timedelta(hours=1))
    assert result.events == 0
    assert watermark() == ahead.watermark_to


@pytest.mark.django_db
def test_a_late_event_is_folded_into_its_old_bucket() -> None:
    store(event(), event(started_at=T0 + 5 * SECOND))
    rollup_run(now=T0 + dt.timedelta(minutes=10))
    three_days_ago = T0 - dt.timedelta(days=3)
    received = T0 + dt.timedelta(hours=2)
    store(event(started_at=T0 + 30 * SECOND, received_at=received, prompt_tokens=1000),
          event(started_at=three_days_ago, received_at=received))

    assert rollup_run(now=received + dt.timedelta(minutes=1)).events == 2

    minute = Rollup.objects.get(granularity="minute", bucket=T0)
    assert (minute.requests, minute.prompt_tokens) == (3, 1020)
    assert Rollup.objects.get(granularity="day", bucket=bucket_of(three_days_ago, "day")).requests == 1
    assert_rollups_match_raw()


@pytest.fixture
def eager_celery() -> Iterator[None]:
    from finops.celery import app

    saved = app.conf.task_always_eager, app.conf.task_eager_propagates
    app.conf.task_always_eager = app.conf.task_eager_propagates = True
    yield
    app.conf.task_always_eager, app.conf.task_eager_propagates = saved


def test_every_beat_entry_names_a_registered_task() -> None:
    from django.conf import settings as django_settings

    from finops.celery import app

    app.loader.import_default_modules()  # what a worker does at start: autodiscovers tasks.py
    assert {entry["task"] for entry in django_settings.CELERY_BEAT_SCHEDULE.values()} <= set(app.tasks)


@pytest.mark.django_db
@pytest.mark.usefixtures("eager_celery")
def test_the_beat_task_rolls_up_through_the_service() -> None:
    from finops.telemetry.tasks import rollup

    now = timezone.now()
    store(*(event(started_at=now - dt.timedelta(minutes=2), received_at=now - dt.timedelta(minutes=1))
            for _ in range(3)))

    summary = rollup.delay().get()

    assert summary["events"] == 3
    assert Rollup.objects.get(granularity="day").requests == 3
    assert_rollups_match_raw()


# -- races ----------------------------------------------------------------------------------------


@pytest.fixture
def racing_database(transactional_db: None, tmp_path: Any) -> Iterator[None]:
    """Committed data other connections can see. On SQLite, a migrated database file for the test:
    the test database is in memory with a shared cache, whose locks fail at once ("database table
    is locked") where a file's writers queue on the busy timeout, as they do in production."""
    if connection.vendor != "sqlite":
        yield
        return
    saved_connection, saved_name = connection.connection, connection.settings_dict["NAME"]
    connection.connection = None  # keep the in-memory database alive, unused, until we are back
    connection.settings_dict["NAME"] = str(tmp_path / "race.sqlite3")  # shared with new threads
    try:
        call_command("migrate", verbosity=0)
        yield
    finally:
        connection.close()
        connection.settings_dict["NAME"] = saved_name
        connection.connection = saved_connection


def in_thread(target: Any, *args: Any) -> threading.Thread:
    def run() -> None:
        try:
            target(*args)
        finally:
            connection.close()  # each thread has its own connection; the test database must be droppable

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.usefixtures("racing_database")
def test_a_second_run_waits_for_the_first_and_finds_nothing_new() -> None:
    rollup_run(now=T0)  # the FillState row exists: the runs below meet at its lock
    store(*(event(started_at=T0 + i * SECOND) for i in range(50)))
    now = T0 + dt.timedelta(hours=1)
    first_holds_lock, results, errors = threading.Event(), {}, []

    def first() -> None:
        try:
            with transaction.atomic():
                results["first"] = rollup_run(now=now)
                first_holds_lock.set()
                time.sleep(0.6)  # still holding the FillState lock, not yet committed
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
            first_holds_lock.set()

    def second() -> None:
        first_holds_lock.wait(10)
        began = time.perf_counter()
        try:
            results["second"] = rollup_run(now=now + SECOND)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        results["waited"] = time.perf_counter() - began

    threads = [in_thread(first), in_thread(second)]
    for thread in threads:
        thread.join(30)
    assert not errors
    assert results["first"].events == 50
    assert results["second"].events == 0
    assert results["waited"] >= 0.4  # it queued behind the lock instead of reading the old watermark
    assert_rollups_match_raw()


@pytest.mark.usefixtures("racing_database")
def test_racing_runs_count_each_event_once() -> None:
    store(*(event(started_at=T0 + i * 7 * SECOND, tenant=f"t{i % 3}", received_at=T0 + i * SECOND)
            for i in range(300)))
    start, counted, errors = threading.Barrier(4), [], []

    def racer(offset: int) -> None:
        start.wait(10)
        try:
            for step in range(5):  # each run takes the next slice of received_at, racing the others
                counted.append(rollup_run(now=T0 + dt.timedelta(seconds=60 * step + offset)).events)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [in_thread(racer, offset) for offset in (0, 15, 30, 45)]
    for thread in threads:
        thread.join(60)
    assert not errors
    counted.append(rollup_run(now=T0 + dt.timedelta(hours=1)).events)
    assert sum(counted) == 300
    assert sorted(Rollup.objects.filter(granularity="day").values_list("requests", flat=True)) == [100, 100, 100]
    assert_rollups_match_raw()


# -- properties -----------------------------------------------------------------------------------

TENANTS, FEATURES, MODELS = ["acme", "globex"], ["chat", "search"], ["smollm2", "llama", None]
latency = st.floats(min_value=sketch.MIN_MS, max_value=600_000.0, allow_nan=False)
pico_dollars = st.integers(min_value=0, max_value=10**10).map(lambda n: Decimal(n).scaleb(-12))


@st.composite
def raw_events(draw: st.DrawFn) -> RequestEvent:
    started = T0 + dt.timedelta(seconds=draw(st.integers(0, 3 * 86_400)), microseconds=draw(st.integers(0, 999_999)))
    e2e = draw(latency)
    ttft = draw(st.none() | latency)
    return event(
        started_at=started, received_at=started + dt.timedelta(seconds=draw(st.integers(0, 2 * 86_400))),
        tenant=draw(st.sampled_from(TENANTS)), feature=draw(st.sampled_from(FEATURES)),
        model_served=draw(st.sampled_from(MODELS)), status=draw(st.sampled_from(sorted(STATUS_CLASSES))),
        prompt_tokens=draw(st.integers(0, 100_000)), completion_tokens=draw(st.integers(0, 4_000)),
        cache_hit=draw(st.booleans()), gpu_seconds=draw(st.none() | st.floats(0, 100, allow_nan=False)),
        energy_joules=draw(st.none() | st.floats(0, 10_000, allow_nan=False)),
        list_cost=draw(st.none() | pico_dollars), hardware_cost=draw(st.none() | pico_dollars),
        e2e_ms=e2e, ttft_ms=ttft, ttft_bucket=sketch.bucket_index(ttft),
        queue_wait_ms=draw(st.none() | st.floats(0, 60_000, allow_nan=False)),
    )


def example_in_savepoint(check: Any) -> Any:
    """Run one hypothesis example inside a savepoint that is rolled back: a clean table each time."""

    @functools.wraps(check)
    def wrapped(*args: Any, **kwargs: Any) -> None:
        with transaction.atomic():
            check(*args, **kwargs)
            transaction.set_rollback(True)

    return wrapped


@pytest.mark.django_db
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=st.lists(raw_events(), min_size=1, max_size=40),
       cuts=st.lists(st.integers(0, 5 * 86_400), max_size=4))
@example_in_savepoint
def test_rollups_at_every_granularity_equal_raw_sums(events: list[RequestEvent], cuts: list[int]) -> None:
    store(*events)
    for cut in sorted(cuts):  # several runs, each taking a slice of received_at
        rollup_run(now=T0 + dt.timedelta(seconds=cut))
    rollup_run(now=T0 + dt.timedelta(days=6))

    assert_rollups_match_raw()
    totals = [
        (sum(r["requests"] for r in rows.values()), sum(r["prompt_tokens"] for r in rows.values()),
         sum(r["completion_tokens"] for r in rows.values()), sum(r["list_cost"] for r in rows.values()),
         sum(r["hardware_cost"] for r in rows.values()), sum(r["unpriced"] for r in rows.values()))
        for rows in (rollup_totals(g) for g in Granularity.values)
    ]
    exact = (len(events), sum(e.prompt_tokens for e in events), sum(e.completion_tokens for e in events),
             sum((e.list_cost or 0 for e in events), Decimal(0)),
             sum((e.hardware_cost or 0 for e in events), Decimal(0)),
             sum(e.list_cost is None for e in events))
    assert totals == [exact, exact, exact]
    gpu = sum(e.gpu_seconds or 0 for e in events)
    for granularity in Granularity.values:
        assert sum(r["gpu_seconds"] for r in rollup_totals(granularity).values()) == pytest.approx(gpu, abs=1e-6)


def exact_quantile(values: list[float], q: float) -> float:
    """The order statistic sketch.quantile estimates: the value at rank floor(q * (n - 1))."""
    ordered = sorted(values)
    return ordered[math.floor(q * (len(ordered) - 1))]


@pytest.mark.django_db
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(latencies=st.lists(st.tuples(latency, st.integers(0, 2 * 86_400), st.sampled_from(TENANTS)),
                          min_size=1, max_size=80))
@example_in_savepoint
def test_merged_rollup_histograms_keep_quantiles_within_alpha(latencies: list[tuple[float, int, str]]) -> None:
    store(*(event(e2e_ms=ms, tenant=tenant, started_at=T0 + dt.timedelta(seconds=offset))
            for ms, offset, tenant in latencies))
    rollup_run(now=T0 + dt.timedelta(days=4))
    values = [ms for ms, _, _ in latencies]

    for granularity in Granularity.values:
        merged = sketch.merge(Rollup.objects.filter(granularity=granularity).values_list("e2e_hist", flat=True))
        assert sum(merged.values()) == len(values)
        for q in (0.0, 0.5, 0.9, 0.99, 1.0):
            exact = exact_quantile(values, q)
            estimate = sketch.quantile(merged, q)
            assert estimate is not None
            assert abs(estimate - exact) <= sketch.ALPHA * exact * (1 + 1e-9), (granularity, q)
