"""Rulesets are pushed to each runtime over real HTTP (a stub runtime in a thread here): PUT
/admin/ruleset with the runtime's admin token, retried with capped, jittered backoff, and the
version the runtime says it holds is recorded as acknowledged."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from finops.runtimes.models import Ruleset, Runtime
from finops.runtimes.selectors import rulesets_to_push
from finops.runtimes.services import PUSH_BACKOFF_CAP_S, push_delay, ruleset_push, ruleset_store

pytestmark = pytest.mark.django_db

DROP = "drop"  # close the connection without answering


class StubRuntime:
    """A tiny HTTP server that answers PUT /admin/ruleset from a script and records requests."""

    def __init__(self) -> None:
        self.script: list[Any] = []
        self.requests: list[dict[str, Any]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                stub.requests.append({"path": self.path, "authorization": self.headers.get("Authorization"),
                                      "document": json.loads(body)})
                answer = stub.script.pop(0) if stub.script else (200, None)
                if answer == DROP:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                status, payload = answer
                if payload is None:
                    payload = {"version": stub.requests[-1]["document"]["version"]}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub() -> Iterator[StubRuntime]:
    server = StubRuntime()
    yield server
    server.close()


@pytest.fixture
def runtime(stub: StubRuntime) -> Runtime:
    runtime = Runtime.objects.create(name="rt-1", base_url=stub.url + "/")
    ruleset_store(runtime=runtime, content={"runtime_id": "rt-1", "prices": {}, "rules": [], "allowances": []})
    return runtime


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def test_a_push_sends_the_document_with_the_admin_token_and_records_the_acknowledgement(
        stub: StubRuntime, runtime: Runtime) -> None:
    outcome = ruleset_push(runtime=runtime)

    (request,) = stub.requests
    assert request["path"] == "/admin/ruleset"
    assert request["authorization"] == f"Bearer {runtime.admin_token()}"
    assert request["document"] == Ruleset.objects.get(runtime=runtime).document
    assert (outcome.accepted, outcome.acknowledged) == (True, 1)
    runtime.refresh_from_db()
    assert runtime.last_ruleset_ack == 1
    assert Ruleset.objects.get(runtime=runtime).last_push_outcome == "accepted: runtime holds v1"
    assert rulesets_to_push(now=Ruleset.objects.get(runtime=runtime).last_push_at) == []


def test_failures_are_retried_with_backoff_until_the_runtime_accepts(stub: StubRuntime, runtime: Runtime) -> None:
    stub.script = [(503, {"error": {"message": "busy"}}), DROP, (500, {}), (200, None)]
    sleeps = Sleeps()

    outcome = ruleset_push(runtime=runtime, sleep=sleeps)

    assert len(stub.requests) == 4
    assert (outcome.accepted, outcome.attempts) == (True, 4)
    assert len(sleeps) == 3
    assert all(0 <= delay <= PUSH_BACKOFF_CAP_S for delay in sleeps)


def test_a_runtime_that_stays_down_is_given_up_on_after_the_allowed_attempts(stub: StubRuntime,
                                                                            runtime: Runtime) -> None:
    stub.script = [(503, {})] * 10
    sleeps = Sleeps()

    outcome = ruleset_push(runtime=runtime, attempts=4, sleep=sleeps)

    assert len(stub.requests) == 4
    assert not outcome.accepted
    assert outcome.detail == "gave up after 4 attempts: HTTP 503"
    runtime.refresh_from_db()
    assert runtime.last_ruleset_ack is None
    assert Ruleset.objects.get(runtime=runtime).last_push_outcome == "gave up after 4 attempts: HTTP 503"


def test_an_unreachable_runtime_is_retried_then_reported() -> None:
    runtime = Runtime.objects.create(name="rt-gone", base_url="http://127.0.0.1:9")  # discard: nothing listens
    ruleset_store(runtime=runtime, content={"rules": []})

    outcome = ruleset_push(runtime=runtime, attempts=3, sleep=Sleeps())

    assert (outcome.accepted, outcome.attempts) == (False, 3)
    assert outcome.detail.startswith("gave up after 3 attempts: ConnectError")


def test_409_records_the_version_the_runtime_already_holds_without_retrying(stub: StubRuntime,
                                                                           runtime: Runtime) -> None:
    stub.script = [(409, {"error": {"type": "conflict_error", "message": "not newer"}, "version": 1})]

    outcome = ruleset_push(runtime=runtime, sleep=Sleeps())

    assert len(stub.requests) == 1
    assert (outcome.acknowledged, outcome.accepted) == (1, True)
    runtime.refresh_from_db()
    assert runtime.last_ruleset_ack == 1


def test_409_above_every_version_issued_here_reissues_the_document_above_it(stub: StubRuntime,
                                                                           runtime: Runtime) -> None:
    # The runtime holds v41 from a control plane whose database was since restored from a backup.
    stub.script = [(409, {"error": {"message": "not newer"}, "version": 41}), (200, None)]

    outcome = ruleset_push(runtime=runtime, sleep=Sleeps())

    assert [r["document"]["version"] for r in stub.requests] == [1, 42]
    assert stub.requests[1]["document"]["rules"] == stub.requests[0]["document"]["rules"]
    assert (outcome.accepted, outcome.acknowledged) == (True, 42)
    assert Ruleset.objects.get(runtime=runtime).version == 42


@pytest.mark.parametrize("status", [401, 403, 404, 422])
def test_answers_that_retrying_cannot_fix_are_recorded_and_not_retried(stub: StubRuntime, runtime: Runtime,
                                                                       status: int) -> None:
    stub.script = [(status, {"error": {"message": "Incorrect admin token."}})]

    outcome = ruleset_push(runtime=runtime, sleep=Sleeps())

    assert len(stub.requests) == 1
    assert not outcome.accepted
    assert outcome.detail == f"HTTP {status}: Incorrect admin token."


@pytest.mark.parametrize("body", [b"not json", json.dumps({"version": "7"}).encode(), json.dumps([1]).encode(),
                                  json.dumps({"version": -1}).encode(), json.dumps({"version": True}).encode()])
def test_a_200_without_a_whole_version_is_not_taken_as_an_acknowledgement(stub: StubRuntime, runtime: Runtime,
                                                                         body: bytes) -> None:
    stub.script = [(200, json.loads(body) if body != b"not json" else "not json")]

    outcome = ruleset_push(runtime=runtime, sleep=Sleeps())

    assert not outcome.accepted
    runtime.refresh_from_db()
    assert runtime.last_ruleset_ack is None


def test_backoff_is_exponential_capped_and_fully_jittered() -> None:
    rng = random.Random(7)
    for attempt in range(1, 12):
        ceiling = min(PUSH_BACKOFF_CAP_S, 0.5 * 2 ** (attempt - 1))
        delays = [push_delay(attempt, rng=rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8 and min(delays) < ceiling * 0.2  # spread over the whole range
