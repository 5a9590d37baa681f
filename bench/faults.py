"""Faults: the telemetry pipeline broken in each way it can break, under load, then reconciled.

Wattson promises that every request the runtime answered is stored exactly once and every total
equals the raw sum. Each fault here runs on the whole product in processes of its own
(``bench.fault_rig``: private PostgreSQL and Redis, the control plane under uvicorn behind a fault
proxy, the Celery worker with beat, the runtime serving ``tiny-random``) while a client sends chat
completions, JSON and streamed, each with a unique OpenAI ``user`` (``bench.fault_load``):

* ``collector_refused`` / ``collector_502`` / ``collector_html_400``: the proxy in front of the
  control plane refuses connections, answers 502, or answers a proxy's HTML 400 page;
* ``collector_slow``: the proxy lets the control plane store each batch and holds its answer past
  the exporter's 5 s timeout, so the runtime sends stored batches again;
* ``spool_disk_full``: the tmpfs under the runtime's spool is filled to the last byte (root only);
* ``control_plane_kill9``: uvicorn and its workers get SIGKILL while a batch is being ingested,
  and start again;
* ``redis_down``: the Redis under the runtime's response cache is killed and started again; every
  request must still be answered 200 (a miss, never an error);
* ``runtime_kill9``: the runtime gets SIGKILL with streams in flight, and starts again over the
  same spool and state;
* ``worker_kill9_mid_rollup``: the Celery worker gets SIGKILL inside a rollup run (the run is
  caught in its write: this process holds a SHARE lock on ``telemetry_rollup``, waits until the
  worker's backend holds the FillState row lock and waits on that table, kills, then lets go);
  once it is back and the rollups have caught up, the rollup rows' sums (requests, tokens, list
  cost) must equal the raw sums at every granularity, in ``Rollup`` and ``MarginalRollup`` alike;
* ``postgres_restart``: PostgreSQL is crashed (``pg_ctl -m immediate stop``) while a batch is
  being ingested, and starts again (last: it cuts every session of every process at once).

The faults run in this order on one stack. One that did not end clean may leave the runtime
exporting nothing (a dead sender thread, say): the next fault first sends a probe request, and if
it is not stored within 10 s the runtime is restarted over its spool (and the notes say so).

Each fault: load for ``warmup`` seconds, the fault for ``fault`` seconds under load, the fault
mended (the service back up), load for ``tail`` seconds more; then the reconciliation, in SQL on
the private database. *answered*: requests the runtime gave a whole answer (any status; a stream
through ``[DONE]``); *no answer*: requests that got none (refused, cut off by a kill), which no
event is owed for; *stored*: rows of this fault's users; *duplicates*: rows beyond one per
request; *lost*: answered but not stored by the deadline; *resent*: events the runtime sent again
after the control plane had accepted them (counted at the proxy; the database must drop them);
*recovered*: from the fault's end until every request answered before it was stored (for the
rollup fault: until the rollups had caught up with every event of the fault).

    python -m bench faults [--quick] [--only NAME ...] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.fault_load import MODEL, Load, LoadShape
from bench.fault_proxy import Mode
from bench.fault_rig import API_KEY, DATABASE, Stack, Unavailable
from bench.report import print_table, progress

PROBE_TIMEOUT_S = 10.0
INGEST_WAIT_S = 15.0  # for a telemetry POST to break
ROLLUP_WAIT_S = 40.0  # for the beat's next rollup run (every 10 s) to reach its write
STREAMS_WAIT_S = 15.0


@dataclass(frozen=True)
class Size:
    rate_per_s: float
    concurrency: int
    warmup_s: float
    fault_s: float
    tail_s: float
    recovery_s: float  # the deadline, from the fault's end, for every answered request to be stored


FULL = Size(rate_per_s=20, concurrency=4, warmup_s=4.0, fault_s=5.0, tail_s=6.0, recovery_s=90.0)
QUICK = Size(rate_per_s=8, concurrency=3, warmup_s=0.5, fault_s=1.0, tail_s=0.5, recovery_s=20.0)


# -- the faults --------------------------------------------------------------------------------------

Step = Callable[[Stack, Load, list[str]], None]  # a fault's break or mend; evidence goes in the list


@dataclass(frozen=True)
class Fault:
    name: str
    what: str
    inject: Step
    mend: Step
    shape: LoadShape = field(default_factory=LoadShape)
    unavailable: Callable[[Stack], str | None] = lambda stack: None
    rollups: bool = False  # reconcile the rollups with the raw events too
    every_answer_ok: bool = False  # every request must be answered 200, not only stored


def _proxy(mode: Mode) -> Step:
    def switch(stack: Stack, load: Load, notes: list[str]) -> None:
        stack.proxy.set_mode(mode)

    return switch


def _during_ingest(stack: Stack, action: Callable[[], None], what: str, notes: list[str]) -> None:
    stack.proxy.arm(action)
    if not stack.proxy.wait_fired(INGEST_WAIT_S):
        raise RuntimeError(f"no telemetry POST reached the control plane within {INGEST_WAIT_S:.0f} s to break")
    notes.append(f"{what} while a telemetry POST was inside the control plane")


def _kill_control_plane(stack: Stack, load: Load, notes: list[str]) -> None:
    _during_ingest(stack, stack.kill_control_plane, "kill -9 of uvicorn and its workers", notes)


def _start_control_plane(stack: Stack, load: Load, notes: list[str]) -> None:
    stack.start_control_plane()


def _crash_postgres(stack: Stack, load: Load, notes: list[str]) -> None:
    _during_ingest(stack, stack.pg.crash, "pg_ctl -m immediate stop", notes)


def _start_postgres(stack: Stack, load: Load, notes: list[str]) -> None:
    stack.pg.start()


def _kill_cache_redis(stack: Stack, load: Load, notes: list[str]) -> None:
    stack.cache.kill()


def _start_cache_redis(stack: Stack, load: Load, notes: list[str]) -> None:
    errors = stack.runtime_metric("wattson_cache_redis_errors_total")
    notes.append(f"the cache's Redis reads and writes that failed (served as misses) while it was down: {errors}")
    stack.cache.start()


def _fill_spool_disk(stack: Stack, load: Load, notes: list[str]) -> None:
    written = stack.spool_disk.fill()
    notes.append(f"filled the spool's {stack.spool_disk.size_mb} MB tmpfs ({written / 2**20:.1f} MiB written)")


def _free_spool_disk(stack: Stack, load: Load, notes: list[str]) -> None:
    stack.spool_disk.free()


def _kill_runtime_mid_stream(stack: Stack, load: Load, notes: list[str]) -> None:
    deadline = time.monotonic() + STREAMS_WAIT_S
    while load.streams_in_flight() < 2:
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than 2 streams were in flight within {STREAMS_WAIT_S:.0f} s")
        time.sleep(0.01)
    load.pause()  # nothing new until it is back; the streams in flight are cut off
    in_flight = load.streams_in_flight()
    stack.kill_runtime()
    notes.append(f"kill -9 of the runtime with {in_flight} streams mid-body")


def _restart_runtime(stack: Stack, load: Load, notes: list[str]) -> None:
    stack.start_runtime()
    load.resume()


def _kill_worker_mid_rollup(stack: Stack, load: Load, notes: list[str]) -> None:
    with stack.pg.connect(DATABASE) as watch, stack.pg.connect(DATABASE, autocommit=False) as blocker:
        blocker.execute("LOCK TABLE telemetry_rollup IN SHARE MODE")
        pid, seconds, query = _blocked_rollup_run(watch, blocker.info.backend_pid)
        before = _watermark(watch)  # no other run can move it while this one holds the row lock
        stack.kill_worker()
        blocker.rollback()
        deadline = time.monotonic() + 10
        while watch.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone():
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        after = _watermark(watch)
    moved = "had not moved" if after == before else f"MOVED from {before} to {after}"
    notes.append(f"kill -9 of the worker {seconds:.1f} s into a rollup run: its database session held the "
                 f"FillState row lock and was writing ({query[:40]}...); after the kill the watermark {moved}")


def _blocked_rollup_run(watch: Any, blocker_pid: int) -> tuple[int, float, str]:
    """The worker's rollup run, once it holds the FillState row lock and waits on our table lock:
    (its backend's pid, seconds since its transaction began, its statement)."""
    deadline = time.monotonic() + ROLLUP_WAIT_S
    while time.monotonic() < deadline:
        row = watch.execute(
            "SELECT a.pid, extract(epoch FROM now() - a.xact_start)::float, a.query FROM pg_stat_activity a "
            "WHERE %s = ANY(pg_blocking_pids(a.pid)) AND EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid "
            "AND l.granted AND l.mode = 'RowShareLock' AND l.relation = 'telemetry_fillstate'::regclass)",
            [blocker_pid]).fetchone()
        if row is not None:
            return row[0], row[1], row[2]
        time.sleep(0.1)
    raise RuntimeError(f"no rollup run reached its write into telemetry_rollup within {ROLLUP_WAIT_S:.0f} s")


def _start_worker(stack: Stack, load: Load, notes: list[str]) -> None:
    stack.start_worker()


def _pass(stack: Stack, load: Load, notes: list[str]) -> None:
    stack.proxy.set_mode(Mode.PASS)


FAULTS = [
    Fault("collector_refused", "the collector refuses connections", _proxy(Mode.REFUSE), _pass),
    Fault("collector_502", "the collector's proxy answers 502", _proxy(Mode.BAD_GATEWAY), _pass),
    Fault("collector_html_400", "the collector's proxy answers an HTML 400 page", _proxy(Mode.HTML_400), _pass),
    Fault("collector_slow", "the collector stores each batch and answers after the exporter's timeout",
          _proxy(Mode.SLOW), _pass),
    Fault("spool_disk_full", "the disk under the runtime's spool is full", _fill_spool_disk, _free_spool_disk,
          unavailable=lambda stack: stack.spool_disk.unavailable),
    Fault("control_plane_kill9", "kill -9 of the control plane during ingest", _kill_control_plane,
          _start_control_plane),
    Fault("redis_down", "the Redis under the response cache is down", _kill_cache_redis, _start_cache_redis,
          every_answer_ok=True),
    Fault("runtime_kill9", "kill -9 of the runtime mid-stream, restarted over its spool", _kill_runtime_mid_stream,
          _restart_runtime, shape=LoadShape(stream_every=1, stream_max_tokens=128)),
    Fault("worker_kill9_mid_rollup", "kill -9 of the Celery worker inside a rollup run", _kill_worker_mid_rollup,
          _start_worker, rollups=True),
    Fault("postgres_restart", "PostgreSQL crashed and restarted during ingest", _crash_postgres, _start_postgres),
]
FAULTS_BY_NAME = {fault.name: fault for fault in FAULTS}


# -- the reconciliation ------------------------------------------------------------------------------


def stored_rows(stack: Stack, prefix: str) -> dict[str, int] | None:
    """Rows per end_user starting with ``prefix``; None while the database does not answer."""
    import psycopg

    try:
        with stack.pg.connect(DATABASE) as conn:
            rows = conn.execute("SELECT end_user, count(*) FROM telemetry_requestevent "
                                "WHERE starts_with(end_user, %s) GROUP BY end_user", [prefix]).fetchall()
    except psycopg.Error:
        return None
    return dict(rows)


def _watermark(conn: Any) -> Any:
    row = conn.execute("SELECT watermark FROM telemetry_fillstate WHERE name = 'requests'").fetchone()
    return row[0] if row else None


TOTALS = "count(*), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0), coalesce(sum(list_cost), 0)"
ROLLED = "sum(requests), sum(prompt_tokens), sum(completion_tokens), sum(list_cost)"


def rollup_mismatches(stack: Stack) -> list[str]:
    """Where the rollups' sums differ from the raw events rolled up (received up to the watermark),
    read in one snapshot: empty when every granularity of both rollup tables adds up exactly."""
    import psycopg

    with stack.pg.connect(DATABASE, autocommit=False) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with conn.transaction():
            watermark = _watermark(conn)
            raw = conn.execute(f"SELECT {TOTALS} FROM telemetry_requestevent WHERE received_at <= %s",
                               [watermark]).fetchone()
            tables = {
                "Rollup": conn.execute(f"SELECT granularity, {ROLLED} FROM telemetry_rollup GROUP BY 1").fetchall(),
                "MarginalRollup": conn.execute(f"SELECT granularity, {ROLLED} FROM telemetry_marginalrollup "
                                               "WHERE dimension = '' GROUP BY 1").fetchall(),
            }
    mismatches = []
    for table, rows in tables.items():
        sums = {row[0]: tuple(row[1:]) for row in rows}
        for granularity in ("minute", "hour", "day"):
            if sums.get(granularity) != tuple(raw):
                mismatches.append(f"{table} {granularity}: (requests, prompt, completion, list cost) "
                                  f"{sums.get(granularity)} != raw {tuple(raw)}")
    return mismatches


def _rollups_caught_up(stack: Stack, prefix: str) -> bool:
    with stack.pg.connect(DATABASE) as conn:
        row = conn.execute("SELECT max(received_at) <= (SELECT watermark FROM telemetry_fillstate "
                           "WHERE name = 'requests') FROM telemetry_requestevent "
                           "WHERE starts_with(end_user, %s)", [prefix]).fetchone()
    return bool(row and row[0])


# -- one fault ---------------------------------------------------------------------------------------


@dataclass
class FaultResult:
    name: str
    answered: int = 0
    unanswered: int = 0
    errors: int = 0  # answered with something other than a complete 200
    stored: int = 0
    duplicates: int = 0
    lost: int = 0
    resent: int = 0
    recovered_s: float | None = None
    health: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rollup_mismatches: list[str] = field(default_factory=list)
    every_answer_ok: bool = False
    skipped: str | None = None
    failed: str | None = None

    @property
    def clean(self) -> bool:
        return (self.skipped is None and self.failed is None and self.answered > 0 and self.lost == 0
                and self.duplicates == 0 and not self.rollup_mismatches
                and not (self.every_answer_ok and (self.errors or self.unanswered)))

    def describe(self) -> str:
        """Everything a reader needs to see why a fault did not end clean."""
        telemetry = self.health.get("telemetry") or {}
        recovered = "never" if self.recovered_s is None else f"{self.recovered_s:.1f} s"
        lines = [f"{self.name}: answered {self.answered}, no answer {self.unanswered}, not a complete 200 "
                 f"{self.errors}, stored {self.stored}, duplicates {self.duplicates}, lost {self.lost}, "
                 f"resent {self.resent}, recovered in {recovered}",
                 f"runtime /health after: {self.health.get('status')}; telemetry: {telemetry}"]
        lines += [f"  {note}" for note in self.notes + self.rollup_mismatches]
        if self.failed:
            lines.append(f"  failed: {self.failed}")
        return "\n".join(lines)


def run_fault(stack: Stack, fault: Fault, size: Size) -> FaultResult:
    """Run ``fault`` on ``stack`` under load and reconcile what was answered with what was stored;
    a fault that could not be run is a result too (``failed``), so the next one still runs."""
    if (reason := fault.unavailable(stack)) is not None:
        return FaultResult(fault.name, skipped=reason)
    result = FaultResult(fault.name, every_answer_ok=fault.every_answer_ok)
    suspect, stack.suspect = stack.suspect, True  # until this fault ends clean
    try:
        result.notes += stack.ensure_running()
        if suspect:
            result.notes += _probe(stack)
        _run_under_load(stack, fault, size, result)
    except Exception as exc:
        result.failed = f"{type(exc).__name__}: {exc}"
    stack.suspect = not result.clean
    return result


def _run_under_load(stack: Stack, fault: Fault, size: Size, result: FaultResult) -> None:
    prefix = f"{fault.name}-"
    load = Load(stack.runtime_url, key=API_KEY, tag=fault.name, rate_per_s=size.rate_per_s,
                concurrency=size.concurrency, shape=fault.shape)
    load.start()
    try:
        if not load.wait_answered(1, size.warmup_s + 30):
            raise RuntimeError("no request was answered before the fault")
        time.sleep(size.warmup_s)
        fault.inject(stack, load, result.notes)
        time.sleep(size.fault_s)
        mending = time.monotonic()
        fault.mend(stack, load, result.notes)
        fault_end = time.monotonic()
        if fault_end - mending > 1:
            result.notes.append(f"mended (the service back up) in {fault_end - mending:.1f} s")
        result.recovered_s = _wait_stored(stack, load, prefix, fault_end, size)
    finally:
        load.stop()
    if fault.rollups:
        result.recovered_s, result.rollup_mismatches = _wait_rollups(stack, prefix, fault_end, size)
    _reconcile(result, stack, load, prefix)


def _wait_stored(stack: Stack, load: Load, prefix: str, fault_end: float, size: Size) -> float | None:
    """Keep the load going ``tail_s`` after the fault's end, then stop it; wait until everything
    answered is stored (or the deadline). Returns the seconds from the fault's end until every
    request answered before it was stored, None if that never happened."""
    backlog = load.answered_users()
    recovered = None
    stopped = False
    while True:
        now = time.monotonic()
        if not stopped and now - fault_end >= size.tail_s:
            load.stop()
            stopped = True
        stored = stored_rows(stack, prefix)
        if stored is not None:
            if recovered is None and backlog <= stored.keys():
                recovered = now - fault_end
            if stopped and recovered is not None and load.answered_users() <= stored.keys():
                return recovered
        if now - fault_end > size.recovery_s:
            return recovered
        time.sleep(0.2)


def _wait_rollups(stack: Stack, prefix: str, fault_end: float, size: Size) -> tuple[float | None, list[str]]:
    """Wait until the rollups have counted every event of this fault; then their sums against the raw."""
    while not _rollups_caught_up(stack, prefix):
        if time.monotonic() - fault_end > size.recovery_s + ROLLUP_WAIT_S:
            return None, [f"the rollups had not caught up {size.recovery_s + ROLLUP_WAIT_S:.0f} s after the fault"]
        time.sleep(0.5)
    return time.monotonic() - fault_end, rollup_mismatches(stack)


def _reconcile(result: FaultResult, stack: Stack, load: Load, prefix: str) -> None:
    outcomes = load.outcomes
    answered = {o.user for o in outcomes if o.answered}
    stored = stored_rows(stack, prefix) or {}
    result.answered = len(answered)
    result.unanswered = sum(not o.answered for o in outcomes)
    result.errors = sum(o.answered and not o.complete for o in outcomes)
    result.stored = sum(stored.values())
    result.duplicates = sum(count - 1 for count in stored.values())
    result.lost = len(answered - stored.keys())
    result.resent = stack.proxy.resent(prefix)
    result.health = stack.runtime_health()
    if result.lost:
        result.recovered_s = None


def _probe(stack: Stack) -> list[str]:
    """After a fault that did not end clean: one request must be stored within a few seconds, or
    the runtime is restarted (a clean stop, the same spool) so the next fault starts on a stack
    that stores what it answers."""
    began = time.monotonic()
    if _probe_stored(stack, f"probe-{began:.0f}-a"):
        return [f"a probe request was stored {time.monotonic() - began:.1f} s after the previous fault"]
    stack.restart_runtime()
    if _probe_stored(stack, f"probe-{began:.0f}-b"):
        return [f"the previous fault left the runtime storing nothing for {PROBE_TIMEOUT_S:.0f} s; restarted it"]
    raise RuntimeError("the stack stores nothing, even after the runtime was restarted")


def _probe_stored(stack: Stack, user: str) -> bool:
    response = httpx.post(stack.runtime_url + "/v1/chat/completions", timeout=30,
                          headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": MODEL, "user": user, "max_tokens": 2,
                                "messages": [{"role": "user", "content": user}]})
    response.raise_for_status()
    deadline = time.monotonic() + PROBE_TIMEOUT_S
    while time.monotonic() < deadline:
        if (stored_rows(stack, user) or {}).get(user):
            return True
        time.sleep(0.2)
    return False


