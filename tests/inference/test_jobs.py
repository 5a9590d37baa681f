"""Async jobs, live: accepted at once, run in the background through the sync endpoints' path,
followed by SSE (resumable with Last-Event-ID), cancelled by DELETE, kept across a restart,
dead-lettered when they fail and replayed by an admin; each tenant sees only its own."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from inference.config import RuntimeConfig, Upstream
from inference.engine.models import LoadedModel
from inference.jobs.store import FINISHED
from tests.inference.fake_upstream import FakeUpstream, fake_upstream, text_of
from tests.inference.live import ACME, GLOBEX, INITECH, LiveRuntime, serve, slowed, tiny_config
from tests.inference.rulesets import ADMIN_TOKEN, admin

CHAT_URL = "/v1/chat/completions"
UPSTREAM_CHAT = {"model": "big", "messages": [{"role": "user", "content": "Hi"}]}


def chat(max_tokens: int = 5, **fields: Any) -> dict[str, Any]:
    return {"model": "tiny-random", "messages": [{"role": "user", "content": "Tell me a story"}],
            "max_tokens": max_tokens, "ignore_eos": True, **fields}


def jobs_config(**overrides: Any) -> RuntimeConfig:
    return tiny_config(admin_token=ADMIN_TOKEN, **overrides)


@pytest.fixture(scope="module")
def live(tiny_model: LoadedModel) -> Iterator[LiveRuntime]:
    with serve(jobs_config(), preloaded=(tiny_model,)) as server:
        yield server


@pytest.fixture
def slow(tiny_model: LoadedModel) -> Iterator[LiveRuntime]:
    """A runtime whose model takes 50 ms a step, one job at a time, so a test can act mid-job."""
    with serve(jobs_config(jobs_concurrency=1), preloaded=(slowed(tiny_model, 0.05),)) as server:
        yield server


@dataclasses.dataclass(frozen=True)
class SseEvent:
    id: int
    type: str
    data: dict[str, Any]


def submit(live: LiveRuntime, body: dict[str, Any] | None = None, *, key: str = ACME, url: str = CHAT_URL,
           **headers: str) -> httpx.Response:
    return live.client(key, **headers).post("/v1/jobs", json={"url": url, "body": body or chat()})


def submitted(live: LiveRuntime, body: dict[str, Any] | None = None, **kwargs: Any) -> str:
    response = submit(live, body, **kwargs)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def job(live: LiveRuntime, job_id: str, key: str = ACME) -> dict[str, Any]:
    response = live.client(key).get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def finished(live: LiveRuntime, job_id: str, *, key: str = ACME, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (state := job(live, job_id, key))["status"] not in FINISHED:
        assert time.monotonic() < deadline, f"job still {state['status']}"
        time.sleep(0.02)
    return state


def read_events(live: LiveRuntime, job_id: str, *, last_event_id: int | None = None, stop_after: int | None = None,
                key: str = ACME) -> list[SseEvent]:
    """The job's event stream, read until the server ends it (or ``stop_after`` events)."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    events: list[SseEvent] = []
    with live.client(key, **headers).stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in response.iter_lines():
            if line.startswith(":"):
                continue
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
                continue
            if fields:
                events.append(SseEvent(int(fields["id"]), fields["event"], json.loads(fields["data"])))
                fields = {}
            if stop_after is not None and len(events) >= stop_after:
                break
    return events


def text_of_tokens(events: list[SseEvent]) -> str:
    return "".join(e.data["text"] for e in events if e.type == "token")


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"type", "message", "code", "param"}
    if code is not None:
        assert error["code"] == code
    return error  # type: ignore[no-any-return]


# -- accepted, run, answered -----------------------------------------------------------------------


