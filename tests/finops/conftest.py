"""Fixtures for the control-plane tests; the builders they use live in ``factories``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.test import Client

from finops.runtimes.models import Runtime
from finops.telemetry.services import telemetry_caches_clear
from tests.finops.factories import runtime_with_token

EVENTS_URL = "/api/v1/events"


@pytest.fixture(autouse=True)
def _fresh_ingest_caches() -> None:
    """Ingest caches prices for a few seconds; each test starts from what its database holds."""
    telemetry_caches_clear()


@pytest.fixture
def runtime_token(db: None) -> tuple[Runtime, str]:
    """The runtime ``rt-1`` (the factories' default runtime_id) and its plain token."""
    return runtime_with_token()


@pytest.fixture
def post_batch(client: Client, runtime_token: tuple[Runtime, str]) -> Callable[..., Any]:
    """POST a body (bytes) to the ingest API as ``rt-1``, or with another ``token`` (None: no header)."""
    default = runtime_token[1]

    def post(body: bytes, *, token: str | None = default, **headers: str) -> Any:
        if token is not None:
            headers["HTTP_AUTHORIZATION"] = f"Bearer {token}"
        return client.generic("POST", EVENTS_URL, body, content_type="application/json", **headers)

    return post
