"""Reads of semantic cache policies: the ruleset's entries, and the thresholds a page shows."""

from __future__ import annotations

import datetime as dt
from typing import Any

from finops.caching.models import SemanticCachePolicy


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def semantic_cache_document() -> list[dict[str, Any]]:
    """The ruleset's ``semantic_cache`` entries: every enabled policy (docs/RULESET.md)."""
    return [{"feature": p.feature, "tenant": p.tenant, "threshold": float(p.threshold), "ttl_s": p.ttl_seconds,
             "flushed_at": _iso(p.flushed_at) if p.flushed_at else None}
            for p in SemanticCachePolicy.objects.filter(enabled=True).order_by("feature", "tenant")]


def semantic_policies_in_force(*, tenant: str | None = None, feature: str | None = None) -> list[SemanticCachePolicy]:
    """The enabled policies that apply to a page's scope: a feature's (for every tenant or one), a
    tenant's (its own and the ``*`` ones), or all."""
    policies = SemanticCachePolicy.objects.filter(enabled=True)
    if feature is not None:
        policies = policies.filter(feature=feature)
    if tenant is not None:
        policies = policies.filter(tenant__in=(tenant, "*"))
    return list(policies.order_by("feature", "tenant"))
