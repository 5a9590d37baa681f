"""Writes to budgets: create, change, pause and delete. The evaluation that runs every few seconds
is ``finops.budgets.evaluation``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction

from finops.budgets.models import Budget

# What a budget measures; changing it mid-period would make its events, grants and the runtimes'
# ledgers count two different things under one name. Create a new budget instead.
FIXED_AFTER_CREATE = ("tenant", "feature", "period", "unit")
EDITABLE_FIELDS = (
    "name", "tenant", "feature", "period", "unit", "limit", "thresholds", "recipients", "action",
    "throttle_tokens_per_minute", "throttle_requests_per_minute", "downgrade_model", "cap_max_tokens",
    "enforcement", "on_expiry", "paused",
)


def budget_create(*, fields: Mapping[str, Any]) -> Budget:
    """Create a budget from ``fields`` (any of ``EDITABLE_FIELDS``); ``ValidationError`` if invalid."""
    unknown = set(fields) - set(EDITABLE_FIELDS)
    if unknown:
        raise ValueError(f"not budget fields: {sorted(unknown)}")
    budget = Budget(**fields)
    budget.full_clean()
    budget.save()
    return budget


def budget_update(*, budget: Budget, fields: Mapping[str, Any]) -> Budget:
    """Change ``budget``; what it measures (``FIXED_AFTER_CREATE``) cannot change."""
    unknown = set(fields) - set(EDITABLE_FIELDS)
    if unknown:
        raise ValueError(f"not budget fields: {sorted(unknown)}")
    fixed = {name: ["Fixed once the budget exists: create a new budget to measure something else."]
             for name in FIXED_AFTER_CREATE if name in fields and fields[name] != getattr(budget, name)}
    if fixed:
        raise ValidationError(fixed)
    for name, value in fields.items():
        setattr(budget, name, value)
    budget.full_clean()
    budget.save(update_fields=[*fields, "updated_at"])
    return budget


def budget_pause(*, budget: Budget, paused: bool) -> Budget:
    """Pause (stop evaluating and enforcing) or resume a budget; its rules leave the runtimes'
    rulesets at the next evaluation."""
    budget.paused = paused
    budget.save(update_fields=["paused", "updated_at"])
    return budget


def budget_delete(*, budget: Budget) -> None:
    """Delete ``budget`` with its events and grants. Its row is locked first, the order evaluation
    takes the locks in: a delete during an evaluation waits for it, instead of deleting the grants
    the evaluation is about to update and deadlocking with it."""
    with transaction.atomic():
        if Budget.objects.select_for_update().filter(pk=budget.pk).first() is not None:
            budget.delete()
