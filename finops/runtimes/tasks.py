"""Celery tasks for runtimes: each only calls a service."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from finops.runtimes.models import Runtime
from finops.runtimes.services import ruleset_push


# The push retries inside (bounded backoff); a push queued behind a long backlog is stale, and the
# next evaluation queues a fresh one anyway.
@shared_task(name="finops.runtimes.tasks.push_ruleset", expires=60)
def push_ruleset(runtime_id: int) -> dict[str, Any]:
    runtime = Runtime.objects.filter(pk=runtime_id).first()
    if runtime is None:
        return {"runtime_id": runtime_id, "detail": "runtime no longer registered"}
    outcome = ruleset_push(runtime=runtime)
    return {"runtime": outcome.runtime, "version": outcome.pushed_version, "acknowledged": outcome.acknowledged,
            "accepted": outcome.accepted, "attempts": outcome.attempts, "detail": outcome.detail}
