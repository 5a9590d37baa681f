"""The admin token the control plane pushes rulesets with: printed once by register_runtime,
derived from SECRET_KEY and a stored salt, never stored itself."""

from __future__ import annotations

import io
import re

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from finops.runtimes.models import Runtime

pytestmark = pytest.mark.django_db

ADMIN_TOKEN = re.compile(r"wat_[A-Za-z0-9_-]{43}")
RUNTIME_TOKEN_RULE = re.compile(r"^[A-Za-z0-9_\-.~+/=]{16,200}$")  # what the runtime's --admin-token accepts


def register(*args: str) -> str:
    out = io.StringIO()
    call_command("register_runtime", *args, stdout=out)
    return out.getvalue()


def test_register_prints_the_admin_token_for_the_runtimes_start_command() -> None:
    output = register("gpu-1", "--url", "http://gpu-1:8080")

    (token,) = set(ADMIN_TOKEN.findall(output))
    assert token == Runtime.objects.get(name="gpu-1").admin_token()
    assert RUNTIME_TOKEN_RULE.match(token)
    assert f"--admin-token {token}" in output


def test_the_database_never_holds_the_admin_token() -> None:
    (token,) = set(ADMIN_TOKEN.findall(register("gpu-1", "--url", "http://gpu-1:8080")))

    out = io.StringIO()
    call_command("dumpdata", stdout=out)
    assert token not in out.getvalue()


def test_each_runtime_has_its_own_admin_token() -> None:
    register("gpu-1", "--url", "http://gpu-1:8080")
    register("gpu-2", "--url", "http://gpu-2:8080")

    first, second = (runtime.admin_token() for runtime in Runtime.objects.order_by("name"))
    assert first != second


def test_changing_the_secret_key_changes_every_admin_token(settings: pytest.FixtureRequest) -> None:
    register("gpu-1", "--url", "http://gpu-1:8080")
    before = Runtime.objects.get().admin_token()

    settings.SECRET_KEY = "a-new-secret-key-after-rotation"

    assert Runtime.objects.get().admin_token() != before


def test_rotate_admin_token_issues_a_new_one_and_the_old_one_stops_being_used() -> None:
    register("gpu-1", "--url", "http://gpu-1:8080")
    before = Runtime.objects.get().admin_token()

    output = register("gpu-1", "--rotate-admin-token")

    (token,) = set(ADMIN_TOKEN.findall(output))
    assert token != before
    assert Runtime.objects.get().admin_token() == token
    assert f"--admin-token {token}" in output


def test_rotating_the_admin_token_of_an_unknown_runtime_is_refused() -> None:
    with pytest.raises(CommandError, match="no runtime named 'ghost'"):
        register("ghost", "--rotate-admin-token")


def test_the_ingest_token_rotation_keeps_the_admin_token() -> None:
    register("gpu-1", "--url", "http://gpu-1:8080")
    before = Runtime.objects.get().admin_token()

    output = register("gpu-1", "--rotate")

    assert f"--admin-token {before}" in output
