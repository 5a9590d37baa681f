"""Builders for the budget tests: budgets with sensible defaults, request events written straight
to the database (no rollups, so every selector reads them from the raw tail), users in groups."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from django.contrib.auth.models import Group, User
from django.utils import timezone

from finops.budgets.models import Budget
from finops.budgets.services import budget_create
from finops.telemetry.models import STATUS_CLASSES, RequestEvent
from finops.telemetry.partitioning import ensure_partitions


def budget(**fields: Any) -> Budget:
    """A monthly $10 list-price budget for tenant acme, alerting one recipient, unless told otherwise."""
    values: dict[str, Any] = {"name": "acme monthly", "tenant": "acme", "feature": "*", "period": "monthly",
                              "unit": "usd_list", "limit": Decimal("10"), "recipients": ["finance@example.com"]}
    values.update(fields)
    return budget_create(fields=values)


def request_event(*, started_at: dt.datetime | None = None, received_at: dt.datetime | None = None,
                  cost: str | Decimal | None = "1", **fields: Any) -> RequestEvent:
    """A stored-shape request event costing ``cost`` USD at list price (hardware: a tenth of it)."""
    started_at = started_at or timezone.now() - dt.timedelta(seconds=30)
    status = fields.pop("status", "ok")
    values: dict[str, Any] = {
        "event_id": uuid.uuid4(), "runtime_id": "rt-1", "started_at": started_at,
        "finished_at": started_at + dt.timedelta(milliseconds=250),
        "received_at": received_at or started_at + dt.timedelta(seconds=1),
        "tenant": "acme", "feature": "chat", "end_user": None, "api_key_id": "key-1",
        "model_requested": "smollm2", "model_served": "smollm2", "route_reason": "requested", "rule_id": None,
        "priority": "standard", "status": status, "status_class": STATUS_CLASSES[status],
        "http_status": 200, "error_type": None, "prompt_tokens": 100, "completion_tokens": 50, "cache_hit": False,
        "queue_wait_ms": 1.0, "ttft_ms": 20.0, "e2e_ms": 250.0, "tpot_ms": 4.0, "queue_depth_at_admit": 0,
        "mean_batch_size": 1.0, "gpu_seconds": 0.5, "energy_joules": None, "device": "cpu", "price_book_id": None,
        "list_cost": Decimal(cost) if cost is not None else None,
        "hardware_cost": Decimal(cost) / 10 if cost is not None else None,
        "e2e_bucket": None, "ttft_bucket": None,
    }
    values.update(fields)
    return RequestEvent(**values)


def store(events: Iterable[RequestEvent]) -> list[RequestEvent]:
    events = list(events)
    ensure_partitions({e.started_at.astimezone(dt.UTC).date() for e in events})
    return RequestEvent.objects.bulk_create(events)


def spend(amount: str | Decimal, *, at: dt.datetime | None = None, **fields: Any) -> RequestEvent:
    """Store one request that cost ``amount`` at list price."""
    return store([request_event(started_at=at, cost=amount, **fields)])[0]


def user_in(group: str | None, username: str = "someone", *, password: str | None = None) -> User:
    """A user in ``group``; without a password unless given (hashing one is slow on purpose)."""
    user = User.objects.create_user(username, f"{username}@example.com", password)
    if group:
        user.groups.add(Group.objects.get(name=group))
    return user
