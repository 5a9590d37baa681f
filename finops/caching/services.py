"""Writes to semantic cache policies. A change reaches runtimes with the next ruleset compilation
(the budget evaluation beat, every few seconds), which gives their documents a new version."""

from __future__ import annotations

import datetime as dt

from django.db.models import QuerySet
from django.utils import timezone

from finops.caching.models import SemanticCachePolicy


def semantic_policies_flush(*, policies: QuerySet[SemanticCachePolicy], now: dt.datetime | None = None) -> int:
    """Forget the answers stored for these policies' scopes: runtimes serve none stored before now and
    delete them (locally and in the Redis they share). Returns how many policies were flushed."""
    return policies.update(flushed_at=now or timezone.now())
