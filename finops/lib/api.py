"""What the control plane's machine APIs (ingest, ruleset pull) share: the error body both
services answer with, the runtime's bearer token, and the answers to a failure of their own."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse

logger = logging.getLogger("finops.api")

# A token longer than this is refused without being looked up.
MAX_TOKEN_CHARS = 512


def api_error(status: int, message: str, *, error_type: str = "invalid_request_error", code: str | None = None,
              param: str | None = None, extra: dict | None = None) -> JsonResponse:
    """The error body both services answer with: ``{"error": {"type", "message", "code", "param"}}``."""
    body = {**(extra or {}), "error": {"type": error_type, "message": message, "code": code, "param": param}}
    return JsonResponse(body, status=status)


def bearer_token(request: HttpRequest) -> str:
    """The token of an ``Authorization: Bearer <token>`` header ("" without one)."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def runtime_token_refused(token: str) -> JsonResponse:
    """The 401 for a request without a valid runtime token (``token``: what it sent, if anything)."""
    response = api_error(401, "A valid runtime token is required: 'Authorization: Bearer <token>'.",
                         error_type="authentication_error", code="invalid_token" if token else "missing_token")
    response["WWW-Authenticate"] = 'Bearer realm="wattson"'
    return response


def machine_api(view: Callable[[HttpRequest], HttpResponse]) -> Callable[[HttpRequest], HttpResponse]:
    """A machine API's view that fails in the API's error format, never with Django's HTML page:
    503 with ``Retry-After`` while the database is unavailable, 500 for anything else."""
    @functools.wraps(view)
    def wrapped(request: HttpRequest) -> HttpResponse:
        try:
            return view(request)
        except (OperationalError, InterfaceError) as exc:
            logger.error("%s: database unavailable: %s", request.path, exc)
            response = api_error(503, "The control plane's database is unavailable; retry later.",
                                 error_type="server_error", code="database_unavailable")
            response["Retry-After"] = "5"
            return response
        except Exception:
            logger.exception("%s: unexpected failure", request.path)
            return api_error(500, "The control plane failed to answer; the request may be retried.",
                             error_type="server_error", code="internal_error")

    return wrapped
