"""Dashboard selector latency over 30 days of raw events (10 million by default).

A scratch database (``wattson_bench_sel``) is migrated with ``manage.py migrate``; then everything
is generated in SQL, server-side (HTTP and the Python rollup service would take hours at this size):

* raw ``RequestEvent`` rows spread evenly over the last 30 days, in their daily partitions
  (``partitioning.ensure_partitions``): 50 tenants (skewed: a few large ones), each using 4 of 20
  features and mostly one of 4 models, seven statuses, log-normal latencies, priced tokens, and
  ``e2e_bucket``/``ttft_bucket`` computed in SQL exactly as ``finops.telemetry.sketch.bucket_index``
  does (checked against it on a sample);
* the ``requests`` FillState watermark just before the last ``--tail`` events (by ``received_at``),
  so those stay raw — the tail every selector adds to the rollups;
* ``Rollup`` rows for every event received up to the watermark, built with ``INSERT … SELECT …
  GROUP BY``: minutes for the last ``MINUTE_ROLLUP_RETENTION_DAYS`` only (as retention leaves
  them), hours and days for all 30, with the sparse latency histograms built by
  ``jsonb_object_agg`` over bucket counts; the ``DeviceUseRollup`` rows beside them; then the
  ``MarginalRollup`` rows (per tenant, per feature, per model, and in total) added up from those rows.

One check that the synthetic rollups agree with the raw rows (``usage_totals`` over 30 days against
SUMs over raw, and the sketch's 30-day p50/p95 against the exact ones), then each selector runs in
this process (``django.setup()`` against the scratch database) once to warm up and ``--runs`` times
timed. "overview" is the selectors an overview needs: totals, by feature, a daily series and e2e
percentiles. Then every dashboard page over 30 days through Django's test client (server time:
selectors, charts and templates) — with the ``--tail`` events still raw (rollups stalled for a few
minutes), then again "caught up" after the real ``rollup_run`` folded them (the steady state: the
10 s beat keeps the tail at seconds of traffic). For a selector over its goal, the plan of its
slowest statement is shown (``EXPLAIN ANALYZE``).

    python -m bench selector_latency [--quick] [--events 10000000] [--runs 20] [--keep] [--reuse]
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.ingest_throughput import (
    create_database,
    database_exists,
    django_disconnect,
    django_use,
    drop_database,
    migrate,
)
from bench.report import percentile, print_table, progress

DATABASE = "wattson_bench_sel"
GOAL_OVERVIEW_P95_MS = 150.0
GOAL_PAGE_P95_MS = 300.0
DAYS = 30
GENERATION_WORK_MEM = "256MB"

GROUP = "tenant, feature, model, status_class"
SUMS = """count(*) AS requests, sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
    count(*) FILTER (WHERE cache_hit) AS cache_hits, coalesce(sum(gpu_seconds), 0) AS gpu_seconds,
    coalesce(sum(energy_joules), 0) AS energy_joules, count(energy_joules) AS energy_measured,
    coalesce(sum(list_cost), 0) AS list_cost, coalesce(sum(hardware_cost), 0) AS hardware_cost,
    coalesce(sum(saved_cost), 0) AS saved_cost, count(*) FILTER (WHERE list_cost IS NULL) AS unpriced,
    coalesce(sum(queue_wait_ms), 0) AS queue_wait_ms_sum, count(queue_wait_ms) AS queue_waits,
    max(queue_wait_ms) AS queue_wait_ms_max, count(*) FILTER (WHERE status = 'rejected_rule') AS rejected_rule,
    count(*) FILTER (WHERE status = 'rejected_budget') AS rejected_budget,
    count(*) FILTER (WHERE status = 'shed') AS shed"""
SUM_COLUMNS = ("requests, prompt_tokens, completion_tokens, cache_hits, gpu_seconds, energy_joules, "
               "energy_measured, list_cost, hardware_cost, saved_cost, unpriced, queue_wait_ms_sum, queue_waits, "
               "queue_wait_ms_max, rejected_rule, rejected_budget, shed")


def bucket_sql(column: str) -> str:
    """``sketch.bucket_index`` in SQL."""
    from finops.telemetry import sketch

    return (f"CASE WHEN {column} IS NULL THEN NULL WHEN {column} <= {sketch.MIN_MS} THEN {sketch.MIN_INDEX} "
            f"ELSE least({sketch.MAX_INDEX}, ceil(ln({column}) / ln({sketch.GAMMA!r})))::int END")


# -- generation -------------------------------------------------------------------------------------


def generate_raw(events: int, end: dt.datetime) -> None:
    """``events`` raw rows with started_at evenly over the ``DAYS`` days before ``end``, one
    INSERT per day (each fills one partition)."""
    from django.db import connection, transaction

    from finops.telemetry import partitioning

    start = end - dt.timedelta(days=DAYS)
    days = {(start + dt.timedelta(days=i)).date() for i in range(DAYS + 1)}
    partitioning.ensure_partitions(days)
    step_s = DAYS * 86_400 / events
    # Columns derived from a few uniform randoms per row (r1..r6); g numbers the events in time.
    sql = f"""
    INSERT INTO telemetry_requestevent (event_id, runtime_id, started_at, finished_at, received_at, tenant, feature,
        end_user, api_key_id, model_requested, model_served, route_reason, rule_id, priority, status, status_class,
        http_status, error_type, prompt_tokens, completion_tokens, cache_hit, queue_wait_ms, ttft_ms, e2e_ms,
        tpot_ms, queue_depth_at_admit, mean_batch_size, gpu_seconds, energy_joules, device, price_book_id,
        list_cost, hardware_cost, saved_cost, e2e_bucket, ttft_bucket)
    SELECT gen_random_uuid(), 'rt-' || (g %% 3), s.started, s.started + make_interval(secs => s.e2e / 1000),
        s.started + make_interval(secs => s.e2e / 1000 + 0.05), 'tenant-' || lpad(s.t::text, 2, '0'),
        'feature-' || lpad(((s.t * 7 + s.f) %% 20)::text, 2, '0'), 'user-' || (g %% 5000),
        'key-' || s.t || '-' || (g %% 3), s.model, CASE WHEN s.rejected THEN NULL ELSE s.model END,
        CASE WHEN s.rejected THEN 'rule' ELSE 'default' END, CASE WHEN s.rejected THEN 'budget-cap' END,
        (ARRAY['low', 'normal', 'normal', 'high'])[1 + g %% 4], s.status,
        CASE WHEN s.status IN ('ok') THEN 'ok' WHEN s.status IN ('error', 'timeout') THEN 'error'
             WHEN s.status = 'cancelled' THEN 'cancelled' ELSE 'rejected' END,
        CASE s.status WHEN 'ok' THEN 200 WHEN 'error' THEN 500 WHEN 'timeout' THEN 504 WHEN 'cancelled' THEN 499
             WHEN 'rejected_rule' THEN 403 WHEN 'rejected_budget' THEN 402 ELSE 503 END,
        CASE WHEN s.status <> 'ok' THEN s.status END, s.prompt, s.completion, s.hit,
        CASE WHEN NOT s.rejected THEN s.r6 * 50 END, s.ttft, s.e2e,
        CASE WHEN s.completion > 0 THEN s.e2e / s.completion END, g %% 20,
        CASE WHEN NOT s.rejected THEN 1 + s.r6 * 31 END, CASE WHEN NOT s.rejected THEN s.e2e / 1000 END, NULL,
        'cpu', 1,
        CASE WHEN s.rejected THEN NULL WHEN s.hit THEN 0 ELSE round((s.prompt * 0.2 + s.completion * 0.8) / 1e6, 12)
             END,
        CASE WHEN NOT s.rejected THEN round((s.e2e / 1000 * 0.05 / 3600)::numeric, 12) END,
        CASE WHEN s.hit AND NOT s.rejected THEN round((s.prompt * 0.2 + s.completion * 0.8) / 1e6, 12) END,
        {bucket_sql('s.e2e')}, {bucket_sql('s.ttft')}
    FROM (
        SELECT r.*,
            r.status IN ('rejected_rule', 'rejected_budget', 'shed') AS rejected, r.r5 < 0.1 AS hit,
            (ARRAY['smollm2-135m', 'llama-3.1-8b', 'qwen2.5-7b', 'mistral-7b'])[1 + (r.t + (r.r4 < 0.2)::int) %% 4]
                AS model,
            CASE WHEN r.status IN ('rejected_rule', 'rejected_budget', 'shed') THEN 2.0
                 ELSE exp(6.5 + 0.8 * r.z) END AS e2e,
            CASE WHEN r.status IN ('rejected_rule', 'rejected_budget', 'shed') THEN NULL
                 ELSE exp(6.5 + 0.8 * r.z) * (0.05 + 0.25 * r.r5) END AS ttft,
            20 + (r.r6 * 1980)::int AS prompt,
            CASE WHEN r.status IN ('rejected_rule', 'rejected_budget', 'shed') THEN 0
                 ELSE 5 + (r.r4 * 395)::int END AS completion
        FROM (
            SELECT g, %(start)s::timestamptz + make_interval(secs => g * {step_s!r}) AS started,
                floor(50 * power(random(), 2))::int AS t, floor(4 * random())::int AS f,
                random() AS r4, random() AS r5, random() AS r6,
                sqrt(-2 * ln(1 - random())) * cos(2 * pi() * random()) AS z,
                random() AS rs
            FROM generate_series(%(first)s, %(last)s) g
        ) r0
        CROSS JOIN LATERAL (SELECT r0.*, CASE WHEN r0.rs < 0.93 THEN 'ok' WHEN r0.rs < 0.95 THEN 'error'
            WHEN r0.rs < 0.955 THEN 'timeout' WHEN r0.rs < 0.965 THEN 'cancelled'
            WHEN r0.rs < 0.98 THEN 'rejected_rule' WHEN r0.rs < 0.99 THEN 'rejected_budget' ELSE 'shed' END
            AS status) r
    ) s
    """
    per_day = math.ceil(events / DAYS)
    with connection.cursor() as cursor:
        cursor.execute(f"SET work_mem = '{GENERATION_WORK_MEM}'")
        cursor.execute("SELECT setseed(0.42)")
        for first in range(0, events, per_day):
            last = min(events, first + per_day) - 1
            with transaction.atomic():
                cursor.execute(sql, {"start": start, "first": first, "last": last})
            progress(f"raw events: {last + 1:,} of {events:,}")


SAMPLE_EVERY_S = 5


def generate_samples(end: dt.datetime) -> None:
    """Runtime samples of the three (CPU) runtimes every ``SAMPLE_EVERY_S`` over the sample
    retention, rolled up by the real service — what the GPUs and runtimes page reads."""
    from django.conf import settings
    from django.db import connection, transaction

    from finops.telemetry.sample_rollups import sample_rollup_run

    start = end - dt.timedelta(days=settings.SAMPLE_RETENTION_DAYS)
    with connection.cursor() as cursor, transaction.atomic():
        cursor.execute(
            "INSERT INTO telemetry_runtimesample (runtime_id, at, received_at, queue_depth, running, tokens_per_s) "
            "SELECT 'rt-' || r, t, t + interval '1 second', (random() * 8)::int, (random() * 16)::int, "
            "random() * 200 FROM generate_series(0, 2) r, "
            "generate_series(%s::timestamptz, %s::timestamptz, make_interval(secs => %s)) t",
            [start, end, SAMPLE_EVERY_S])
        progress(f"runtime samples: {cursor.rowcount:,}")
    began = time.perf_counter()
    result = sample_rollup_run(now=end + dt.timedelta(minutes=5))
    progress(f"sample rollups: {result.as_dict()} in {time.perf_counter() - began:.0f} s")
    with connection.cursor() as cursor:  # fresh statistics, as autovacuum keeps them on a live database
        cursor.execute("ANALYZE telemetry_runtimesample, telemetry_devicesample, telemetry_runtimerollup, "
                       "telemetry_devicerollup")


def generate_rollups(tail: int) -> dt.datetime:
    """Rollups of every event received up to a watermark that leaves the last ``tail`` raw;
    return the watermark."""
    from django.conf import settings
    from django.db import connection, transaction

    with connection.cursor() as cursor, transaction.atomic():
        cursor.execute(f"SET LOCAL work_mem = '{GENERATION_WORK_MEM}'")
        cursor.execute("SELECT received_at FROM telemetry_requestevent ORDER BY received_at DESC OFFSET %s LIMIT 1",
                       [tail])
        row = cursor.fetchone()
        watermark = row[0] if row else dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
        cursor.execute("SELECT max(received_at) FROM telemetry_requestevent")
        newest = cursor.fetchone()[0]
        minute_from = newest - dt.timedelta(days=settings.MINUTE_ROLLUP_RETENTION_DAYS)
        for granularity, since in (("day", None), ("hour", None), ("minute", minute_from)):
            began = time.perf_counter()
            where = "received_at <= %(watermark)s" + (" AND started_at >= %(since)s" if since else "")
            trunc = f"date_trunc('{granularity}', started_at, 'UTC')"
            base = (f"SELECT {trunc} AS bucket, tenant, feature, coalesce(model_served, '') AS model, status_class, "
                    f"{{cols}} FROM telemetry_requestevent WHERE {where} GROUP BY 1, 2, 3, 4, 5{{extra}}")
            hist = ("SELECT bucket, {g}, jsonb_object_agg(b, n ORDER BY b) AS hist FROM ("
                    + base.format(cols="{col} AS b, count(*) AS n", extra=", 6").replace("WHERE ", "WHERE {col} "
                                                                                           "IS NOT NULL AND ")
                    + ") x GROUP BY bucket, {g}")
            cursor.execute(
                f"INSERT INTO telemetry_rollup (granularity, bucket, {GROUP}, {SUM_COLUMNS}, e2e_hist, ttft_hist) "
                f"SELECT %(granularity)s, s.bucket, s.tenant, s.feature, s.model, s.status_class, {SUM_COLUMNS}, "
                "coalesce(e.hist, '{}'::jsonb), coalesce(t.hist, '{}'::jsonb) "
                f"FROM ({base.format(cols=SUMS, extra='')}) s "
                f"LEFT JOIN ({hist.format(g=GROUP, col='e2e_bucket')}) e USING (bucket, {GROUP}) "
                f"LEFT JOIN ({hist.format(g=GROUP, col='ttft_bucket')}) t USING (bucket, {GROUP})",
                {"granularity": granularity, "watermark": watermark, "since": since},
            )
            progress(f"{granularity} rollups: {cursor.rowcount:,} rows in {time.perf_counter() - began:.0f} s")
            cursor.execute(
                "INSERT INTO telemetry_deviceuserollup "
                "(granularity, bucket, runtime_id, device, requests, gpu_seconds) "
                f"SELECT %(granularity)s, {trunc}, runtime_id, device, count(*), sum(gpu_seconds) "
                f"FROM telemetry_requestevent WHERE {where} AND gpu_seconds IS NOT NULL AND device IS NOT NULL "
                "GROUP BY 2, 3, 4", {"granularity": granularity, "watermark": watermark, "since": since})
        for dimension in ("", "tenant", "feature", "model"):
            began = time.perf_counter()
            cursor.execute(marginal_sql(dimension))
            progress(f"marginal rollups by {dimension or 'total'}: {cursor.rowcount:,} rows in "
                     f"{time.perf_counter() - began:.0f} s")
        cursor.execute("INSERT INTO telemetry_fillstate (name, watermark, updated_at) VALUES ('requests', %s, now()) "
                       "ON CONFLICT (name) DO UPDATE SET watermark = excluded.watermark", [watermark])
    vacuum()
    return watermark


def vacuum() -> None:
    """Fresh statistics and visibility maps (outside any transaction: VACUUM refuses one)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")


