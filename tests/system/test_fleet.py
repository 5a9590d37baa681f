"""A fleet on one control plane (issue 16): three runtime processes (``python -m inference serve
--model tiny-random``) export to the control plane under uvicorn with two workers, a Celery worker
on Redis evaluates the budgets and pushes the rulesets, all on PostgreSQL; hard budgets in tokens
are shared by the three under concurrent load from client threads until every runtime refuses.

* **Never overspent, no phantom refusals.** What is stored as spent is at most the limit, and at
  least 90% of the limit was served before the first request was refused on the budget: runtimes
  refuse because the limit is used up, not because their share of it ran dry while the rest sat
  unallocated.
* **A runtime killed mid-period strands no more than ``finops/budgets/grants.py`` allows.** It is
  killed with SIGKILL halfway through a second budget; the other two spend the rest. What it was
  granted beyond what it spent is at most what it held at the kill, or the one top-up the policy
  can still give a runtime whose spending has stopped (it counts as live for ``LIVE_WINDOW``):
  ``max(starter, 2 × what it spent since its last chunk)``.
* **Every answered request is stored exactly once.** Each request carries a user of its own; after
  the killed runtime is started again over its spool, every request answered (200 or a refusal)
  is one stored event, no more, and every runtime's stored events carry its sequence numbers
  without a gap. The one exception is counted, not hidden: what the killed runtime answered in its
  last moment, whose event was still in memory waiting for the exporter's writer thread (which
  numbers it and writes it to the spool) when SIGKILL came, is lost.

Evaluation is the real task on the worker, queued by this test every ``EVALUATE_EVERY_S`` (the
beat's 5 s cadence is for production; a test that spends a budget in seconds needs the grants to
follow faster) with an expiry, as the beat queues it. Each run queues its pushes on the worker.

Needs PostgreSQL (``DATABASE_URL=postgres://…``; `.ci/run` runs it in its PostgreSQL pass) and
Redis (``WATTSON_TEST_REDIS_URL``, default db 15 on 127.0.0.1:6379); skipped without either. The
processes share pytest-django's test database and a Celery queue of the test's own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.db import connection
from django.db.models import F, Sum
from django.utils import timezone

from demo.processes import Child
from finops.budgets import grants
from finops.budgets.models import Budget, Grant
from finops.budgets.services import budget_create
from finops.budgets.tasks import evaluate
from finops.runtimes.models import Runtime
from finops.runtimes.services import runtime_register
from finops.telemetry.models import RequestEvent
from tests.celery_process import (
    REDIS_URL,
    ROOT,
    broker_connection,
    celery_worker,
    control_plane_env,
    redis_up,
    unique_queue,
    worker_ready,
)
from tests.inference.live import free_port

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]

MODEL = "tiny-random"
MODEL_CACHE_DIR = Path(os.environ.get("INFERENCE_MODEL_CACHE_DIR") or ROOT / ".cache/models")
NAMES = ("fleet-1", "fleet-2", "fleet-3")
KEYS = {"fleet-a": "sk-fleet-a-0001", "fleet-b": "sk-fleet-b-0002"}
PROMPT = "The keeper of the lighthouse"
MAX_TOKENS = 8
# Tokens. The shared budget is spent by paced clients, each sending at most one request (about 17
# tokens) every PACED_PERIOD_S: some 35 tokens/s a runtime, so the fleet spends it in about 40 s,
# over some 150 evaluations (a daily budget spent in 12 minutes at the beat's 5 s). A grant grows
# only at an evaluation, a second or so after the runtime's spend calls for it (export, the next
# evaluation, its run, the push), so a runtime that spends its starter share (a tenth of the limit
# split three ways) faster than that is refused while most of the limit is still unallocated.
SHARED_LIMIT = Decimal(4000)
PACED_PERIOD_S = 1.0
# The budget a runtime is killed halfway through is spent as fast as the clients can: what it
# strands does not depend on how fast the others spend.
KILLED_LIMIT = Decimal(3000)
CLIENTS_PER_RUNTIME = 2
EVALUATE_EVERY_S = 0.25
REFUSED_FOR_S = 2.0  # a client refused this long without a success in between is done
LAST_MOMENT_S = 1.0  # a killed runtime may lose what it answered this shortly before the kill
START_TIMEOUT_S = 120.0
WAIT_S = 60.0


# -- the processes -----------------------------------------------------------------------------------


@dataclass
class Member:
    """One runtime of the fleet: its registration, address and process."""

    name: str
    port: int
    token: str
    admin_token: str
    state_dir: Path
    spool_dir: Path
    log: Path
    child: Child | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, control_plane_url: str) -> None:
        argv = [sys.executable, "-m", "inference", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--device", "cpu", "--torch-threads", "1", "--model", MODEL, "--model-cache-dir", str(MODEL_CACHE_DIR),
                "--runtime-id", self.name, "--finops-url", control_plane_url, "--finops-token", self.token,
                "--admin-token", self.admin_token, "--spool-dir", str(self.spool_dir), "--state-dir",
                str(self.state_dir), "--export-interval-s", "0.2", "--sample-interval-s", "5",
                "--ruleset-pull-interval-s", "2", "--max-batch-size", "8", "--log-level", "warning"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_")}
        env["INFERENCE_API_KEYS"] = ",".join(f"{key}:{tenant}" for tenant, key in KEYS.items())
        self.child = Child(self.name, argv, env=env, cwd=ROOT, log=self.log, stop_signal=signal.SIGTERM)

    def wait(self) -> None:
        assert self.child is not None
        self.child.wait_until(lambda: httpx.get(self.url + "/health", timeout=2).status_code == 200,
                              what="become healthy", timeout=START_TIMEOUT_S, interval=0.2)

    def kill(self) -> float:
        """SIGKILL to the runtime's process group, then reap it; return when it was sent (monotonic)."""
        assert self.child is not None
        killed_at = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.child.pgid, signal.SIGKILL)
        self.child.process.wait(timeout=10)
        return killed_at

    def spool_drained(self) -> bool:
        """Whether the runtime has sent every record it spooled (its ``/health`` says so)."""
        telemetry = httpx.get(self.url + "/health", timeout=5).json()["telemetry"]
        return telemetry["queued"] == 0 and telemetry["spooled_records"] == 0

    def held(self) -> dict[str, Any]:
        """What the runtime holds: its ruleset's version and its allowances with their ledgers."""
        answer = httpx.get(self.url + "/admin/ruleset", headers={"Authorization": f"Bearer {self.admin_token}"},
                           timeout=5)
        answer.raise_for_status()
        return answer.json()


