"""Org scale on one control plane: 10,000 budgets over 1,000 tenants, a month of 1M events, 20 runtimes.

A scratch database (``wattson_bench_org``) is migrated, then filled in SQL, server-side:

* ``--events`` raw request events (1,000,000) from the start of this month to a few minutes ago:
  ``--tenants`` tenants (1,000; skewed, a few large ones) × 20 features, served by 20 runtimes
  (``rt-00`` … ``rt-19``), priced, then rolled up as the rollup run would
  (``selector_latency.generate_rollups``) so the steady state's raw tail is seconds of traffic;
* ``--budgets`` budgets (10,000): per tenant one tenant-wide monthly budget, hard (tokens or list
  USD, block), and nine per (tenant, feature) over day, week and month in all four units, soft,
  alerting at 50/80/100%; 20 registered runtimes seen just now, so every hard budget is shared
  among 20 runtimes (20,000 grants).

Then, in this process (``django.setup()`` against the scratch database): the first evaluation pass
(it creates every grant), and ``--passes`` timed passes (``budgets_evaluate``, as the Celery task
runs it with one worker: chunk after chunk, then the rulesets compiled for 20 runtimes), each after
``--tail-events`` more events arrived (received now: the raw tail, and grants to settle). After the
last pass every budget's stored spend is checked against a SQL sum over its scope's raw events in
its period. Then the budgets page (Django's test client, logged in: server time) — default order,
by name deep in the pages, a search, the htmx table fragment.

Then ingest from 20 runtimes at once: ``finops.asgi`` under uvicorn (``--workers``), 20 clients each
POSTing its own runtime's batches with its own token (``--ingest-events``), events/s and POST p95;
and, for ``--lag-minutes``, the same ingest without pause while this process runs ``rollup_run``
every 10 s as the beat does: the rollup lag (database now − watermark) it keeps, beside the rate
reached. On 2 cores the load generator, uvicorn and PostgreSQL share the machine, so the rate is
what this machine reaches, printed next to the 20,000 events/s the issue asks about.

    python -m bench org_scale [--quick] [--events N] [--budgets N] [--passes N] [--lag-minutes M] [--keep]
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import random
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from bench.ingest_throughput import (
    build_bodies,
    control_plane,
    create_database,
    database_exists,
    django_disconnect,
    django_use,
    drop_database,
    migrate,
    post_all,
    price_book_create,
)
from bench.report import percentile, print_table, progress
from bench.selector_latency import bucket_sql, generate_rollups, vacuum

DATABASE = "wattson_bench_org"
RUNTIMES = 20
FEATURES = 20
GOAL_PASS_P95_S = 5.0
GOAL_PAGE_P95_MS = 300.0
GOAL_LAG_S = 30.0
UUID_HEAD = re.compile(rb'"event_id":"[0-9a-f]{8}')
ROLLUP_EVERY_S = 10.0
UNITS = ("usd_list", "tokens", "usd_hardware", "gpu_hours")
PERIODS = ("daily", "weekly", "monthly")


# -- generation -------------------------------------------------------------------------------------


def generate_events(events: int, tenants: int, start: dt.datetime, end: dt.datetime, *, received_now: bool = False,
                    seed: float = 0.42) -> None:
    """``events`` raw rows with started_at evenly over ``[start, end)``, received a second after
    they ended (or now: the raw tail), in slices of a day's worth."""
    from django.db import connection, transaction

    from finops.telemetry import partitioning

    days = {(start + dt.timedelta(days=i)).date() for i in range((end - start).days + 2)}
    partitioning.ensure_partitions(days)
    step_s = (end - start).total_seconds() / events
    received = "now()" if received_now else "s.started + make_interval(secs => s.e2e / 1000 + 1)"
    sql = f"""
    INSERT INTO telemetry_requestevent (event_id, runtime_id, started_at, finished_at, received_at, tenant, feature,
        end_user, api_key_id, model_requested, model_served, route_reason, rule_id, priority, status, status_class,
        http_status, error_type, prompt_tokens, completion_tokens, cache_hit, queue_wait_ms, ttft_ms, e2e_ms,
        tpot_ms, queue_depth_at_admit, mean_batch_size, gpu_seconds, energy_joules, device, price_book_id,
        list_cost, hardware_cost, saved_cost, e2e_bucket, ttft_bucket)
    SELECT gen_random_uuid(), 'rt-' || lpad((g %% {RUNTIMES})::text, 2, '0'), s.started,
        s.started + make_interval(secs => s.e2e / 1000), {received},
        'tenant-' || lpad(s.t::text, 4, '0'), 'feature-' || lpad(((s.t * 7 + s.f) %% {FEATURES})::text, 2, '0'),
        'user-' || (g %% 5000), 'key-' || s.t, s.model, s.model, 'default', NULL, 'standard',
        CASE WHEN s.ok THEN 'ok' ELSE 'error' END, CASE WHEN s.ok THEN 'ok' ELSE 'error' END,
        CASE WHEN s.ok THEN 200 ELSE 500 END, CASE WHEN s.ok THEN NULL ELSE 'error' END,
        s.prompt, s.completion, false, s.r6 * 50, s.e2e * 0.2, s.e2e,
        CASE WHEN s.completion > 0 THEN s.e2e / s.completion END, 0, 1 + s.r6 * 31, s.e2e / 1000, NULL, 'cpu', 1,
        round((s.prompt * 0.2 + s.completion * 0.8) / 1e6, 12), round((s.e2e / 1000 * 0.05 / 3600)::numeric, 12),
        NULL, {bucket_sql('s.e2e')}, {bucket_sql('s.e2e * 0.2')}
    FROM (
        SELECT g, %(start)s::timestamptz + make_interval(secs => g * {step_s!r}) AS started,
            floor(%(tenants)s * power(random(), 2))::int AS t, floor(9 * random())::int AS f,
            (ARRAY['smollm2-135m', 'llama-3.1-8b', 'qwen2.5-7b', 'mistral-7b'])[1 + floor(4 * random())::int] AS model,
            random() > 0.03 AS ok, exp(6.5 + 0.8 * sqrt(-2 * ln(1 - random())) * cos(2 * pi() * random())) AS e2e,
            20 + floor(random() * 1980)::int AS prompt, 5 + floor(random() * 395)::int AS completion,
            random() AS r6
        FROM generate_series(%(first)s, %(last)s) g
    ) s
    """
    per_slice = max(1, math.ceil(events / max(1, (end - start).days + 1)))
    with connection.cursor() as cursor:
        cursor.execute("SET work_mem = '256MB'")
        cursor.execute("SELECT setseed(%s)", [seed])
        for first in range(0, events, per_slice):
            last = min(events, first + per_slice) - 1
            with transaction.atomic():
                cursor.execute(sql, {"start": start, "first": first, "last": last, "tenants": tenants})
            if not received_now:
                progress(f"raw events: {last + 1:,} of {events:,}")


