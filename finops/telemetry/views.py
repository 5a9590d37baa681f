"""The ingest API, ``POST /api/v1/events``: thin — authenticate, bound the body, hand it to the service.

Answers: 202 ``{"accepted", "duplicates", "refused": [...]}`` when anything in the batch could be
kept (or the batch was empty); 422, the same body plus an ``error``, when every record was refused
(so the runtime sets the batch aside rather than resending it forever); 400 / 401 / 413 with the
OpenAI-style error body for a body that is not a batch, a bad token, or too much at once; 503 with
``Retry-After`` while the database is unavailable (``finops.lib.api.machine_api``).
"""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from finops.lib.api import api_error, bearer_token, machine_api, runtime_token_refused
from finops.telemetry.contracts import BatchMalformed, BatchTooLarge
from finops.telemetry.services import runtime_token_authenticate, telemetry_ingest


class _Refused(Exception):
    def __init__(self, response: JsonResponse) -> None:
        self.response = response


@csrf_exempt
@machine_api
def ingest_events(request: HttpRequest) -> JsonResponse:
    try:
        return _ingest(request)
    except _Refused as refused:
        return refused.response


def _ingest(request: HttpRequest) -> JsonResponse:
    if request.method != "POST":
        response = api_error(405, "Use POST to send telemetry.", code="method_not_allowed")
        response["Allow"] = "POST"
        return response
    token = bearer_token(request)
    runtime = runtime_token_authenticate(token=token) if token else None
    if runtime is None:
        return runtime_token_refused(token)
    body = _read_body(request)
    try:
        result = telemetry_ingest(runtime=runtime, body=body)
    except BatchTooLarge as exc:
        return api_error(413, f"{exc}; send smaller batches.", code="too_many_records")
    except BatchMalformed as exc:
        return api_error(400, str(exc), code="invalid_batch")
    if result.all_refused:
        return api_error(422, f"All {result.received} records were refused; see 'refused'.",
                         code="all_records_refused", extra=result.as_dict())
    return JsonResponse(result.as_dict(), status=202)


def _read_body(request: HttpRequest) -> bytes:
    """The body, refused before it is read when its declared length is too large, and refused
    while it is read when it runs past the limit anyway."""
    limit = settings.INGEST_MAX_BODY_BYTES
    declared = (request.META.get("CONTENT_LENGTH") or "0").strip()
    if not (declared.isascii() and declared.isdigit()):
        raise _Refused(api_error(400, "Content-Length must be a whole number of bytes.", code="invalid_length"))
    if len(declared) > 18 or int(declared) > limit:
        raise _Refused(_too_large(limit))
    body = request.read(limit + 1)
    if len(body) > limit:
        raise _Refused(_too_large(limit))
    return body


def _too_large(limit: int) -> JsonResponse:
    return api_error(413, f"The body is larger than {limit} bytes; send smaller batches.", code="body_too_large")
