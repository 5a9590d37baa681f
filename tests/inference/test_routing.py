"""The ``auto`` alias routes short, simple requests to the small model and long or complex ones to
the large model, and says why; a misconfigured alias stops the runtime at start."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
from collections.abc import Iterator

import pytest

from inference.config import ConfigError, load_config
from inference.engine.models import LoadedModel
from inference.routing import looks_like_code
from inference.runtime import Runtime
from tests.inference.live import LiveRuntime, serve, tiny_config

ROUTED = dict(models=("tiny-small", "tiny-large"), auto_small="tiny-small", auto_large="tiny-large",
              auto_large_prompt_tokens=40, auto_large_max_tokens=64)


@pytest.fixture(scope="module")
def routed(tiny_model: LoadedModel) -> Iterator[LiveRuntime]:
    """Two models under two names (the same tiny weights), behind the alias ``auto``."""
    small = dataclasses.replace(tiny_model, name="tiny-small")
    large = dataclasses.replace(tiny_model, name="tiny-large")
    with serve(tiny_config(**ROUTED), preloaded=(small, large)) as server:
        yield server


def ask(live: LiveRuntime, body: dict, path: str = "/v1/completions") -> tuple[str, str, str]:
    """(model served per the body, the route header, the event's route_reason)."""
    live.events.clear()
    with live.client() as client:
        response = client.post(path, json={"model": "auto", "max_tokens": 3, **body})
    assert response.status_code == 200, response.text
    (event,) = live.wait_for_events(1)
    assert event.model_requested == "auto" and event.model_served == response.json()["model"]
    return response.json()["model"], response.headers["x-wattson-route"], event.route_reason


def test_a_short_plain_prompt_goes_to_the_small_model(routed: LiveRuntime) -> None:
    model, header, reason = ask(routed, {"prompt": "The keeper climbed the stairs."})
    assert (model, reason) == ("tiny-small", "auto_small")
    assert header.startswith("auto_small;")


def test_a_long_prompt_goes_to_the_large_model(routed: LiveRuntime) -> None:
    model, header, reason = ask(routed, {"prompt": "The keeper climbed the stairs every evening. " * 5})
    assert (model, reason) == ("tiny-large", "auto_large")
    assert "prompt_tokens" in header


def test_a_long_answer_asked_for_goes_to_the_large_model(routed: LiveRuntime) -> None:
    model, header, reason = ask(routed, {"prompt": "The keeper", "max_tokens": 64})
    assert (model, reason) == ("tiny-large", "auto_large")
    assert "max_tokens=64" in header


def test_code_in_a_chat_goes_to_the_large_model(routed: LiveRuntime) -> None:
    body = {"messages": [{"role": "user", "content": "Fix:\n```\nx = 1\n```"}]}
    model, header, reason = ask(routed, body, path="/v1/chat/completions")
    assert (model, reason) == ("tiny-large", "auto_large")
    assert header.endswith("code")


def test_naming_a_model_bypasses_the_alias(routed: LiveRuntime) -> None:
    routed.events.clear()
    with routed.client() as client:
        response = client.post("/v1/completions", json={"model": "tiny-large", "prompt": "Hi", "max_tokens": 2})
    assert response.status_code == 200 and "x-wattson-route" not in response.headers
    (event,) = routed.wait_for_events(1)
    assert event.route_reason == "requested"


def test_the_alias_is_listed_among_the_models(routed: LiveRuntime) -> None:
    with routed.client() as client:
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["tiny-large", "tiny-small", "auto"]


def test_code_is_recognised_by_fences_or_code_lines() -> None:
    assert looks_like_code("def f(x):\n    return x\nimport os\n")
    assert looks_like_code("int main() {\n  return 0;\n}")
    assert not looks_like_code("Write a short poem about the sea; keep it calm.")


def test_an_alias_target_that_is_not_served_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="--auto-large 'gpt-9' is not a served model"):
        load_config(["--auto-small", "tiny-random", "--auto-large", "gpt-9"], environ={})
    with pytest.raises(ConfigError, match="needs both"):
        load_config(["--auto-small", "tiny-random"], environ={})
    with pytest.raises(ConfigError, match="also the name of a served model"):
        load_config(["--auto-model", "tiny-random", "--auto-small", "tiny-random", "--auto-large", "tiny-random"],
                    environ={})


def test_the_cli_refuses_an_unknown_alias_target_before_loading_anything() -> None:
    result = subprocess.run([sys.executable, "-m", "inference", "serve", "--auto-small", "tiny-random",
                             "--auto-large", "nope"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "configuration error: --auto-large 'nope' is not a served model" in result.stderr


def test_the_runtime_refuses_to_start_with_an_alias_to_a_model_it_did_not_load(tiny_model: LoadedModel) -> None:
    # A config built in code skips load_config: the runtime checks against what it really loaded.
    runtime = Runtime(tiny_config(auto_small="tiny-random", auto_large="tiny-huge"), preloaded=(tiny_model,))

    async def start() -> None:
        try:
            await runtime.start()
        finally:
            await runtime.stop()

    with pytest.raises(ConfigError, match="--auto-large 'tiny-huge' is not a served model; served: tiny-random"):
        asyncio.run(start())
    assert not runtime.ready
