"""Tasks: every attempt of a task counts toward it, whichever rollup run counted it; a task succeeded
if any attempt did; cost per successful task and waste equal a raw SQL computation over the events."""

from __future__ import annotations

import datetime as dt
import random
import uuid
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection

from finops.telemetry.models import ClientTask
from finops.telemetry.ranges import Filters
from finops.telemetry.rollups import rollup_run
from finops.telemetry.task_costs import task_series, task_totals, tasks_by
from tests.finops.test_rollups import SECOND, T0, event, store

pytestmark = pytest.mark.django_db

HOUR = dt.timedelta(hours=1)
RANGE = Filters(start=T0 - 2 * HOUR, end=T0 + 6 * HOUR)


def attempt(task: str | None, n: int, *, at: dt.datetime, status: str = "ok", cost: str = "0.001",
            received: dt.datetime | None = None, **fields: Any) -> Any:
    return event(task_id=task, request_id=fields.pop("request_id", task), attempt=n, started_at=at, status=status,
                 list_cost=Decimal(cost), hardware_cost=Decimal(cost) / 10,
                 received_at=received or at + 2 * SECOND, **fields)


def raw_task_sql(filters: Filters, group: str = "tenant = tenant") -> dict[tuple[Any, bool], tuple[int, int, Decimal]]:
    """(group value, succeeded) -> (tasks, attempts, list cost), straight from the raw events: a task
    is a tenant's events of one task id (else request id, else the event itself), in the range of its
    first attempt; its feature is its first attempt's, its model its latest ok attempt's (else its
    latest attempt's)."""
    key = "COALESCE(e.task_id, e.request_id, CAST(e.event_id AS TEXT))"
    sql = f"""
        WITH t AS (
            SELECT e.tenant AS tenant, {key} AS task, MIN(e.started_at) AS first_at, COUNT(*) AS attempts,
                   MAX(CASE WHEN e.status = 'ok' THEN 1 ELSE 0 END) AS ok, SUM(e.list_cost) AS cost
            FROM telemetry_requestevent e GROUP BY e.tenant, {key}
        ), named AS (
            SELECT t.*,
              (SELECT f.feature FROM telemetry_requestevent f WHERE f.tenant = t.tenant
                 AND COALESCE(f.task_id, f.request_id, CAST(f.event_id AS TEXT)) = t.task
                 ORDER BY f.started_at LIMIT 1) AS feature,
              (SELECT COALESCE(m.model_served, '') FROM telemetry_requestevent m WHERE m.tenant = t.tenant
                 AND COALESCE(m.task_id, m.request_id, CAST(m.event_id AS TEXT)) = t.task
                 ORDER BY CASE WHEN m.status = 'ok' THEN 1 ELSE 0 END DESC, m.started_at DESC LIMIT 1) AS model
            FROM t
        )
        SELECT {group} AS value, ok, COUNT(*), SUM(attempts), SUM(cost) FROM named
        WHERE first_at >= %s AND first_at < %s GROUP BY value, ok"""
    with connection.cursor() as cursor:
        cursor.execute(sql, [filters.start, filters.end])
        return {(value, bool(ok)): (int(n), int(attempts), Decimal(str(cost)).quantize(Decimal("1e-9")))
                for value, ok, n, attempts, cost in cursor.fetchall()}


def figures_as_raw(figures: Any) -> dict[bool, tuple[int, int, Decimal]]:
    out = {}
    if figures.successful_tasks:
        out[True] = (figures.successful_tasks, figures.successful_attempts,
                     figures.successful_cost.quantize(Decimal("1e-9")))
    if figures.tasks - figures.successful_tasks:
        out[False] = (figures.tasks - figures.successful_tasks, figures.attempts - figures.successful_attempts,
                      figures.waste.quantize(Decimal("1e-9")))
    return out