@dataclass
class Fleet:
    control_plane_url: str
    members: list[Member]
    broker: str
    queue: str
    var_dir: Path
    logs: Path
    stop_evaluating: threading.Event = field(default_factory=threading.Event)
    evaluations_queued: int = 0

    def member(self, name: str) -> Member:
        return next(m for m in self.members if m.name == name)

    def evaluate_continuously(self) -> threading.Thread:
        """Queue the evaluation task on the worker every ``EVALUATE_EVERY_S`` until stopped."""

        def run() -> None:
            with broker_connection(self.broker, self.var_dir) as conn:
                while not self.stop_evaluating.wait(EVALUATE_EVERY_S):
                    evaluate.apply_async(queue=self.queue, connection=conn, expires=2 * EVALUATE_EVERY_S)
                    self.evaluations_queued += 1

        thread = threading.Thread(target=run, name="evaluations", daemon=True)
        thread.start()
        return thread

    def log_tails(self) -> str:
        return "\n".join(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:])
                         for path in sorted(self.logs.glob("*.log")))


def wait_for(condition: Callable[[], Any], what: str, fleet: Fleet, timeout: float = WAIT_S) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` (with the
    processes' logs) at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{fleet.log_tails()}")
        time.sleep(0.1)


@pytest.fixture
def fleet(transactional_db: None, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Fleet]:
    """The fleet started on this test's database, its runtimes registered, evaluation queued every
    ``EVALUATE_EVERY_S``; every process stopped before the database is flushed."""
    if connection.vendor != "postgresql":
        pytest.skip("the fleet test runs on PostgreSQL: set DATABASE_URL=postgres://... (.ci/run's PostgreSQL pass)")
    if not redis_up(REDIS_URL):
        pytest.skip(f"the fleet test needs Redis for Celery: none answers at {REDIS_URL}")
    caplog.set_level(logging.WARNING, logger="httpx")  # every request of the load, otherwise
    logs = tmp_path / "logs"
    var_dir = tmp_path / "var"
    queue = unique_queue("fleet")
    cp_port = free_port()
    members = []
    for name in NAMES:
        port = free_port()
        runtime, token = runtime_register(name=name, base_url=f"http://127.0.0.1:{port}")
        members.append(Member(name, port, token, runtime.admin_token(), tmp_path / name / "state",
                              tmp_path / name / "spool", logs / f"{name}.log"))
    fleet = Fleet(f"http://127.0.0.1:{cp_port}", members, REDIS_URL, queue, var_dir, logs)
    env = control_plane_env(broker=REDIS_URL, var_dir=var_dir, queue=queue)
    server = Child("control plane", [sys.executable, "-m", "uvicorn", "finops.asgi:application", "--host",
                                     "127.0.0.1", "--port", str(cp_port), "--workers", "2", "--log-level", "warning",
                                     "--no-access-log"],
                   env=env, cwd=ROOT, log=logs / "control-plane.log", stop_signal=signal.SIGTERM)
    try:
        with celery_worker(broker=REDIS_URL, var_dir=var_dir, queue=queue, log=logs / "celery.log",
                           concurrency=2) as worker:
            for member in members:
                member.start(fleet.control_plane_url)
            server.wait_until(lambda: httpx.post(fleet.control_plane_url + "/api/v1/events", content=b"{}",
                                                 timeout=2).status_code == 401,
                              what="answer /api/v1/events", timeout=START_TIMEOUT_S, interval=0.2)
            for member in members:
                member.wait()
            worker.wait_until(lambda: worker_ready(worker), what="say it is ready", timeout=START_TIMEOUT_S)
            evaluations = fleet.evaluate_continuously()
            try:
                yield fleet
            finally:
                fleet.stop_evaluating.set()
                evaluations.join(timeout=10)
    finally:
        for member in members:
            if member.child is not None:
                member.child.stop()
        server.stop()


# -- the load ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    user: str
    runtime: str
    status: int | None  # None: no answer (the runtime was killed)
    tokens: int  # prompt + completion of a 200
    code: str | None  # the error code of a refusal
    at: float  # when it was answered (time.monotonic)


@dataclass
class Load:
    """Client threads sending completions in one tenant until they are refused for good; each
    sends at most one request every ``period_s`` (0: back to back)."""

    tenant: str
    period_s: float = 0.0
    answers: list[Answer] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def served(self) -> int:
        with self.lock:
            return sum(a.tokens for a in self.answers if a.status == 200)

    def answered(self) -> list[Answer]:
        with self.lock:
            return [a for a in self.answers if a.status is not None]

    def refusals(self) -> Counter[tuple[int | None, str | None]]:
        """Every answer other than a 200, by status and error code."""
        with self.lock:
            return Counter((a.status, a.code) for a in self.answers if a.status not in (200, None))

    def run(self, members: list[Member], clients_per_runtime: int = CLIENTS_PER_RUNTIME,
            during: Callable[[Load], None] | None = None) -> None:
        threads = [threading.Thread(target=self._client, args=(member,), name=f"{member.name}-{n}")
                   for member in members for n in range(clients_per_runtime)]
        for thread in threads:
            thread.start()
        if during is not None:
            during(self)
        for thread in threads:
            thread.join(timeout=WAIT_S * 3)
        assert not any(thread.is_alive() for thread in threads), "a client never finished"

    def _client(self, member: Member) -> None:
        refused_since: float | None = None
        deadline = time.monotonic() + WAIT_S * 2
        with httpx.Client(base_url=member.url, headers={"Authorization": f"Bearer {KEYS[self.tenant]}"},
                          timeout=30) as client:
            next_at = time.monotonic()
            while time.monotonic() < deadline:
                time.sleep(max(0.0, next_at - time.monotonic()))
                next_at = time.monotonic() + self.period_s
                user = f"{self.tenant}-{uuid.uuid4().hex}"
                body = {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "ignore_eos": True, "user": user}
                try:
                    response = client.post("/v1/completions", json=body)
                except httpx.TransportError:  # killed: no answer, and no event owed
                    self._record(Answer(user, member.name, None, 0, None, time.monotonic()))
                    return
                if response.status_code == 200:
                    usage = response.json()["usage"]
                    self._record(Answer(user, member.name, 200, usage["prompt_tokens"] + usage["completion_tokens"],
                                        None, time.monotonic()))
                    refused_since = None
                    continue
                code = response.json()["error"]["code"]
                self._record(Answer(user, member.name, response.status_code, 0, code, time.monotonic()))
                if (response.status_code, code) != (429, "rejected_budget"):
                    return  # not what this load expects: the test fails on it (``refusals``)
                refused_since = refused_since or time.monotonic()
                if time.monotonic() - refused_since >= REFUSED_FOR_S:
                    return
                time.sleep(0.2)

    def _record(self, answer: Answer) -> None:
        with self.lock:
            self.answers.append(answer)


# -- what was stored ---------------------------------------------------------------------------------


def tokens_of(events: Any) -> int:
    return events.aggregate(total=Sum(F("prompt_tokens") + F("completion_tokens")))["total"] or 0


def scope(tenant: str) -> Any:
    return RequestEvent.objects.filter(tenant=tenant)


def stored_rows(answers: list[Answer]) -> Counter[str]:
    """The rows stored for each of ``answers`` (by the request's user)."""
    users = [a.user for a in answers]
    return Counter(RequestEvent.objects.filter(end_user__in=users).values_list("end_user", flat=True))


def wait_stored(fleet: Fleet, answers: list[Answer]) -> None:
    """Wait until each of ``answers`` is stored; at the deadline, fail saying what is missing."""
    deadline = time.monotonic() + WAIT_S
    while True:
        rows = stored_rows(answers)
        missing = Counter((a.runtime, a.status) for a in answers if a.user not in rows)
        if not missing:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{sum(missing.values())} of {len(answers)} answered requests were never stored "
                        f"((runtime, status): count): {dict(missing)}\n{fleet.log_tails()}")
        time.sleep(0.1)


def numbered_without_gaps(runtime: str) -> bool:
    """Whether the events stored from ``runtime`` carry its sequence numbers 1, 2, 3, … each once:
    every event it numbered (on writing it to its spool) was stored, none twice."""
    seqs = list(RequestEvent.objects.filter(runtime_id=runtime).order_by("seq").values_list("seq", flat=True))
    return seqs == list(range(1, len(seqs) + 1))


def hard_budget(tenant: str, limit: Decimal) -> Budget:
    return budget_create(fields={"name": f"{tenant} hard cap", "tenant": tenant, "period": "monthly",
                                 "unit": "tokens", "limit": limit, "enforcement": "hard", "action": "block"})


def allowance_held(member: Member, budget: Budget) -> Decimal | None:
    for allowance in member.held()["state"]["allowances"]:
        if allowance["budget_id"] == str(budget.pk):
            return Decimal(allowance["granted"])
    return None


# -- the specification -------------------------------------------------------------------------------


def test_a_hard_budget_shared_by_three_runtimes_is_spent_to_its_limit_and_a_killed_runtime_strands_little(
        fleet: Fleet) -> None:
    began = time.monotonic()
    shared, killed_mid_period = hard_budget("fleet-a", SHARED_LIMIT), hard_budget("fleet-b", KILLED_LIMIT)
    wait_for(lambda: all(allowance_held(m, b) for m in fleet.members for b in (shared, killed_mid_period)),
             "every runtime to hold an allowance of both budgets", fleet)

    # 1. All three runtimes spend the shared budget until each is refused for good.
    load_a = Load("fleet-a", period_s=PACED_PERIOD_S)
    load_a.run(fleet.members)
    assert set(load_a.refusals()) == {(429, "rejected_budget")}, load_a.refusals()
    wait_stored(fleet, load_a.answered())
    events = scope("fleet-a")
    spent = tokens_of(events.filter(status="ok"))
    first_refusal = events.filter(status="rejected_budget").order_by("started_at").first()
    assert first_refusal is not None, "the runtimes never refused"
    # Served before it: admitted (and so received) earlier, on the runtimes' one clock.
    before_refusal = tokens_of(events.filter(status="ok", started_at__lt=first_refusal.started_at))
    print(f"\nshared budget: {spent} of {SHARED_LIMIT} tokens spent, {before_refusal} "
          f"({before_refusal / SHARED_LIMIT:.1%}) before the first refusal ({first_refusal.runtime_id}, "
          f"{time.monotonic() - began:.0f} s in, {fleet.evaluations_queued} evaluations queued)")
    assert spent <= SHARED_LIMIT, f"overspent: {spent} tokens stored against a hard limit of {SHARED_LIMIT}"
    assert before_refusal >= Decimal("0.9") * SHARED_LIMIT, \
        f"phantom refusals: only {before_refusal} of {SHARED_LIMIT} tokens were served before the first refusal"
    shared_grants = list(Grant.objects.filter(budget=shared).select_related("runtime"))
    assert sum(g.granted for g in shared_grants) <= SHARED_LIMIT
    for grant in shared_grants:
        assert tokens_of(events.filter(status="ok", runtime_id=grant.runtime.name)) <= grant.granted, grant.runtime

    # 2. The second budget: one runtime is killed with SIGKILL once about half of it is served.
    victim = fleet.member(NAMES[-1])
    at_kill: dict[str, Any] = {}

    def kill_halfway(load: Load) -> None:
        wait_for(lambda: load.served() >= KILLED_LIMIT / 2, "half of the second budget to be served", fleet)
        at_kill["at"] = victim.kill()
        at_kill["grant"] = Grant.objects.get(budget=killed_mid_period, runtime__name=victim.name)
        at_kill["live"] = Runtime.objects.filter(last_seen_at__gte=timezone.now() - grants.LIVE_WINDOW).count()

    load_b = Load("fleet-b")
    load_b.run(fleet.members, during=kill_halfway)
    assert set(load_b.refusals()) <= {(429, "rejected_budget")}, load_b.refusals()
    granted = Grant.objects.get(budget=killed_mid_period, runtime__name=victim.name).granted

    # Started again over its spool, it sends what it spooled before the kill. Every request
    # answered is then stored exactly once, but for what the killed runtime answered in its last
    # moment: an event waits in memory for the exporter's writer thread, which gives it its number
    # and writes it to the spool, so a SIGKILL in between loses it. Those are counted and must be
    # recent; everything any runtime numbered is stored, none twice.
    victim.start(fleet.control_plane_url)
    victim.wait()
    wait_for(victim.spool_drained, "the restarted runtime to send what it spooled", fleet)
    answered = load_a.answered() + load_b.answered()
    last_moment = [a for a in answered if a.runtime == victim.name and a.at >= at_kill["at"] - LAST_MOMENT_S]
    wait_stored(fleet, [a for a in answered if a.runtime != victim.name or a.at < at_kill["at"] - LAST_MOMENT_S])
    rows = stored_rows(answered)
    assert set(rows.values()) == {1}, {user: count for user, count in rows.items() if count != 1}
    lost = [a for a in last_moment if a.user not in rows]
    for name in NAMES:
        assert numbered_without_gaps(name), f"{name}: an event it numbered was lost or stored twice"

    events = scope("fleet-b")
    spent = tokens_of(events.filter(status="ok"))
    victim_spent = Decimal(tokens_of(events.filter(status="ok", runtime_id=victim.name)))
    stranded = granted - victim_spent
    grant = at_kill["grant"]
    held = grant.granted - victim_spent
    starter = KILLED_LIMIT * grants.STARTER_FRACTION / at_kill["live"]
    top_up = max(starter, 2 * (victim_spent - grant.reported_at_last_chunk))
    bound = max(held, top_up)
    print(f"killed mid-period: {spent} of {KILLED_LIMIT} tokens spent; {victim.name} granted {granted:.0f}, spent "
          f"{victim_spent}, so {stranded:.0f} stranded; bound {bound:.0f} (held at the kill {held:.0f}, one more "
          f"top-up {top_up:.0f}); {len(answered)} requests answered, {len(lost)} lost (answered by {victim.name} "
          f"in the {LAST_MOMENT_S:g} s before its kill: {len(last_moment)}); {time.monotonic() - began:.0f} s "
          f"from the budgets' creation")
    assert spent <= KILLED_LIMIT, f"overspent: {spent} tokens stored against a hard limit of {KILLED_LIMIT}"
    assert stranded <= bound, f"the killed runtime strands {stranded} tokens, more than the policy's {bound}"
    assert spent + stranded >= Decimal("0.9") * KILLED_LIMIT, "the two left spent what the killed one did not hold"
