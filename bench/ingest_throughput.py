"""Telemetry ingest end to end over HTTP into PostgreSQL, next to a raw COPY of the same rows.

A scratch database (``wattson_bench_ingest``, created here and dropped at the end) is migrated with
``manage.py migrate``; a runtime is registered (its token authenticates the POSTs) and a price book
is saved, so every event is priced on arrival as in production. The control plane
(``finops.asgi:application``) is served by uvicorn in a process of its own, with ``--workers`` 1 and
2 in turn. This process is the load generator: ``--clients`` threads, each with its own
``httpx.Client``, POST pre-built bodies of ``--batch`` request events (built with
``inference.contracts.RequestEvent`` and joined by the exporter's own ``sender.batch_body``) until
``--events`` have been sent. The table is emptied before each server configuration, so every
configuration stores the same events.

Then the limit, with psycopg straight into the same database and the same rows (read back from the
table as Python values): binary COPY into the partitioned table, and the path ingest takes — COPY
into a temporary staging table, then ``INSERT … SELECT … ON CONFLICT DO NOTHING`` — once for all
rows in one transaction and once per batch with a commit each.

    python -m bench ingest_throughput [--quick] [--events 200000] [--batch 500] [--clients 4]
                                      [--workers 1 2] [--keep]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.report import percentile, print_table, progress
from bench.servers import free_port, logged_process

PG_HOST = os.environ.get("BENCH_PG_HOST", "127.0.0.1")
PG_PORT = os.environ.get("BENCH_PG_PORT", "5432")
PG_USER = os.environ.get("BENCH_PG_USER", "postgres")
DATABASE = "wattson_bench_ingest"
RUNTIME_NAME = "bench-ingest"
GOAL_EVENTS_PER_S = 20_000
REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 60.0

TENANTS = [f"tenant-{i:02d}" for i in range(50)]
FEATURES = [f"feature-{i:02d}" for i in range(20)]
MODELS = ["smollm2-135m", "llama-3.1-8b", "qwen2.5-7b", "mistral-7b"]
STATUSES = [("ok", 200, 0.93), ("error", 500, 0.02), ("timeout", 504, 0.005), ("cancelled", 499, 0.01),
            ("rejected_rule", 403, 0.015), ("rejected_budget", 402, 0.01), ("shed", 503, 0.01)]


# -- the scratch database and Django -----------------------------------------------------------------


def database_url(name: str) -> str:
    return f"postgres://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"


def pg_connect(name: str = "postgres", **kwargs: object):
    import psycopg

    return psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=name, **kwargs)


def create_database(name: str) -> None:
    with pg_connect(autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def database_exists(name: str) -> bool:
    with pg_connect(autocommit=True) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone() is not None


def drop_database(name: str) -> None:
    django_disconnect()
    with pg_connect(autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def django_env(name: str) -> dict[str, str]:
    """The environment the control plane runs with against scratch database ``name``."""
    env = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", "DEBUG")}
    env.update(DATABASE_URL=database_url(name), WATTSON_DEV="1", DJANGO_SETTINGS_MODULE="finops.settings",
               LOG_LEVEL="WARNING")
    return env


def migrate(name: str) -> None:
    started = time.perf_counter()
    subprocess.run([sys.executable, "manage.py", "migrate", "--verbosity", "0"], cwd=REPO, env=django_env(name),
                   check=True)
    progress(f"migrated {name} in {time.perf_counter() - started:.1f} s")


def django_use(name: str) -> None:
    """Point this process's Django at scratch database ``name`` (set up Django on first use).

    Django is configured once per process; a later benchmark in the same ``python -m bench`` run
    switches the default connection to its own database, as Django's test runner does."""
    import django
    from django.apps import apps

    if not apps.ready:
        os.environ.update({k: v for k, v in django_env(name).items() if k not in ("LOG_LEVEL",)})
        os.environ["LOG_LEVEL"] = "WARNING"
        django.setup()
    from django.conf import settings
    from django.db import connection

    connection.close()
    settings.DATABASES["default"]["NAME"] = name
    connection.settings_dict["NAME"] = name


