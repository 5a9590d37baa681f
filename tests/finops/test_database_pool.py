"""The control plane's pooled PostgreSQL sessions: a session the server ended (PostgreSQL restarted,
say) is replaced before a request gets it, so once the database is back no request fails for it.
The fault suite's ``postgres_restart`` found ingest answering 503 for 10-25 s after the server was
back, one batch per pooled session that had died with it."""

from __future__ import annotations

import psycopg
import pytest
from django.db import connection

from finops.telemetry.models import RequestEvent

pytestmark = pytest.mark.django_db(transaction=True)


def end_every_other_session() -> int:
    """End every session of the test database but the one this opens (what a restart does to the
    pool's sessions); return how many were ended."""
    params = connection.settings_dict
    with psycopg.connect(host=params["HOST"], port=params["PORT"] or 5432, user=params["USER"],
                         password=params["PASSWORD"] or None, dbname=params["NAME"], autocommit=True) as admin:
        return admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
        ).fetchone()[0]


def test_a_pooled_session_the_server_ended_is_replaced_before_a_query_uses_it() -> None:
    if connection.vendor != "postgresql" or "pool" not in connection.settings_dict["OPTIONS"]:
        pytest.skip("the connection pool is PostgreSQL's")
    assert RequestEvent.objects.count() == 0  # the pool now holds a session that worked
    connection.close()  # back to the pool
    assert end_every_other_session() >= 1

    assert RequestEvent.objects.count() == 0, "the dead session is never handed out"
