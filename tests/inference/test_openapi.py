"""The runtime publishes an OpenAPI document at /openapi.json that declares every endpoint's body,
headers, callers and errors, and a bounded schemathesis run against the live app (in process, on
the tiny model) finds no 5xx, nothing the document does not declare, and no error outside the
API's error format."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from schemathesis import Case, GenerationMode
from schemathesis.python import asgi
from schemathesis.specs.openapi.schemas import OpenApiSchema

from inference.api import create_app
from inference.engine.models import LoadedModel
from inference.jobs.store import ENDPOINTS
from inference.routes.jobs import JobSubmission
from inference.routes.openapi import DEADLINE, PRIORITY, TASK
from inference.rules.contract import RulesetDocument
from inference.runtime import Runtime
from inference.schemas import ChatCompletionRequest, CompletionRequest
from tests.inference.live import ACME, tiny_config
from tests.openapi_run import ERROR_FIELDS, json_object, run_bounded, with_header

ADMIN_TOKEN = "admin-token-for-the-openapi-run"
REF = "#/components/schemas/{}"
OPERATIONS = [
    "GET /health", "GET /metrics", "GET /v1/models", "POST /v1/chat/completions", "POST /v1/completions",
    "POST /v1/jobs", "GET /v1/jobs/{job_id}", "DELETE /v1/jobs/{job_id}", "GET /v1/jobs/{job_id}/events",
    "GET /admin/jobs/dead", "POST /admin/jobs/dead/{job_id}/replay", "GET /admin/ruleset", "PUT /admin/ruleset",
    "GET /admin/telemetry/refused", "POST /admin/telemetry/refused/resend", "DELETE /admin/telemetry/refused/{name}",
]
EXAMPLES = 20  # valid requests per operation, and as many invalid ones


@pytest.fixture
def app(tiny_model: LoadedModel, tmp_path: Path) -> FastAPI:
    """A runtime on the tiny model with an admin token, exporting to a control plane that is not
    there (so the set-aside records' endpoints have a spool); not started (the run starts it)."""
    config = tiny_config(admin_token=ADMIN_TOKEN, finops_url="http://127.0.0.1:9", spool_dir=tmp_path / "spool")
    return create_app(config, Runtime(config, preloaded=(tiny_model,)))


@pytest.fixture
def document(app: FastAPI) -> dict[str, Any]:
    response = TestClient(app).get("/openapi.json")
    assert response.status_code == 200
    return response.json()


@pytest.fixture
def api(app: FastAPI) -> Iterator[OpenApiSchema]:
    """The document as schemathesis loads it from the app, which it starts (and this stops)."""
    try:
        yield schemathesis.openapi.from_asgi("/openapi.json", app)
    finally:
        asgi.shutdown_lifespans()


def operations(document: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            yield f"{method.upper()} {path}", operation


def test_the_document_is_served_and_the_interactive_docs_stay_off(app: FastAPI, document: dict[str, Any]) -> None:
    client = TestClient(app)

    assert document["openapi"].startswith("3.")
    assert sorted(label for label, _ in operations(document)) == sorted(OPERATIONS)
    assert client.get("/docs").status_code == 404
    assert client.get("/redoc").status_code == 404


@pytest.mark.parametrize(("label", "model"), [("POST /v1/chat/completions", ChatCompletionRequest),
                                              ("POST /v1/completions", CompletionRequest),
                                              ("PUT /admin/ruleset", RulesetDocument)])
def test_each_body_is_declared_by_the_model_that_validates_it(document: dict[str, Any], label: str,
                                                              model: type) -> None:
    body = dict(operations(document))[label]["requestBody"]

    assert body["required"] is True
    assert body["content"]["application/json"]["schema"] == {"$ref": REF.format(model.__name__)}
    declared = document["components"]["schemas"][model.__name__]
    expected = model.model_json_schema(ref_template=REF.format("{model}"))
    expected.pop("$defs", None)
    assert declared == expected


def test_a_job_body_is_the_request_of_the_endpoint_its_url_names(document: dict[str, Any]) -> None:
    schema = dict(operations(document))["POST /v1/jobs"]["requestBody"]["content"]["application/json"]["schema"]

    variants = {v["properties"]["url"]["const"]: v for v in schema["oneOf"]}
    assert set(variants) == set(ENDPOINTS)
    for url, model in ENDPOINTS.items():
        assert set(variants[url]["properties"]) == set(JobSubmission.model_fields)
        assert variants[url]["properties"]["body"] == {"$ref": REF.format(model.__name__)}
        assert variants[url]["additionalProperties"] is False  # JobSubmission forbids other fields


def test_every_operation_says_who_may_call_it_and_answers_errors_in_the_error_format(
        document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    assert {name: (s["type"], s["scheme"]) for name, s in schemes.items()} == {
        "apiKey": ("http", "bearer"), "adminToken": ("http", "bearer")}
    error_body = document["components"]["schemas"]["ErrorBody"]
    assert error_body["required"] == ["error"]
    assert set(document["components"]["schemas"]["ErrorDetail"]["required"]) == ERROR_FIELDS
    for label, operation in operations(document):
        expected = [] if label in ("GET /health", "GET /metrics") else \
            [{"adminToken": []}] if " /admin/" in label else [{"apiKey": []}]
        assert operation["security"] == expected, label
        errors = {status: r for status, r in operation["responses"].items() if status >= "400"}
        if label == "GET /health":  # a probe: while the runtime starts, its 503 is the health body
            assert errors.pop("503")["content"] == operation["responses"]["200"]["content"]
        if expected:
            assert "401" in errors, label
        for status, response in errors.items():
            assert response["content"] == {"application/json": {"schema": {"$ref": REF.format("ErrorBody")}}}, \
                (label, status)
            if status in ("429", "503"):
                assert "Retry-After" in response["headers"], (label, status)


def test_a_generation_declares_the_feature_priority_deadline_and_task_headers_it_reads(
        document: dict[str, Any]) -> None:
    for label in ("POST /v1/chat/completions", "POST /v1/completions", "POST /v1/jobs"):
        headers = {p["name"] for p in dict(operations(document))[label]["parameters"] if p["in"] == "header"}
        assert headers == {"X-Wattson-Feature", "X-Wattson-Priority", "X-Wattson-Deadline", "X-Wattson-Task"}, label
    task = re.compile(TASK["schema"]["pattern"])
    assert all(task.match(value) for value in ("ticket-42", "a:b/c.d_e", "x" * 100))
    assert not any(task.match(value) for value in ("", "x" * 101, "two words", "<b>", "a\nb"))
    priority = re.compile(PRIORITY["schema"]["pattern"])
    assert all(priority.match(value) for value in ("low", "normal", "high", "HIGH", "Normal"))
    assert not any(priority.match(value) for value in ("urgent", "", "highest"))
    deadline = re.compile(DEADLINE["schema"]["pattern"])
    assert all(deadline.match(value) for value in ("30", "0.5", "2.125"))
    assert not any(deadline.match(value) for value in ("-1", "1e3", "", "2.1255", "soon"))


def test_an_unsupported_method_is_405_naming_every_method_the_resource_has(app: FastAPI) -> None:
    response = TestClient(app).patch("/admin/ruleset")

    assert response.status_code == 405
    assert set(response.json()["error"]) == ERROR_FIELDS
    assert response.headers["allow"] == "GET, PUT"


@pytest.mark.parametrize("label", OPERATIONS)
def test_a_bounded_schemathesis_run_finds_nothing_the_document_does_not_declare(api: OpenApiSchema,
                                                                               label: str) -> None:
    method, path = label.split(" ")
    run_bounded(api[path][method], examples=EXAMPLES, prepare=_as_its_caller)


def _as_its_caller(case: Case, mode: GenerationMode) -> None:
    """The caller's token; a valid generation is asked of the served model, so that it runs."""
    with_header(case, "Authorization", f"Bearer {ADMIN_TOKEN if case.path.startswith('/admin/') else ACME}")
    if mode is not GenerationMode.POSITIVE:
        return
    body = json_object(case.body)
    inner = json_object(body.get("body")) if body is not None and case.path == "/v1/jobs" else body
    if inner is not None and "model" in inner:
        inner["model"] = "tiny-random"
