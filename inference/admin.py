"""The control plane's endpoints on the runtime: ``PUT /admin/ruleset`` (push) and
``GET /admin/ruleset`` (what the runtime holds, with its ledger), behind ``--admin-token``.

Without an admin token configured the endpoints answer 403: nobody can push rules to that runtime
(it can still pull them with ``--finops-url``).
"""

from __future__ import annotations

import hashlib
import hmac
import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from inference.errors import ApiError
from inference.rules import RulesetInvalid, RulesetNotNewer
from inference.rules.contract import MAX_DOCUMENT_BYTES
from inference.runtime import Runtime


def install_admin_routes(app: FastAPI, runtime: Runtime) -> None:
    @app.put("/admin/ruleset")
    async def put_ruleset(request: Request) -> JSONResponse:
        require_admin(runtime, request)
        raw = await _read_body(request)
        try:
            version = await runtime.ruleset.accept(raw)
        except RulesetInvalid as exc:
            raise ApiError(422, exc.message, code="invalid_ruleset", param=exc.param) from None
        except RulesetNotNewer as exc:
            error = ApiError(409, str(exc), code="ruleset_not_newer", param="version")
            return JSONResponse({**error.body(), "version": exc.held}, status_code=409)
        except OSError:
            raise ApiError(503, "The ruleset could not be saved to the runtime's state directory.",
                           code="state_unwritable", retry_after_s=5) from None
        return JSONResponse({"version": version})

    @app.get("/admin/ruleset")
    async def get_ruleset(request: Request) -> Response:
        require_admin(runtime, request)
        state = json.dumps(runtime.rules.snapshot(), separators=(",", ":")).encode()
        held = runtime.ruleset.held_document or b"null"  # validated JSON, embedded as it came
        body = b'{"version":%d,"ruleset":%s,"state":%s}' % (runtime.rules.version, held, state)
        return Response(body, media_type="application/json")


def require_admin(runtime: Runtime, request: Request) -> None:
    """Let the request through only with the runtime's admin token (401/403 otherwise)."""
    expected = runtime.config.admin_token
    if not expected:
        raise ApiError(403, "The admin API is disabled on this runtime: no --admin-token "
                       "(INFERENCE_ADMIN_TOKEN) is configured.", code="admin_disabled")
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "Missing admin token: send 'Authorization: Bearer <admin token>'.",
                       code="missing_admin_token")
    # Compared as digests: equal length, constant time, whatever the caller sent.
    if not hmac.compare_digest(_digest(token.strip()), _digest(expected)):
        raise ApiError(401, "Incorrect admin token.", code="invalid_admin_token")


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    too_large = ApiError(413, f"The ruleset is larger than {MAX_DOCUMENT_BYTES} bytes.", code="body_too_large")
    if declared is not None and (not (declared.isascii() and declared.isdigit())
                                 or int(declared) > MAX_DOCUMENT_BYTES):
        raise too_large
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_DOCUMENT_BYTES:
            raise too_large
    return bytes(raw)