@pytest.mark.parametrize(("url", "body", "kind"), [
    (CHAT_URL, chat(5), "chat.completion"),
    ("/v1/completions", {"model": "tiny-random", "prompt": "Once upon", "max_tokens": 5, "ignore_eos": True},
     "text_completion"),
], ids=["chat", "completion"])
def test_a_job_is_accepted_at_once_and_completes_with_the_sync_endpoints_answer(
        live: LiveRuntime, url: str, body: dict[str, Any], kind: str) -> None:
    live.events.clear()
    response = submit(live, body, url=url)

    assert response.status_code == 202
    accepted = response.json()
    assert response.headers["Location"] == f"/v1/jobs/{accepted['id']}"
    assert (accepted["object"], accepted["status"], accepted["model"], accepted["result"]) == (
        "job", "queued", "tiny-random", None)
    done = finished(live, accepted["id"])
    assert (done["status"], done["attempts"], done["error"]) == ("succeeded", 1, None)
    assert done["finished_at"] >= done["started_at"] >= done["created_at"]
    result = done["result"]
    assert (result["object"], result["model"]) == (kind, "tiny-random")
    assert result["usage"]["completion_tokens"] == 5
    (event,) = live.wait_for_events(1)
    assert (event.tenant, event.model_served, event.status, event.priority, event.completion_tokens) == (
        "acme", "tiny-random", "ok", "low", 5)


@pytest.mark.parametrize(("key", "asked", "priority"), [(ACME, None, "low"), (ACME, "high", "high"),
                                                        (INITECH, "high", "normal")])
def test_a_job_runs_at_low_priority_unless_asked_and_within_its_tier(live: LiveRuntime, key: str, asked: str | None,
                                                                     priority: str) -> None:
    live.events.clear()
    headers = {"X-Wattson-Priority": asked} if asked else {}
    job_id = submitted(live, key=key, **{"X-Wattson-Feature": "nightly", **headers})
    assert finished(live, job_id, key=key)["priority"] == priority
    (event,) = live.wait_for_events(1)
    assert (event.priority, event.feature) == (priority, "nightly")


def test_job_events_stream_by_sse_and_resume_after_the_last_event_id(slow: LiveRuntime) -> None:
    job_id = submitted(slow, chat(12))

    first = read_events(slow, job_id, stop_after=3)  # then the client drops
    assert [(e.id, e.type) for e in first] == [(1, "queued"), (2, "running"), (3, "token")]
    assert first[1].data == {"status": "running", "attempt": 1}
    rest = read_events(slow, job_id, last_event_id=3)
    assert job(slow, job_id)["status"] == "succeeded"

    events = first + rest
    assert [e.id for e in events] == list(range(1, len(events) + 1)), "no event lost or repeated"
    assert events[-1].type == "succeeded" and rest[0].id == 4
    tokens = [e.type for e in events[2:-1]]
    assert set(tokens) == {"token"} and 3 <= len(tokens) <= 12, "pieces of text as the 12 tokens came"
    result = events[-1].data["result"]
    assert text_of_tokens(events) == result["choices"][0]["message"]["content"]
    assert result == job(slow, job_id)["result"]

    assert read_events(slow, job_id, last_event_id=0) == events, "a finished job's log is replayed whole"
    assert read_events(slow, job_id, last_event_id=events[-1].id) == [], "nothing after the last: the stream ends"


def test_a_malformed_last_event_id_is_a_400(live: LiveRuntime) -> None:
    job_id = submitted(live)
    response = live.client(**{"Last-Event-ID": "abc"}).get(f"/v1/jobs/{job_id}/events")
    assert_error(response, 400, "invalid_last_event_id")
    finished(live, job_id)


# -- cancelling ------------------------------------------------------------------------------------


def test_delete_cancels_a_running_job_and_frees_its_engine_slot(slow: LiveRuntime) -> None:
    job_id = submitted(slow, chat(200))
    assert len(read_events(slow, job_id, stop_after=4)) == 4  # queued, running and two tokens
    engine = slow.runtime.backends["tiny-random"].engine  # type: ignore[union-attr]
    wait_for(lambda: engine.stats.running == 1)
    assert slow.runtime.running() == 1, "the job holds a running slot"

    response = slow.client().delete(f"/v1/jobs/{job_id}")

    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    wait_for(lambda: engine.stats.running == 0 and slow.runtime.running() == 0, timeout=3)
    (event,) = slow.wait_for_events(1)
    assert (event.status, event.http_status, event.error_type) == ("cancelled", 499, "job_cancelled")
    assert 2 <= event.completion_tokens < 200
    assert job(slow, job_id)["status"] == "cancelled" and job(slow, job_id)["result"] is None
    assert read_events(slow, job_id)[-1].type == "cancelled"
    assert_error(slow.client().delete(f"/v1/jobs/{job_id}"), 409, "job_finished")