def django_disconnect() -> None:
    from django.apps import apps

    if apps.ready:
        from django.db import connections

        connections.close_all()


# -- events and bodies -------------------------------------------------------------------------------


def build_bodies(events: int, batch: int, *, seed: int = 7, runtime: str = RUNTIME_NAME) -> list[bytes]:
    """POST bodies of ``batch`` events each from ``runtime``, serialized and joined exactly as the
    exporter does."""
    from inference.contracts import RequestEvent
    from inference.telemetry.sender import batch_body
    from inference.telemetry.spool import SpoolRecord

    rng = random.Random(seed)
    now = dt.datetime.now(dt.UTC)
    weights = [w for *_, w in STATUSES]
    bodies = []
    for first in range(0, events, batch):
        records = []
        for _ in range(min(batch, events - first)):
            tenant = rng.randrange(len(TENANTS))
            status, http_status, _ = rng.choices(STATUSES, weights)[0]
            rejected = status in ("rejected_rule", "rejected_budget", "shed")
            model = MODELS[(tenant + (rng.random() < 0.2)) % len(MODELS)]
            e2e = 2.0 if rejected else rng.lognormvariate(6.5, 0.8)
            started = now - dt.timedelta(seconds=rng.uniform(60, 86_000))
            completion = 0 if rejected else rng.randint(5, 400)
            event = RequestEvent(
                event_id=uuid.UUID(int=rng.getrandbits(128), version=4), runtime_id=runtime,
                started_at=started, finished_at=started + dt.timedelta(milliseconds=e2e),
                tenant=TENANTS[tenant], feature=FEATURES[(tenant * 7 + rng.randrange(4)) % len(FEATURES)],
                end_user=f"user-{rng.randrange(5000)}", api_key_id=f"key-{tenant:02d}-{rng.randrange(3)}",
                model_requested=model, model_served=None if rejected else model,
                route_reason="rule" if rejected else "default", rule_id="budget-cap" if rejected else None,
                priority=rng.choice(("low", "normal", "normal", "high")), status=status, http_status=http_status,
                error_type=None if status == "ok" else status, prompt_tokens=rng.randint(20, 2000),
                completion_tokens=completion, cache_hit=rng.random() < 0.1,
                queue_wait_ms=None if rejected else rng.uniform(0, 50),
                ttft_ms=None if rejected else e2e * rng.uniform(0.05, 0.3), e2e_ms=e2e,
                tpot_ms=None if rejected or not completion else e2e / completion,
                queue_depth_at_admit=rng.randrange(20), mean_batch_size=None if rejected else rng.uniform(1, 32),
                gpu_seconds=None if rejected else e2e / 1000, energy_joules=None, device="cpu",
            )
            records.append(SpoolRecord(kind="E", data=event.model_dump_json().encode()))
        bodies.append(batch_body(records))
    return bodies


# -- setup in the scratch database -------------------------------------------------------------------


def setup_control_plane() -> str:
    """Register the runtime and save a price book; return the runtime's token."""
    from finops.runtimes.services import runtime_register

    _, token = runtime_register(name=RUNTIME_NAME, base_url="http://127.0.0.1:9")
    price_book_create()
    django_disconnect()
    return token


