"""The control plane's machine API as an OpenAPI 3.1 document, ``GET /api/v1/openapi.json``:
``POST /api/v1/events`` (the runtimes' telemetry), ``GET /api/v1/ruleset`` (their pull) and
``GET /api/v1/focus`` (the FOCUS export a FinOps tool pulls).

The request body's schemas are the ingest contract's pydantic models (``contracts.TelemetryBatch``
and the records it holds), and a refusal's is ``contracts.Refusal``'s, so the document says what
ingest validates and cannot drift from it. Every error is ``finops.lib.api.api_error``'s body.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest, JsonResponse
from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import models_json_schema

from finops.lib.api import api_error
from finops.runtimes.views import VERSION_HEADER
from finops.telemetry.contracts import CONTRACT_VERSION, Refusal, TelemetryBatch

REF = "#/components/schemas/{model}"


class ErrorDetail(BaseModel):
    type: str
    message: str
    code: str | None
    param: str | None


class ErrorBody(BaseModel):
    """What ``api_error`` answers; a refused batch's 422 adds the ingest result beside ``error``."""

    error: ErrorDetail


_INGEST_RESULT = {
    "type": "object", "required": ["accepted", "duplicates", "refused"],
    "properties": {
        "accepted": {"type": "integer", "minimum": 0, "description": "Records stored now."},
        "duplicates": {"type": "integer", "minimum": 0, "description": "Records stored before (not counted twice)."},
        "refused": {"type": "array", "items": {"$ref": REF.format(model="Refusal")},
                    "description": "Records not stored, each with its reasons."},
    },
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again.",
                                "schema": {"type": "integer", "minimum": 0}}}
_VERSION_HELD = {"description": "The version of the ruleset sent (200) or already held (304).",
                 "schema": {"type": "string", "pattern": "^[0-9]{1,19}$"}}


def _error(description: str, *, headers: dict[str, Any] | None = None, schema: str = "ErrorBody") -> dict[str, Any]:
    response: dict[str, Any] = {"description": description,
                                "content": {"application/json": {"schema": {"$ref": REF.format(model=schema)}}}}
    if headers:
        response["headers"] = headers
    return response


_UNAUTHORIZED = _error("No bearer token, or not a valid runtime token.",
                       headers={"WWW-Authenticate": {"schema": {"type": "string"}}})
_DATABASE_DOWN = "The database is unavailable; `Retry-After` says when to retry."


def _ingest() -> dict[str, Any]:
    return {
        "operationId": "ingest_events",
        "summary": "Store a batch of request events and runtime samples",
        "description": (f"At most {settings.INGEST_MAX_RECORDS} records and {settings.INGEST_MAX_BODY_BYTES} bytes a "
                        "request. Records are judged one by one: a record the contract or the ingest checks refuse "
                        "(another runtime's, outside the retention window, ...) is listed in `refused` and the rest "
                        "are stored. Storing is idempotent on `event_id`."),
        "security": [{"runtimeToken": []}],
        "requestBody": {"required": True,
                        "content": {"application/json": {"schema": {"$ref": REF.format(model="TelemetryBatch")}}}},
        "responses": {
            "202": {"description": "Stored what could be kept (or the batch was empty).",
                    "content": {"application/json": {"schema": {"$ref": REF.format(model="IngestResult")}}}},
            "400": _error("The body is not a batch: not JSON, not an object, or its lists are not lists."),
            "401": _UNAUTHORIZED,
            "413": _error("Too many records or too many bytes in one request: send smaller batches."),
            "422": _error("Every record was refused: the runtime sets the batch aside instead of resending it.",
                          schema="RefusedBatch"),
            "500": _error("The control plane failed to store the batch; it may be sent again."),
            "503": _error(_DATABASE_DOWN, headers=_RETRY_AFTER),
        },
    }