def test_delete_cancels_a_queued_job_before_it_runs(slow: LiveRuntime) -> None:
    running = submitted(slow, chat(40))
    queued = submitted(slow, chat(5))
    wait_for(lambda: job(slow, running)["status"] == "running")
    assert job(slow, queued)["status"] == "queued"

    assert slow.client().delete(f"/v1/jobs/{queued}").json()["status"] == "cancelled"

    assert finished(slow, running)["status"] == "succeeded"
    assert job(slow, queued)["attempts"] == 0, "it never ran"
    assert [e.type for e in read_events(slow, queued)] == ["queued", "cancelled"]
    assert len(slow.wait_for_events(1)) == 1, "only the job that ran made a request event"


def test_another_tenants_key_gets_404_for_the_job(slow: LiveRuntime) -> None:
    job_id = submitted(slow, chat(8))
    other = slow.client(GLOBEX)

    for response in (other.get(f"/v1/jobs/{job_id}"), other.get(f"/v1/jobs/{job_id}/events"),
                     other.delete(f"/v1/jobs/{job_id}")):
        assert_error(response, 404, "job_not_found")
    assert assert_error(other.get("/v1/jobs/job_nonexistent"), 404)["type"] == "not_found_error"
    assert finished(slow, job_id)["status"] == "succeeded", "the other tenant's DELETE cancelled nothing"


# -- surviving a restart ---------------------------------------------------------------------------


def test_running_and_queued_jobs_survive_a_runtime_restart_and_complete(tiny_model: LoadedModel) -> None:
    config = jobs_config(jobs_concurrency=1)
    model = slowed(tiny_model, 0.05)
    with serve(config, preloaded=(model,)) as first:
        interrupted = submitted(first, chat(40))
        waiting = submitted(first, chat(6))
        wait_for(lambda: any(e.type == "token" for e in read_events(first, interrupted, stop_after=3)))
        assert job(first, waiting)["status"] == "queued"
    # The first runtime is gone, mid-job; another starts on the same state directory.
    with serve(config, preloaded=(model,)) as second:
        resumed, queued = finished(second, interrupted), finished(second, waiting)
        events = read_events(second, interrupted)

    assert (resumed["status"], resumed["attempts"]) == ("succeeded", 2)
    assert resumed["result"]["usage"]["completion_tokens"] == 40
    assert (queued["status"], queued["attempts"], queued["result"]["usage"]["completion_tokens"]) == (
        "succeeded", 1, 6)
    kinds = [(e.type, e.data.get("reason") or e.data.get("attempt")) for e in events if e.type != "token"]
    assert kinds == [("queued", None), ("running", 1), ("queued", "runtime_restarted"), ("running", 2),
                     ("succeeded", None)]
    after_restart = events[[e.type for e in events].index("running", 2):]
    assert text_of_tokens(after_restart) == resumed["result"]["choices"][0]["message"]["content"]
    assert first.events[0].error_type == "runtime_stopped", "the interrupted attempt's own event says why"


# -- failing, dead-lettered, replayed --------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with fake_upstream() as upstream:
        yield upstream


@pytest.fixture
def gateway(fake: FakeUpstream) -> Iterator[LiveRuntime]:
    config = jobs_config(models=(), upstreams=(Upstream("big", fake.url, "vendor/big"),), upstream_retries=0,
                         job_max_attempts=2, breaker_min_requests=1000)
    with serve(config) as server:
        yield server