def generate_tail(tail: int) -> None:
    """``tail`` more raw events on a kept database whose rollups caught up: copies of the newest,
    moved to end now and received now — what arrives while the rollups stall for a few minutes."""
    from django.db import connection

    from finops.telemetry import partitioning
    from finops.telemetry.models import RequestEvent

    today = dt.datetime.now(dt.UTC).date()
    partitioning.ensure_partitions({today, today + dt.timedelta(days=1)})
    moved = ("id", "event_id", "started_at", "finished_at", "received_at")
    kept = ", ".join(f.column for f in RequestEvent._meta.concrete_fields if f.column not in moved)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO telemetry_requestevent (event_id, started_at, finished_at, received_at, {kept}) "
            f"SELECT gen_random_uuid(), started_at + shift, finished_at + shift, now(), {kept} "
            "FROM (SELECT * FROM telemetry_requestevent ORDER BY started_at DESC LIMIT %s) newest, "
            "(SELECT now() - max(started_at) AS shift FROM telemetry_requestevent) latest", [tail])
        progress(f"raw tail: {cursor.rowcount:,} events received after the rollup watermark")


def marginal_sql(dimension: str) -> str:
    """``MarginalRollup`` rows keeping ``dimension`` ("" keeps none), added up from the rollup rows
    — what ``finops.telemetry.rollups.marginals`` writes beside them."""
    value = dimension or "''"
    sums = ", ".join(f"{'max' if column.endswith('_max') else 'sum'}({column}) AS {column}"
                     for column in SUM_COLUMNS.split(", "))
    key = f"granularity, bucket, {value} AS value, status_class"
    hist = ("SELECT granularity, bucket, value, status_class, jsonb_object_agg(k, n ORDER BY k::int) AS hist FROM ("
            f"SELECT {key}, h.key AS k, sum(h.value::bigint) AS n FROM telemetry_rollup "
            "CROSS JOIN LATERAL jsonb_each_text({column}) h GROUP BY 1, 2, 3, 4, 5) x GROUP BY 1, 2, 3, 4")
    return (f"INSERT INTO telemetry_marginalrollup (granularity, bucket, dimension, value, status_class, "
            f"{SUM_COLUMNS}, e2e_hist, ttft_hist) "
            f"SELECT s.granularity, s.bucket, '{dimension}', s.value, s.status_class, {SUM_COLUMNS}, "
            "coalesce(e.hist, '{}'::jsonb), coalesce(t.hist, '{}'::jsonb) "
            f"FROM (SELECT {key}, {sums} "
            "FROM telemetry_rollup GROUP BY 1, 2, 3, 4) s "
            f"LEFT JOIN ({hist.format(column='e2e_hist')}) e USING (granularity, bucket, value, status_class) "
            f"LEFT JOIN ({hist.format(column='ttft_hist')}) t USING (granularity, bucket, value, status_class)")


