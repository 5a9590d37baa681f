"""Celery tasks for budgets: each only calls a service (and queues the follow-up tasks)."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from django.db import transaction

from finops.budgets.alerts import alerts_send
from finops.budgets.services import budgets_evaluate
from finops.runtimes.tasks import push_ruleset


@shared_task(name="finops.budgets.tasks.evaluate")
def evaluate() -> dict[str, Any]:
    """Evaluate every budget, then queue the alert sender and a push to each runtime whose
    ruleset changed or is still unacknowledged."""
    result = budgets_evaluate()
    if result.alerts_pending:
        transaction.on_commit(send_alerts.delay)
    for runtime_id in sorted(set(result.rulesets_changed) | set(result.rulesets_to_push)):
        transaction.on_commit(lambda runtime_id=runtime_id: push_ruleset.delay(runtime_id))
    return result.as_dict()


@shared_task(name="finops.budgets.tasks.send_alerts")
def send_alerts() -> dict[str, Any]:
    return alerts_send().as_dict()
