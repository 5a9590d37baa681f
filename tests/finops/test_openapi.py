"""The control plane publishes an OpenAPI document of its machine API at /api/v1/openapi.json,
built from the ingest contract's models, and a bounded schemathesis run against the Django app
(in process, over WSGI, as a registered runtime) finds no 5xx, nothing the document does not
declare, and no error outside the API's error format."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from django.core.handlers.wsgi import WSGIHandler
from django.core.signals import request_finished, request_started
from django.db import OperationalError, close_old_connections
from django.test import Client
from django.utils import timezone
from schemathesis import Case, GenerationMode
from schemathesis.specs.openapi.schemas import OpenApiSchema

from finops.runtimes.models import Runtime
from finops.runtimes.services import MAX_VERSION, ruleset_store
from finops.telemetry.contracts import DeviceSampleRecord, RequestEventRecord, RuntimeSampleRecord, TelemetryBatch
from finops.telemetry.openapi import ErrorBody
from tests.finops.factories import RUNTIME, event_dict
from tests.openapi_run import ERROR_FIELDS, json_object, run_bounded, with_header

pytestmark = pytest.mark.django_db

URL = "/api/v1/openapi.json"
REF = "#/components/schemas/{}"
EXAMPLES = 25  # valid requests per operation, and as many invalid ones


@pytest.fixture
def runtime_with_ruleset(runtime_token: tuple[Runtime, str]) -> tuple[Runtime, str]:
    """``rt-1``, its token, and a compiled ruleset for it to pull."""
    runtime, _ = runtime_token
    ruleset_store(runtime=runtime, content={"runtime_id": RUNTIME, "prices": {}, "rules": [], "allowances": []})
    return runtime_token


@pytest.fixture
def document(client: Client) -> dict[str, Any]:
    response = client.get(URL)
    assert response.status_code == 200
    return response.json()


@pytest.fixture
def api() -> Iterator[OpenApiSchema]:
    """The document as schemathesis loads it from the WSGI app. The requests run on the test's
    thread and connection, inside its transaction, as Django's test client runs them: a request
    must not close that connection when it starts or ends."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield schemathesis.openapi.from_wsgi(URL, WSGIHandler())
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


def test_the_document_declares_ingest_and_the_ruleset_pull_behind_the_runtime_token(
        document: dict[str, Any]) -> None:
    assert document["openapi"] == "3.1.0"
    assert {path: sorted(methods) for path, methods in document["paths"].items()} == {
        "/api/v1/events": ["post"], "/api/v1/ruleset": ["get"], "/api/v1/focus": ["get"]}
    assert document["components"]["securitySchemes"]["runtimeToken"] == {
        "type": "http", "scheme": "bearer", "description": "The runtime's token, issued when it is registered."}
    for path in ("/api/v1/events", "/api/v1/ruleset"):
        for operation in document["paths"][path].values():
            assert operation["security"] == [{"runtimeToken": []}]
    assert document["paths"]["/api/v1/focus"]["get"]["security"] == [{"focusToken": []}]


def test_the_batch_is_declared_by_the_ingest_contract_models(document: dict[str, Any]) -> None:
    ingest = document["paths"]["/api/v1/events"]["post"]
    schemas = document["components"]["schemas"]

    assert ingest["requestBody"]["content"]["application/json"]["schema"] == {"$ref": REF.format("TelemetryBatch")}
    for model in (TelemetryBatch, RequestEventRecord, RuntimeSampleRecord, DeviceSampleRecord):
        expected = model.model_json_schema(ref_template=REF.format("{model}"))
        expected.pop("$defs", None)
        assert schemas[model.__name__] == expected, model.__name__
    assert schemas["RequestEventRecord"]["additionalProperties"] is False


