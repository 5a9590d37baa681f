"""The organisation's time zone (``ORG_TIME_ZONE``): budget periods reset at its midnight, and
pages show times in it."""

from __future__ import annotations

import zoneinfo

from django.conf import settings


def org_time_zone() -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(settings.ORG_TIME_ZONE)
