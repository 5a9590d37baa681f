"""Cost per successful task and waste: what the ``ClientTask`` rows (``client_tasks``) add up to.

Reads (``task_totals``, ``tasks_by``, ``task_series``) count a task in the range, and the step, of
its first attempt, and read ``ClientTask`` together with the rollups' watermark (``read_rollups``):
tasks are counted up to the last rollup run (``counted_to``), a minute or so behind the raw tail.

* **cost per successful task** = the cost of every attempt of the tasks that succeeded ÷ those tasks;
* **waste** = the cost of the tasks that have not succeeded (every attempt failed or was refused);
  a task still being retried counts here until one of its attempts succeeds.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.db.models import Count, F, QuerySet, Sum
from django.db.models.functions import Trunc

from finops.telemetry.models import ClientTask
from finops.telemetry.ranges import Dimension, Filters, Step, check_dimension, check_step, rollup_plan, steps
from finops.telemetry.sources import fetch_rows, moments, read_rollups
from finops.telemetry.sums import ZERO, cost_sum, cost_value


@dataclass
class TaskFigures:
    """Tasks and what they cost. Costs are list price unless named ``hardware_``; rates and per-task
    figures are None where there is nothing to divide by."""

    tasks: int = 0
    successful_tasks: int = 0
    attempts: int = 0
    requests: int = 0
    successful_attempts: int = 0
    list_cost: Decimal = ZERO  # every attempt of every task
    successful_cost: Decimal = ZERO  # every attempt of the tasks that succeeded
    hardware_cost: Decimal = ZERO
    successful_hardware_cost: Decimal = ZERO
    counted_to: dt.datetime | None = field(default=None, compare=False)  # the rollups' watermark

    @property
    def waste(self) -> Decimal:
        """List cost of the tasks that have not succeeded."""
        return self.list_cost - self.successful_cost

    @property
    def hardware_waste(self) -> Decimal:
        return self.hardware_cost - self.successful_hardware_cost

    @property
    def cost_per_successful_task(self) -> Decimal | None:
        return self.successful_cost / self.successful_tasks if self.successful_tasks else None

    @property
    def hardware_cost_per_successful_task(self) -> Decimal | None:
        return self.successful_hardware_cost / self.successful_tasks if self.successful_tasks else None

    @property
    def success_rate(self) -> float | None:
        return self.successful_tasks / self.tasks if self.tasks else None

    @property
    def attempts_per_task(self) -> float | None:
        return self.attempts / self.tasks if self.tasks else None

    @property
    def waste_share(self) -> float | None:
        """Waste as a fraction of all tasks' list cost."""
        return float(self.waste / self.list_cost) if self.list_cost else None

    def add_row(self, row: dict[str, Any]) -> None:
        """Add a row of ``_AGGREGATES`` grouped by ``succeeded``."""
        tasks, attempts = int(row["n_tasks"] or 0), int(row["n_attempts"] or 0)
        list_cost, hardware = cost_value(row["n_list_cost"]), cost_value(row["n_hardware_cost"])
        self.tasks += tasks
        self.attempts += attempts
        self.requests += int(row["n_requests"] or 0)
        self.list_cost += list_cost
        self.hardware_cost += hardware
        if row["succeeded"]:
            self.successful_tasks += tasks
            self.successful_attempts += attempts
            self.successful_cost += list_cost
            self.successful_hardware_cost += hardware


def _aggregates() -> dict[str, Any]:
    return {"n_tasks": Count("id"), "n_attempts": Sum("attempts"), "n_requests": Sum("requests"),
            "n_list_cost": cost_sum("list_cost"), "n_hardware_cost": cost_sum("hardware_cost")}


def _tasks_of(filters: Filters) -> QuerySet[ClientTask]:
    tasks = ClientTask.objects.filter(first_started_at__gte=filters.start, first_started_at__lt=filters.end)
    for name, values in (("tenant", filters.tenants), ("feature", filters.features), ("model", filters.models)):
        if values:
            tasks = tasks.filter(**{f"{name}__in": values})
    return tasks.order_by()


def _grouped(filters: Filters, keys: dict[str, Any]) -> tuple[dt.datetime | None, list[dict[str, Any]]]:
    def read() -> list[dict[str, Any]]:
        return fetch_rows(_tasks_of(filters).values("succeeded", **keys).annotate(**_aggregates()).order_by())
    return read_rollups(read, empty=[])


def task_totals(*, filters: Filters) -> TaskFigures:
    """Tasks that began in the range (and the filters' tenants, features, models), as far as rolled up."""
    watermark, rows = _grouped(filters, {})
    figures = TaskFigures(counted_to=watermark)
    for row in rows:
        figures.add_row(row)
    return figures


@dataclass
class TaskRow(TaskFigures):
    value: str = ""


def tasks_by(*, filters: Filters, dimension: Dimension) -> dict[str, TaskRow]:
    """``task_totals`` per tenant, feature, or model (the one that answered the task)."""
    check_dimension(dimension)
    watermark, rows = _grouped(filters, {"kept": F(dimension)})
    by_value: dict[str, TaskRow] = {}
    for row in rows:
        value = row["kept"]
        by_value.setdefault(value, TaskRow(value=value, counted_to=watermark)).add_row(row)
    return by_value


@dataclass
class TaskPoint(TaskFigures):
    at: dt.datetime | None = None


def task_series(*, filters: Filters, step: Step) -> list[TaskPoint]:
    """``task_totals`` per UTC ``step`` of the tasks' first attempts, every step of the range present."""
    check_step(step)
    plan = rollup_plan(filters=filters, coarsest=step)
    watermark, rows = _grouped(filters, {"at": Trunc("first_started_at", step, tzinfo=dt.UTC)})
    moment = moments()
    points: dict[dt.datetime | None, TaskPoint] = {}
    for row in rows:
        at = moment(row["at"])
        points.setdefault(at, TaskPoint(at=at, counted_to=watermark)).add_row(row)
    return [points.get(at) or TaskPoint(at=at, counted_to=watermark) for at in steps(plan, step)]
