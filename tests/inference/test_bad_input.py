"""Bad input gets the OpenAI error body and a 4xx status, never a 500, and is still measured."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.inference.live import ACME, LiveRuntime

CHAT = "/v1/chat/completions"
GOOD_CHAT: dict[str, Any] = {"model": "tiny-random", "messages": [{"role": "user", "content": "hi"}]}


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None,
                        param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"type", "message", "code", "param"}
    assert error["message"] and "Traceback" not in error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize(("body", "code", "param"), [
    ({**GOOD_CHAT, "max_tokens": -1}, "invalid_value", "max_tokens"),
    ({**GOOD_CHAT, "max_tokens": 0}, "invalid_value", "max_tokens"),
    ({**GOOD_CHAT, "max_tokens": "12"}, "invalid_value", "max_tokens"),
    ({**GOOD_CHAT, "max_tokens": 10**12}, "context_length_exceeded", "max_tokens"),
    ({**GOOD_CHAT, "temperature": "hot"}, "invalid_value", "temperature"),
    ({**GOOD_CHAT, "temperature": 3}, "invalid_value", "temperature"),
    ({**GOOD_CHAT, "top_p": 0}, "invalid_value", "top_p"),
    ({**GOOD_CHAT, "stream": "yes"}, "invalid_value", "stream"),
    ({**GOOD_CHAT, "n": 2}, "invalid_value", "n"),
    ({**GOOD_CHAT, "stop": ["a", "b", "c", "d", "e"]}, "invalid_value", "stop"),
    ({**GOOD_CHAT, "seed": -4}, "invalid_value", "seed"),
    ({"model": "tiny-random"}, "missing_required_parameter", "messages"),
    ({"model": "tiny-random", "messages": []}, "invalid_value", "messages"),
    ({"model": "tiny-random", "messages": "hello"}, "invalid_value", "messages"),
    ({"model": "tiny-random", "messages": [{"role": "wizard", "content": "hi"}]}, "invalid_value", None),
    ({"model": "tiny-random", "messages": [{"role": "user", "content": 42}]}, "invalid_value", None),
    ({"messages": [{"role": "user", "content": "hi"}]}, "missing_required_parameter", "model"),
    ({**GOOD_CHAT, "model": 7}, "invalid_value", "model"),
])
def test_invalid_chat_bodies_are_400_naming_the_parameter(live: LiveRuntime, body: dict, code: str,
                                                          param: str | None) -> None:
    with live.client() as client:
        assert_openai_error(client.post(CHAT, json=body), 400, code, param)


@pytest.mark.parametrize(("field", "value"), [
    ("model", "tiny-random\nX-Injected: 1"), ("model", "tiny\x1b[31mred"), ("user", "=HYPERLINK(\"x\")\r\n"),
    ("user", "alice\u2028bob"), ("user", "tab\there"),
])
def test_names_with_control_characters_are_400_and_never_reach_an_event(live: LiveRuntime, field: str,
                                                                        value: str) -> None:
    with live.client() as client:
        assert_openai_error(client.post(CHAT, json={**GOOD_CHAT, field: value}), 400, "invalid_value", field)

    event = live.events[-1]
    assert (event.status, event.http_status) == ("error", 400)
    assert value not in (event.model_requested, event.end_user), "the control plane would refuse the event"


def test_an_unknown_model_is_404_listing_the_served_ones(live: LiveRuntime) -> None:
    with live.client() as client:
        error = assert_openai_error(client.post(CHAT, json={**GOOD_CHAT, "model": "gpt-9"}), 404,
                                    "model_not_found", "model")
    assert "tiny-random" in error["message"]


def test_an_over_long_prompt_is_400_context_length_exceeded(live: LiveRuntime) -> None:
    body = {"model": "tiny-random", "prompt": "lighthouse keeper " * 2000}
    with live.client() as client:
        assert_openai_error(client.post("/v1/completions", json=body), 400, "context_length_exceeded")


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe\x00"])
def test_malformed_json_is_400(live: LiveRuntime, raw: bytes) -> None:
    with live.client() as client:
        response = client.post(CHAT, content=raw, headers={"Content-Type": "application/json"})
    assert_openai_error(response, 400, "invalid_json")


def test_a_huge_body_is_413(live: LiveRuntime) -> None:
    body = {**GOOD_CHAT, "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}
    with live.client() as client:
        assert_openai_error(client.post(CHAT, json=body), 413, "body_too_large")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sk-not-a-key-0000"}, {"Authorization": ACME},
                                     {"Authorization": "Basic c2stYWNtZQ=="}])
def test_a_missing_or_wrong_key_is_401_and_nothing_is_served(live: LiveRuntime, headers: dict) -> None:
    live.events.clear()
    with httpx.Client(base_url=live.base_url) as client:
        response = client.post(CHAT, json=GOOD_CHAT, headers=headers)
        models = client.get("/v1/models", headers=headers)
    assert_openai_error(response, 401)
    assert_openai_error(models, 401)
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert live.events == [], "an unauthenticated request has no tenant to charge"


@pytest.mark.parametrize(("header", "value"), [("X-Wattson-Feature", "a b"), ("X-Wattson-Feature", "x" * 101),
                                               ("X-Wattson-Priority", "urgent")])
def test_malformed_wattson_headers_are_400(live: LiveRuntime, header: str, value: str) -> None:
    with live.client(**{header: value}) as client:
        assert_openai_error(client.post(CHAT, json=GOOD_CHAT), 400, param=header)


def test_unknown_routes_and_methods_use_the_error_body(live: LiveRuntime) -> None:
    with live.client() as client:
        assert_openai_error(client.get("/v1/nothing"), 404)
        assert_openai_error(client.get(CHAT), 405)


def test_a_refused_request_is_still_an_event_charged_to_its_tenant(live: LiveRuntime) -> None:
    live.events.clear()
    with live.client(**{"X-Wattson-Feature": "search"}) as client:
        client.post(CHAT, json={**GOOD_CHAT, "max_tokens": -1})
    (event,) = live.wait_for_events(1)
    assert (event.tenant, event.feature, event.status, event.http_status) == ("acme", "search", "error", 400)
    assert event.error_type == "invalid_value" and event.completion_tokens == 0
