"""Semantic cache policies reach every runtime in its ruleset (docs/RULESET.md, ``semantic_cache``),
as the runtime's own parser reads them; an admin enables a feature (optionally for one tenant) with
a threshold and a TTL, and flushes its stored answers, each change a new ruleset version."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.test import Client
from django.utils import timezone

from finops.budgets.evaluation import budgets_evaluate
from finops.caching.models import SemanticCachePolicy
from finops.runtimes.models import Ruleset, Runtime
from inference.rules.contract import ruleset_parse
from inference.semantic_cache import policies_of

pytestmark = pytest.mark.django_db


@pytest.fixture
def runtime() -> Runtime:
    return Runtime.objects.create(name="rt-1", base_url="http://rt-1.test:8000")


def held(runtime: Runtime) -> tuple[int, dict[str, Any]]:
    """The runtime's current version and document, checked with the runtime's own parser."""
    doc = Ruleset.objects.get(runtime=runtime).document
    ruleset_parse(json.dumps(doc).encode())
    return doc["version"], doc


def test_without_a_policy_the_semantic_cache_is_off_everywhere(runtime: Runtime) -> None:
    budgets_evaluate()
    assert held(runtime)[1]["semantic_cache"] == []


def test_an_enabled_policy_reaches_the_runtime_as_it_parses_it(runtime: Runtime) -> None:
    SemanticCachePolicy.objects.create(feature="faq", threshold=Decimal("0.9"), ttl_seconds=3600)
    SemanticCachePolicy.objects.create(feature="support", tenant="globex", threshold=Decimal("0.95"))
    SemanticCachePolicy.objects.create(feature="off", enabled=False)
    budgets_evaluate()
    version, doc = held(runtime)
    assert doc["semantic_cache"] == [
        {"feature": "faq", "tenant": "*", "threshold": 0.9, "ttl_s": 3600, "flushed_at": None},
        {"feature": "support", "tenant": "globex", "threshold": 0.95, "ttl_s": 86400, "flushed_at": None},
    ]
    policies = policies_of(ruleset_parse(json.dumps(doc).encode()))
    assert [(p.feature, p.tenant, p.threshold, p.ttl_s) for p in policies] == [
        ("faq", "*", 0.9, 3600.0), ("support", "globex", 0.95, 86400.0)]
    budgets_evaluate()
    assert held(runtime)[0] == version, "no change, no new version"


def test_the_admin_flushes_a_features_answers_with_a_new_version(runtime: Runtime) -> None:
    policy = SemanticCachePolicy.objects.create(feature="faq")
    budgets_evaluate()
    before, _ = held(runtime)
    admin = User.objects.create_superuser("root", "root@example.com", "pw")
    client = Client()
    client.force_login(admin)
    response = client.post("/admin/caching/semanticcachepolicy/",
                           {"action": "flush", "_selected_action": [policy.pk]}, follow=True)
    assert response.status_code == 200
    assert "Flushed 1 semantic cache policy" in response.content.decode()
    policy.refresh_from_db()
    assert policy.flushed_at is not None and timezone.now() - policy.flushed_at < dt.timedelta(seconds=10)
    budgets_evaluate()
    version, doc = held(runtime)
    assert version == before + 1
    flushed = policies_of(ruleset_parse(json.dumps(doc).encode()))[0].flushed_at
    assert flushed == pytest.approx(policy.flushed_at.timestamp(), abs=1e-3)


@pytest.mark.parametrize("fields", [{"threshold": Decimal("0.3")}, {"threshold": Decimal("1.01")},
                                    {"ttl_seconds": 0}, {"feature": "no spaces"}, {"tenant": ""}])
def test_a_policy_out_of_bounds_is_refused(fields: dict[str, Any]) -> None:
    policy = SemanticCachePolicy(**{"feature": "faq", **fields})
    with pytest.raises(ValidationError):
        policy.full_clean()


def test_the_admin_form_creates_a_policy(runtime: Runtime) -> None:
    admin = User.objects.create_superuser("root", "root@example.com", "pw")
    client = Client()
    client.force_login(admin)
    response = client.post("/admin/caching/semanticcachepolicy/add/",
                           {"feature": "faq", "tenant": "*", "threshold": "0.92", "ttl_seconds": "600",
                            "enabled": "on"})
    assert response.status_code == 302, response.content.decode()[:2000]
    budgets_evaluate()
    assert held(runtime)[1]["semantic_cache"][0]["threshold"] == 0.92
