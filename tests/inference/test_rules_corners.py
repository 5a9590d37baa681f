"""Rules at the edges: upstream models (no tokenizer here), the options that configure rulesets,
a document for another runtime, and a ruleset that changes while a request is being tokenized."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from inference.config import ConfigError, Upstream, load_config
from inference.rules import RuleEnforcer, RuleRejection, ruleset_compile, ruleset_parse
from tests.inference.fake_upstream import FakeUpstream, fake_upstream
from tests.inference.live import LiveRuntime, serve, tiny_config
from tests.inference.rulesets import ADMIN_TOKEN, admin, allowance, document, held, push, rule, scope


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with fake_upstream() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def gateway(fake: FakeUpstream) -> Iterator[LiveRuntime]:
    config = tiny_config(models=(), upstreams=(Upstream("big", fake.url, "vendor/big-model"),),
                         admin_token=ADMIN_TOKEN, default_max_tokens=16)
    with serve(config) as live:
        yield live


def ask_upstream(live: LiveRuntime, **body: object) -> int:
    with live.client() as client:
        return client.post("/v1/chat/completions", json={
            "model": "big", "messages": [{"role": "user", "content": "Hello there"}], **body}).status_code


def test_a_cap_bounds_what_is_asked_of_an_upstream(fake: FakeUpstream, gateway: LiveRuntime) -> None:
    fake.reset()
    push(gateway, document(rules=[rule("cap", {"type": "cap_max_tokens", "max_tokens": 7})]))
    assert ask_upstream(gateway, max_completion_tokens=500) == 200
    assert ask_upstream(gateway) == 200
    first, second = fake.requests[-2:]
    assert first.body["max_tokens"] == 7 and "max_completion_tokens" not in first.body
    assert second.body["max_tokens"] == 7


def test_a_budget_on_an_upstream_bounds_its_length_and_settles_its_reported_usage(
        fake: FakeUpstream, gateway: LiveRuntime) -> None:
    fake.reset()
    fake.reply(pieces=3, prompt_tokens=9)
    push(gateway, document(allowances=[allowance("up", unit="tokens", granted=1000)]))
    assert ask_upstream(gateway) == 200
    assert fake.requests[-1].body["max_tokens"] == 16, "the default length, so the worst case is known"
    (up,) = held(gateway)["state"]["allowances"]
    assert up["settled"] == "12" and up["reserved"] == "0"  # the upstream's usage: 9 + 3


def test_a_document_for_another_runtime_is_refused(gateway: LiveRuntime) -> None:
    before = held(gateway)["version"]
    with admin(gateway) as client:
        response = client.put("/admin/ruleset", json={**document(), "runtime_id": "someone-else"})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "runtime_id"
    assert held(gateway)["version"] == before


def test_a_ruleset_applied_while_a_request_is_tokenized_is_the_one_that_counts() -> None:
    enforcer = RuleEnforcer()

    def apply(doc: dict) -> None:  # type: ignore[type-arg]
        enforcer.apply(ruleset_compile(ruleset_parse(json.dumps(doc).encode())))

    apply(document(allowances=[allowance("b", unit="tokens", granted=1000, period_start="2026-11-01T00:00:00Z")]))
    match = enforcer.match("acme", "f", "m", {"m"})
    assert match is not None
    apply(document(rules=[rule("blk", {"type": "block"}, budget_name="acme frozen", where=scope(tenant="acme"))]))
    with pytest.raises(RuleRejection, match="acme frozen"):
        enforcer.reserve(match, prompt_tokens=1, max_tokens=1, model="m")
    match = enforcer.match("globex", "f", "m", {"m"})
    assert match is None or match.allowances == []


def test_ruleset_options_come_from_flags_and_variables(tmp_path: Path) -> None:
    config = load_config(["--admin-token", "a" * 24, "--state-dir", str(tmp_path), "--ruleset-pull-interval-s", "2.5"])
    assert (config.admin_token, config.resolved_state_dir, config.ruleset_pull_interval_s) == ("a" * 24, tmp_path, 2.5)
    from_env = load_config([], {"INFERENCE_ADMIN_TOKEN": "b" * 20, "INFERENCE_RUNTIME_ID": "gpu/a 1"})
    assert from_env.admin_token == "b" * 20
    assert from_env.resolved_state_dir == Path(".cache/runtime-state/gpu_a_1")
    assert load_config([]).admin_token is None


@pytest.mark.parametrize("argv", [["--admin-token", "short"], ["--admin-token", "has spaces in it, 1234"],
                                  ["--ruleset-pull-interval-s", "0"], ["--ruleset-pull-interval-s", "soon"]])
def test_bad_ruleset_options_are_configuration_errors(argv: list[str]) -> None:
    with pytest.raises(ConfigError):
        load_config(argv)
