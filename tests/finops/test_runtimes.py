"""The runtime registry: registering a runtime shows its token once and stores only a digest."""

from __future__ import annotations

import io
import re

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.urls import reverse

from finops.runtimes.models import ConcurrencyCap, Runtime, RuntimeToken, token_digest
from finops.runtimes.selectors import runtime_get_by_token
from finops.runtimes.services import runtime_register, runtime_token_revoke, runtime_token_rotate

pytestmark = pytest.mark.django_db

TOKEN = re.compile(r"wrt_[A-Za-z0-9_-]{43}")


def register(*args: str) -> str:
    out = io.StringIO()
    call_command("register_runtime", *args, stdout=out)
    return out.getvalue()


def tokens_in(output: str) -> set[str]:
    return set(TOKEN.findall(output))


def database_dump() -> str:
    out = io.StringIO()
    call_command("dumpdata", stdout=out)
    return out.getvalue()


def test_register_prints_a_token_that_authenticates_as_the_runtime() -> None:
    output = register("gpu-1", "--url", "http://gpu-1:8080")

    (token,) = tokens_in(output)
    runtime = Runtime.objects.get(name="gpu-1")
    assert runtime.base_url == "http://gpu-1:8080"
    assert RuntimeToken.objects.get(digest=token_digest(token)).runtime == runtime
    assert runtime_get_by_token(token=token) == runtime


def test_register_shows_how_to_start_the_runtime_with_the_token() -> None:
    output = register("gpu-1", "--url", "http://gpu-1:8080", "--finops-url", "http://finops:8000")

    (token,) = tokens_in(output)
    assert (f"INFERENCE_FINOPS_URL=http://finops:8000 INFERENCE_FINOPS_TOKEN={token} "
            "python -m inference serve --runtime-id gpu-1") in output


def test_the_database_never_holds_the_plain_token() -> None:
    (token,) = tokens_in(register("gpu-1", "--url", "http://gpu-1:8080"))
    (rotated,) = tokens_in(register("gpu-1", "--rotate"))

    dump = database_dump()
    assert token not in dump
    assert rotated not in dump
    assert token[:8] in dump  # the prefix is kept, to tell tokens apart


def test_a_duplicate_name_is_refused_and_keeps_the_first_runtime() -> None:
    register("gpu-1", "--url", "http://gpu-1:8080")

    with pytest.raises(CommandError, match=r"already registered.*--rotate"):
        register("gpu-1", "--url", "http://elsewhere:8080")
    assert Runtime.objects.get().base_url == "http://gpu-1:8080"
    assert RuntimeToken.objects.count() == 1


@pytest.mark.parametrize(
    ("name", "url", "message"),
    [
        ("not a slug!", "http://gpu-1:8080", "name"),
        ("gpu-1", "not-a-url", "base_url"),
        ("gpu-1", "ftp://gpu-1/", "http:// or https://"),
    ],
)
def test_an_invalid_name_or_url_is_refused_with_a_clear_message(name: str, url: str, message: str) -> None:
    with pytest.raises(CommandError, match=re.escape(message)):
        register(name, "--url", url)
    assert not Runtime.objects.exists()


def test_register_without_a_url_is_refused() -> None:
    with pytest.raises(CommandError, match="--url is required"):
        register("gpu-1")


def test_rotate_issues_a_new_token_and_revokes_the_old_one() -> None:
    (old,) = tokens_in(register("gpu-1", "--url", "http://gpu-1:8080"))

    output = register("gpu-1", "--rotate")

    (new,) = tokens_in(output)
    assert new != old
    assert runtime_get_by_token(token=new) == Runtime.objects.get(name="gpu-1")
    assert runtime_get_by_token(token=old) is None
    assert "INFERENCE_FINOPS_TOKEN=" + new in output


def test_rotate_of_an_unknown_runtime_is_refused() -> None:
    with pytest.raises(CommandError, match="no runtime named 'ghost'"):
        register("ghost", "--rotate")


def test_a_revoked_token_no_longer_authenticates_and_revoking_twice_keeps_the_first_time() -> None:
    runtime, plain = runtime_register(name="gpu-1", base_url="http://gpu-1:8080")
    token = RuntimeToken.objects.get(runtime=runtime)

    runtime_token_revoke(token=token)
    first = token.revoked_at
    runtime_token_revoke(token=token)

    assert runtime_get_by_token(token=plain) is None
    assert first is not None
    assert RuntimeToken.objects.get(pk=token.pk).revoked_at == first