# -- the table ---------------------------------------------------------------------------------------


def report(results: Sequence[FaultResult], size: Size) -> None:
    rows = []
    for r in results:
        if r.skipped:
            rows.append([r.name, "skipped", "", "", "", "", "", "", ""])
            continue
        recovered = f"{r.recovered_s:.1f} s" if r.recovered_s is not None else None
        rows.append([r.name, r.answered, r.unanswered, r.stored, r.duplicates, r.lost, r.resent, recovered,
                     r.health.get("status", "?")])
    notes = [f"\nload: {size.rate_per_s:g} requests/s from {size.concurrency} clients, every other one streamed "
             "(runtime_kill9: every one, 128 tokens);",
             f"{size.warmup_s:g} s before the fault, {size.fault_s:g} s of it, {size.tail_s:g} s after it is mended",
             "answered: a whole answer (a stream through [DONE]); no answer: refused or cut off, no event owed;",
             "stored: rows of the fault's users; duplicates: rows beyond one per request; lost: answered, not stored",
             f"within {size.recovery_s:g} s; resent: events sent again after the control plane had accepted them;",
             "recovered: fault mended -> every request answered before then stored (rollup fault: rollups caught up)"]
    for r in results:
        if r.skipped:
            notes.append(f"{r.name}: skipped: {r.skipped}")
        notes += [f"{r.name}: {note}" for note in r.notes + r.rollup_mismatches]
        if r.failed:
            notes.append(f"{r.name}: FAILED: {r.failed}")
        elif not r.clean and not r.skipped:
            telemetry = r.health.get("telemetry") or {}
            notes.append(f"{r.name}: NOT CLEAN; runtime telemetry after: {telemetry}")
    print_table("Faults: every request answered, stored exactly once",
                ["fault", "answered", "no answer", "stored", "duplicates", "lost", "resent", "recovered",
                 "/health after"], rows, notes)


# -- main --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the test's sizes: about 30 requests a fault")
    parser.add_argument("--only", nargs="+", choices=list(FAULTS_BY_NAME), metavar="NAME",
                        help=f"run only these faults ({', '.join(FAULTS_BY_NAME)})")
    parser.add_argument("--keep", action="store_true", help="keep the rig's directory (logs) after a clean run")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    size = QUICK if args.quick else FULL
    faults = [FAULTS_BY_NAME[name] for name in args.only] if args.only else FAULTS
    root = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    results: list[FaultResult] = []
    try:
        with Stack(root) as stack:
            progress(f"the stack is up (logs in {stack.logs})")
            for fault in faults:
                progress(f"{fault.name}: {fault.what}")
                began = time.monotonic()
                results.append(run_fault(stack, fault, size))
                progress(f"({time.monotonic() - began:.0f} s) {results[-1].describe()}")
    except Unavailable as exc:
        print(f"faults: cannot run here: {exc}", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)
        return 1
    report(results, size)
    ok = all(r.clean or r.skipped for r in results)
    if ok and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    else:
        progress(f"the rig's logs are kept in {root / 'logs'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
