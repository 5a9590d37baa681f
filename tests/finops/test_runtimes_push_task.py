"""The Celery task ``push_ruleset`` makes one attempt per run and leaves the waiting to Celery: a
transient failure (unreachable, timeout, 429, 5xx) is retried with ``self.retry`` after a capped,
fully jittered backoff, so the worker is free between attempts and a runtime that is down costs
the others nothing.

Most tests run the task through Celery's own tracer as a worker does (``build_tracer``, not eager),
with the task's ``apply_async`` replaced by a recorder: what Celery would queue for the retry (its
countdown, expiry and arguments) is what they assert. The last one runs a real worker process.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.app.trace import build_tracer

from finops.runtimes import tasks
from finops.runtimes.models import Ruleset, Runtime
from finops.runtimes.services import (
    PUSH_ATTEMPTS,
    PUSH_BACKOFF_BASE_S,
    PUSH_BACKOFF_CAP_S,
    PUSH_EXPIRES_S,
    ruleset_store,
)
from tests.celery_process import FILESYSTEM, REDIS_URL, celery_worker, redis_up, send, task_log, unique_queue
from tests.finops.stub_runtime import StubRuntime, closed_port_url

EMPTY = {"prices": {}, "rules": [], "allowances": []}


class Scheduled(list):
    """Stands in for ``push_ruleset.apply_async``: records each message Celery would queue."""

    def __call__(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, **options: Any) -> None:
        self.append({"args": tuple(args), "kwargs": kwargs or {}, **options})


@pytest.fixture
def scheduled(monkeypatch: pytest.MonkeyPatch) -> Scheduled:
    recorder = Scheduled()
    monkeypatch.setattr(tasks.push_ruleset, "apply_async", recorder)
    return recorder


def run_in_worker(*args: Any, retries: int = 0) -> tuple[str, Any]:
    """Run ``push_ruleset(*args)`` as a worker runs a message (its ``retries`` so far); return the
    task's state (SUCCESS, RETRY, FAILURE) and its return value or exception."""
    task = tasks.push_ruleset
    tracer = build_tracer(task.name, task, app=task.app, eager=False, propagate=False)
    task_id = str(uuid.uuid4())
    ran = tracer(task_id, args, {}, {"id": task_id, "retries": retries,
                                     "delivery_info": {"exchange": "", "routing_key": "pushes"}})
    state = ran.info.state if ran.info is not None else "SUCCESS"
    return state, ran.retval


def make_runtime(name: str, base_url: str) -> Runtime:
    runtime = Runtime.objects.create(name=name, base_url=base_url)
    ruleset_store(runtime=runtime, content={"runtime_id": name, **EMPTY})
    return runtime


@pytest.fixture
def stub() -> Iterator[StubRuntime]:
    server = StubRuntime()
    yield server
    server.close()


@pytest.mark.django_db
def test_a_down_runtime_gets_a_retry_scheduled_and_the_worker_is_free_at_once(
        scheduled: Scheduled, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = make_runtime("rt-down", closed_port_url())
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)

    began = time.monotonic()
    state, _ = run_in_worker(runtime.pk)
    elapsed = time.monotonic() - began

    assert state == "RETRY"
    assert slept == [] and elapsed < 1.0, f"the task waited ({elapsed:.2f} s, sleeps {slept})"
    (retry,) = scheduled
    assert retry["args"] == (runtime.pk, 1), "the retry carries the version its push began with"
    assert retry["retries"] == 1 and retry["queue"] == "pushes"
    assert 0 <= retry["countdown"] <= PUSH_BACKOFF_BASE_S
    assert retry["expires"] == pytest.approx(retry["countdown"] + PUSH_EXPIRES_S)
    row = Ruleset.objects.get(runtime=runtime)
    assert row.last_push_outcome.startswith(f"attempt 1 of {PUSH_ATTEMPTS} failed, retrying: ConnectError")
    assert row.last_push_version == 1


@pytest.mark.django_db
@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_429_and_5xx_are_retried(scheduled: Scheduled, stub: StubRuntime, status: int) -> None:
    runtime = make_runtime("rt-1", stub.url)
    stub.script = [(status, {"error": {"message": "busy"}})]

    state, _ = run_in_worker(runtime.pk)

    assert state == "RETRY" and len(scheduled) == 1
    assert len(stub.requests) == 1
    runtime.refresh_from_db()
    assert runtime.last_ruleset_ack is None


@pytest.mark.django_db
@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_other_4xx_answers_are_not_retried(scheduled: Scheduled, stub: StubRuntime, status: int) -> None:
    runtime = make_runtime("rt-1", stub.url)
    stub.script = [(status, {"error": {"message": "Incorrect admin token."}})]

    state, result = run_in_worker(runtime.pk)

    assert state == "SUCCESS" and scheduled == []
    assert (result["accepted"], result["detail"]) == (False, f"HTTP {status}: Incorrect admin token.")


@pytest.mark.django_db
def test_a_retry_that_succeeds_acknowledges_the_version(scheduled: Scheduled, stub: StubRuntime) -> None:
    runtime = make_runtime("rt-1", stub.url)

    state, result = run_in_worker(runtime.pk, 1, retries=2)

    assert state == "SUCCESS" and scheduled == []
    assert (result["accepted"], result["acknowledged"], result["attempt"]) == (True, 1, 3)
    runtime.refresh_from_db()
    assert runtime.last_ruleset_ack == 1
    assert Ruleset.objects.get(runtime=runtime).last_push_outcome == "accepted: runtime holds v1"