# -- checks and sizes -------------------------------------------------------------------------------


def overview_filters(now: dt.datetime, days: float, **kwargs: object):
    from finops.telemetry.ranges import Filters

    end = now.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
    return Filters(start=end - dt.timedelta(days=days), end=end, **kwargs)


def check_consistency(now: dt.datetime) -> list[str]:
    from django.db import connection

    from finops.telemetry.latency import latency_percentiles
    from finops.telemetry.usage import usage_totals

    totals = usage_totals(filters=overview_filters(now, DAYS))
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*), sum(prompt_tokens), sum(completion_tokens), coalesce(sum(list_cost), 0), "
            "count(*) FILTER (WHERE status_class = 'error'), "
            "percentile_disc(0.5) WITHIN GROUP (ORDER BY e2e_ms), percentile_disc(0.95) WITHIN GROUP (ORDER BY e2e_ms) "
            "FROM telemetry_requestevent WHERE started_at >= %s AND started_at < %s", [totals.start, totals.end])
        n, prompt, completion, cost, errors, p50, p95 = cursor.fetchone()
        cursor.execute("SELECT e2e_ms, e2e_bucket FROM telemetry_requestevent TABLESAMPLE SYSTEM (1) LIMIT 20000")
        sample = cursor.fetchall()
    from finops.telemetry.sketch import bucket_index

    wrong_buckets = sum(1 for value, bucket in sample if bucket_index(value) != bucket)
    got = (totals.requests, totals.prompt_tokens, totals.completion_tokens, totals.list_cost, totals.errors)
    want = (n, prompt, completion, cost, errors)
    quantiles = latency_percentiles(filters=overview_filters(now, DAYS), metric="e2e", quantiles=(0.5, 0.95))
    lines = [
        f"usage_totals 30 d vs SUMs over raw (requests, prompt, completion, list cost, errors): "
        f"{'equal' if got == want else f'DIFFERENT: {got} vs {want}'}",
        f"sketch p50/p95 {quantiles[0.5]:.1f}/{quantiles[0.95]:.1f} ms vs exact {p50:.1f}/{p95:.1f} ms "
        f"(error {abs(quantiles[0.5] / p50 - 1):.1%}/{abs(quantiles[0.95] / p95 - 1):.1%}, bound 2%)",
        f"SQL bucket = sketch.bucket_index on {len(sample):,} sampled rows: "
        f"{'all' if not wrong_buckets else f'{wrong_buckets} DIFFER'}",
    ]
    return lines if got == want and not wrong_buckets else [*lines, "CONSISTENCY CHECK FAILED"]


