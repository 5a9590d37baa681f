"""``GET /api/v1/ruleset``: a runtime pulls its ruleset (the reconciliation for a missed push).

Bearer: the runtime's ingest token. The runtime says which version it holds in
``X-Wattson-Ruleset-Version``; that is recorded as its acknowledged version. Answers 200 with the
document, 304 when the runtime already holds the newest version, 401 without a valid token, 400
for a version header that is not a whole number, and 503 (``Retry-After``) before the first compile
or while the database is unavailable.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from finops.lib.api import MAX_TOKEN_CHARS, api_error, bearer_token, machine_api, runtime_token_refused
from finops.runtimes.selectors import runtime_get_by_token
from finops.runtimes.services import MAX_VERSION, ruleset_pull

VERSION_HEADER = "X-Wattson-Ruleset-Version"


@csrf_exempt
@machine_api
def ruleset(request: HttpRequest) -> HttpResponse:
    if request.method not in ("GET", "HEAD"):
        response = api_error(405, "Use GET to fetch the ruleset.", code="method_not_allowed")
        response["Allow"] = "GET, HEAD"
        return response
    token = bearer_token(request)
    runtime = runtime_get_by_token(token=token) if token and len(token) <= MAX_TOKEN_CHARS else None
    if runtime is None:
        return runtime_token_refused(token)
    raw = request.headers.get(VERSION_HEADER)
    held = None
    if raw is not None:
        raw = raw.strip()
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 19 and int(raw) <= MAX_VERSION):
            return api_error(400, f"{VERSION_HEADER} must be the whole number of the version held.",
                             code="invalid_version", param=VERSION_HEADER)
        held = int(raw)
    current = ruleset_pull(runtime=runtime, held=held)
    if current is None:
        response = api_error(503, "No ruleset has been compiled for this runtime yet; retry shortly.",
                             error_type="server_error", code="ruleset_not_ready")
        response["Retry-After"] = "5"
        return response
    response = HttpResponse(status=304) if held == current.version else JsonResponse(current.document)
    response[VERSION_HEADER] = str(current.version)
    response["Cache-Control"] = "no-store"
    return response
