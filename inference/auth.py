"""Who may call the runtime: the bearer token of the ``Authorization`` header, checked as an API key
(``Runtime.authenticate``) or as the admin token the control plane holds (``require_admin``)."""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING

from fastapi import Request

from inference.errors import ApiError

if TYPE_CHECKING:
    from inference.runtime import Runtime


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (the scheme in any case), or None
    when the header is missing, of another scheme, or has no token."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    return token if token and scheme.lower() == "bearer" else None


def require_admin(runtime: Runtime, request: Request) -> None:
    """Let the request through only with the runtime's admin token (401/403 otherwise)."""
    expected = runtime.config.admin_token
    if not expected:
        raise ApiError(403, "The admin API is disabled on this runtime: no --admin-token "
                       "(INFERENCE_ADMIN_TOKEN) is configured.", code="admin_disabled")
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise ApiError(401, "Missing admin token: send 'Authorization: Bearer <admin token>'.",
                       code="missing_admin_token")
    # Compared as digests: equal length, constant time, whatever the caller sent.
    if not hmac.compare_digest(token_digest(token), token_digest(expected)):
        raise ApiError(401, "Incorrect admin token.", code="invalid_admin_token")


def token_digest(value: str) -> bytes:
    """A token's SHA-256: API keys are looked up by it, so lookup time says nothing about a key's
    characters, and the admin token is compared by it, in constant time whatever its length."""
    return hashlib.sha256(value.encode()).digest()
