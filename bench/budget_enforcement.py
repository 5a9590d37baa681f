"""How long after a budget's spend reaches its limit the runtime starts refusing its requests.

Everything runs as in production, each in a process of its own: the runtime (``python -m inference
serve --model tiny-random``, exporting telemetry to the control plane, taking pushes with its admin
token, pulling its ruleset every 10 s), the control plane (uvicorn ``finops.asgi`` on a scratch
PostgreSQL database, ``wattson_bench_budget``, created and migrated here and dropped at the end),
and one Celery worker with the one beat (``celery -A finops worker -B``, the schedule in
``finops/settings.py``: budget evaluation every 5 s) on Redis when it answers on 127.0.0.1:6379,
on the embedded filesystem broker otherwise. This process creates the budgets (through
``budget_create``, in the same database) and is the client: one thread sending completions of the
same size in one budget's scope until the runtime refuses one (hard: back to back; soft:
``--interval-ms`` after each answer).

Two paths, one budget per trial (scope: the bench tenant and a feature of its own, limit: five
requests' list price):

* **hard** — an allowance the runtime reserves against. Every hard budget is created first and
  the run waits until the runtime holds all their allowances (granted by the beat's evaluation,
  pushed); then each trial spends its budget. The runtime refuses locally, at admission, the first
  request whose worst case no longer fits, so the time is from the ``finished_at`` of the last
  request served (its settlement is what used the allowance up; the spend itself never crosses
  the limit) to the ``finished_at`` of the first 429.
* **soft, action block** — the control plane notices the spend from ingested telemetry: export
  (every 1 s) → ingest → evaluation (beat, every 5 s) → ruleset compiled → push (a Celery task) →
  the runtime's next request gets a 429. The time is from the ``finished_at`` of the request whose
  list price took the period's spend to the limit (events ordered by ``finished_at``, prices as
  ingest stored them) to the ``finished_at`` of the first 429 (rule ``b<id>-block``), split at
  the crossing event's ``received_at`` (ingest) and the ``exceeded`` state change's
  ``created_at`` (evaluation).

All clock points are on one machine's clock: the runtime stamps ``finished_at``, PostgreSQL
``received_at``, the worker the state change. A refusal can only be seen on a request, so a figure
includes the wait for the next request: a round trip for the hard path, up to ``--interval-ms``
more for the soft one.

The time of one evaluation of the hard budgets is printed too: the soft path waits for evaluation,
which runs one budget after another, so with enough budgets a pass outlasts the 5 s cadence.
By default the soft trials run with their own budget alone (``--keep-budgets`` keeps them all).

    python -m bench budget_enforcement [--quick] [--hard-trials 40] [--soft-trials 30]
                                       [--interval-ms 20] [--keep-budgets] [--keep]
"""

from __future__ import annotations

import argparse
import datetime as dt
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import httpx

from bench.ingest_throughput import REPO, control_plane, create_database, django_env, django_use, drop_database, migrate
from bench.report import percentile, print_table, progress
from bench.servers import BENCH_KEY, BENCH_TENANT, logged_process, runtime_server

DATABASE = "wattson_bench_budget"
RUNTIME_NAME = "bench-budget"  # runtime_server names its runtime bench-<name>
MODEL = "tiny-random"
PRICE_PER_1M = Decimal("1000")  # a tenth of a cent a token: a tiny request costs about a cent
PROMPT = "The keeper"
MAX_TOKENS = 8
REQUESTS_PER_BUDGET = 5
GOAL_P99_S = 2.0
TRIAL_TIMEOUT_S = 60.0
REDIS_URL = "redis://127.0.0.1:6379/14"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench budget_enforcement", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 trials a path (checks the script)")
    parser.add_argument("--hard-trials", type=int, help="hard budgets spent (default 40)")
    parser.add_argument("--soft-trials", type=int, help="soft budgets with a block action spent (default 30)")
    parser.add_argument("--interval-ms", type=float, default=20.0,
                        help="pause between one request's answer and the next request (default 20)")
    parser.add_argument("--broker", help=f"Celery broker (default: {REDIS_URL} if Redis answers, else filesystem://)")
    parser.add_argument("--keep-budgets", action="store_true",
                        help="keep every trial's budget (default: the hard ones are deleted before the soft trials, "
                             "each soft one after its trial, so each soft trial is evaluated with its budget alone)")
    parser.add_argument("--keep", action="store_true", help=f"keep the {DATABASE} database afterwards")
    args = parser.parse_args(argv)
    args.hard_trials = args.hard_trials or (3 if args.quick else 40)
    args.soft_trials = args.soft_trials or (3 if args.quick else 30)
    return args