def price_book_create() -> None:
    """A price book for the benchmark's models and CPU, so events are priced on arrival."""
    from decimal import Decimal

    from finops.pricing.models import DevicePrice, ModelPrice, PriceBook

    book = PriceBook.objects.create(name="bench", effective_from=dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
    for i, model in enumerate([*MODELS, "*"]):
        ModelPrice.objects.create(book=book, model=model, prompt_per_1m=Decimal("0.10") * (i + 1),
                                  completion_per_1m=Decimal("0.40") * (i + 1))
    DevicePrice.objects.create(book=book, device_type="cpu", per_gpu_hour=Decimal("0.05"), per_kwh=Decimal("0.15"))


# -- the server and the load -------------------------------------------------------------------------


@contextmanager
def control_plane(workers: int, name: str) -> Iterator[str]:
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "finops.asgi:application", "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers), "--log-level", "warning", "--no-access-log"]
    url = f"http://127.0.0.1:{port}"
    with logged_process("uvicorn", argv, env=django_env(name), cwd=REPO) as server:
        progress(f"starting uvicorn --workers {workers} (pid {server.pid}) on {url}")
        server.wait_until(lambda: httpx.post(url + "/api/v1/events", content=b"{}", timeout=2.0).status_code == 401,
                          what="answer /api/v1/events", timeout=START_TIMEOUT_S, interval=0.2)
        yield url


@dataclass
class LoadResult:
    label: str
    events: int
    posts: int
    seconds: float
    latencies: list[float]
    accepted: int
    errors: list[str]
    stored: int
    client_cpu: float
    sessions: int  # database sessions opened while the events were sent (this process's count too)

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def post_all(url: str, token: str, bodies: list[bytes], clients: int) -> tuple[float, list[float], int, list[str]]:
    """POST every body once, from ``clients`` threads taking the next unsent body in turn."""
    next_index = iter(range(len(bodies)))
    lock = threading.Lock()
    latencies: list[float] = []
    accepted = [0]
    errors: list[str] = []
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def worker() -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=60.0) as client:
            while True:
                with lock:
                    index = next(next_index, None)
                if index is None:
                    return
                began = time.perf_counter()
                try:
                    response = client.post("/api/v1/events", content=bodies[index])
                except httpx.HTTPError as exc:
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                took = time.perf_counter() - began
                with lock:
                    latencies.append(took)
                    if response.status_code == 202:
                        accepted[0] += response.json()["accepted"]
                    else:
                        errors.append(f"{response.status_code}: {response.text[:200]}")

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - began, latencies, accepted[0], errors


def database_sessions(name: str) -> int:
    """Sessions ever opened on database ``name`` (pg_stat_database, PostgreSQL 14+)."""
    with pg_connect(name) as conn:
        row = conn.execute("SELECT sessions FROM pg_stat_database WHERE datname = %s", [name]).fetchone()
        return int(row[0]) if row else 0


def table_count(name: str) -> int:
    with pg_connect(name) as conn:
        return conn.execute("SELECT count(*) FROM telemetry_requestevent").fetchone()[0]


def truncate(name: str) -> None:
    with pg_connect(name, autocommit=True) as conn:
        conn.execute("TRUNCATE telemetry_requestevent")


def run_http(name: str, token: str, bodies: list[bytes], events: int, workers: int, clients: int) -> LoadResult:
    truncate(name)
    # Warm-up: a few batches of events outside the measured set, then emptied again.
    warm = build_bodies(100 * clients, 50, seed=99)
    with control_plane(workers, name) as url:
        post_all(url, token, warm, clients)
        truncate(name)
        progress(f"posting {events:,} events in {len(bodies):,} bodies from {clients} clients")
        cpu, sessions = time.process_time(), database_sessions(name)
        seconds, latencies, accepted, errors = post_all(url, token, bodies, clients)
        cpu, sessions = time.process_time() - cpu, database_sessions(name) - sessions
    stored = table_count(name)
    return LoadResult(f"HTTP, uvicorn --workers {workers}, {clients} clients", events, len(bodies), seconds,
                      latencies, accepted, errors, stored, cpu / seconds, sessions)


