"""``GET /api/v1/focus?start=YYYY-MM-DD&end=YYYY-MM-DD``: the FOCUS export (``focus``) for a FinOps
tool to pull, behind its own bearer token (``FOCUS_API_TOKEN``; unset, the endpoint is off)."""

from __future__ import annotations

import datetime as dt
import hmac

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_GET

from finops.lib.api import MAX_TOKEN_CHARS, api_error, bearer_token, machine_api
from finops.lib.tables import csv_response
from finops.telemetry.focus import FocusRangeRefused, focus_days, focus_table


def _token_refused(sent: str) -> HttpResponse:
    response = api_error(401, "A valid FOCUS export token is required: 'Authorization: Bearer <token>'.",
                         error_type="authentication_error", code="invalid_token" if sent else "missing_token")
    response["WWW-Authenticate"] = 'Bearer realm="wattson-focus"'
    return response


def _day(request: HttpRequest, name: str) -> dt.date | HttpResponse:
    text = request.GET.get(name, "")
    try:
        if len(text) != 10:
            raise ValueError(text)
        return dt.date.fromisoformat(text)
    except ValueError:
        return api_error(400, f"{name} must be a date, YYYY-MM-DD (UTC).", code="invalid_date", param=name)


@require_GET
@machine_api
def focus_export_api(request: HttpRequest) -> HttpResponse:
    if not settings.FOCUS_API_TOKEN:
        return api_error(404, "The FOCUS export API is off: set FOCUS_API_TOKEN to turn it on.",
                         error_type="not_found_error", code="focus_api_off")
    sent = bearer_token(request)
    if len(sent) > MAX_TOKEN_CHARS or not hmac.compare_digest(sent.encode(), settings.FOCUS_API_TOKEN.encode()):
        return _token_refused(sent)
    first, last = _day(request, "start"), _day(request, "end")
    for day in (first, last):
        if isinstance(day, HttpResponse):
            return day
    assert isinstance(first, dt.date) and isinstance(last, dt.date)
    try:
        start, end = focus_days(first=first, last=last)
    except FocusRangeRefused as exc:
        return api_error(400, f"Cannot export this range: {exc}.", code="range_refused", param="start")
    return csv_response(focus_table(start=start, end=end))
