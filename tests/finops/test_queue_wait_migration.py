"""Migration 0006 fills the rollups' new queue-wait and rejection-reason columns from the raw events
still kept that the rollups had counted (up to the watermark); later events are the next run's."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from finops.telemetry.models import MarginalRollup, Rollup
from finops.telemetry.partitioning import ensure_partitions

BEFORE = [("telemetry", "0005_saved_cost")]
T0 = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=3)
SECOND = dt.timedelta(seconds=1)
COLUMNS = ("queue_wait_ms_sum", "queue_waits", "queue_wait_ms_max", "rejected_rule", "rejected_budget", "shed")


@pytest.mark.django_db(transaction=True)
def test_queue_waits_and_rejection_reasons_are_filled_from_the_counted_raw_events() -> None:
    executor = MigrationExecutor(connection)
    executor.migrate(BEFORE)
    apps = executor.loader.project_state(BEFORE).apps
    event, fill_state = apps.get_model("telemetry", "RequestEvent"), apps.get_model("telemetry", "FillState")
    rollup, marginal = apps.get_model("telemetry", "Rollup"), apps.get_model("telemetry", "MarginalRollup")
    ensure_partitions({T0.date()})

    def request(at: dt.datetime, status: str, wait: float | None, received: dt.datetime, tenant: str = "acme") -> None:
        status_class = "ok" if status == "ok" else "rejected"
        event.objects.create(
            event_id=uuid.uuid4(), runtime_id="rt-1", started_at=at, finished_at=at + SECOND, received_at=received,
            tenant=tenant, feature="chat", api_key_id="k", model_requested="m",
            model_served="m" if status == "ok" else None, route_reason="requested", priority="normal",
            status=status, status_class=status_class, http_status=200 if status == "ok" else 429,
            prompt_tokens=1, completion_tokens=1, e2e_ms=1000.0, queue_wait_ms=wait)

    request(T0, "ok", 40.0, T0 + SECOND)
    request(T0 + 10 * SECOND, "ok", 100.0, T0 + 11 * SECOND)
    request(T0 + 20 * SECOND, "shed", None, T0 + 21 * SECOND)
    request(T0 + 25 * SECOND, "rejected_budget", None, T0 + 26 * SECOND, tenant="globex")
    request(T0 + 30 * SECOND, "ok", 900.0, T0 + 3 * 3600 * SECOND)  # after the watermark: the next run's
    fill_state.objects.create(name="requests", watermark=T0 + 60 * SECOND)
    buckets = (("minute", T0), ("hour", T0), ("day", T0.replace(hour=0)))
    for granularity, bucket in buckets:
        for tenant, model, status_class in (("acme", "m", "ok"), ("acme", "", "rejected"), ("globex", "", "rejected")):
            rollup.objects.create(granularity=granularity, bucket=bucket, tenant=tenant, feature="chat", model=model,
                                  status_class=status_class)
        for dimension, value, status_class in (("", "", "ok"), ("", "", "rejected"), ("tenant", "acme", "ok"),
                                               ("tenant", "globex", "rejected"), ("model", "", "rejected")):
            marginal.objects.create(granularity=granularity, bucket=bucket, dimension=dimension, value=value,
                                    status_class=status_class)

    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(executor.loader.graph.leaf_nodes())

    def filled(rows: object) -> set[tuple[object, ...]]:
        return {tuple(getattr(row, name) for name in COLUMNS) for row in rows}  # type: ignore[attr-defined]

    for granularity, _ in buckets:
        assert filled(Rollup.objects.filter(granularity=granularity, tenant="acme", status_class="ok")) == {
            (140.0, 2, 100.0, 0, 0, 0)}
        assert filled(Rollup.objects.filter(granularity=granularity, tenant="acme", status_class="rejected")) == {
            (0.0, 0, None, 0, 0, 1)}
        assert filled(MarginalRollup.objects.filter(granularity=granularity, dimension="", status_class="rejected")) \
            == {(0.0, 0, None, 0, 1, 1)}
        assert filled(MarginalRollup.objects.filter(granularity=granularity, dimension="tenant", value="acme")) == {
            (140.0, 2, 100.0, 0, 0, 0)}
        assert filled(MarginalRollup.objects.filter(granularity=granularity, dimension="model", value="")) == {
            (0.0, 0, None, 0, 1, 1)}
