"""What the control plane's machine APIs (ingest, ruleset pull) share: the error body both
services answer with, and the runtime's bearer token."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse

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