def test_a_job_the_upstream_refuses_is_dead_lettered_at_once_and_an_admin_replays_it(
        gateway: LiveRuntime, fake: FakeUpstream) -> None:
    fake.fail(400, "this prompt is refused")
    job_id = submitted(gateway, UPSTREAM_CHAT)

    failed = finished(gateway, job_id)
    assert (failed["status"], failed["attempts"], failed["error"]["code"]) == ("failed", 1, "upstream_rejected")
    assert "this prompt is refused" in failed["error"]["message"]
    assert len(fake.requests) == 1, "a 4xx is not retried"
    (dead,) = admin(gateway).get("/admin/jobs/dead").json()["data"]
    assert (dead["id"], dead["tenant"], dead["status"]) == (job_id, "acme", "failed")

    fake.reply(pieces=3)
    replayed = admin(gateway).post(f"/admin/jobs/dead/{job_id}/replay")
    assert replayed.status_code == 200
    assert (replayed.json()["status"], replayed.json()["attempts"]) == ("queued", 0)

    done = finished(gateway, job_id)
    assert (done["status"], done["attempts"], done["error"]) == ("succeeded", 1, None)
    assert done["result"]["choices"][0]["message"]["content"] == text_of(3)
    assert admin(gateway).get("/admin/jobs/dead").json()["data"] == []
    assert [e.type for e in read_events(gateway, job_id) if e.type != "token"] == [
        "queued", "running", "failed", "queued", "running", "succeeded"]
    assert [(e.status, e.http_status) for e in gateway.wait_for_events(2)] == [("error", 400), ("ok", 200)]


def test_a_job_failing_transiently_is_retried_up_to_its_attempts_then_dead_lettered(
        gateway: LiveRuntime, fake: FakeUpstream) -> None:
    fake.fail(503, "overloaded")
    job_id = submitted(gateway, UPSTREAM_CHAT)

    failed = finished(gateway, job_id)

    assert (failed["status"], failed["attempts"], failed["error"]["code"]) == ("failed", 2, "upstream_overloaded")
    assert len(fake.requests) == 2, "one upstream call an attempt, two attempts"
    events = read_events(gateway, job_id)
    retry = next(e for e in events if e.data.get("reason") == "retry")
    assert retry.data["retry_in_s"] >= 1, "at least the upstream's Retry-After"
    assert [e.http_status for e in gateway.wait_for_events(2)] == [503, 503], "one request event per attempt"
    assert [d["id"] for d in admin(gateway).get("/admin/jobs/dead").json()["data"]] == [job_id]


def test_the_dead_letter_list_needs_the_admin_token(gateway: LiveRuntime) -> None:
    assert_error(admin(gateway, None).get("/admin/jobs/dead"), 401, "missing_admin_token")
    assert_error(admin(gateway, "wrong-token-0123456789").get("/admin/jobs/dead"), 401, "invalid_admin_token")
    assert_error(gateway.client().get("/admin/jobs/dead"), 401, "invalid_admin_token")
    assert_error(admin(gateway).post("/admin/jobs/dead/job_nonexistent/replay"), 404, "job_not_found")


def test_only_a_failed_job_can_be_replayed(live: LiveRuntime) -> None:
    job_id = submitted(live)
    finished(live, job_id)
    assert_error(admin(live).post(f"/admin/jobs/dead/{job_id}/replay"), 404, "job_not_found")
    assert job(live, job_id)["status"] == "succeeded"


# -- what is refused, and what is forgotten ---------------------------------------------------------


@pytest.mark.parametrize(("payload", "status", "code", "param"), [
    (b"{not json", 400, "invalid_json", None),
    (b"[]", 400, "invalid_json", None),
    ({}, 400, "missing_required_parameter", "url"),
    ({"url": "/v1/embeddings", "body": chat()}, 400, "invalid_value", "url"),
    ({"url": CHAT_URL, "body": chat(), "extra": 1}, 400, "invalid_value", "extra"),
    ({"url": CHAT_URL, "body": "hello"}, 400, "invalid_value", "body"),
    ({"url": CHAT_URL, "body": {"model": "tiny-random"}}, 400, "missing_required_parameter", "body.messages"),
    ({"url": CHAT_URL, "body": chat(max_tokens="12")}, 400, "invalid_value", "body.max_tokens"),
    ({"url": CHAT_URL, "body": chat(stream=True)}, 400, "invalid_value", "body.stream"),
    ({"url": CHAT_URL, "body": {**chat(), "model": "gpt-9"}}, 404, "model_not_found", "body.model"),
    ({"url": CHAT_URL, "body": chat(messages=[{"role": "user", "content": "word " * 3000}])}, 400,
     "context_length_exceeded", "body.messages"),
], ids=["not-json", "not-object", "no-url", "unknown-url", "unknown-key", "body-not-object", "no-messages",
        "string-max-tokens", "stream", "unknown-model", "too-long"])