def create_budgets_and_runtimes(count: int, tenants: int, now: dt.datetime) -> None:
    """``count`` budgets, a tenth of them hard (one tenant-wide per tenant), and ``RUNTIMES``
    registered runtimes seen just now."""
    from finops.budgets.models import Budget
    from finops.runtimes.models import Runtime

    Runtime.objects.bulk_create([Runtime(name=f"rt-{i:02d}", base_url=f"http://10.0.0.{i + 1}:8000",
                                         last_seen_at=now) for i in range(RUNTIMES)])
    budgets = []
    for i in range(count):
        t, k = divmod(i, 10)
        tenant = f"tenant-{t % tenants:04d}"
        if k == 0:
            unit = "tokens" if t % 2 else "usd_list"
            limit = Decimal(5_000_000) if unit == "tokens" else Decimal("2.00")
            budgets.append(Budget(name=f"{tenant} monthly cap", tenant=tenant, feature="*", period="monthly",
                                  unit=unit, limit=limit, enforcement="hard", action="block",
                                  recipients=["finops@example.com"]))
            continue
        feature = f"feature-{(t * 7 + k - 1) % FEATURES:02d}"
        unit, period = UNITS[k % len(UNITS)], PERIODS[k % len(PERIODS)]
        limit = {"usd_list": Decimal("0.50"), "usd_hardware": Decimal("0.001"), "tokens": Decimal(800_000),
                 "gpu_hours": Decimal("0.5")}[unit] * {"daily": 1, "weekly": 4, "monthly": 10}[period]
        action = ("alert_only", "throttle", "block")[k % 3]
        budgets.append(Budget(name=f"{tenant} {feature} {period} {unit}", tenant=tenant, feature=feature,
                              period=period, unit=unit, limit=limit, action=action,
                              throttle_requests_per_minute=60 if action == "throttle" else None,
                              recipients=["finops@example.com"]))
    Budget.objects.bulk_create(budgets, batch_size=2000)


