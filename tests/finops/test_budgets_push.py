"""Rulesets are pushed to each runtime over real HTTP (a stub runtime in a thread here): PUT
/admin/ruleset with the runtime's admin token, and the version the runtime says it holds is
recorded as acknowledged. ``ruleset_push`` is one attempt that never waits: a failure worth
retrying comes back marked so, and the Celery task (``test_runtimes_push_task``) schedules the
retry after a capped, jittered backoff."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

import pytest

from finops.runtimes.models import Ruleset, Runtime
from finops.runtimes.selectors import rulesets_to_push
from finops.runtimes.services import PUSH_ATTEMPTS, PUSH_BACKOFF_CAP_S, push_delay, ruleset_push, ruleset_store
from tests.finops.stub_runtime import DROP, StubRuntime, closed_port_url

pytestmark = pytest.mark.django_db

EMPTY = {"runtime_id": "rt-1", "prices": {}, "rules": [], "allowances": []}


@pytest.fixture
def stub() -> Iterator[StubRuntime]:
    server = StubRuntime()
    yield server
    server.close()


@pytest.fixture
def runtime(stub: StubRuntime) -> Runtime:
    runtime = Runtime.objects.create(name="rt-1", base_url=stub.url + "/")
    ruleset_store(runtime=runtime, content=EMPTY)
    return runtime


def recorded(runtime: Runtime) -> Ruleset:
    return Ruleset.objects.get(runtime=runtime)


def test_a_push_sends_the_document_with_the_admin_token_and_records_the_acknowledgement(
        stub: StubRuntime, runtime: Runtime) -> None:
    outcome = ruleset_push(runtime=runtime)

    (request,) = stub.requests
    assert request["path"] == "/admin/ruleset"
    assert request["authorization"] == f"Bearer {runtime.admin_token()}"
    assert request["document"] == recorded(runtime).document
    assert (outcome.accepted, outcome.acknowledged, outcome.retry) == (True, 1, False)
    runtime.refresh_from_db()
    assert runtime.last_ruleset_ack == 1
    assert recorded(runtime).last_push_outcome == "accepted: runtime holds v1"
    assert rulesets_to_push(now=recorded(runtime).last_push_at) == []


@pytest.mark.parametrize("answer", [(503, {"error": {"message": "busy"}}), (500, {}), (429, {}), DROP],
                         ids=["503", "500", "429", "dropped"])
def test_a_failure_worth_retrying_is_one_send_marked_for_a_retry(stub: StubRuntime, runtime: Runtime,
                                                                 answer: object) -> None:
    stub.script = [answer]

    outcome = ruleset_push(runtime=runtime)

    assert len(stub.requests) == 1, "one attempt sends once; the retry is the caller's to schedule"
    assert (outcome.accepted, outcome.retry, outcome.attempt) == (False, True, 1)
    assert outcome.detail.startswith(f"attempt 1 of {PUSH_ATTEMPTS} failed, retrying: ")
    row = recorded(runtime)
    assert (row.last_push_version, row.last_push_outcome) == (1, outcome.detail)
    assert row.last_push_at >= row.push_started_at
    runtime.refresh_from_db()
    assert runtime.last_ruleset_ack is None


def test_the_last_attempt_gives_up_and_says_so(stub: StubRuntime, runtime: Runtime) -> None:
    stub.script = [(503, {})]

    outcome = ruleset_push(runtime=runtime, attempt=4, attempts=4)

    assert (outcome.accepted, outcome.retry) == (False, False)
    assert outcome.detail == "gave up after 4 attempts: HTTP 503"
    assert recorded(runtime).last_push_outcome == "gave up after 4 attempts: HTTP 503"


def test_an_unreachable_runtime_is_marked_for_a_retry() -> None:
    runtime = Runtime.objects.create(name="rt-gone", base_url=closed_port_url())
    ruleset_store(runtime=runtime, content={"rules": []})

    outcome = ruleset_push(runtime=runtime)

    assert (outcome.accepted, outcome.retry) == (False, True)
    assert "ConnectError" in outcome.detail


def test_409_records_the_version_the_runtime_already_holds_without_retrying(stub: StubRuntime,
                                                                           runtime: Runtime) -> None:
    stub.script = [(409, {"error": {"type": "conflict_error", "message": "not newer"}, "version": 1})]

    outcome = ruleset_push(runtime=runtime)

    assert len(stub.requests) == 1
    assert (outcome.acknowledged, outcome.accepted, outcome.retry) == (1, True, False)
    runtime.refresh_from_db()
    assert runtime.last_ruleset_ack == 1


def test_409_above_every_version_issued_here_reissues_the_document_above_it_and_sends_it_at_once(
        stub: StubRuntime, runtime: Runtime) -> None:
    # The runtime holds v41 from a control plane whose database was since restored from a backup.
    stub.script = [(409, {"error": {"message": "not newer"}, "version": 41}), (200, None)]

    outcome = ruleset_push(runtime=runtime)

    assert [r["document"]["version"] for r in stub.requests] == [1, 42]
    assert stub.requests[1]["document"]["rules"] == stub.requests[0]["document"]["rules"]
    assert (outcome.accepted, outcome.acknowledged, outcome.pushed_version) == (True, 42, 42)
    assert recorded(runtime).version == 42


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_answers_that_retrying_cannot_fix_are_recorded_and_not_retried(stub: StubRuntime, runtime: Runtime,
                                                                       status: int) -> None:
    stub.script = [(status, {"error": {"message": "Incorrect admin token."}})]

    outcome = ruleset_push(runtime=runtime)

    assert len(stub.requests) == 1
    assert (outcome.accepted, outcome.retry) == (False, False)
    assert outcome.detail == f"HTTP {status}: Incorrect admin token."


@pytest.mark.parametrize("body", [b"not json", json.dumps({"version": "7"}).encode(), json.dumps([1]).encode(),
                                  json.dumps({"version": -1}).encode(), json.dumps({"version": True}).encode()])
def test_a_200_without_a_whole_version_is_not_taken_as_an_acknowledgement(stub: StubRuntime, runtime: Runtime,
                                                                         body: bytes) -> None:
    stub.script = [(200, json.loads(body) if body != b"not json" else "not json")]

    outcome = ruleset_push(runtime=runtime)

    assert (outcome.accepted, outcome.retry) == (False, False)
    runtime.refresh_from_db()
    assert runtime.last_ruleset_ack is None


def test_a_runtime_that_already_holds_the_newest_version_is_sent_nothing(stub: StubRuntime,
                                                                         runtime: Runtime) -> None:
    assert ruleset_push(runtime=runtime).accepted
    before = recorded(runtime)

    outcome = ruleset_push(runtime=runtime, attempt=3)

    assert len(stub.requests) == 1
    assert (outcome.accepted, outcome.retry, outcome.detail) == (True, False, "nothing to push: runtime holds v1")
    assert recorded(runtime).last_push_at == before.last_push_at


def test_a_push_begun_for_an_older_version_is_superseded_by_the_newer_ones_own(stub: StubRuntime,
                                                                                runtime: Runtime) -> None:
    ruleset_store(runtime=runtime, content={**EMPTY, "rules": [{"id": "newer"}]})  # v2, pushed on its own

    outcome = ruleset_push(runtime=runtime, attempt=2, version=1)

    assert stub.requests == []
    assert (outcome.accepted, outcome.retry) == (False, False)
    assert outcome.detail.startswith("superseded: v2 was issued since")


def test_backoff_is_exponential_capped_and_fully_jittered() -> None:
    rng = random.Random(7)
    for attempt in range(1, 12):
        ceiling = min(PUSH_BACKOFF_CAP_S, 0.5 * 2 ** (attempt - 1))
        delays = [push_delay(attempt, rng=rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8 and min(delays) < ceiling * 0.2  # spread over the whole range
