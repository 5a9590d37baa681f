"""Tasks: what a client wanted done, however many attempts it took, kept one row per task.

A task is every event of a tenant that carries one ``task_id`` (docs/TELEMETRY.md): a request's
retries and fallbacks, a job's attempts and replays, a client re-sending under the same task id.
Its attempts may arrive over hours, so no per-bucket rollup can say whether a task succeeded or
what it cost in all: ``ClientTask`` keeps one row per task, added to by each request rollup run
from the events it counts (same watermark, same lock: ``client_tasks_add``), so every attempt is
counted once, whichever run it arrives in.

What the rows add up to (cost per successful task, waste) is read by ``task_costs``.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.db.models import F, QuerySet

from finops.telemetry.models import ClientTask, RequestEvent
from finops.telemetry.sums import ZERO

CHUNK = 500
_UPDATED = ["feature", "model", "model_at", "first_started_at", "last_started_at", "attempts", "requests",
            "succeeded", "prompt_tokens", "completion_tokens", "list_cost", "hardware_cost"]
_EVENT_FIELDS = ("tenant", "task_id", "request_id", "event_id", "feature", "model_served", "started_at", "status",
                 "attempt", "prompt_tokens", "completion_tokens", "list_cost", "hardware_cost")


def task_key(*, task_id: str | None, request_id: str | None, event_id: Any) -> str:
    """The task an event belongs to within its tenant: its task id, else its request's id, else itself."""
    return task_id or request_id or str(event_id)


def _attempt_added(task: ClientTask, event: tuple[Any, ...]) -> None:
    (_, _, _, _, feature, served, started_at, status, attempt, prompt, completion, list_cost, hardware) = event
    ok = status == "ok"
    if task.attempts == 0 or started_at < task.first_started_at:
        task.first_started_at, task.feature = started_at, feature
    if task.attempts == 0 or started_at > task.last_started_at:
        task.last_started_at = started_at
    # The model that answered the task (the latest ok attempt's), else the latest attempt's. A stored
    # model came from an ok attempt exactly when the task has succeeded.
    if task.attempts == 0 or (ok, started_at) > (task.succeeded, task.model_at):
        task.model, task.model_at = served or "", started_at
    task.attempts += 1
    task.requests += attempt is None or attempt == 1
    task.succeeded = task.succeeded or ok
    task.prompt_tokens += prompt
    task.completion_tokens += completion
    task.list_cost = Decimal(task.list_cost) + (list_cost or ZERO)
    task.hardware_cost = Decimal(task.hardware_cost) + (hardware or ZERO)


def client_tasks_add(events: QuerySet[RequestEvent]) -> int:
    """Add ``events`` (a rollup run's window, under its lock) to their tasks' rows; rows written."""
    by_task: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
    for event in events.order_by().values_list(*_EVENT_FIELDS).iterator(chunk_size=5000):
        tenant, task_id, request_id, event_id = event[:4]
        by_task.setdefault((tenant, task_key(task_id=task_id, request_id=request_id, event_id=event_id)),
                           []).append(event)
    written = 0
    keys = sorted(by_task)
    for start in range(0, len(keys), CHUNK):
        chunk = keys[start:start + CHUNK]
        existing = {(t.tenant, t.task_id): t for t in ClientTask.objects.filter(
            tenant__in={k[0] for k in chunk}, task_id__in={k[1] for k in chunk})}
        rows = []
        for key in chunk:
            task = existing.get(key) or ClientTask(tenant=key[0], task_id=key[1], attempts=0, requests=0,
                                                   prompt_tokens=0, completion_tokens=0, list_cost=ZERO,
                                                   hardware_cost=ZERO, succeeded=False)
            for event in by_task[key]:
                _attempt_added(task, event)
            rows.append(task)
        ClientTask.objects.bulk_create(rows, update_conflicts=True, unique_fields=["tenant", "task_id"],
                                       update_fields=_UPDATED, batch_size=CHUNK)
        written += len(rows)
    return written


def client_tasks_reprice(differences: dict[tuple[str, str], tuple[Decimal, Decimal]]) -> int:
    """Move tasks' costs by (list, hardware) differences, per (tenant, task key), under the rollups'
    lock (a re-price of counted events); rows changed. A task whose row has expired is left alone."""
    changed = 0
    for (tenant, task_id), (listed, hardware) in differences.items():
        if listed or hardware:
            changed += ClientTask.objects.filter(tenant=tenant, task_id=task_id).update(
                list_cost=F("list_cost") + listed, hardware_cost=F("hardware_cost") + hardware)
    return changed