def tail_size() -> int:
    """Raw events received after the rollup watermark."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM telemetry_requestevent r, telemetry_fillstate f "
                       "WHERE f.name = 'requests' AND r.received_at > f.watermark")
        return cursor.fetchone()[0]


def sizes() -> list[str]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM telemetry_requestevent")
        raw = cursor.fetchone()[0]
        cursor.execute("SELECT granularity, count(*) FROM telemetry_rollup GROUP BY 1 ORDER BY 1")
        rollups = ", ".join(f"{g} {n:,}" for g, n in cursor.fetchall())
        cursor.execute("SELECT granularity, count(*) FROM telemetry_marginalrollup GROUP BY 1 ORDER BY 1")
        rollups += "; marginal rollup rows: " + ", ".join(f"{g} {n:,}" for g, n in cursor.fetchall())
        cursor.execute("SELECT pg_size_pretty(pg_database_size(current_database())), "
                       "pg_size_pretty(pg_total_relation_size('telemetry_rollup'))")
        db_size, rollup_size = cursor.fetchone()
    return [f"raw events {raw:,} (tail past the watermark {tail_size():,}); rollup rows: {rollups}",
            f"database {db_size}, of which telemetry_rollup (with indexes) {rollup_size}"]


# -- timing -----------------------------------------------------------------------------------------


@dataclass
class Timing:
    name: str
    seconds: list[float]
    slowest_sql: tuple[float, str]

    def p(self, q: float) -> float:
        return percentile(self.seconds, q) * 1000


def cases(now: dt.datetime, tenant: str, feature: str) -> list[tuple[str, Callable[[], object]]]:
    from finops.telemetry import latency, usage

    month, week, day = overview_filters(now, DAYS), overview_filters(now, 7), overview_filters(now, 1)
    one_tenant = overview_filters(now, DAYS, tenants=(tenant,))
    tenant_feature = overview_filters(now, DAYS, tenants=(tenant,), features=(feature,))

    def overview() -> None:
        usage.usage_totals(filters=month)
        usage.usage_by(filters=month, dimension="feature")
        usage.usage_series(filters=month, step="day")
        latency.latency_percentiles(filters=month, metric="e2e")

    return [
        ("usage_totals 30d", lambda: usage.usage_totals(filters=month)),
        (f"usage_totals 30d, tenant {tenant}", lambda: usage.usage_totals(filters=one_tenant)),
        ("usage_by tenant 30d", lambda: usage.usage_by(filters=month, dimension="tenant")),
        ("usage_by feature 30d", lambda: usage.usage_by(filters=month, dimension="feature")),
        ("usage_by model 30d", lambda: usage.usage_by(filters=month, dimension="model")),
        ("usage_series day step 30d", lambda: usage.usage_series(filters=month, step="day")),
        ("usage_series hour step 7d", lambda: usage.usage_series(filters=week, step="hour")),
        ("latency_percentiles e2e 30d", lambda: latency.latency_percentiles(filters=month, metric="e2e")),
        ("latency_percentiles e2e 1d", lambda: latency.latency_percentiles(filters=day, metric="e2e")),
        (f"latency_percentiles e2e 30d, tenant {tenant}",
         lambda: latency.latency_percentiles(filters=one_tenant, metric="e2e")),
        (f"usage_by model 30d, tenant {tenant}", lambda: usage.usage_by(filters=one_tenant, dimension="model")),
        (f"latency_percentiles e2e 30d, {tenant} + {feature}",
         lambda: latency.latency_percentiles(filters=tenant_feature, metric="e2e")),
        ("overview (totals + by feature + day series + e2e percentiles) 30d", overview),
    ]


def page_cases(tenant: str, feature: str) -> list[tuple[str, Callable[[], object]]]:
    """Every dashboard page over the 30-day range, rendered by Django's test client as a logged-in
    budget admin: the whole server time (selectors, charts, templates), no network."""
    from django.contrib.auth import get_user_model
    from django.test import Client

    user, _ = get_user_model().objects.get_or_create(username="bench-admin", defaults={"is_superuser": True})
    client = Client()
    client.force_login(user)
    pages = [("overview", "/"), ("tenants", "/tenants/"), ("features", "/features/"), ("models", "/models/"),
             (f"tenant {tenant}", f"/tenants/{tenant}/"), (f"feature {feature}", f"/features/{feature}/"),
             ("GPUs and runtimes", "/gpus/"), ("budgets", "/budgets/")]

    def get(url: str) -> Callable[[], object]:
        def call() -> object:
            response = client.get(url, {"range": "30d"})
            if response.status_code != 200:
                raise RuntimeError(f"{url}: HTTP {response.status_code}")
            return response
        return call

    cases = [(f"page {name} 30d", get(url)) for name, url in pages]
    cases.append(("page overview 30d, htmx refresh", lambda: client.get("/", {"range": "30d"}, HTTP_HX_REQUEST="true")))
    return cases


def time_case(name: str, call: Callable[[], object], runs: int) -> Timing:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:  # warm-up, and which statement is slowest
        call()
    slowest = max(((float(q["time"]), q["sql"]) for q in captured.captured_queries), default=(0.0, ""))
    seconds = []
    for _ in range(runs):
        began = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - began)
    return Timing(name, seconds, slowest)


def explain(sql: str) -> list[str]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql)
        return [row[0] for row in cursor.fetchall()]


# -- main -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    events: int
    tail: int
    runs: int
    keep: bool
    reuse: bool


def parse_args(argv: Sequence[str]) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m bench selector_latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200,000 events (checks the script)")
    parser.add_argument("--events", type=int, help="raw events over 30 days (default 10,000,000)")
    parser.add_argument("--tail", type=int, help="events left past the rollup watermark (5,000; 1,000 with --quick)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs of each selector (default 20)")
    parser.add_argument("--keep", action="store_true", help=f"keep the database {DATABASE} after the run")
    parser.add_argument("--reuse", action="store_true",
                        help=f"time against a kept {DATABASE} if there is one (no generation)")
    args = parser.parse_args(argv)
    return Settings(events=args.events or (200_000 if args.quick else 10_000_000),
                    tail=args.tail or (1_000 if args.quick else 5_000), runs=args.runs,
                    keep=args.keep, reuse=args.reuse)


def main(argv: Sequence[str]) -> int:
    settings = parse_args(argv)
    notes: list[str] = []
    django_use(DATABASE)
    from finops.telemetry import usage  # noqa: F401 -- fail now rather than after generating
    try:
        if settings.reuse and database_exists(DATABASE):
            django_use(DATABASE)
            migrate(DATABASE)  # a kept database may predate the newest migrations
            vacuum()  # what autovacuum does after a migration rewrote rows, before timing them
            from finops.telemetry.models import RuntimeSample

            if not RuntimeSample.objects.exists():
                generate_samples(dt.datetime.now(dt.UTC))
            if not tail_size():
                generate_tail(settings.tail)
            notes.append(f"reused the kept database {DATABASE} (no generation)")
        else:
            create_database(DATABASE)
            migrate(DATABASE)
            django_use(DATABASE)
            began = time.perf_counter()
            generate_raw(settings.events, dt.datetime.now(dt.UTC))
            raw_s = time.perf_counter() - began
            generate_rollups(settings.tail)
            generate_samples(dt.datetime.now(dt.UTC))
            notes.append(f"generation: raw events {raw_s:.0f} s, rollups + VACUUM ANALYZE "
                         f"{time.perf_counter() - began - raw_s:.0f} s")
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute("SELECT max(started_at) FROM telemetry_requestevent")
            now = cursor.fetchone()[0]
            cursor.execute("SELECT tenant FROM telemetry_rollup WHERE granularity = 'day' GROUP BY 1 "
                           "ORDER BY sum(requests) DESC LIMIT 1")
            tenant = cursor.fetchone()[0]
            cursor.execute("SELECT feature FROM telemetry_rollup WHERE granularity = 'day' AND tenant = %s "
                           "GROUP BY 1 ORDER BY sum(requests) DESC LIMIT 1", [tenant])
            feature = cursor.fetchone()[0]
        notes += sizes()
        checks = check_consistency(now)
        notes += checks
        timings = []
        for name, call in [*cases(now, tenant, feature), *page_cases(tenant, feature)]:
            progress(f"timing {name}")
            timings.append(time_case(name, call, settings.runs))
        if tail_size():
            # The steady state: the 10 s beat keeps the tail at seconds of traffic.
            from finops.telemetry.rollups import rollup_run

            progress("folding the raw tail into the rollups (rollup_run)")
            result = rollup_run()
            notes.append(f"then rollup_run folded the tail: {result.events:,} events, {result.rows:,} rows written "
                         f"in {result.seconds:.1f} s; pages timed again 'caught up'")
            for name, call in page_cases(tenant, feature):
                progress(f"timing {name}, caught up")
                timings.append(time_case(f"{name}, caught up", call, settings.runs))
        plans = []
        for t in timings:
            goal = GOAL_PAGE_P95_MS if t.name.startswith("page") else GOAL_OVERVIEW_P95_MS
            if t.p(95) > goal and t.slowest_sql[1]:
                plans.append((t, explain(t.slowest_sql[1])))
    finally:
        if settings.keep:
            django_disconnect()
            progress(f"kept database {DATABASE}")
        else:
            drop_database(DATABASE)
    report(settings, timings, notes, plans)
    return 0 if "CONSISTENCY CHECK FAILED" not in checks else 1


def report(settings: Settings, timings: list[Timing], notes: list[str],
           plans: list[tuple[Timing, list[str]]]) -> None:
    rows = []
    for t in timings:
        goal = GOAL_PAGE_P95_MS if t.name.startswith("page") else GOAL_OVERVIEW_P95_MS
        verdicts = [f"< {goal:.0f}: {'met' if t.p(95) < goal else 'NOT met'}"]
        rows.append([t.name, f"{t.p(50):.1f}", f"{t.p(95):.1f}", f"{max(t.seconds) * 1000:.1f}",
                     f"{t.slowest_sql[0] * 1000:.1f}", "; ".join(verdicts)])
    notes = [f"\n{settings.runs} timed runs each after one warm-up; ms. 'slowest SQL' is the slowest statement "
             "of the warm-up run.",
             f"Goals: a 30-day overview's selectors p95 < {GOAL_OVERVIEW_P95_MS:.0f} ms (each, and "
             f"the overview as a whole); a dashboard page's server time p95 < {GOAL_PAGE_P95_MS:.0f} ms.", *notes]
    print_table(f"Dashboard selectors over {DAYS} days", ["selector", "p50", "p95", "max", "slowest SQL",
                                                          "goal p95"], rows, notes)
    for t, plan in plans:
        print(f"\nEXPLAIN ANALYZE of the slowest statement of '{t.name}' ({t.slowest_sql[0] * 1000:.0f} ms):\n")
        print(t.slowest_sql[1][:600] + (" …" if len(t.slowest_sql[1]) > 600 else ""))
        print("\n".join("  " + line for line in plan[:40]))
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
