"""What the control plane calls on the runtime: ``PUT /admin/ruleset`` (push) and
``GET /admin/ruleset`` (what the runtime holds, with its ledger), behind ``--admin-token``.

Without an admin token configured the endpoints answer 403: nobody can push rules to that runtime
(it can still pull them with ``--finops-url``).
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from inference.auth import require_admin
from inference.errors import ApiError
from inference.request_parsing import read_capped_body
from inference.routes import runtime_of
from inference.routes.openapi import operation
from inference.rules import RulesetInvalid, RulesetNotNewer
from inference.rules.contract import MAX_DOCUMENT_BYTES, RulesetDocument

router = APIRouter()


@router.put("/admin/ruleset", **operation(auth="adminToken", body=RulesetDocument,
                                          errors=(403, 409, 413, 422, 503)))
async def put_ruleset(request: Request) -> JSONResponse:
    runtime = runtime_of(request)
    require_admin(runtime, request)
    raw = await read_capped_body(request, limit=MAX_DOCUMENT_BYTES, what="ruleset")
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


@router.get("/admin/ruleset", **operation(auth="adminToken", errors=(403,)))
async def get_ruleset(request: Request) -> Response:
    runtime = runtime_of(request)
    require_admin(runtime, request)
    state = json.dumps(runtime.rules.snapshot(), separators=(",", ":")).encode()
    held = runtime.ruleset.held_document or b"null"  # validated JSON, embedded as it came
    body = b'{"version":%d,"ruleset":%s,"state":%s}' % (runtime.rules.version, held, state)
    return Response(body, media_type="application/json")