def run_in_process(name: str, token: str, bodies: list[bytes], events: int) -> LoadResult:
    """``telemetry_ingest`` called in this process on every body, one after another, over one
    persistent connection: ingest's parsing, validation, pricing and database work without HTTP."""
    from django.db import connection

    from finops.telemetry.services import runtime_token_authenticate, telemetry_ingest

    truncate(name)
    runtime = runtime_token_authenticate(token=token)
    assert runtime is not None
    telemetry_ingest(runtime=runtime, body=build_bodies(500, 500, seed=99)[0])  # warm-up: prices, partitions
    truncate(name)
    connection.ensure_connection()
    progress(f"telemetry_ingest() in process on {len(bodies):,} bodies")
    latencies, accepted = [], 0
    cpu, began = time.process_time(), time.perf_counter()
    for body in bodies:
        started = time.perf_counter()
        accepted += telemetry_ingest(runtime=runtime, body=body).accepted
        latencies.append(time.perf_counter() - started)
    seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
    django_disconnect()
    return LoadResult("in process: telemetry_ingest() per body, 1 thread, no HTTP", events, len(bodies), seconds,
                      latencies, accepted, [], table_count(name), cpu / seconds, 1)


# -- the limit: COPY straight into the database ------------------------------------------------------


def read_rows(name: str) -> list[tuple]:
    from finops.telemetry.services import _EVENT_COLUMN_LIST

    with pg_connect(name) as conn:
        return conn.execute(f"SELECT {_EVENT_COLUMN_LIST} FROM telemetry_requestevent").fetchall()


def copy_limits(name: str, rows: list[tuple], batch: int) -> list[tuple[str, int, float, int]]:
    """(way, rows, seconds, rows stored) for each way of writing ``rows`` without HTTP."""
    from finops.telemetry.services import _EVENT_COLUMN_LIST, _EVENT_COPY_TYPES, _STAGING, _STAGING_CREATE

    table = "telemetry_requestevent"
    results = []

    def copy_into(cursor: object, target: str, chunk: Sequence[tuple]) -> None:
        with cursor.copy(f"COPY {target} ({_EVENT_COLUMN_LIST}) FROM STDIN (FORMAT BINARY)") as copy:  # type: ignore[attr-defined]
            copy.set_types(_EVENT_COPY_TYPES)
            for row in chunk:
                copy.write_row(row)

    move = (f"INSERT INTO {table} ({_EVENT_COLUMN_LIST}) SELECT {_EVENT_COLUMN_LIST} FROM {_STAGING} "
            f"ON CONFLICT (event_id, started_at) DO NOTHING")

    def direct(conn: object) -> None:
        with conn.transaction(), conn.cursor() as cursor:  # type: ignore[attr-defined]
            copy_into(cursor, table, rows)

    def staged(conn: object) -> None:
        with conn.transaction(), conn.cursor() as cursor:  # type: ignore[attr-defined]
            cursor.execute(_STAGING_CREATE)
            copy_into(cursor, _STAGING, rows)
            cursor.execute(move)

    def staged_batches(conn: object) -> None:
        with conn.cursor() as cursor:  # type: ignore[attr-defined]
            for first in range(0, len(rows), batch):
                with conn.transaction():  # type: ignore[attr-defined]
                    cursor.execute(_STAGING_CREATE)
                    copy_into(cursor, _STAGING, rows[first:first + batch])
                    cursor.execute(move)

    for label, way in ((f"binary COPY into the partitioned table, {len(rows):,} rows in 1 transaction", direct),
                       ("COPY into temp staging + INSERT … ON CONFLICT DO NOTHING, 1 transaction", staged),
                       (f"same, {batch} rows a transaction (ingest's database work, no HTTP)", staged_batches)):
        truncate(name)
        with pg_connect(name, autocommit=True) as conn:
            progress(label)
            began = time.perf_counter()
            way(conn)
            seconds = time.perf_counter() - began
        results.append((label, len(rows), seconds, table_count(name)))
    return results


# -- main --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    events: int
    batch: int
    clients: int
    workers: tuple[int, ...]
    keep: bool


