"""Migrations 0009 and 0010 keep what is stored: devices keep their names under their runtimes, and
rollup rows keep their costs and memory sums in the wider columns."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.db import IntegrityError, connection, transaction
from django.db.migrations.executor import MigrationExecutor

from finops.telemetry.models import Device, DeviceRollup, Rollup

BEFORE = [("telemetry", "0008_record_sequence")]
T0 = dt.datetime(2026, 11, 20, 12, tzinfo=dt.UTC)


@pytest.mark.django_db(transaction=True)
def test_devices_and_rollup_rows_are_kept_and_a_uuid_may_repeat_across_runtimes() -> None:
    executor = MigrationExecutor(connection)
    executor.migrate(BEFORE)
    apps = executor.loader.project_state(BEFORE).apps
    apps.get_model("telemetry", "Device").objects.create(uuid="GPU-1", name="NVIDIA H100", runtime_id="rt-a",
                                                        last_seen_at=T0)
    apps.get_model("telemetry", "Rollup").objects.create(
        granularity="day", bucket=T0, tenant="acme", feature="chat", model="m", status_class="ok", requests=2,
        list_cost=Decimal("123456789.123456789012"))
    apps.get_model("telemetry", "DeviceRollup").objects.create(granularity="day", bucket=T0, runtime_id="rt-a",
                                                              device="GPU-1", samples=2, mem_used_sum=3 * 2**40)

    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(executor.loader.graph.leaf_nodes())

    assert list(Device.objects.values_list("runtime_id", "uuid", "name")) == [("rt-a", "GPU-1", "NVIDIA H100")]
    Device.objects.create(runtime_id="rt-b", uuid="GPU-1", name="NVIDIA T4", last_seen_at=T0)
    with pytest.raises(IntegrityError), transaction.atomic():
        Device.objects.create(runtime_id="rt-a", uuid="GPU-1", name="again", last_seen_at=T0)
    if connection.vendor == "postgresql":  # SQLite keeps decimals as doubles
        assert Rollup.objects.get().list_cost == Decimal("123456789.123456789012")
    assert DeviceRollup.objects.get().mem_used_sum == 3 * 2**40