def _ruleset_pull() -> dict[str, Any]:
    return {
        "operationId": "ruleset_pull",
        "summary": "The runtime's ruleset (docs/RULESET.md), or 304 when it holds the newest",
        "security": [{"runtimeToken": []}],
        "parameters": [{"name": VERSION_HEADER, "in": "header", "required": False, "schema": _VERSION_HELD["schema"],
                        "description": "The version the runtime holds, recorded as acknowledged."}],
        "responses": {
            "200": {"description": "The ruleset document, contract version 1.",
                    "headers": {VERSION_HEADER: _VERSION_HELD},
                    "content": {"application/json": {"schema": {
                        "type": "object", "required": ["version", "issued_at"],
                        "properties": {"version": {"type": "integer", "minimum": 1},
                                       "issued_at": {"type": "string", "format": "date-time"}}}}}},
            "304": {"description": "The runtime already holds the newest version.",
                    "headers": {VERSION_HEADER: _VERSION_HELD}},
            "400": _error(f"{VERSION_HEADER} is not the whole number of a version."),
            "401": _UNAUTHORIZED,
            "503": _error("No ruleset has been compiled for this runtime yet, or the database is unavailable; "
                          "`Retry-After` says when to retry.", headers=_RETRY_AFTER),
        },
    }


def _focus_export() -> dict[str, Any]:
    day = {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"}
    return {
        "operationId": "focus_export",
        "summary": "Cost and usage of whole UTC days in FOCUS 1.2 columns, as CSV (docs/DASHBOARDS.md)",
        "security": [{"focusToken": []}],
        "parameters": [{"name": "start", "in": "query", "required": True, "schema": day,
                        "description": "The first UTC day."},
                       {"name": "end", "in": "query", "required": True, "schema": day,
                        "description": "The last UTC day, included."}],
        "responses": {
            "200": {"description": "One row per day, runtime, model, tenant and feature.",
                    "content": {"text/csv": {"schema": {"type": "string"}}}},
            "400": _error("A day is not a date, the last is before the first, or the range reaches past the "
                          "raw events' retention."),
            "401": _error("No bearer token, or not the FOCUS export token.",
                          headers={"WWW-Authenticate": {"schema": {"type": "string"}}}),
            "404": _error("The endpoint is off: no FOCUS_API_TOKEN is set."),
            "500": _error("The control plane failed to answer; the request may be retried."),
            "503": _error(_DATABASE_DOWN, headers=_RETRY_AFTER),
        },
    }


def openapi_document() -> dict[str, Any]:
    _, top = models_json_schema([(TelemetryBatch, "validation"), (ErrorBody, "validation")], ref_template=REF)
    schemas: dict[str, Any] = top["$defs"]
    schemas["Refusal"] = TypeAdapter(Refusal).json_schema(ref_template=REF)
    schemas["IngestResult"] = _INGEST_RESULT
    schemas["RefusedBatch"] = {"allOf": [{"$ref": REF.format(model="ErrorBody")},
                                         {"$ref": REF.format(model="IngestResult")}]}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Wattson control plane: machine API", "version": str(CONTRACT_VERSION),
                 "description": "What runtimes call: telemetry ingest and the ruleset pull; and the FOCUS export "
                                "a FinOps tool pulls. Every error is "
                                '`{"error": {"type", "message", "code", "param"}}`.'},
        "paths": {"/api/v1/events": {"post": _ingest()}, "/api/v1/ruleset": {"get": _ruleset_pull()},
                  "/api/v1/focus": {"get": _focus_export()}},
        "components": {
            "schemas": schemas,
            "securitySchemes": {"runtimeToken": {"type": "http", "scheme": "bearer",
                                                 "description": "The runtime's token, issued when it is registered."},
                                "focusToken": {"type": "http", "scheme": "bearer",
                                               "description": "FOCUS_API_TOKEN: a FinOps tool's token."}},
        },
    }


def openapi_view(request: HttpRequest) -> JsonResponse:
    if request.method not in ("GET", "HEAD"):
        response = api_error(405, "Use GET to read the OpenAPI document.", code="method_not_allowed")
        response["Allow"] = "GET, HEAD"
        return response
    return JsonResponse(openapi_document())