# -- measurements -----------------------------------------------------------------------------------


@dataclass
class Pass:
    seconds: float
    evaluated: int
    failed: int
    events: int


def evaluation_passes(passes: int, tail_events: int, tenants: int) -> tuple[Pass, list[Pass], dt.datetime]:
    """The first pass (grants created), then ``passes`` timed ones, each after the rollups caught up
    and ``tail_events`` more events arrived; the moment of the last pass."""
    from django.utils import timezone

    from finops.budgets.evaluation import budgets_evaluate
    from finops.telemetry.rollups import rollup_run

    def one(now: dt.datetime) -> Pass:
        began = time.perf_counter()
        result = budgets_evaluate(now=now)
        return Pass(time.perf_counter() - began, result.evaluated, result.failed, result.events)

    now = timezone.now()
    first = one(now)
    progress(f"first pass (creates the grants): {first.seconds:.1f} s, {first.evaluated:,} evaluated, "
             f"{first.failed} failed, {first.events:,} budget events")
    timed = []
    for i in range(passes):
        rollup_run()  # as the beat does every 10 s: the tail is the last seconds of traffic, not the run's
        now = timezone.now()
        generate_events(tail_events, tenants, now - dt.timedelta(seconds=60), now, received_now=True, seed=i / passes)
        now = timezone.now()
        timed.append(one(now))
        progress(f"pass {i + 1}/{passes}: {timed[-1].seconds:.2f} s")
    return first, timed, now


def spend_mismatches(now: dt.datetime) -> tuple[int, list[str]]:
    """Budgets whose stored spend differs from the SQL sum over their scope's raw events in their
    period at ``now`` (GPU-hours: by more than their micro-hour rounding)."""
    from django.db import connection

    from finops.budgets.models import ANY, Budget
    from finops.budgets.periods import period_at

    sums: dict[tuple[str, str, str], tuple[Decimal, Decimal, Decimal, float]] = {}
    budgets = list(Budget.objects.filter(paused=False))
    for kind in {b.period for b in budgets}:
        period = period_at(kind, now)
        with connection.cursor() as cursor:
            cursor.execute("SELECT tenant, feature, sum(prompt_tokens + completion_tokens), "
                           "coalesce(sum(list_cost), 0), coalesce(sum(hardware_cost), 0), "
                           "coalesce(sum(gpu_seconds), 0) "
                           "FROM telemetry_requestevent WHERE started_at >= %s AND started_at < %s GROUP BY 1, 2",
                           [period.start, period.end])
            for tenant, feature, tokens, list_cost, hardware, gpu in cursor.fetchall():
                for scope in ((tenant, feature), (tenant, ANY), (ANY, feature), (ANY, ANY)):
                    old = sums.get((kind, *scope), (Decimal(0), Decimal(0), Decimal(0), 0.0))
                    sums[(kind, *scope)] = (old[0] + tokens, old[1] + list_cost, old[2] + hardware, old[3] + gpu)
    wrong = []
    for budget in budgets:
        tokens, list_cost, hardware, gpu = sums.get((budget.period, budget.tenant, budget.feature),
                                                    (Decimal(0), Decimal(0), Decimal(0), 0.0))
        if budget.unit == "gpu_hours":
            if abs(float(budget.spend) - gpu / 3600) > 2e-6:
                wrong.append(f"{budget.name}: {budget.spend} vs {gpu / 3600}")
            continue
        want = {"tokens": tokens, "usd_list": list_cost, "usd_hardware": hardware}[budget.unit]
        if budget.spend != want:
            wrong.append(f"{budget.name}: {budget.spend} vs {want}")
    return len(budgets), wrong


def page_timings(runs: int) -> list[tuple[str, list[float]]]:
    from django.contrib.auth import get_user_model
    from django.test import Client

    user, _ = get_user_model().objects.get_or_create(username="bench-admin", defaults={"is_superuser": True})
    client = Client()
    client.force_login(user)
    cases = [("budgets page, default order (most used first)", "/budgets/", {}),
             ("budgets page 100 by name", "/budgets/?sort=name&page=100", {}),
             ("budgets page, search 'tenant-05'", "/budgets/?q=tenant-05", {}),
             ("budgets table fragment (htmx), by state", "/budgets/?sort=-state&page=3",
              {"HTTP_HX_REQUEST": "true", "HTTP_HX_TARGET": "budget-table"})]
    timings = []
    for name, url, headers in cases:
        progress(f"timing {name}")
        seconds = []
        for run in range(runs + 1):
            began = time.perf_counter()
            response = client.get(url, **headers)
            if response.status_code != 200:
                raise RuntimeError(f"{url}: HTTP {response.status_code}")
            if run:  # the first is the warm-up
                seconds.append(time.perf_counter() - began)
        timings.append((name, seconds))
    return timings


