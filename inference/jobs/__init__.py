"""Async jobs: a generation request accepted now, run in the background, kept across restarts.

``POST /v1/jobs`` takes the request a sync endpoint would, wrapped with the endpoint it is for::

    {"url": "/v1/chat/completions", "body": {"model": "smollm2", "messages": [...]}}
    {"url": "/v1/completions", "body": {"model": "smollm2", "prompt": "..."}}

The body is checked as the sync endpoint checks it (fields, model, context length; ``stream`` must
be unset: a job's progress is read from its events) and a refusal is the same OpenAI error body
(400, 401, 404, 413). Accepted, it answers ``202`` with the job and a ``Location`` header. Headers
as for the sync endpoints: ``X-Wattson-Feature``, ``X-Wattson-Priority``, which defaults to ``low``
for a job (capped by the key's tier like any request), so interactive traffic goes first, and
``X-Wattson-Deadline``: the seconds from submission within which the job is to be answered (at most
``--job-deadline-s``, the default); no attempt is made past it and the job fails with 504
``deadline_exceeded``.

A job, as ``GET /v1/jobs/{id}`` shows it::

    {"id": "job_…", "object": "job", "status": "queued|running|succeeded|failed|cancelled",
     "url": "/v1/chat/completions", "model": "smollm2", "priority": "low", "feature": "default",
     "attempts": 1, "created_at": 1764000000, "started_at": …, "finished_at": …, "deadline_at": …,
     "result": {…the sync endpoint's response body…} | null,
     "error": {"type", "message", "code", "param"} | null}

``GET /v1/jobs/{id}/events`` streams the job's log as server-sent events, each with an ``id`` (1, 2,
3… per job), an ``event`` type and JSON ``data``: ``queued`` (with a ``reason`` when queued again:
``retry``, ``runtime_restarted``, ``replay``), ``running`` (with its ``attempt``: text starts over
at each one), ``token`` (``{"text": …}`` as generated), then one of ``succeeded`` (with the
``result``), ``failed`` (with the ``error``) or ``cancelled``, after which the stream ends. A client
that reconnects with ``Last-Event-ID`` gets the events after that id, then the live ones.

``DELETE /v1/jobs/{id}`` cancels a queued or running job (a running one stops generating and frees
its engine slot); a finished one answers 409. Jobs belong to their tenant: another tenant's key gets
404, as for a job that does not exist.

Each *attempt* goes down the sync endpoints' path (rules, the response cache, retries and the
fallback chain, admission) and records a request event for each attempt at a model, as a sync
request does, so the control plane counts every attempt's tokens and GPU time; their ``request_id``
is the job's id and their ``attempt`` numbers run on across the job's attempts and replays. A job
whose answer is cached is answered from the cache, and a job's answer is kept for the requests
after it. A submission refused at the door made no attempt and makes no event. A transient failure
(shed, throttled, upstream 502/503/504, breaker open) queues the job again after a backoff, up to
``--job-max-attempts`` and only while the next try would start before the job's deadline; the last
attempt's failure, or any other, fails the job to the dead-letter list: ``GET /admin/jobs/dead``
lists failed jobs and ``POST /admin/jobs/dead/{id}/replay`` queues one again with its attempts reset
(both with the admin token, like ``/admin/ruleset``); a replayed job has as long a deadline as at
first, counted from the replay.

Jobs live in ``jobs.sqlite3`` in the runtime's state directory. A job running or queued when the
runtime stops is queued again at the next start and runs to completion (the interrupted attempt
counts as one). Finished jobs and their events are forgotten ``--job-ttl-s`` after they finished.
"""

from inference.jobs.runner import Attempt, JobRunner
from inference.jobs.store import Job, JobStore

__all__ = ["Attempt", "Job", "JobRunner", "JobStore"]