def parse_args(argv: Sequence[str]) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m bench ingest_throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10,000 events (checks the script)")
    parser.add_argument("--events", type=int, help="events to send (default 200,000; 10,000 with --quick)")
    parser.add_argument("--batch", type=int, default=500, help="events per POST (default 500)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients (default 4)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="uvicorn worker counts (default 1 2)")
    parser.add_argument("--keep", action="store_true", help=f"keep the scratch database {DATABASE}")
    args = parser.parse_args(argv)
    return Settings(events=args.events or (10_000 if args.quick else 200_000), batch=args.batch,
                    clients=args.clients, workers=tuple(args.workers), keep=args.keep)


def main(argv: Sequence[str]) -> int:
    settings = parse_args(argv)
    progress(f"building {settings.events:,} events")
    began = time.perf_counter()
    bodies = build_bodies(settings.events, settings.batch)
    progress(f"built {len(bodies):,} bodies ({sum(map(len, bodies)) / len(bodies) / 1024:.0f} KiB each) "
             f"in {time.perf_counter() - began:.1f} s")
    create_database(DATABASE)
    try:
        migrate(DATABASE)
        django_use(DATABASE)
        token = setup_control_plane()
        results = [run_http(DATABASE, token, bodies, settings.events, workers, settings.clients)
                   for workers in settings.workers]
        results.append(run_in_process(DATABASE, token, bodies, settings.events))
        rows = read_rows(DATABASE)
        limits = copy_limits(DATABASE, rows, settings.batch)
    finally:
        if settings.keep:
            django_disconnect()
            progress(f"kept database {DATABASE}")
        else:
            drop_database(DATABASE)
    report(settings, results, limits)
    ok = all(r.stored == r.events and r.accepted == r.events and not r.errors for r in results)
    ok = ok and all(stored == n for _, n, _, stored in limits)
    return 0 if ok else 1


def report(settings: Settings, results: list[LoadResult], limits: list[tuple[str, int, float, int]]) -> None:
    rows = []
    for r in results:
        rows.append([r.label, f"{r.events:,}", f"{r.rate:,.0f}", f"{percentile(r.latencies, 50) * 1000:.0f} ms",
                     f"{percentile(r.latencies, 95) * 1000:.0f} ms", f"{r.stored:,}",
                     "yes" if r.stored == r.events == r.accepted and not r.errors else "NO",
                     f"{r.client_cpu:.0%}"])
    for label, n, seconds, stored in limits:
        rows.append([label, f"{n:,}", f"{n / seconds:,.0f}", "", "", f"{stored:,}",
                     "yes" if stored == n else "NO", ""])
    best = max((r.rate for r in results if r.label.startswith("HTTP")), default=0.0)
    notes = [
        f"\n{settings.batch} events a POST (the exporter's body format); the limit rows write the same rows",
        "read back from the table as Python values (client-side encoding included, as in ingest).",
        "client CPU: the load generator's own CPU time over the wall time (it shares the 2 cores); for the",
        "in-process row, the CPU of the process that ran telemetry_ingest (the database's is not counted).",
        f"Goal >= {GOAL_EVENTS_PER_S:,} events/s over HTTP on 2 cores: "
        f"{'met' if best >= GOAL_EVENTS_PER_S else 'NOT met'} (best {best:,.0f}).",
    ]
    for r in results:
        if r.label.startswith("HTTP"):
            notes.append(f"{r.label}: {r.posts:,} POSTs opened {r.sessions - 1:,} database sessions")
        if r.errors:
            notes.append(f"{r.label}: {len(r.errors)} failed POSTs, first: {r.errors[0]}")
        if r.accepted != r.events:
            notes.append(f"{r.label}: the server accepted {r.accepted:,} of {r.events:,}")
    print_table("Telemetry ingest: events/s into PostgreSQL",
                ["way", "events", "events/s", "POST p50", "POST p95", "rows in DB", "all stored", "client CPU"],
                rows, notes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