# -- the processes -----------------------------------------------------------------------------------


def redis_answers() -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", 6379)) == 0


@contextmanager
def celery_worker(broker: str, var_dir: Path) -> Iterator[None]:
    """One worker with the beat, on ``broker``; its beat schedule (and a filesystem broker) in ``var_dir``."""
    var_dir.mkdir(parents=True, exist_ok=True)
    env = {**django_env(DATABASE), "CELERY_BROKER_URL": broker, "WATTSON_VAR_DIR": str(var_dir)}
    if broker.startswith("redis"):
        subprocess.run([sys.executable, "-m", "celery", "-A", "finops", "purge", "-f"], cwd=REPO, env=env,
                       capture_output=True, check=False)
    argv = [sys.executable, "-m", "celery", "-A", "finops", "worker", "-B", "--concurrency", "2", "-l", "warning"]
    with logged_process("celery", argv, env=env, cwd=REPO, stop_timeout_s=30) as worker:
        progress(f"starting celery worker -B (pid {worker.pid}) on {broker}")
        time.sleep(1.0)
        worker.check()
        yield


# -- the control plane's side, in this process ---------------------------------------------------------


def setup_control_plane() -> tuple[str, str]:
    """Register the runtime and save the price book; return the runtime's ingest and admin tokens."""
    from finops.pricing.models import ModelPrice, PriceBook
    from finops.runtimes.services import runtime_register

    runtime, token = runtime_register(name=RUNTIME_NAME, base_url="http://127.0.0.1:9")
    book = PriceBook.objects.create(name="bench", effective_from=dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
    ModelPrice.objects.create(book=book, model=MODEL, prompt_per_1m=PRICE_PER_1M, completion_per_1m=PRICE_PER_1M)
    return token, runtime.admin_token()


def runtime_reachable_at(url: str) -> None:
    from finops.runtimes.models import Runtime

    Runtime.objects.filter(name=RUNTIME_NAME).update(base_url=url)


def create_budget(feature: str, limit: Decimal, *, hard: bool) -> int:
    from finops.budgets.services import budget_create

    return budget_create(fields={
        "name": f"bench {feature}", "tenant": BENCH_TENANT, "feature": feature, "period": "monthly",
        "unit": "usd_list", "limit": limit, "action": "block", "enforcement": "hard" if hard else "soft",
    }).pk


def delete_budgets(budget_ids: Iterable[int]) -> None:
    from finops.budgets.models import Budget
    from finops.budgets.services import budget_delete

    for budget in Budget.objects.filter(pk__in=list(budget_ids)):
        budget_delete(budget=budget)


def time_evaluation() -> tuple[int, list[float]]:
    """One evaluation of every budget (what the beat's task runs), timed here three times."""
    from finops.budgets.evaluation import budgets_evaluate

    seconds, evaluated = [], 0
    for _ in range(3):
        started = time.perf_counter()
        evaluated = budgets_evaluate().evaluated
        seconds.append(time.perf_counter() - started)
    return evaluated, seconds


def events_of(feature: str) -> list:  # type: ignore[type-arg]
    from finops.telemetry.models import RequestEvent

    return list(RequestEvent.objects.filter(runtime_id=RUNTIME_NAME, feature=feature).order_by("finished_at", "id"))


def wait_for_events(feature: str, count: int) -> list:  # type: ignore[type-arg]
    deadline = time.monotonic() + TRIAL_TIMEOUT_S
    while True:
        events = events_of(feature)
        if len(events) >= count:
            return events
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(events)} of {count} events of {feature} reached the control plane")
        time.sleep(0.2)


def exceeded_at(budget_id: int) -> dt.datetime | None:
    from finops.budgets.models import BudgetEvent, EventKind, State

    event = BudgetEvent.objects.filter(budget_id=budget_id, kind=EventKind.STATE_CHANGE, to_state=State.EXCEEDED) \
        .order_by("created_at").first()
    return event.created_at if event else None


# -- the client --------------------------------------------------------------------------------------


