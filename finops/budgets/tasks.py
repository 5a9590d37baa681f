"""Celery tasks for budgets: each only calls a service (and queues the follow-up tasks).

The beat queues ``evaluate`` every few seconds (exactly one beat: docs/DEPLOY.md). A pass over more
budgets than one chunk holds is split: where Celery keeps results (a chord needs them) the chunks
run as a group on every worker there is, and ``finish_evaluation`` compiles the rulesets after the
last; without a result backend one worker evaluates the chunks in turn.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from celery import chord, current_app, shared_task
from django.db import transaction
from django.utils import timezone

from finops.budgets.alerts import alerts_send
from finops.budgets.evaluation import (
    Evaluation,
    budgets_evaluate,
    budgets_evaluate_chunk,
    evaluation_chunks,
    evaluation_finish,
)
from finops.runtimes.tasks import push_ruleset


@shared_task(name="finops.budgets.tasks.evaluate")
def evaluate() -> dict[str, Any]:
    """Evaluate every budget, then queue the alert sender and a push to each runtime whose
    ruleset changed or is still unacknowledged; split over the workers when it is worth it."""
    now = timezone.now()
    chunks = evaluation_chunks()
    if len(chunks) > 1 and _results_kept():
        at = now.isoformat()
        chord(evaluate_chunk.s(chunk, at) for chunk in chunks)(finish_evaluation.s(at))
        return {"chunks": len(chunks), "budgets": sum(len(chunk) for chunk in chunks)}
    result = budgets_evaluate(now=now)
    _follow_up(result)
    return result.as_dict()


@shared_task(name="finops.budgets.tasks.evaluate_chunk")
def evaluate_chunk(budget_ids: list[int], at: str) -> dict[str, Any]:
    return budgets_evaluate_chunk(budget_ids=budget_ids, now=dt.datetime.fromisoformat(at)).as_dict()


@shared_task(name="finops.budgets.tasks.finish_evaluation")
def finish_evaluation(parts: list[dict[str, Any]], at: str) -> dict[str, Any]:
    """After every chunk of a pass: compile the rulesets, queue the pushes and the alert sender."""
    result = Evaluation()
    for part in parts:
        result.add(Evaluation(evaluated=part["evaluated"], failed=part["failed"], events=part["events"]))
    result = evaluation_finish(result=result, now=dt.datetime.fromisoformat(at))
    _follow_up(result)
    return result.as_dict()


@shared_task(name="finops.budgets.tasks.send_alerts")
def send_alerts() -> dict[str, Any]:
    return alerts_send().as_dict()


def _follow_up(result: Evaluation) -> None:
    if result.alerts_pending:
        transaction.on_commit(send_alerts.delay)
    for runtime_id in sorted(set(result.rulesets_changed) | set(result.rulesets_to_push)):
        transaction.on_commit(lambda runtime_id=runtime_id: push_ruleset.delay(runtime_id))


def _results_kept() -> bool:
    """Whether Celery can join a group's results (a chord): a result backend, or eager tasks."""
    conf = current_app.conf
    return bool(conf.task_always_eager or (conf.result_backend and conf.result_backend != "disabled"))
