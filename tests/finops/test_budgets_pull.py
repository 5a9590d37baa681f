"""GET /api/v1/ruleset: a runtime pulls its own ruleset with its ingest token; the version it
holds is recorded as acknowledged, and it gets 304 when it already holds the newest."""

from __future__ import annotations

import pytest
from django.test import Client

from finops.runtimes.models import Ruleset, Runtime
from finops.runtimes.services import ruleset_store
from tests.finops.factories import runtime_with_token

pytestmark = pytest.mark.django_db

URL = "/api/v1/ruleset"
HEADER = "HTTP_X_WATTSON_RULESET_VERSION"


@pytest.fixture
def runtime_and_token() -> tuple[Runtime, str]:
    runtime, token = runtime_with_token("rt-1")
    ruleset_store(runtime=runtime, content={"runtime_id": "rt-1", "prices": {}, "rules": [], "allowances": []})
    ruleset_store(runtime=runtime, content={"runtime_id": "rt-1", "prices": {}, "rules": [], "allowances": [],
                                            "note": "second"})
    return runtime, token


def pull(client: Client, token: str | None, held: str | None = None) -> object:
    headers = {}
    if token is not None:
        headers["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    if held is not None:
        headers[HEADER] = held
    return client.get(URL, **headers)


def test_the_runtime_gets_its_own_document_and_its_held_version_is_recorded(
        client: Client, runtime_and_token: tuple[Runtime, str]) -> None:
    runtime, token = runtime_and_token
    Runtime.objects.create(name="rt-other", base_url="http://other.test")

    response = pull(client, token, held="1")

    assert response.status_code == 200
    assert response.json() == Ruleset.objects.get(runtime=runtime).document
    assert response.json()["version"] == 2
    assert response["X-Wattson-Ruleset-Version"] == "2"
    runtime.refresh_from_db()
    assert runtime.last_ruleset_ack == 1
    assert runtime.last_seen_at is not None


def test_304_when_the_runtime_already_holds_the_newest_version(client: Client,
                                                              runtime_and_token: tuple[Runtime, str]) -> None:
    runtime, token = runtime_and_token

    response = pull(client, token, held="2")

    assert response.status_code == 304
    assert response.content == b""
    runtime.refresh_from_db()
    assert runtime.last_ruleset_ack == 2


def test_a_runtime_that_says_nothing_about_its_version_gets_the_document(
        client: Client, runtime_and_token: tuple[Runtime, str]) -> None:
    runtime, token = runtime_and_token

    response = pull(client, token)

    assert response.status_code == 200
    runtime.refresh_from_db()
    assert runtime.last_ruleset_ack is None


@pytest.mark.parametrize("token", [None, "", "wrt_not-a-real-token", "x" * 5000])
def test_without_a_valid_ingest_token_the_answer_is_401(client: Client, runtime_and_token: tuple[Runtime, str],
                                                        token: str | None) -> None:
    response = pull(client, token, held="1")

    assert response.status_code == 401
    assert response["WWW-Authenticate"] == 'Bearer realm="wattson"'
    assert response.json()["error"]["type"] == "authentication_error"
    assert Runtime.objects.get(name="rt-1").last_ruleset_ack is None


def test_a_revoked_token_is_refused(client: Client, runtime_and_token: tuple[Runtime, str]) -> None:
    runtime, token = runtime_and_token
    runtime.tokens.update(revoked_at="2026-01-01T00:00:00Z")

    assert pull(client, token).status_code == 401


@pytest.mark.parametrize("held", ["two", "-1", "1.5", "99999999999999999999999", " ", "１"])
def test_a_version_header_that_is_not_a_whole_number_is_a_400(client: Client, runtime_and_token: tuple[Runtime, str],
                                                              held: str) -> None:
    _, token = runtime_and_token

    response = pull(client, token, held=held)

    assert response.status_code == 400
    assert response.json()["error"]["param"] == "X-Wattson-Ruleset-Version"


def test_before_the_first_compile_the_runtime_is_told_to_retry(client: Client) -> None:
    _, token = runtime_with_token("rt-new")

    response = pull(client, token, held="0")

    assert response.status_code == 503
    assert response["Retry-After"] == "5"
    assert response.json()["error"]["code"] == "ruleset_not_ready"


def test_a_runtime_holding_a_version_above_ours_is_given_the_document_reissued_above_it(
        client: Client, runtime_and_token: tuple[Runtime, str]) -> None:
    _, token = runtime_and_token

    response = pull(client, token, held="40")

    assert response.status_code == 200
    assert response.json()["version"] == 41
    assert response.json()["note"] == "second"


def test_only_get_is_allowed(client: Client, runtime_and_token: tuple[Runtime, str]) -> None:
    _, token = runtime_and_token

    response = client.post(URL, HTTP_AUTHORIZATION=f"Bearer {token}")

    assert response.status_code == 405