def register_tokens() -> dict[str, str]:
    """A fresh ingest token for each of the ``RUNTIMES`` runtimes."""
    from finops.runtimes.models import Runtime
    from finops.runtimes.services import runtime_token_rotate

    tokens = {runtime.name: runtime_token_rotate(runtime=runtime) for runtime in Runtime.objects.all()}
    django_disconnect()
    return tokens


def ingest_fleet(url: str, tokens: dict[str, str], events: int, batch: int
                 ) -> tuple[float, list[float], int, list[str]]:
    """Every runtime POSTs ``events / RUNTIMES`` events in batches of ``batch`` at once."""
    per_runtime = max(batch, events // len(tokens))
    results: list[tuple[float, list[float], int, list[str]]] = []
    lock = threading.Lock()
    bodies = {name: build_bodies(per_runtime, batch, seed=i, runtime=name) for i, name in enumerate(sorted(tokens))}

    def send(name: str) -> None:
        outcome = post_all(url, tokens[name], bodies[name], 1)
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=send, args=(name,)) for name in tokens]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    latencies = [latency for _, lat, _, _ in results for latency in lat]
    return (seconds, latencies, sum(accepted for _, _, accepted, _ in results),
            [error for *_, errors in results for error in errors])


@dataclass
class Lag:
    rate_asked: int
    accepted: int
    seconds: float
    lags: list[float]  # database now − watermark after each rollup run
    errors: int

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds


def rollup_lag(url: str, tokens: dict[str, str], rate: int, minutes: float, batch: int) -> Lag:
    """Ingest from every runtime at ``rate`` events/s in all (or as close as the machine gets) for
    ``minutes`` while this process runs ``rollup_run`` every 10 s, as the beat does."""
    import httpx

    from finops.telemetry.rollups import database_now, rollup_run
    from finops.telemetry.tail import watermark_before_read

    stop = threading.Event()
    accepted, errors = [0], [0]
    lock = threading.Lock()
    interval = len(tokens) * batch / rate  # seconds between one runtime's batches
    # Bodies built once per runtime (building is slower than sending), made new each round by
    # stamping the round into the first eight hex digits of every event id.
    templates = {name: [UUID_HEAD.sub(b'"event_id":"%(round)s', body) for body in
                        build_bodies(batch * 10, batch, seed=random.randrange(10**9), runtime=name)]
                 for name in tokens}
    rounds = iter(range(1, 2**32))

    def send(index: int, name: str) -> None:
        headers = {"Authorization": f"Bearer {tokens[name]}", "Content-Type": "application/json"}
        due = time.perf_counter() + interval * index / len(tokens)  # spread the runtimes' batches out
        with httpx.Client(base_url=url, timeout=60.0, headers=headers) as client:
            while not stop.is_set():
                with lock:
                    stamp = b"%08x" % next(rounds)
                for template in templates[name]:
                    body = template.replace(b"%(round)s", stamp)
                    time.sleep(max(0.0, due - time.perf_counter()))
                    due += interval
                    if stop.is_set():
                        return
                    try:
                        response = client.post("/api/v1/events", content=body)
                    except httpx.HTTPError:
                        response = None
                    with lock:
                        if response is not None and response.status_code == 202:
                            accepted[0] += response.json()["accepted"]
                        else:
                            errors[0] += 1

    threads = [threading.Thread(target=send, args=(i, name)) for i, name in enumerate(sorted(tokens))]
    lags: list[float] = []
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    try:
        while time.perf_counter() - began < minutes * 60:
            tick = time.perf_counter()
            rollup_run()
            watermark = watermark_before_read()
            lags.append((database_now() - watermark).total_seconds() if watermark else math.nan)
            time.sleep(max(0.0, ROLLUP_EVERY_S - (time.perf_counter() - tick)))
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return Lag(rate, accepted[0], time.perf_counter() - began, lags, errors[0])


