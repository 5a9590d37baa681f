"""The runtime's OpenAPI document (``GET /openapi.json``): what each endpoint takes and answers.

The routes read the raw request themselves (the body within its size limit, validated strictly,
refused with the API's own errors), so FastAPI sees no body parameters to describe. Each route
declares instead, with ``operation``, the pydantic model that validates its body, the headers it
reads, who may call it and the errors it can answer; ``openapi_document`` adds the security
schemes and the body models' schemas. Nothing here takes part in serving a request.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from pydantic import BaseModel

from inference.admission import PRIORITY_RANK
from inference.errors import ErrorBody
from inference.request_parsing import DEADLINE_PATTERN, FEATURE_PATTERN, MAX_BODY_BYTES, TASK_PATTERN

REF = "#/components/schemas/{model}"
SECURITY_SCHEMES = {
    "apiKey": {"type": "http", "scheme": "bearer", "description": "An API key of this runtime (--api-key)."},
    "adminToken": {"type": "http", "scheme": "bearer",
                   "description": "The runtime's admin token (--admin-token), held by the control plane."},
}
Auth = Literal["apiKey", "adminToken"]

_ERRORS = {
    400: "The request is not valid: the body, a parameter or a header (see `error.param`).",
    401: "No bearer token, or not a valid one.",
    403: "Not allowed: the admin API is off on this runtime (no admin token configured).",
    404: "No such model or job.",
    409: "A conflict with the runtime's state.",
    413: f"The body is over its limit ({MAX_BODY_BYTES} bytes for a request; 16 MiB for a ruleset).",
    422: "The ruleset is not valid.",
    429: "Refused by a rule: a throttle, a block or an exhausted budget. `Retry-After` says when to try again.",
    500: "The engine failed while generating.",
    502: "The upstream server failed.",
    503: "Overloaded, shutting down, or refused while a budget cannot be metered; `Retry-After` says when "
         "to try again.",
    504: "The upstream server did not answer in time, or the request's deadline passed (code `deadline_exceeded`).",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again.",
                                "schema": {"type": "integer", "minimum": 0}}}
_WWW_AUTHENTICATE = {"WWW-Authenticate": {"description": "`Bearer`.", "schema": {"type": "string"}}}

FEATURE = {
    "name": "X-Wattson-Feature", "in": "header", "required": False,
    "description": "The product feature the request is for, in the cost reports (`default` without it).",
    "schema": {"type": "string", "pattern": FEATURE_PATTERN},
}
TASK = {
    "name": "X-Wattson-Task", "in": "header", "required": False,
    "description": "The task the request is an attempt at (or the body's `metadata.task_id`; both given, they "
                   "must agree): every request sent under one task id counts toward one task's cost. Without "
                   "it the request is a task of its own.",
    "schema": {"type": "string", "pattern": TASK_PATTERN},
}
# The runtime reads the priority in any case; the pattern says so, letter by letter.
PRIORITY = {
    "name": "X-Wattson-Priority", "in": "header", "required": False,
    "description": "low, normal or high, in any case; capped by the API key's tier.",
    "schema": {"type": "string", "pattern": "^(" + "|".join(
        "".join(f"[{c.upper()}{c}]" for c in name) for name in PRIORITY_RANK) + ")$"},
}
DEADLINE = {
    "name": "X-Wattson-Deadline", "in": "header", "required": False,
    "description": "Seconds the whole request may take (queue waits, retries, fallbacks and generation "
                   "included; for a job, from its submission), at most the runtime's limit "
                   "(--request-deadline-s, --job-deadline-s), which is also the default.",
    "schema": {"type": "string", "pattern": DEADLINE_PATTERN},
}
LAST_EVENT_ID = {
    "name": "Last-Event-ID", "in": "header", "required": False,
    "description": "The id of the last event received: the stream resumes after it.",
    "schema": {"type": "string", "pattern": "^[0-9]{0,18}$"},
}

# What a generation can answer besides 200: the body, the model or the prompt is wrong (400, 404,
# 413), the rules refuse it (429, 503), the engine or an upstream fails (500, 502, 504), or the
# runtime is overloaded or stopping (503).
GENERATION_ERRORS = (400, 404, 413, 429, 500, 502, 503, 504)
# A server-sent event, as the schema of a text/event-stream response describes each one.
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"}}}
COMPLETION = {"application/json": {"type": "object"},
              "text/event-stream": {**SSE_EVENT, "description": 'With `"stream": true`: chunks, then '
                                                                "`data: [DONE]`."}}
EVENT_STREAM = {"text/event-stream": SSE_EVENT}


def operation(*, auth: Auth | None, errors: Iterable[int] = (), body: type[BaseModel] | dict[str, Any] | None = None,
              headers: Iterable[dict[str, Any]] = (), ok: dict[str, Any] | None = None,
              ok_status: int = 200, ok_also: Iterable[int] = ()) -> dict[str, Any]:
    """The keyword arguments of a route's decorator that describe it in the document: who may
    call it, the headers it reads, its JSON body (the model that validates it, or a schema made
    with ``model_schemas``), what it answers when all goes well (``ok``: media type to schema;
    ``ok_also``: other statuses with that body) and the error statuses it can answer."""
    statuses = sorted({*errors, *((401,) if auth else ())})
    responses: dict[int | str, Any] = {status: _error_response(status) for status in statuses}
    extra: dict[str, Any] = {"security": [{auth: []}] if auth else []}
    if headers:
        extra["parameters"] = list(headers)
    if body is not None:
        schema = dict(body) if isinstance(body, dict) else {"$ref": ref(body), "$defs": model_schemas(body)}
        _define(schema.pop("$defs", {}))
        extra["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    content = {media: {"schema": schema} for media, schema in (ok or {"application/json": {"type": "object"}}).items()}
    extra["responses"] = {str(ok_status): {"content": content}}
    for status in ok_also:
        extra["responses"][str(status)] = {"description": "The same body.", "content": content}
    # The routes answer with responses of their own making: without a media type of its own the
    # decorator adds none beside those of ``ok``.
    return {"responses": responses, "openapi_extra": extra, "response_class": Response}


def ref(model: type[BaseModel]) -> str:
    return REF.format(model=model.__name__)


def model_schemas(*models: type[BaseModel]) -> dict[str, Any]:
    """The JSON schemas (for validation) of ``models`` and the models they hold, by name: a request
    body's ``$defs``, which go to the document's components."""
    schemas: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template=REF, mode="validation")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return schemas


# The schemas the request bodies refer to, by name, as ``operation`` was given them: the document's
# components. (FastAPI's own copy of a schema has its bounds as floats, and 2**63 - 1 becomes 2**63.)
_DEFINITIONS: dict[str, Any] = {}


def _define(definitions: dict[str, Any]) -> None:
    for name, schema in definitions.items():
        if _DEFINITIONS.setdefault(name, schema) != schema:
            raise ValueError(f"two different schemas are named {name!r} in the runtime's OpenAPI document")


def _error_response(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {"model": ErrorBody, "description": _ERRORS[status]}
    if status in (429, 503):
        response["headers"] = _RETRY_AFTER
    elif status == 401:
        response["headers"] = _WWW_AUTHENTICATE
    return response


DESCRIPTION = ("Wattson's inference runtime: the OpenAI-compatible API, async jobs, and the ruleset endpoints "
               'the control plane calls. Every error is `{"error": {"type", "message", "code", "param"}}`.')


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """The document, built once: FastAPI's, with the body models' schemas among the components,
    the security schemes, and without FastAPI's own 422 (this API answers bad input with a 400)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    document = get_openapi(title=app.title, version=app.version, description=DESCRIPTION, routes=app.routes)
    for op in (op for path in document["paths"].values() for op in path.values()):
        if op["responses"].get("422", {}).get("description") == "Validation Error":
            del op["responses"]["422"]
    components = document.setdefault("components", {})
    schemas = {name: schema for name, schema in components.get("schemas", {}).items()
               if name not in ("HTTPValidationError", "ValidationError")}
    components["schemas"] = {**schemas, **copy.deepcopy(_DEFINITIONS)}
    components["securitySchemes"] = SECURITY_SCHEMES
    app.openapi_schema = document
    return document
