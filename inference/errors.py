"""The OpenAI error body for every failure, with the right status and never a stack trace."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger("inference.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    502: "upstream_error",
    503: "server_overloaded",
    504: "upstream_timeout",
}


class ErrorDetail(BaseModel):
    type: str
    message: str
    code: str | None
    param: str | None


class ErrorBody(BaseModel):
    """The error body, as the OpenAPI document declares it: what ``ApiError.body`` writes."""

    error: ErrorDetail


class ApiError(Exception):
    """A failure the client should see, in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after_s: int | None = None,
        error_type: str | None = None,
        transient: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s
        self.error_type = error_type or _TYPES.get(status, "invalid_request_error")
        # A failure that may pass if the same request is tried again (a dropped connection, a
        # timeout, a 502/503/504 from an upstream): the only kind ever retried.
        self.transient = transient
        self.extra_headers = dict(headers or {})

    def with_headers(self, headers: dict[str, str]) -> ApiError:
        """The same error, answered with ``headers`` too (a copy: errors may be shared constants)."""
        return ApiError(self.status, self.message, code=self.code, param=self.param, retry_after_s=self.retry_after_s,
                        error_type=self.error_type, transient=self.transient, headers={**self.extra_headers, **headers})

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.error_type, "message": self.message, "code": self.code,
                          "param": self.param}}

    def headers(self) -> dict[str, str]:
        headers = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}
        headers.update(self.extra_headers)
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return headers

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers())


def validation_error(exc: RequestValidationError | Exception, *, within: str | None = None) -> ApiError:
    """Describe the first problem of a pydantic validation failure as a 400 naming the field
    (as a field of ``within`` when the object validated sits inside the request)."""
    errors = exc.errors() if hasattr(exc, "errors") else []
    if not errors:
        return ApiError(400, "The request body is not valid.", code="invalid_request", param=within)
    first = errors[0]
    parts = list(first.get("loc", ()))
    if isinstance(exc, RequestValidationError) and parts[:1] == ["body"]:
        parts = parts[1:]  # FastAPI's name for where the fields came from, not a field
    loc = [str(p) for p in parts if not _is_type_tag(p)]
    if within is not None:
        loc.insert(0, within)
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid value"))
    if first.get("type") == "json_invalid":
        return ApiError(400, "The request body is not valid JSON.", code="invalid_json")
    if first.get("type") == "missing":
        return ApiError(400, f"Missing required parameter: '{param}'.", code="missing_required_parameter",
                        param=param)
    return ApiError(400, f"Invalid value for '{param}': {message}.", code="invalid_value", param=param)


def _is_type_tag(part: object) -> bool:
    """Pydantic names the branch of a union it tried (``str``, ``list[TextPart]``): not a parameter."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool", "none", "list", "dict"}
                                      or "[" in part or part.startswith("function-"))


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> list[str]:
    """The methods some route answers at the request's path (each method is a route of its own here)."""
    routes = request.app.router.routes
    return [method for method in _METHODS
            if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: "Not found.", 405: "Method not allowed."}.get(exc.status_code, str(exc.detail))
        response = ApiError(exc.status_code, message, code=f"http_{exc.status_code}").response()
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:  # RFC 9110 asks for every method of the resource, not those of one route
            response.headers["Allow"] = ", ".join(_allowed_methods(request))
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return ApiError(500, "The server failed to process the request.", code="internal_error").response()
