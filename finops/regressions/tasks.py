"""Celery tasks for cost regressions: each only calls a service (and queues the alert sender)."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from django.db import transaction

from finops.regressions.alerts import regression_alerts_send
from finops.regressions.services import regressions_detect


@shared_task(name="finops.regressions.tasks.detect")
def detect() -> dict[str, Any]:
    result = regressions_detect()
    if result.found:
        transaction.on_commit(send_alerts.delay)
    return result.as_dict()


@shared_task(name="finops.regressions.tasks.send_alerts")
def send_alerts() -> dict[str, Any]:
    return regression_alerts_send().as_dict()