def test_the_service_refuses_a_duplicate_with_a_validation_error() -> None:
    runtime_register(name="gpu-1", base_url="http://gpu-1:8080")
    with pytest.raises(ValidationError) as excinfo:
        runtime_register(name="gpu-1", base_url="http://gpu-1:8080")
    assert excinfo.value.message_dict == {"name": ["a runtime named 'gpu-1' is already registered"]}


def test_rotating_through_the_service_returns_a_working_token() -> None:
    runtime, first = runtime_register(name="cpu-1", base_url="https://cpu-1.internal")
    second = runtime_token_rotate(runtime=runtime)
    assert runtime_get_by_token(token=second) == runtime
    assert runtime_get_by_token(token=first) is None
    assert runtime_get_by_token(token="") is None


@pytest.fixture
def admin_client() -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("admin", "admin@example.com", "pw"))
    return client


def test_admin_pages_show_tokens_by_prefix_only(admin_client: Client) -> None:
    runtime, plain = runtime_register(name="gpu-1", base_url="http://gpu-1:8080")
    token = RuntimeToken.objects.get(runtime=runtime)

    pages = [
        reverse("admin:runtimes_runtime_changelist"),
        reverse("admin:runtimes_runtime_change", args=[runtime.pk]),
        reverse("admin:runtimes_runtimetoken_changelist"),
        reverse("admin:runtimes_runtimetoken_change", args=[token.pk]),
    ]
    for url in pages:
        response = admin_client.get(url)
        assert response.status_code == 200, url
        body = response.content.decode()
        assert plain not in body
    assert plain[:8] in admin_client.get(pages[1]).content.decode()


def test_the_admin_revoke_action_revokes_the_selected_tokens(admin_client: Client) -> None:
    runtime, plain = runtime_register(name="gpu-1", base_url="http://gpu-1:8080")
    token = RuntimeToken.objects.get(runtime=runtime)

    response = admin_client.post(
        reverse("admin:runtimes_runtimetoken_changelist"),
        {"action": "revoke", "_selected_action": [token.pk]},
        follow=True,
    )

    assert response.status_code == 200
    assert "Revoked 1 token(s)." in response.content.decode()
    assert runtime_get_by_token(token=plain) is None


def test_the_admin_can_revoke_every_token_of_a_runtime(admin_client: Client) -> None:
    runtime, _ = runtime_register(name="gpu-1", base_url="http://gpu-1:8080")
    RuntimeToken.issue(runtime)

    admin_client.post(
        reverse("admin:runtimes_runtime_changelist"),
        {"action": "revoke_all_tokens", "_selected_action": [runtime.pk]},
    )

    assert not RuntimeToken.objects.filter(runtime=runtime, revoked_at__isnull=True).exists()


def test_the_admin_accepts_a_bare_host_name_url_and_refuses_other_schemes(admin_client: Client) -> None:
    runtime, _ = runtime_register(name="gpu-1", base_url="http://gpu-1:8080")
    url = reverse("admin:runtimes_runtime_change", args=[runtime.pk])
    management = {"tokens-TOTAL_FORMS": "1", "tokens-INITIAL_FORMS": "1",
                  "tokens-MIN_NUM_FORMS": "0", "tokens-MAX_NUM_FORMS": "1000",
                  "tokens-0-id": str(runtime.tokens.get().pk), "tokens-0-runtime": str(runtime.pk)}

    refused = admin_client.post(url, {"url": "ftp://gpu-2/", **management})
    accepted = admin_client.post(url, {"url": "http://gpu-2:9000", **management})

    assert refused.status_code == 200 and "http:// or https://" in refused.content.decode()
    assert accepted.status_code == 302, accepted.context["errors"] if accepted.context else accepted
    runtime.refresh_from_db()
    assert runtime.base_url == "http://gpu-2:9000"


def test_an_admin_sets_a_concurrency_cap_and_one_that_limits_nothing_is_refused(admin_client: Client) -> None:
    add = reverse("admin:runtimes_concurrencycap_add")
    empty = admin_client.post(add, {"tenant": "acme", "feature": "*", "model": "*", "max_running": "",
                                    "max_queued": "", "note": ""})
    made = admin_client.post(add, {"tenant": "acme", "feature": "batch", "model": "*", "max_running": "2",
                                   "max_queued": "0", "note": "Batch jobs wait their turn."}, follow=True)

    assert empty.status_code == 200 and "Set max running, max queued or both." in empty.content.decode()
    assert made.status_code == 200
    (cap,) = ConcurrencyCap.objects.all()
    assert (cap.tenant, cap.feature, cap.max_running, cap.max_queued) == ("acme", "batch", 2, 0)
    assert "acme" in admin_client.get(reverse("admin:runtimes_concurrencycap_changelist")).content.decode()
