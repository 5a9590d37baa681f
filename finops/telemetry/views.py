"""The ingest API, ``POST /api/v1/events``: thin — authenticate, hand the body to the service."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST


@csrf_exempt
@require_POST
def ingest_events(request: HttpRequest) -> JsonResponse:
    from finops.telemetry.services import ingest_request

    return ingest_request(request)
