"""A bounded schemathesis run against one operation of an API's OpenAPI document, in process.

Each operation gets a fixed number of generated requests, valid ones and invalid ones, drawn
derandomized (the same requests on every run, so a failure reproduces and the run takes seconds).
Every answer is checked: never a 5xx, a status, media type, headers and body that the document
declares, every invalid request refused with a 4xx, and every error in the API's error format.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import APIOperation, Case, CheckContext, GenerationMode, Response
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

ERROR_FIELDS = {"type", "message", "code", "param"}


def error_body(ctx: CheckContext, response: Response, case: Case) -> None:
    """A 4xx or 5xx carries ``{"error": {"type", "message", "code", "param"}}`` and no traceback."""
    if response.status_code < 400:
        return
    body = json.loads(response.content)
    error = body.get("error") if isinstance(body, dict) else None
    assert isinstance(error, dict) and set(error) == ERROR_FIELDS, f"not the API's error body: {body!r}"
    assert isinstance(error["type"], str) and isinstance(error["message"], str) and error["message"]
    assert all(error[key] is None or isinstance(error[key], str) for key in ("code", "param"))
    assert "Traceback" not in error["message"]


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection, error_body]


def has_inputs(operation: APIOperation) -> bool:
    """Whether the operation takes anything an invalid request could get wrong."""
    raw = operation.definition.raw
    return bool(raw.get("parameters") or raw.get("requestBody") or raw.get("security"))


def run_bounded(operation: APIOperation, *, examples: int, prepare: Callable[[Case, GenerationMode], None]) -> None:
    """``examples`` valid and ``examples`` invalid requests to ``operation``, each made ready by
    ``prepare`` (a token, say) and checked with ``CHECKS``; the first failure raises."""
    _run(operation, GenerationMode.POSITIVE, examples=examples, prepare=prepare)
    if has_inputs(operation):
        _run(operation, GenerationMode.NEGATIVE, examples=examples, prepare=prepare)


def _run(operation: APIOperation, mode: GenerationMode, *, examples: int,
         prepare: Callable[[Case, GenerationMode], None]) -> None:
    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def request(case: Case) -> None:
        prepare(case, mode)
        case.call_and_validate(checks=CHECKS)

    request()


def with_header(case: Case, name: str, value: str) -> None:
    case.headers = {**(case.headers or {}), name: value}


def json_object(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None
