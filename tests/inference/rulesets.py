"""Small factories for ruleset documents (docs/RULESET.md) and a client for a live runtime's
admin endpoints."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from tests.inference.live import LiveRuntime

ADMIN_TOKEN = "admin-token-0123456789abcdef"
ANY = {"tenant": "*", "feature": "*", "model": "*"}

_versions = itertools.count(1)


def at(seconds_from_now: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds_from_now)).isoformat().replace("+00:00", "Z")


def scope(tenant: str = "*", feature: str = "*", model: str = "*") -> dict[str, str]:
    return {"tenant": tenant, "feature": feature, "model": model}


def rule(rule_id: str, action: dict[str, Any], *, where: dict[str, str] | None = None, budget_name: str | None = None,
         reason: str = "", expires_at: str | None = None) -> dict[str, Any]:
    return {"id": rule_id, "budget_id": rule_id, "budget_name": budget_name, "scope": where or ANY,
            "action": action, "reason": reason, "expires_at": expires_at}


def allowance(budget_id: str, *, unit: str = "tokens", granted: float = 1000, reported: float = 0,
              where: dict[str, str] | None = None, budget_name: str | None = None,
              period_start: str = "2026-11-01T00:00:00Z", resets_at: str | None = None,
              expires_at: str | None = None, on_expiry: str = "closed") -> dict[str, Any]:
    return {"budget_id": budget_id, "budget_name": budget_name, "scope": where or ANY, "unit": unit,
            "period_start": period_start, "resets_at": resets_at or at(3600), "granted": granted,
            "reported": reported, "expires_at": expires_at, "on_expiry": on_expiry}


def document(*, rules: list[dict[str, Any]] = (), allowances: list[dict[str, Any]] = (),  # type: ignore[assignment]
             prices: dict[str, Any] | None = None, version: int | None = None) -> dict[str, Any]:
    """A valid document; versions grow across every document a test run makes, so each push is
    newer than the last one a runtime saw."""
    return {"version": version if version is not None else next(_versions) + 1_000_000,
            "issued_at": at(0), "runtime_id": "test-runtime", "prices": prices or {},
            "rules": list(rules), "allowances": list(allowances)}


def admin(live: LiveRuntime, token: str | None = ADMIN_TOKEN) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.Client(base_url=live.base_url, headers=headers, timeout=30)


def push(live: LiveRuntime, doc: dict[str, Any]) -> dict[str, Any]:
    with admin(live) as client:
        response = client.put("/admin/ruleset", json=doc)
    assert response.status_code == 200, response.text
    assert response.json() == {"version": doc["version"]}
    return doc


def held(live: LiveRuntime) -> dict[str, Any]:
    with admin(live) as client:
        response = client.get("/admin/ruleset")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def metric(live: LiveRuntime, name: str, **labels: str) -> float | None:
    """One sample from /metrics, or None when absent."""
    text = httpx.get(live.base_url + "/metrics", timeout=10).text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    series = f"{name}{{{wanted}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None