# -- main -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    events: int
    tenants: int
    budgets: int
    passes: int
    tail_events: int
    page_runs: int
    ingest_events: int
    lag_minutes: float
    lag_rates: tuple[int, ...]
    workers: int
    keep: bool
    reuse: bool


def parse_args(argv: Sequence[str]) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m bench org_scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (checks the script)")
    parser.add_argument("--events", type=int, help="raw events this month (1,000,000)")
    parser.add_argument("--tenants", type=int, help="tenants (1,000)")
    parser.add_argument("--budgets", type=int, help="budgets (10,000; a tenth hard)")
    parser.add_argument("--passes", type=int, help="timed evaluation passes (20)")
    parser.add_argument("--tail-events", type=int, default=2_000, help="events arriving before each pass (2,000)")
    parser.add_argument("--page-runs", type=int, default=20, help="timed loads of each budgets page (20)")
    parser.add_argument("--ingest-events", type=int, help="events POSTed by the 20 runtimes (200,000)")
    parser.add_argument("--lag-minutes", type=float, help="minutes of ingest at each rate, measuring rollup lag (5)")
    parser.add_argument("--lag-rates", type=int, nargs="+", help="ingest rates in events/s (2,000 and 20,000)")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn workers (2)")
    parser.add_argument("--keep", action="store_true", help=f"keep the database {DATABASE} after the run")
    parser.add_argument("--reuse", action="store_true", help=f"use a kept {DATABASE} as it is (no generation)")
    args = parser.parse_args(argv)
    quick = args.quick
    return Settings(events=args.events or (50_000 if quick else 1_000_000),
                    tenants=args.tenants or (100 if quick else 1_000),
                    budgets=args.budgets or (1_000 if quick else 10_000), passes=args.passes or (3 if quick else 20),
                    tail_events=args.tail_events, page_runs=3 if quick else args.page_runs,
                    ingest_events=args.ingest_events or (10_000 if quick else 200_000),
                    lag_minutes=args.lag_minutes if args.lag_minutes is not None else (0.5 if quick else 5.0),
                    lag_rates=tuple(args.lag_rates or ((1_000,) if quick else (2_000, 20_000))),
                    workers=args.workers, keep=args.keep, reuse=args.reuse)


def main(argv: Sequence[str]) -> int:
    settings = parse_args(argv)
    reuse = settings.reuse and database_exists(DATABASE)
    if not reuse:
        create_database(DATABASE)
    migrate(DATABASE)
    django_use(DATABASE)
    from django.conf import settings as django_settings
    from django.utils import timezone

    from finops.budgets.periods import period_at

    ok = True
    try:
        if not reuse:
            now = timezone.now()
            month = period_at("monthly", now)
            began = time.perf_counter()
            generate_events(settings.events, settings.tenants, month.start, now - dt.timedelta(minutes=3))
            generate_rollups(tail=0)
            vacuum()
            generated_s = time.perf_counter() - began
            create_budgets_and_runtimes(settings.budgets, settings.tenants, timezone.now())
            price_book_create()
            progress(f"generated {settings.events:,} events and their rollups in {generated_s:.0f} s; "
                     f"{settings.budgets:,} budgets")
        else:
            from finops.runtimes.models import Runtime

            Runtime.objects.update(last_seen_at=timezone.now())  # the fleet is live again
            progress(f"reusing {DATABASE} as kept")
        first, passes, last = evaluation_passes(settings.passes, settings.tail_events, settings.tenants)
        checked, wrong = spend_mismatches(last)
        ok = ok and not wrong and all(p.failed == 0 for p in [first, *passes])
        pages = page_timings(settings.page_runs)
        tokens = register_tokens()
        with control_plane(settings.workers, DATABASE) as url:
            progress(f"ingest: {settings.ingest_events:,} events from {RUNTIMES} runtimes at once")
            ingest = ingest_fleet(url, tokens, settings.ingest_events, 500)
            django_use(DATABASE)
            lags = []
            for rate in settings.lag_rates:
                progress(f"rollup lag: {settings.lag_minutes} min of ingest at {rate:,} events/s, rollup_run every "
                         f"{ROLLUP_EVERY_S:.0f} s")
                lags.append(rollup_lag(url, tokens, rate, settings.lag_minutes, 500))
                measured = [value for value in lags[-1].lags if not math.isnan(value)]
                progress(f"  {lags[-1].rate:,.0f} events/s reached; lag after each rollup run: "
                         + ", ".join(f"{value:.0f} s" for value in measured))
    finally:
        if settings.keep:
            django_disconnect()
            progress(f"kept database {DATABASE}")
        else:
            drop_database(DATABASE)
    report(settings, first, passes, checked, wrong, pages, ingest, lags,
           chunk=django_settings.BUDGET_EVALUATION_CHUNK)
    return 0 if ok else 1


