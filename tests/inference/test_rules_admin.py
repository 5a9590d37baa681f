"""PUT/GET /admin/ruleset: who may push, which documents are accepted, and what survives a restart."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from inference.engine.models import LoadedModel
from inference.rules import RuleEnforcer, RulesetKeeper, StateDirError
from tests.inference.live import INITECH, LiveRuntime, serve, tiny_config
from tests.inference.rulesets import (
    ADMIN_TOKEN,
    admin,
    allowance,
    at,
    document,
    held,
    metric,
    push,
    rule,
    scope,
)


@pytest.fixture(scope="module")
def live(tiny_model: LoadedModel) -> Iterator[LiveRuntime]:
    with serve(tiny_config(admin_token=ADMIN_TOKEN), preloaded=(tiny_model,)) as server:
        yield server


def test_a_newer_ruleset_is_accepted_and_held(live: LiveRuntime) -> None:
    doc = push(live, document(rules=[rule("r1", {"type": "cap_max_tokens", "max_tokens": 8})]))

    state = held(live)
    assert state["version"] == doc["version"]
    assert state["ruleset"] == doc
    assert metric(live, "wattson_ruleset_version") == doc["version"]


def test_a_ruleset_that_is_not_newer_is_refused_with_409_naming_the_held_version(live: LiveRuntime) -> None:
    doc = push(live, document())
    with admin(live) as client:
        same = client.put("/admin/ruleset", json=doc)
        older = client.put("/admin/ruleset", json={**doc, "version": doc["version"] - 1})

    for response in (same, older):
        assert response.status_code == 409
        body = response.json()
        assert body["error"]["code"] == "ruleset_not_newer"
        assert body["version"] == doc["version"]
        assert str(doc["version"]) in body["error"]["message"]
    assert held(live)["version"] == doc["version"]


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789", "x"])
def test_a_missing_or_wrong_admin_token_is_refused_with_401(live: LiveRuntime, token: str | None) -> None:
    before = held(live)["version"]
    with admin(live, token=token) as client:
        put = client.put("/admin/ruleset", json=document())
        get = client.get("/admin/ruleset")

    for response in (put, get):
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    assert held(live)["version"] == before


def test_the_api_keys_of_tenants_are_not_admin_tokens(live: LiveRuntime) -> None:
    with live.client() as client:
        response = client.put("/admin/ruleset", json=document())
    assert response.status_code == 401


def _valid() -> dict[str, Any]:
    return document(rules=[rule("t", {"type": "throttle", "requests_per_minute": 5})],
                    allowances=[allowance("b1")], prices={"tiny-random": {"prompt_per_1m": 1, "completion_per_1m": 2}})


MALFORMED: list[tuple[str, Any]] = [
    ("not json", b"{nope"),
    ("a list", b"[]"),
    ("version as a string", {**_valid(), "version": "7"}),
    ("version zero", {**_valid(), "version": 0}),
    ("no issued_at", {k: v for k, v in _valid().items() if k != "issued_at"}),
    ("naive timestamp", {**_valid(), "issued_at": "2026-11-22T10:00:00"}),
    ("unknown action", {**_valid(), "rules": [rule("x", {"type": "explode"})]}),
    ("throttle without a limit", {**_valid(), "rules": [rule("x", {"type": "throttle"})]}),
    ("negative throttle", {**_valid(), "rules": [rule("x", {"type": "throttle", "requests_per_minute": -1})]}),
    ("unknown field in an action", {**_valid(), "rules": [rule("x", {"type": "block", "force": True})]}),
    ("duplicate rule ids", {**_valid(), "rules": [rule("x", {"type": "block"}), rule("x", {"type": "block"})]}),
    ("scope without model", {**_valid(), "rules": [{**rule("x", {"type": "block"}),
                                                    "scope": {"tenant": "a", "feature": "*"}}]}),
    ("grant as a string", {**_valid(), "allowances": [{**allowance("b"), "granted": "10"}]}),
    ("negative grant", {**_valid(), "allowances": [allowance("b", granted=-1)]}),
    ("unknown unit", {**_valid(), "allowances": [allowance("b", unit="euros")]}),
    ("control character in an id", {**_valid(), "rules": [rule("a\u0000b", {"type": "block"})]}),
    ("budget id too long", {**_valid(), "allowances": [allowance("b" * 101)]}),
    ("duplicate budgets", {**_valid(), "allowances": [allowance("b"), allowance("b")]}),
    ("huge number", json.dumps(_valid()).replace('"granted": 1000', '"granted": 1e999').encode()),
    ("NaN price", json.dumps(_valid()).replace('"prompt_per_1m": 1', '"prompt_per_1m": NaN').encode()),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000),
]


@pytest.mark.parametrize(("what", "body"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_ruleset_is_refused_with_422_and_changes_nothing(live: LiveRuntime, what: str, body: Any) -> None:
    before = held(live)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with admin(live) as client:
        response = client.put("/admin/ruleset", content=content, headers={"Content-Type": "application/json"})

    assert response.status_code == 422, (what, response.text)
    error = response.json()["error"]
    assert error["code"] == "invalid_ruleset"
    assert error["type"] == "invalid_request_error"
    assert "Traceback" not in response.text
    assert held(live) == before


def test_a_ruleset_over_the_size_limit_is_refused_with_413(live: LiveRuntime) -> None:
    with admin(live) as client:
        response = client.put("/admin/ruleset", content=b" " * (16 * 1024 * 1024 + 1))
    assert response.status_code == 413


def test_without_an_admin_token_configured_the_admin_api_is_disabled(tiny_model: LoadedModel) -> None:
    with serve(tiny_config(), preloaded=(tiny_model,)) as plain, admin(plain) as client:
        put = client.put("/admin/ruleset", json=document())
        get = client.get("/admin/ruleset")
    for response in (put, get):
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "admin_disabled"
        assert "--admin-token" in response.json()["error"]["message"]


def test_the_ruleset_and_the_ledger_survive_a_restart(tiny_model: LoadedModel, tmp_path: Path) -> None:
    config = tiny_config(admin_token=ADMIN_TOKEN, state_dir=tmp_path / "state")
    doc = document(rules=[rule("blk", {"type": "block"}, where=scope(tenant="initech"), budget_name="initech cap")],
                   allowances=[allowance("b-tokens", unit="tokens", granted=10_000, where=scope(tenant="acme"))])
    with serve(config, preloaded=(tiny_model,)) as live:
        push(live, doc)
        with live.client() as client:
            ok = client.post("/v1/completions", json={"model": "tiny-random", "prompt": "The keeper",
                                                      "max_tokens": 5, "ignore_eos": True})
        assert ok.status_code == 200
        used = ok.json()["usage"]["total_tokens"]
        before = held(live)
    assert before["state"]["ledger"] == [{"budget_id": "b-tokens", "period_start": "2026-11-01T00:00:00Z",
                                          "settled": str(used)}]
    assert (tmp_path / "state" / "ruleset.json").is_file() and (tmp_path / "state" / "ledger.json").is_file()

    with serve(config, preloaded=(tiny_model,)) as restarted:
        after = held(restarted)
        assert after["version"] == doc["version"]
        assert after["ruleset"] == doc
        assert after["state"]["ledger"] == before["state"]["ledger"]
        (b_tokens,) = after["state"]["allowances"]
        assert b_tokens["available"] == str(10_000 - used)
        with restarted.client(INITECH) as client:
            blocked = client.post("/v1/completions", json={"model": "tiny-random", "prompt": "x", "max_tokens": 1})
        assert blocked.status_code == 429
        assert "initech cap" in blocked.json()["error"]["message"]


def test_a_second_runtime_cannot_share_a_state_directory(tiny_model: LoadedModel, tmp_path: Path) -> None:
    config = tiny_config(state_dir=tmp_path / "state")
    with serve(config, preloaded=(tiny_model,)):
        second = RulesetKeeper(RuleEnforcer(), tmp_path / "state")
        with pytest.raises(StateDirError, match="in use by another runtime"):
            second.open()


def test_the_admin_endpoints_answer_json_errors_never_stack_traces(live: LiveRuntime) -> None:
    response = httpx.put(live.base_url + "/admin/ruleset", content=b"\xff\xfe",
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_ruleset"
    # An expired rule is accepted (it simply no longer applies).
    push(live, document(rules=[rule("old", {"type": "block"}, expires_at=at(-60))]))
