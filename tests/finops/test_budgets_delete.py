"""Deleting a budget while the beat evaluates it: the delete waits for the evaluation (both lock
the budget's row first) rather than deadlocking with it over the budget's grants."""

from __future__ import annotations

import threading
import time
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection

from finops.budgets import evaluation
from finops.budgets.evaluation import budgets_evaluate
from finops.budgets.models import Budget, Grant
from finops.budgets.services import budget_delete
from tests.finops.budget_factories import budget
from tests.finops.factories import runtime_with_token

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_budget_deleted_during_its_evaluation_is_deleted_once_the_evaluation_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("row locks: SQLite serialises whole transactions, so the two cannot interleave there")
    runtime_with_token()
    hard = budget(name="globex hard cap", tenant="globex", enforcement="hard", action="block", limit=Decimal("10"))
    budgets_evaluate()
    assert Grant.objects.filter(budget=hard).exists()
    time.sleep(1.1)  # the grants' watermark moves on: the next evaluation updates their rows

    locked = threading.Event()
    top_up = evaluation.grants_top_up_many

    def slow_top_up(**kwargs: Any) -> Any:
        # The budget's row is locked and its events written; the deleter now runs into it.
        locked.set()
        time.sleep(1.0)
        return top_up(**kwargs)

    monkeypatch.setattr(evaluation, "grants_top_up_many", slow_top_up)
    monkeypatch.setattr("django.conf.settings.ROLLUP_SETTLE_SECONDS", 0)
    outcome: dict[str, Any] = {}

    def evaluate() -> None:
        try:
            outcome["evaluation"] = budgets_evaluate()
        finally:
            connection.close()

    evaluator = threading.Thread(target=evaluate)
    evaluator.start()
    assert locked.wait(timeout=30)
    budget_delete(budget=Budget.objects.get(pk=hard.pk))  # raised "deadlock detected" before
    evaluator.join(timeout=60)

    assert outcome["evaluation"].failed == 0
    assert not Budget.objects.filter(pk=hard.pk).exists()
    assert not Grant.objects.filter(budget_id=hard.pk).exists()