def verdict(met: bool, goal: str) -> str:
    return f"{goal}: {'met' if met else 'NOT met'}"


def report(settings: Settings, first: Pass, passes: list[Pass], checked: int, wrong: list[str],
           pages: list[tuple[str, list[float]]], ingest: tuple[float, list[float], int, list[str]],
           lags: list[Lag], *, chunk: int) -> None:
    seconds = [p.seconds for p in passes]
    p95 = percentile(seconds, 95)
    print_table(
        f"Budget evaluation: {settings.budgets:,} budgets ({settings.budgets // 10:,} hard, shared by {RUNTIMES} "
        f"runtimes), {settings.tenants:,} tenants, {settings.events:,} events this month; chunks of {chunk:,}",
        ["", "passes", "p50 s", "p95 s", "max s", "budgets evaluated", "failed", "goal"],
        [["first pass (creates the grants)", 1, f"{first.seconds:.2f}", f"{first.seconds:.2f}",
          f"{first.seconds:.2f}", f"{first.evaluated:,}", first.failed, ""],
         [f"steady passes, {settings.tail_events:,} new events before each", len(passes),
          f"{percentile(seconds, 50):.2f}", f"{p95:.2f}", f"{max(seconds):.2f}", f"{passes[-1].evaluated:,}",
          sum(p.failed for p in passes), verdict(p95 < GOAL_PASS_P95_S, f"p95 < {GOAL_PASS_P95_S:.0f} s")]],
        notes=[f"spend of {checked:,} budgets vs SQL sums over raw events in their scope and period: "
               + ("all equal" if not wrong else f"{len(wrong)} DIFFER, e.g. {wrong[:3]}")])
    print_table("Budgets page (server time, Django test client, logged in)", ["page", "p50 ms", "p95 ms", "goal"],
                [[name, f"{percentile(s, 50) * 1000:.0f}", f"{percentile(s, 95) * 1000:.0f}",
                  verdict(percentile(s, 95) * 1000 < GOAL_PAGE_P95_MS, f"p95 < {GOAL_PAGE_P95_MS:.0f}")]
                 for name, s in pages])
    ingest_s, latencies, accepted, errors = ingest
    print_table(
        f"Ingest from {RUNTIMES} runtimes at once (uvicorn --workers {settings.workers}, batches of 500)",
        ["", "events accepted", "seconds", "events/s", "POST p50 ms", "POST p95 ms", "errors"],
        [["burst, as fast as they can", f"{accepted:,}", f"{ingest_s:.1f}", f"{accepted / ingest_s:,.0f}",
          f"{percentile(latencies, 50) * 1000:.0f}", f"{percentile(latencies, 95) * 1000:.0f}", len(errors)]],
        notes=[f"error: {e}" for e in errors[:3]])
    rows = []
    for lag in lags:
        measured = [value for value in lag.lags if not math.isnan(value)]
        worst = max(measured) if measured else math.nan
        rows.append([f"{lag.rate_asked:,}", f"{lag.rate:,.0f}", f"{lag.accepted:,}", f"{lag.seconds:.0f}",
                     len(measured), f"{percentile(measured, 50):.1f}" if measured else "n/a",
                     f"{worst:.1f}" if measured else "n/a", lag.errors,
                     verdict(bool(measured) and worst < GOAL_LAG_S, f"max < {GOAL_LAG_S:.0f} s")])
    print_table(f"Rollup lag while {RUNTIMES} runtimes ingest ({settings.lag_minutes:g} min per rate; rollup_run "
                f"every {ROLLUP_EVERY_S:.0f} s in this process, as the beat runs it)",
                ["events/s asked", "reached", "accepted", "seconds", "rollup runs", "lag p50 s", "lag max s",
                 "failed POSTs", "goal"], rows,
                notes=["lag: database now − the rollup watermark after each run. The load generator, uvicorn and "
                       "PostgreSQL share this machine's cores."])