def test_a_task_whose_first_two_attempts_fail_is_one_successful_task_costing_all_three() -> None:
    """Two failed attempts are counted by one run, the one that succeeds by the next: one task."""
    store(attempt("t-1", 1, at=T0, status="error", cost="0.002", model_served="big"),
          attempt("t-1", 2, at=T0 + SECOND, status="error", cost="0.003", model_served="big"),
          attempt("t-1", 3, at=T0 + 2 * SECOND, cost="0.005", model_served="smollm2", received=T0 + HOUR))
    rollup_run(now=T0 + dt.timedelta(minutes=5))
    halfway = task_totals(filters=RANGE)
    assert (halfway.tasks, halfway.successful_tasks, halfway.waste) == (1, 0, Decimal("0.005"))
    rollup_run(now=T0 + 2 * HOUR)
    totals = task_totals(filters=RANGE)
    assert (totals.tasks, totals.successful_tasks, totals.attempts, totals.requests) == (1, 1, 3, 1)
    assert totals.cost_per_successful_task == Decimal("0.010")
    assert totals.waste == 0
    assert list(tasks_by(filters=RANGE, dimension="model")) == ["smollm2"]  # the model that answered it


def test_an_abandoned_task_is_waste_and_an_unnamed_request_is_a_task_of_its_own() -> None:
    store(attempt("gave-up", 1, at=T0, status="error", cost="0.004"),
          attempt("gave-up", 2, at=T0 + SECOND, status="timeout", cost="0.006"),
          attempt(None, 1, at=T0, request_id=None, cost="0.001"),
          attempt(None, 1, at=T0, request_id=None, cost="0.001", status="rejected_budget"))
    rollup_run(now=T0 + HOUR)
    totals = task_totals(filters=RANGE)
    assert (totals.tasks, totals.successful_tasks) == (3, 1)
    assert totals.waste == Decimal("0.011")
    assert totals.cost_per_successful_task == Decimal("0.001")
    assert totals.success_rate == pytest.approx(1 / 3)


def test_no_task_yet_reads_as_none_not_zero() -> None:
    totals = task_totals(filters=RANGE)
    assert (totals.tasks, totals.cost_per_successful_task, totals.success_rate, totals.waste_share) == (0, None, None,
                                                                                                        None)


def test_a_task_is_counted_where_its_first_attempt_started() -> None:
    store(attempt("late", 1, at=T0 + 59 * 60 * SECOND, status="error"),
          attempt("late", 2, at=T0 + HOUR + SECOND))
    rollup_run(now=T0 + 3 * HOUR)
    points = task_series(filters=Filters(start=T0, end=T0 + 2 * HOUR), step="hour")
    assert [(p.at, p.tasks, p.successful_tasks) for p in points] == [(T0, 1, 1), (T0 + HOUR, 0, 0)]


def test_random_traffic_over_many_runs_agrees_with_raw_sql() -> None:
    """Tasks of one to four attempts, spread over tenants, features and models, arriving over hours
    and counted by a rollup run every 20 minutes."""
    rng = random.Random(18)
    events = []
    for i in range(300):
        task = None if rng.random() < 0.2 else f"task-{i}"
        tenant, feature = rng.choice(["acme", "globex"]), rng.choice(["chat", "search", "summarise"])
        start = T0 - HOUR + dt.timedelta(minutes=rng.randrange(0, 6 * 60))
        for n in range(1, (1 if task is None else rng.randint(1, 4)) + 1):
            at = start + dt.timedelta(seconds=40 * n)
            status = rng.choice(["ok", "error", "error", "timeout", "rejected_budget"])
            events.append(attempt(task, n, at=at, status=status, cost=f"0.00{rng.randint(1, 9)}",
                                  request_id=task or uuid.uuid4().hex, tenant=tenant, feature=feature,
                                  model_served=rng.choice(["smollm2", "big", None]),
                                  received=at + dt.timedelta(minutes=rng.randrange(0, 90))))
    store(*events)
    for k in range(1, 30):
        rollup_run(now=T0 + dt.timedelta(minutes=20 * k))
    assert figures_as_raw(task_totals(filters=RANGE)) == {ok: v for (_, ok), v in raw_task_sql(RANGE).items()}
    for dimension in ("tenant", "feature", "model"):
        raw = raw_task_sql(RANGE, dimension)
        rows = tasks_by(filters=RANGE, dimension=dimension)
        assert {(value, ok): v for value, row in rows.items() for ok, v in figures_as_raw(row).items()} == raw
    assert ClientTask.objects.count() == len({(e.tenant, e.task_id or e.request_id) for e in events})
