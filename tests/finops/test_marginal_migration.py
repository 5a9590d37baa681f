"""Migration 0003 fills the marginal rollups from rollups stored before it existed."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from finops.telemetry.models import MarginalRollup

BEFORE = [("telemetry", "0002_sample_rollups")]
DAY = dt.datetime(2026, 11, 20, tzinfo=dt.UTC)


@pytest.mark.django_db(transaction=True)
def test_existing_rollups_are_added_up_into_marginal_rows() -> None:
    executor = MigrationExecutor(connection)
    executor.migrate(BEFORE)
    Rollup = executor.loader.project_state(BEFORE).apps.get_model("telemetry", "Rollup")
    for tenant, feature, requests, cost, hist in (("acme", "chat", 3, "0.25", {"10": 2, "12": 1}),
                                                  ("acme", "search", 1, "0.5", {"12": 1}),
                                                  ("globex", "chat", 2, "1", {"11": 2})):
        Rollup.objects.create(granularity="day", bucket=DAY, tenant=tenant, feature=feature, model="llama",
                              status_class="ok", requests=requests, list_cost=Decimal(cost), e2e_hist=hist)

    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(executor.loader.graph.leaf_nodes())  # 0003 and whatever follows: the suite's schema

    rows = {(r.dimension, r.value): r for r in MarginalRollup.objects.filter(granularity="day", bucket=DAY)}
    assert {key: r.requests for key, r in rows.items()} == {
        ("", ""): 6, ("tenant", "acme"): 4, ("tenant", "globex"): 2, ("feature", "chat"): 5,
        ("feature", "search"): 1, ("model", "llama"): 6}
    assert rows["", ""].list_cost == Decimal("1.75")
    assert rows["tenant", "acme"].e2e_hist == {"10": 2, "12": 2}