def test_a_bad_submission_gets_an_openai_error_and_no_job(live: LiveRuntime, payload: Any, status: int, code: str,
                                                          param: str | None) -> None:
    client = live.client()
    if isinstance(payload, bytes):
        response = client.post("/v1/jobs", content=payload, headers={"Content-Type": "application/json"})
    else:
        response = client.post("/v1/jobs", json=payload)
    error = assert_error(response, status, code)
    if param is not None:
        assert error["param"] == param
    assert live.runtime.queue_depth() == 0


def test_the_jobs_api_needs_an_api_key(live: LiveRuntime) -> None:
    response = httpx.post(live.base_url + "/v1/jobs", json={"url": CHAT_URL, "body": chat()})
    assert_error(response, 401, "missing_api_key")
    assert_error(httpx.get(live.base_url + "/v1/jobs/job_x"), 401, "missing_api_key")


def test_finished_jobs_are_forgotten_after_their_ttl(tiny_model: LoadedModel) -> None:
    with serve(jobs_config(job_ttl_s=0.5), preloaded=(tiny_model,)) as server:
        job_id = submitted(server)
        assert finished(server, job_id)["status"] == "succeeded"
        wait_for(lambda: server.client().get(f"/v1/jobs/{job_id}").status_code == 404, timeout=5)


def test_a_job_store_made_before_deadlines_opens_with_its_jobs_intact(tmp_path: Any) -> None:
    import sqlite3

    from inference.jobs.store import JobStore

    path = tmp_path / "jobs.sqlite3"
    old = sqlite3.connect(path)  # the first schema's jobs table, one job queued in it
    old.executescript("""
        CREATE TABLE jobs (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, api_key_id TEXT NOT NULL, tier TEXT NOT NULL,
            feature TEXT NOT NULL, priority TEXT NOT NULL, url TEXT NOT NULL, request TEXT NOT NULL,
            status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, result TEXT, error TEXT,
            created_at REAL NOT NULL, started_at REAL, finished_at REAL, not_before REAL NOT NULL);
        INSERT INTO jobs VALUES ('job_old', 'acme', 'acme:…0001', 'premium', 'default', 'low', '/v1/completions',
            '{"model": "tiny-random", "prompt": "Hi"}', 'queued', 0, NULL, NULL, 1.0, NULL, NULL, 1.0);
    """)
    old.close()
    store = JobStore(path)
    store.open()
    try:
        job = store.get("job_old")
        assert job is not None and (job.status, job.deadline_at, job.cache_sampled) == ("queued", None, False)
        assert [store.next_model_attempt("job_old") for _ in range(3)] == [1, 2, 3]
        new = store.create(tenant="acme", api_key_id="k", tier="standard", feature="f", priority="low",
                           url="/v1/completions", request={"model": "tiny-random", "prompt": "Hi"}, deadline_s=60,
                           cache_sampled=True)
        assert new.deadline_at == pytest.approx(new.created_at + 60) and new.cache_sampled
    finally:
        store.close()


@pytest.mark.parametrize(("headers", "metadata", "task"), [
    ({"X-Wattson-Task": "batch-7"}, None, "batch-7"),
    ({}, {"task_id": "batch-8", "source": "nightly"}, "batch-8"),
    ({}, None, None),  # no name: the job is its own task
])
def test_a_job_s_attempts_carry_the_task_it_names(live: LiveRuntime, headers: dict[str, str],
                                                 metadata: dict[str, str] | None, task: str | None) -> None:
    live.events.clear()
    body = chat(**({"metadata": metadata} if metadata else {}))
    job_id = submitted(live, body, **headers)
    assert finished(live, job_id)["status"] == "succeeded"
    (event,) = live.wait_for_events(1)
    assert (event.request_id, event.task_id) == (job_id, task or job_id)


def test_a_job_naming_an_invalid_task_is_refused_before_it_is_queued(live: LiveRuntime) -> None:
    response = submit(live, **{"X-Wattson-Task": "no spaces allowed"})
    assert_error(response, 400, "invalid_task")
