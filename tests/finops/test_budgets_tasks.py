"""The Celery side: one beat entry evaluates budgets every few seconds (with an expiry, so missed
beats do not pile up); evaluation queues the alert sender and a push to each runtime whose ruleset
changed, after its transaction commits."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.conf import settings
from django.contrib import admin
from django.test import Client
from django.utils import timezone

from finops.budgets import tasks
from finops.budgets.models import Budget, BudgetEvent, Grant
from finops.budgets.periods import period_at
from finops.runtimes.models import Ruleset, Runtime
from tests.finops.budget_factories import budget, spend

pytestmark = pytest.mark.django_db


def test_budgets_are_evaluated_every_few_seconds_and_a_missed_beat_expires() -> None:
    entry = settings.CELERY_BEAT_SCHEDULE["budgets-evaluate"]
    assert entry["task"] == "finops.budgets.tasks.evaluate"
    assert entry["schedule"] <= 10
    assert 0 < entry["options"]["expires"] <= entry["schedule"]


def test_evaluation_queues_the_alerts_and_a_push_to_each_changed_runtime_after_commit(
        monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks) -> None:
    queued: list[tuple[str, object]] = []
    monkeypatch.setattr(tasks.send_alerts, "delay", lambda: queued.append(("send_alerts", None)))
    monkeypatch.setattr(tasks.push_ruleset, "delay", lambda runtime_id: queued.append(("push", runtime_id)))
    runtime = Runtime.objects.create(name="rt-1", base_url="http://rt-1.test")
    budget(limit=Decimal("10"), action="block")
    spend("11", at=period_at("monthly", timezone.now()).start + dt.timedelta(minutes=1))

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        result = tasks.evaluate()

    assert len(callbacks) == 2
    assert sorted(queued, key=str) == [("push", runtime.pk), ("send_alerts", None)]
    assert result["rulesets_changed"] == [runtime.pk]
    assert Ruleset.objects.get(runtime=runtime).document["rules"][0]["action"] == {"type": "block"}


def test_every_budget_model_is_in_the_admin_and_its_pages_open() -> None:
    for model in (Budget, BudgetEvent, Grant, Ruleset):
        assert admin.site.is_registered(model)
    from django.contrib.auth.models import User

    client = Client()
    client.force_login(User.objects.create_superuser("root", "root@example.com", None))
    runtime = Runtime.objects.create(name="rt-1", base_url="http://rt-1.test", last_seen_at=timezone.now())
    hard = budget(enforcement="hard", action="block", unit="tokens", limit=Decimal(1000))
    tasks.evaluate()
    spend("11")
    tasks.evaluate()
    for path in ("budgets/budget/", f"budgets/budget/{hard.pk}/change/", "budgets/budgetevent/", "budgets/grant/",
                 "runtimes/ruleset/", f"runtimes/ruleset/{Ruleset.objects.get(runtime=runtime).pk}/change/"):
        assert client.get(f"/admin/{path}").status_code == 200, path