def spend_until_refused(client: httpx.Client, feature: str, interval_s: float) -> tuple[int, httpx.Response]:
    """Send requests in ``feature`` until one is refused; return how many were sent and the refusal."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "ignore_eos": True}
    deadline = time.monotonic() + TRIAL_TIMEOUT_S
    sent = 0
    while time.monotonic() < deadline:
        response = client.post("/v1/completions", json=body, headers={"X-Wattson-Feature": feature})
        sent += 1
        if response.status_code != 200:
            return sent, response
        time.sleep(interval_s)
    raise RuntimeError(f"{feature}: still served after {TRIAL_TIMEOUT_S:.0f} s")


def wait_for_allowances(url: str, admin_token: str, budget_ids: set[str]) -> float:
    """Wait until the runtime holds an allowance for each budget; return how long that took."""
    started = time.monotonic()
    headers = {"Authorization": f"Bearer {admin_token}"}
    while time.monotonic() - started < TRIAL_TIMEOUT_S:
        state = httpx.get(url + "/admin/ruleset", headers=headers, timeout=10).json()["state"]
        held = {a["budget_id"] for a in state["allowances"] if Decimal(a["granted"]) > 0}
        if budget_ids <= held:
            return time.monotonic() - started
        time.sleep(0.2)
    raise RuntimeError("the runtime was not given the hard budgets' allowances in time")


@dataclass
class Trial:
    seconds: float
    ingest_s: float | None = None
    evaluate_s: float | None = None
    deliver_s: float | None = None
    overspend: Decimal = Decimal(0)  # past the limit at the first refusal, as a fraction of it


def hard_trial(feature: str, budget_id: int, events: list) -> Trial:  # type: ignore[type-arg]
    served = [e for e in events if e.status == "ok"]
    refused = [e for e in events if e.status == "rejected_budget"]
    if not served or not refused or refused[0].rule_id != f"allowance:{budget_id}":
        raise RuntimeError(f"{feature}: expected requests served, then refused by its allowance")
    return Trial((refused[0].finished_at - served[-1].finished_at).total_seconds())


def soft_trial(feature: str, budget_id: int, limit: Decimal, events: list) -> Trial:  # type: ignore[type-arg]
    refused = next(e for e in events if e.status == "rejected_budget")
    if refused.rule_id != f"b{budget_id}-block":
        raise RuntimeError(f"{feature}: refused by {refused.rule_id}, not by its block rule")
    spent = Decimal(0)
    crossing = None
    for event in events:
        spent += event.list_cost or 0
        if crossing is None and spent >= limit:
            crossing = event
        if event is refused:
            break
    if crossing is None:
        raise RuntimeError(f"{feature}: refused before its spend reached the limit")
    evaluated = exceeded_at(budget_id)
    return Trial(
        seconds=(refused.finished_at - crossing.finished_at).total_seconds(),
        ingest_s=(crossing.received_at - crossing.finished_at).total_seconds(),
        evaluate_s=(evaluated - crossing.received_at).total_seconds() if evaluated else None,
        deliver_s=(refused.finished_at - evaluated).total_seconds() if evaluated else None,
        overspend=(spent - limit) / limit,
    )


# -- the run -----------------------------------------------------------------------------------------


@dataclass
class Results:
    broker: str
    hard: list[Trial]
    soft: list[Trial]
    evaluated: int = 0
    evaluation_s: list[float] = field(default_factory=list)


def run(args: argparse.Namespace) -> Results:
    broker = args.broker or (REDIS_URL if redis_answers() else "filesystem://")
    token, admin_token = setup_control_plane()
    interval_s = args.interval_ms / 1000
    with tempfile.TemporaryDirectory(prefix="bench-budget-") as scratch, \
            control_plane(1, DATABASE) as finops_url, \
            runtime_server("--model", MODEL, "--finops-url", finops_url, "--finops-token", token,
                           "--admin-token", admin_token, "--state-dir", str(Path(scratch) / "state"),
                           "--spool-dir", str(Path(scratch) / "spool"), name="budget") as runtime_url, \
            celery_worker(broker, Path(scratch) / "var"), \
            httpx.Client(base_url=runtime_url, headers={"Authorization": f"Bearer {BENCH_KEY}"},
                         timeout=30) as client:
        runtime_reachable_at(runtime_url)
        # One request outside every budget: what a request costs, as ingest prices it.
        client.post("/v1/completions", headers={"X-Wattson-Feature": "probe"},
                    json={"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "ignore_eos": True}
                    ).raise_for_status()
        (probe,) = wait_for_events("probe", 1)
        limit = (probe.list_cost * REQUESTS_PER_BUDGET).quantize(Decimal("0.000001"))
        progress(f"a request costs ${probe.list_cost.normalize()} at list price; each budget's limit is ${limit}")

        hard = {f"hard-{i}": create_budget(f"hard-{i}", limit, hard=True) for i in range(args.hard_trials)}
        waited = wait_for_allowances(runtime_url, admin_token, {str(pk) for pk in hard.values()})
        progress(f"{len(hard)} hard budgets' allowances reached the runtime in {waited:.1f} s")
        results = Results(broker, [], [])
        for feature, budget_id in hard.items():
            sent, refusal = spend_until_refused(client, feature, 0.0)
            if refusal.status_code != 429:
                raise RuntimeError(f"{feature}: refused with {refusal.status_code}: {refusal.text}")
            results.hard.append(hard_trial(feature, budget_id, wait_for_events(feature, sent)))
        progress(f"hard: {len(results.hard)} trials")
        results.evaluated, results.evaluation_s = time_evaluation()
        if not args.keep_budgets:  # the soft trials then run with their own budget alone
            delete_budgets(hard.values())

        for i in range(args.soft_trials):
            feature = f"soft-{i}"
            budget_id = create_budget(feature, limit, hard=False)
            sent, refusal = spend_until_refused(client, feature, interval_s)
            if refusal.status_code != 429:
                raise RuntimeError(f"{feature}: refused with {refusal.status_code}: {refusal.text}")
            results.soft.append(soft_trial(feature, budget_id, limit, wait_for_events(feature, sent)))
            if not args.keep_budgets:
                delete_budgets([budget_id])
            progress(f"soft trial {i + 1}/{args.soft_trials}: {results.soft[-1].seconds:.2f} s "
                     f"({sent} requests sent)")
    return results


def summary(values: list[float]) -> list[object]:
    return [len(values), *(percentile(values, q) * 1000 for q in (50, 95, 99)), max(values) * 1000,
            sum(values) / len(values) * 1000]


def report(results: dict[str, list[Trial]], args: argparse.Namespace) -> None:
    hard, soft = results.hard, results.soft
    rows = [["hard: allowance, refused at admission", *summary([t.seconds for t in hard])],
            ["soft + block: ingest, beat evaluation, push", *summary([t.seconds for t in soft])]]
    print_table("Spend reaching the limit -> the runtime's first 429 (ms)",
                ["path", "trials", "p50", "p95", "p99", "max", "mean"], rows,
                notes=[f"broker {results.broker}; limit = {REQUESTS_PER_BUDGET} requests' list price; hard: requests "
                       f"back to back; soft: {args.interval_ms:.0f} ms between an answer and the next request",
                       f"goal: p99 < {GOAL_P99_S:.0f} s for a hard limit"])
    parts = [("exported and ingested (finished_at -> received_at)", [t.ingest_s for t in soft]),
             ("evaluated (received_at -> 'exceeded' recorded)", [t.evaluate_s for t in soft]),
             ("compiled, pushed, next request refused", [t.deliver_s for t in soft])]
    print_table("The soft path, step by step (ms)", ["step", "trials", "p50", "p95", "p99", "max", "mean"],
                [[name, *summary([v for v in values if v is not None])] for name, values in parts])
    overspend = [float(t.overspend) * 100 for t in soft]
    print(f"\none evaluation of {results.evaluated} budgets ({len(hard)} hard; the beat's task), timed in this "
          f"process after the hard trials: {', '.join(f'{v * 1000:.0f}' for v in results.evaluation_s)} ms")
    print(f"soft budgets were past their limit by p50 {percentile(overspend, 50):.0f}%, "
          f"max {max(overspend):.0f}% at the first refusal (hard: 0% by construction)")
    hard_p99 = percentile([t.seconds for t in hard], 99)
    verdict = "met" if hard_p99 < GOAL_P99_S else "NOT met"
    print(f"goal p99 < {GOAL_P99_S:.0f} s for a hard limit: {verdict} ({hard_p99 * 1000:.1f} ms)")


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    create_database(DATABASE)
    try:
        migrate(DATABASE)
        django_use(DATABASE)
        results = run(args)
    finally:
        if not args.keep:
            drop_database(DATABASE)
    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