def test_every_error_is_declared_as_the_error_body(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    assert set(schemas["ErrorDetail"]["required"]) == ERROR_FIELDS
    for path, methods in document["paths"].items():
        for operation in methods.values():
            errors = {status: r for status, r in operation["responses"].items() if status >= "400"}
            assert "401" in errors
            for status, response in errors.items():
                schema = response["content"]["application/json"]["schema"]
                assert schema["$ref"] in (REF.format("ErrorBody"), REF.format("RefusedBatch")), (path, status)
            assert "Retry-After" in errors["503"]["headers"], path
    assert {"$ref": REF.format("ErrorBody")} in schemas["RefusedBatch"]["allOf"]


def test_both_services_declare_the_same_error_body() -> None:
    """Each side keeps its own copy of the wire contracts; this one is held against the other."""
    from inference.errors import ErrorBody as RuntimeErrorBody

    def shape(model: type) -> dict[str, Any]:
        schema = model.model_json_schema()
        schema.pop("description", None)
        return schema

    assert shape(ErrorBody) == shape(RuntimeErrorBody)


def test_the_document_is_read_with_get_only(client: Client) -> None:
    response = client.post(URL)

    assert response.status_code == 405
    assert set(response.json()["error"]) == ERROR_FIELDS
    assert response["Allow"] == "GET, HEAD"


def test_a_runtime_that_says_it_holds_the_highest_version_gets_its_ruleset_not_a_500(
        client: Client, runtime_with_ruleset: tuple[Runtime, str]) -> None:
    response = client.get("/api/v1/ruleset", HTTP_AUTHORIZATION=f"Bearer {runtime_with_ruleset[1]}",
                          HTTP_X_WATTSON_RULESET_VERSION=str(MAX_VERSION))

    assert response.status_code == 200  # nothing can be issued above it: the runtime keeps what it holds
    assert response.json()["version"] == 1


def _pull(client: Client, token: str) -> Any:
    return client.get("/api/v1/ruleset", HTTP_AUTHORIZATION=f"Bearer {token}")


def _ingest_one(client: Client, token: str) -> Any:
    return client.generic("POST", "/api/v1/events", json.dumps({"events": [event_dict()]}),
                          content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {token}")


@pytest.mark.parametrize(("failure", "status", "code"), [
    (OperationalError("the database system is shutting down"), 503, "database_unavailable"),
    (RuntimeError("a bug"), 500, "internal_error"),
])
@pytest.mark.parametrize(("send", "where"), [
    (_pull, "finops.runtimes.views.ruleset_pull"),
    (_ingest_one, "finops.telemetry.views.telemetry_ingest"),
], ids=["ruleset", "ingest"])
def test_a_failure_inside_the_machine_api_answers_in_its_error_format(
        client: Client, runtime_with_ruleset: tuple[Runtime, str], monkeypatch: pytest.MonkeyPatch, send: Any,
        where: str, failure: Exception, status: int, code: str) -> None:
    def fail(**_: Any) -> None:
        raise failure

    monkeypatch.setattr(where, fail)
    response = send(client, runtime_with_ruleset[1])

    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert set(response.json()["error"]) == ERROR_FIELDS
    if status == 503:
        assert response["Retry-After"] == "5"


@pytest.mark.parametrize("label", ["POST /api/v1/events", "GET /api/v1/ruleset", "GET /api/v1/focus"])
def test_a_bounded_schemathesis_run_finds_nothing_the_document_does_not_declare(
        api: OpenApiSchema, runtime_with_ruleset: tuple[Runtime, str], label: str) -> None:
    method, path = label.split(" ")
    token = runtime_with_ruleset[1]

    def as_the_runtime(case: Case, mode: GenerationMode) -> None:
        with_header(case, "Authorization", f"Bearer {token}")
        if mode is GenerationMode.POSITIVE:
            _sent_now_by_rt_1(json_object(case.body))

    run_bounded(api[path][method], examples=EXAMPLES, prepare=as_the_runtime)


def _sent_now_by_rt_1(batch: dict[str, Any] | None) -> None:
    """Valid records as ``rt-1`` sends them, so that they are stored rather than refused as another
    runtime's or as outside the retention window."""
    now = timezone.now()
    for event in (batch or {}).get("events", []):
        event.update(runtime_id=RUNTIME, started_at=(now - dt.timedelta(seconds=1)).isoformat(),
                     finished_at=now.isoformat())
    for sample in (batch or {}).get("samples", []):
        sample.update(runtime_id=RUNTIME, at=now.isoformat())
