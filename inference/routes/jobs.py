"""The jobs API: ``/v1/jobs`` for API keys (each sees only its tenant's jobs) and the dead-letter
list under ``/admin/jobs`` for the admin token. ``inference.jobs``' docstring describes the shapes;
each attempt runs down the sync endpoints' path (``inference.serving.run_job_attempt``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from inference.admission import effective_priority
from inference.auth import require_admin
from inference.backends import LocalBackend
from inference.errors import ApiError
from inference.jobs.runner import JobRunner
from inference.jobs.store import ENDPOINTS, FINISHED, Job
from inference.request_parsing import (
    TASK_METADATA_KEY,
    read_json_object,
    request_deadline_s,
    request_feature,
    request_priority,
    request_task,
    validated,
)
from inference.routes import jobs_of, runtime_of
from inference.routes.openapi import (
    DEADLINE,
    EVENT_STREAM,
    FEATURE,
    LAST_EVENT_ID,
    PRIORITY,
    TASK,
    model_schemas,
    operation,
    ref,
)
from inference.runtime import Runtime
from inference.schemas import MAX_METADATA_PAIRS

KEEPALIVE_S = 15.0


class JobSubmission(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    url: Literal["/v1/chat/completions", "/v1/completions"]
    body: dict[str, Any]


# As the document shows it: ``body`` is a request of the endpoint that ``url`` names.
SUBMISSION_SCHEMA = {
    "oneOf": [{"type": "object", "additionalProperties": False, "required": ["url", "body"],
               "properties": {"url": {"const": url}, "body": {"$ref": ref(model)}}}
              for url, model in ENDPOINTS.items()],
    "$defs": model_schemas(*ENDPOINTS.values()),
}

router = APIRouter()


@router.post("/v1/jobs", status_code=202, **operation(auth="apiKey", body=SUBMISSION_SCHEMA,
                                                     headers=(FEATURE, PRIORITY, DEADLINE, TASK),
                                                     errors=(400, 404, 413), ok_status=202))
async def submit_job(request: Request) -> JSONResponse:
    runtime = runtime_of(request)
    key = runtime.authenticate(request.headers.get("authorization"))
    feature = request_feature(request)
    priority = effective_priority(request_priority(request, default="low"), key.tier)
    deadline_s = request_deadline_s(request, limit_s=runtime.config.job_deadline_s)
    submission = validated(await read_json_object(request), JobSubmission)
    await _check(runtime, submission)
    _name_task(request, submission)
    job = jobs_of(request).submit(tenant=key.tenant, api_key_id=key.key_id, tier=key.tier, feature=feature,
                                  priority=priority, url=submission.url, request=submission.body,
                                  deadline_s=deadline_s, cache_sampled=key.cache_sampled)
    return JSONResponse(job.public(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("/v1/jobs/{job_id}", **operation(auth="apiKey", errors=(404,)))
async def job_status(job_id: str, request: Request) -> JSONResponse:
    return JSONResponse(_tenants_job(job_id, request).public())


@router.get("/v1/jobs/{job_id}/events", **operation(auth="apiKey", headers=(LAST_EVENT_ID,), errors=(400, 404),
                                                    ok=EVENT_STREAM))
async def job_events(job_id: str, request: Request) -> StreamingResponse:
    _tenants_job(job_id, request)
    after = _last_event_id(request)
    return StreamingResponse(_event_stream(jobs_of(request), job_id, after), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.delete("/v1/jobs/{job_id}", **operation(auth="apiKey", errors=(404, 409)))
async def cancel_job(job_id: str, request: Request) -> JSONResponse:
    key = runtime_of(request).authenticate(request.headers.get("authorization"))
    job, cancelled = jobs_of(request).cancel(job_id, tenant=key.tenant)
    if job is None:
        raise _not_found(job_id)
    if not cancelled:
        raise ApiError(409, f"The job is already {job.status}; only a queued or running job can be "
                       "cancelled.", code="job_finished")
    return JSONResponse(job.public())


@router.get("/admin/jobs/dead", **operation(auth="adminToken", errors=(403,)))
async def dead_jobs(request: Request) -> JSONResponse:
    require_admin(runtime_of(request), request)
    return JSONResponse({"object": "list", "data": [_admin_view(job) for job in jobs_of(request).store.dead()]})


@router.post("/admin/jobs/dead/{job_id}/replay", **operation(auth="adminToken", errors=(403, 404)))
async def replay_job(job_id: str, request: Request) -> JSONResponse:
    require_admin(runtime_of(request), request)
    job = jobs_of(request).replay(job_id)
    if job is None:
        raise ApiError(404, f"No dead-lettered job '{job_id[:100]}'.", code="job_not_found")
    return JSONResponse(_admin_view(job))


def _name_task(request: Request, submission: JobSubmission) -> None:
    """Keep the task the client names in the job's stored body (``metadata.task_id``), where every
    attempt and replay of the job reads it; refuse a task id that is not valid (400)."""
    metadata = submission.body.get("metadata") or {}
    task = request_task(request, metadata)
    if task is None or metadata.get(TASK_METADATA_KEY) == task:
        return
    if len(metadata) >= MAX_METADATA_PAIRS:
        raise ApiError(400, f"body.metadata already holds {MAX_METADATA_PAIRS} pairs: name the task in "
                       "metadata.task_id instead of X-Wattson-Task.", code="invalid_task", param="body.metadata")
    submission.body["metadata"] = {**metadata, TASK_METADATA_KEY: task}


async def _check(runtime: Runtime, submission: JobSubmission) -> None:
    """Refuse at once what the sync endpoint would refuse before running it: a body that is not a
    valid request, an unknown model, a prompt that does not fit the model."""
    body = validated(submission.body, ENDPOINTS[submission.url], within="body")
    if body.stream:
        raise ApiError(400, "A job is not streamed: read its progress from /v1/jobs/{id}/events.",
                       code="invalid_value", param="body.stream")
    try:
        backend = runtime.backend(body.model)
        if isinstance(backend, LocalBackend):
            await asyncio.to_thread(backend.prepare, body)
        else:
            backend.prepare(body)
    except ApiError as exc:  # named as the field of the job's body that it is
        exc.param = f"body.{exc.param}" if exc.param else "body"
        raise


def _tenants_job(job_id: str, request: Request) -> Job:
    key = runtime_of(request).authenticate(request.headers.get("authorization"))
    job = jobs_of(request).store.get(job_id, tenant=key.tenant)
    if job is None:  # another tenant's job is not found either: its existence is not theirs to learn
        raise _not_found(job_id)
    return job


def _not_found(job_id: str) -> ApiError:
    return ApiError(404, f"No job '{job_id[:100]}'.", code="job_not_found", param="job_id")


def _last_event_id(request: Request) -> int:
    raw = request.headers.get("last-event-id", "0").strip() or "0"
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise ApiError(400, "Last-Event-ID must be the id of an event of this job.", code="invalid_last_event_id",
                       param="Last-Event-ID")
    return int(raw)


async def _event_stream(runner: JobRunner, job_id: str, after: int) -> AsyncIterator[bytes]:
    """The job's events after ``after`` as SSE, then live ones as they come, until the job's log
    ends in a finished state (or the runner stops)."""
    wake = runner.listen(job_id)
    try:
        while not runner.stopping:
            wake.clear()
            job = runner.store.get(job_id)  # read before the events: a finished job's log is complete
            if job is None:
                return
            events = runner.store.events_after(job_id, after)
            for event in events:
                yield f"id: {event.seq}\nevent: {event.type}\ndata: {event.data}\n\n".encode()
                after = event.seq
            if (events[-1].type if events else job.status) in FINISHED:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=KEEPALIVE_S)
                continue
            yield b": keepalive\n\n"
    finally:
        runner.unlisten(job_id, wake)


def _admin_view(job: Job) -> dict[str, Any]:
    return {**job.public(), "tenant": job.tenant, "api_key_id": job.api_key_id}
