"""Periodic telemetry work for Celery beat (settings.CELERY_BEAT_SCHEDULE): each task only calls
its service. Every service is safe to run twice at once (each queues on its rollups' FillState
lock), so a redelivered or doubled beat costs time, never a double count."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from finops.telemetry.retention import retention_run
from finops.telemetry.rollups import rollup_run
from finops.telemetry.sample_rollups import sample_rollup_run


@shared_task(name="finops.telemetry.tasks.rollup")
def rollup() -> dict[str, Any]:
    return rollup_run().as_dict()


@shared_task(name="finops.telemetry.tasks.sample_rollup")
def sample_rollup() -> dict[str, Any]:
    return sample_rollup_run().as_dict()


@shared_task(name="finops.telemetry.tasks.retention")
def retention() -> dict[str, Any]:
    return retention_run().as_dict()