@pytest.mark.django_db
def test_the_backoff_grows_with_each_retry_up_to_the_cap(scheduled: Scheduled) -> None:
    runtime = make_runtime("rt-down", closed_port_url())
    for retries in range(PUSH_ATTEMPTS - 1):
        state, _ = run_in_worker(runtime.pk, 1, retries=retries)
        assert state == "RETRY"
    ceilings = [min(PUSH_BACKOFF_CAP_S, PUSH_BACKOFF_BASE_S * 2 ** n) for n in range(PUSH_ATTEMPTS - 1)]
    assert [r["retries"] for r in scheduled] == list(range(1, PUSH_ATTEMPTS))
    assert all(0 <= r["countdown"] <= ceiling for r, ceiling in zip(scheduled, ceilings, strict=True))


@pytest.mark.django_db
def test_the_last_attempt_gives_up_without_scheduling_another(scheduled: Scheduled) -> None:
    runtime = make_runtime("rt-down", closed_port_url())

    state, result = run_in_worker(runtime.pk, 1, retries=PUSH_ATTEMPTS - 1)

    assert state == "SUCCESS" and scheduled == []
    assert result["detail"].startswith(f"gave up after {PUSH_ATTEMPTS} attempts: ConnectError")
    assert Ruleset.objects.get(runtime=runtime).last_push_outcome == result["detail"][:300]


@pytest.mark.django_db
def test_a_retry_for_an_older_version_stops_once_a_newer_one_is_issued(scheduled: Scheduled,
                                                                       stub: StubRuntime) -> None:
    runtime = make_runtime("rt-1", stub.url)
    ruleset_store(runtime=runtime, content={"runtime_id": "rt-1", **EMPTY, "rules": [{"id": "newer"}]})

    state, result = run_in_worker(runtime.pk, 1, retries=2)

    assert state == "SUCCESS" and scheduled == [] and stub.requests == []
    assert result["detail"].startswith("superseded: v2 was issued since")


@pytest.mark.django_db
def test_a_push_to_a_runtime_that_holds_the_newest_version_sends_nothing(scheduled: Scheduled,
                                                                         stub: StubRuntime) -> None:
    runtime = make_runtime("rt-1", stub.url)
    Runtime.objects.filter(pk=runtime.pk).update(last_ruleset_ack=1)

    state, result = run_in_worker(runtime.pk)

    assert state == "SUCCESS" and scheduled == [] and stub.requests == []
    assert result["detail"] == "nothing to push: runtime holds v1"


def test_a_push_left_in_the_queue_expires() -> None:
    assert tasks.push_ruleset.expires == PUSH_EXPIRES_S


# -- a real worker ------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("broker", [FILESYSTEM, REDIS_URL], ids=["embedded", "redis"])
def test_a_down_runtime_costs_the_others_nothing_on_one_worker(broker: str, tmp_path: Path) -> None:
    """One worker with one process: the push to the runtime that is down is queued first, yet the
    two runtimes that are up are acknowledged right after its first attempt, before its second."""
    if broker != FILESYSTEM and not redis_up(broker):
        pytest.skip(f"no Redis at {broker}")
    down = make_runtime("rt-down", closed_port_url())
    ups = [StubRuntime(), StubRuntime()]
    try:
        up_runtimes = [make_runtime(f"rt-up-{n}", stub.url) for n, stub in enumerate(ups)]
        queue = unique_queue("push-test")
        sent = []
        for runtime in (down, *up_runtimes):
            sent.append(send(tasks.push_ruleset, (runtime.pk,), broker=broker, var_dir=tmp_path, queue=queue))
            # The filesystem transport names a message by the millisecond it was queued and a random
            # uuid, and delivers in name order: two queued in one millisecond come in either order.
            time.sleep(0.005)
        down_id, *up_ids = sent
        with celery_worker(broker=broker, var_dir=tmp_path, queue=queue, log=tmp_path / "worker.log") as worker:

            def seen() -> tuple[list[str], list[str]]:
                log = task_log(worker)
                return ([what for _, task_id, what in log if task_id == down_id],
                        [what for _, task_id, what in log if task_id in up_ids])

            deadline = time.monotonic() + 120  # the worker's start on a loaded machine included
            while seen()[0].count("retry") < 2 or seen()[1].count("succeeded") < 2:
                assert time.monotonic() < deadline, f"the pushes did not run:\n{worker.log_tail()}"
                worker.check()
                time.sleep(0.1)
            log = task_log(worker)

        # Taken first, the down runtime's push failed and went back to the broker with a countdown;
        # the other two were pushed and acknowledged next, and its second attempt came after them.
        down_retries = [i for i, e in enumerate(log) if e[1:] == (down_id, "retry")]
        up_done = [next(i for i, e in enumerate(log) if e[1:] == (up_id, "succeeded")) for up_id in up_ids]
        assert down_retries[0] < min(up_done) and max(up_done) < down_retries[1], log
        assert log[max(up_done)][0] - log[down_retries[0]][0] < dt.timedelta(seconds=5), log
        assert Runtime.objects.filter(pk__in=[r.pk for r in up_runtimes], last_ruleset_ack=1).count() == 2
        assert [len(stub.requests) for stub in ups] == [1, 1]
        assert "failed, retrying: ConnectError" in Ruleset.objects.get(runtime=down).last_push_outcome
    finally:
        for stub in ups:
            stub.close()
