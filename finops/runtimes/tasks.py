"""Celery tasks for runtimes: each only calls a service."""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from finops.runtimes.models import Runtime
from finops.runtimes.services import PUSH_ATTEMPTS, PUSH_EXPIRES_S, push_delay, ruleset_push


# One run is one attempt. A transient failure is retried by Celery after a capped, jittered
# backoff (the retry waits in the broker, not in this worker, so a runtime that is down costs the
# others nothing); each retry carries the version its push began with, so a newer evaluation's
# push supersedes it. Every message expires: one that waited past its time behind a backlog is
# stale, and the next evaluation queues a fresh push for any runtime still behind.
@shared_task(bind=True, name="finops.runtimes.tasks.push_ruleset", expires=PUSH_EXPIRES_S,
             max_retries=PUSH_ATTEMPTS - 1)
def push_ruleset(self: Task, runtime_id: int, version: int | None = None) -> dict[str, Any]:
    runtime = Runtime.objects.filter(pk=runtime_id).first()
    if runtime is None:
        return {"runtime_id": runtime_id, "detail": "runtime no longer registered"}
    attempt = self.request.retries + 1
    outcome = ruleset_push(runtime=runtime, attempt=attempt, attempts=PUSH_ATTEMPTS, version=version)
    if outcome.retry:
        countdown = push_delay(attempt)
        raise self.retry(args=(runtime_id, outcome.pushed_version), kwargs={}, countdown=countdown,
                         expires=countdown + PUSH_EXPIRES_S, max_retries=PUSH_ATTEMPTS - 1)
    return outcome.as_dict()
