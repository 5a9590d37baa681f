"""The live server the system and browser tests talk to runs on a database connection of its own,
as a deployed control plane does: it sees what the test committed and nothing else. (pytest-django
hands the live server the test's own connection when the test database is SQLite in memory; every
request thread and the test then shared one transaction, and a test that wrote while the runtime
exported failed now and then.)"""

from __future__ import annotations

import httpx
import pytest
from django.db import transaction
from pytest_django.live_server_helper import LiveServer

from finops.runtimes.services import runtime_register

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_live_server_request_sees_only_what_the_test_committed(live_server: LiveServer) -> None:
    def pull(token: str) -> int:
        return httpx.get(f"{live_server.url}/api/v1/ruleset", headers={"Authorization": f"Bearer {token}"},
                         timeout=30).status_code

    with transaction.atomic():
        _, token = runtime_register(name="not-yet-committed", base_url="http://127.0.0.1:1")
        assert pull(token) == 401, "the live server saw a runtime the test had not committed"

    assert pull(token) == 503  # registered, no ruleset compiled yet
