"""The budget pages: every logged-in user reads budgets; only budget admins create, edit, pause or
delete them, through htmx forms that show validation errors inline."""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from finops.budgets.alerts import alerts_send
from finops.budgets.evaluation import budgets_evaluate
from finops.budgets.models import Budget
from finops.budgets.periods import period_at
from tests.finops.budget_factories import budget, spend, user_in

pytestmark = pytest.mark.django_db

HTMX = {"HTTP_HX_REQUEST": "true"}
EDIT_CONTROLS = ("New budget", ">Edit<", ">Delete<", ">Pause<")


def logged_in(group: str | None, username: str) -> Client:
    client = Client()
    client.force_login(user_in(group, username))
    return client


@pytest.fixture
def admin() -> Client:
    return logged_in("budget-admin", "ada")


@pytest.fixture
def pm() -> Client:
    return logged_in("product-manager", "pat")


def form_data(**fields: Any) -> dict[str, Any]:
    data = {"name": "globex daily", "tenant": "globex", "feature": "*", "period": "daily", "unit": "usd_list",
            "limit": "25", "thresholds": "50, 80, 100", "recipients": "a@example.com, b@example.com",
            "action": "block", "throttle_tokens_per_minute": "", "throttle_requests_per_minute": "",
            "downgrade_model": "", "cap_max_tokens": "", "enforcement": "soft", "on_expiry": "closed"}
    data.update(fields)
    return data


def test_every_page_needs_a_login(client: Client) -> None:
    existing = budget()
    for url in ("/budgets/", f"/budgets/{existing.pk}/", "/budgets/new/", f"/budgets/{existing.pk}/edit/"):
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/?next=")


def test_the_login_page_logs_a_user_in(client: Client) -> None:
    user_in("product-manager", "pat", password="pw-for-the-test")
    assert client.get("/accounts/login/").status_code == 200

    response = client.post("/accounts/login/", {"username": "pat", "password": "pw-for-the-test"})

    assert response.status_code == 302
    assert response["Location"] == "/"  # the overview


def test_a_product_manager_sees_spend_progress_and_forecast_but_no_edit_controls(pm: Client) -> None:
    budget(name="acme monthly", limit=Decimal("10"))
    spend("4", at=period_at("monthly", timezone.now()).start + dt.timedelta(minutes=1))

    response = pm.get("/budgets/")

    page = response.content.decode()
    assert response.status_code == 200
    assert "acme monthly" in page and "$4.00" in page and "$10.00" in page
    assert "40.0%" in page and 'style="width: 40%"' in page
    for control in EDIT_CONTROLS:
        assert control not in page


def test_a_product_manager_sees_a_budget_page_without_edit_controls(pm: Client) -> None:
    existing = budget()

    page = pm.get(f"/budgets/{existing.pk}/").content.decode()

    assert "acme monthly" in page and "State history" in page
    for control in EDIT_CONTROLS[1:]:
        assert control not in page


@pytest.mark.parametrize(("method", "path"), [
    ("get", "/budgets/new/"), ("post", "/budgets/new/"), ("get", "/budgets/{pk}/edit/"),
    ("post", "/budgets/{pk}/edit/"), ("post", "/budgets/{pk}/pause/"), ("post", "/budgets/{pk}/delete/"),
])
def test_a_product_manager_cannot_create_edit_pause_or_delete(pm: Client, method: str, path: str) -> None:
    existing = budget(limit=Decimal("10"))

    response = getattr(pm, method)(path.format(pk=existing.pk), form_data(limit="1", paused="1"), **HTMX)

    assert response.status_code == 403
    assert Budget.objects.get().limit == Decimal("10")
    assert not Budget.objects.get().paused


def test_a_budget_admin_sees_the_edit_controls(admin: Client) -> None:
    budget()
    page = admin.get("/budgets/").content.decode()
    for control in EDIT_CONTROLS:
        assert control in page


def test_the_new_budget_form_comes_as_a_fragment_for_htmx_and_as_a_page_otherwise(admin: Client) -> None:
    fragment = admin.get("/budgets/new/", **HTMX).content.decode()
    page = admin.get("/budgets/new/").content.decode()

    assert "<html" not in fragment and 'id="budget-form"' in fragment
    assert "<html" in page and 'id="budget-form"' in page


def test_a_budget_admin_creates_a_budget_through_the_htmx_form(admin: Client) -> None:
    response = admin.post("/budgets/new/", form_data(), **HTMX)

    created = Budget.objects.get()
    assert response.status_code == 200
    assert response["HX-Redirect"] == f"/budgets/{created.pk}/"
    assert (created.name, created.tenant, created.limit) == ("globex daily", "globex", Decimal("25"))
    assert created.thresholds == [50, 80, 100]
    assert created.recipients == ["a@example.com", "b@example.com"]


@pytest.mark.parametrize(("fields", "field", "message"), [
    ({"limit": "-5"}, "limit", "greater than or equal to 0.000001"),
    ({"limit": "lots"}, "limit", "Enter a number"),
    ({"thresholds": "fifty"}, "thresholds", "whole percentages"),
    ({"thresholds": "0, 2000"}, "thresholds", "from 1 to 1000"),
    ({"recipients": "finance, ops@example.com"}, "recipients", "Not email addresses: finance"),
    ({"tenant": "acme corp"}, "tenant", "letters, digits"),
    ({"action": "throttle"}, "throttle_tokens_per_minute", "Throttling needs"),
    ({"action": "downgrade"}, "downgrade_model", "Name the model"),
    ({"enforcement": "hard", "unit": "gpu_hours"}, "enforcement", "Only USD at list price and tokens can be hard"),
    ({"enforcement": "hard", "action": "throttle", "throttle_requests_per_minute": "5"}, "action",
     "A hard budget blocks at 100%"),
    ({"period": "hourly"}, "period", "Select a valid choice"),
    ({"name": ""}, "name", "This field is required"),
])
def test_invalid_input_comes_back_inline_and_saves_nothing(admin: Client, fields: dict[str, str], field: str,
                                                           message: str) -> None:
    response = admin.post("/budgets/new/", form_data(**fields), **HTMX)

    page = response.content.decode()
    assert response.status_code == 200
    assert "HX-Redirect" not in response
    assert "<html" not in page
    errors = re.search(rf'<ul class="errorlist" id="id_{field}-errors">(.*?)</ul>', page, re.S)
    assert errors is not None, f"no inline errors for {field}"
    assert message in errors.group(1)
    assert not Budget.objects.exists()


def test_editing_keeps_what_the_budget_measures(admin: Client) -> None:
    existing = budget(limit=Decimal("10"))

    response = admin.post(f"/budgets/{existing.pk}/edit/",
                          form_data(name="acme monthly", tenant="someone-else", unit="tokens", limit="30"), **HTMX)

    assert response["HX-Redirect"] == f"/budgets/{existing.pk}/"
    existing.refresh_from_db()
    assert (existing.limit, existing.tenant, existing.unit) == (Decimal("30"), "acme", "usd_list")


def test_pausing_through_htmx_returns_the_updated_row(admin: Client) -> None:
    existing = budget()

    response = admin.post(f"/budgets/{existing.pk}/pause/", {"paused": "1"}, **HTMX)

    assert response.status_code == 200
    row = response.content.decode()
    assert row.strip().startswith(f'<tr id="budget-{existing.pk}"')
    assert "paused" in row and ">Resume<" in row
    assert Budget.objects.get().paused


def test_a_pause_request_that_is_neither_pause_nor_resume_is_refused(admin: Client) -> None:
    existing = budget()
    assert admin.post(f"/budgets/{existing.pk}/pause/", {"paused": "maybe"}).status_code == 400


def test_deleting_through_htmx_sends_the_browser_back_to_the_list(admin: Client) -> None:
    existing = budget()

    response = admin.post(f"/budgets/{existing.pk}/delete/", **HTMX)

    assert response["HX-Redirect"] == "/budgets/"
    assert not Budget.objects.exists()


def test_a_missing_budget_is_a_404(admin: Client) -> None:
    assert admin.get("/budgets/999/").status_code == 404
    assert admin.post("/budgets/999/delete/").status_code == 404


def test_the_budget_page_shows_its_state_history_and_alerts(pm: Client) -> None:
    watched = budget(limit=Decimal("10"))
    early = period_at("monthly", timezone.now()).start + dt.timedelta(hours=1)
    spend("9", at=early - dt.timedelta(minutes=5))
    budgets_evaluate(now=early)
    alerts_send()

    page = pm.get(f"/budgets/{watched.pk}/").content.decode()

    assert "State history" in page and "warning" in page
    assert "Crossed 50%" in page and "Crossed 80%" in page and "Sent" in page


def test_htmx_posts_carry_the_csrf_token_from_the_page_body() -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(user_in("budget-admin", "ada"))
    page = client.get("/budgets/").content.decode()
    token = re.search(r'hx-headers=\'\{"X-CSRFToken": "([^"]+)"\}\'', page).group(1)

    refused = client.post("/budgets/new/", form_data(), **HTMX)
    accepted = client.post("/budgets/new/", form_data(), HTTP_X_CSRFTOKEN=token, **HTMX)

    assert refused.status_code == 403
    assert accepted["HX-Redirect"].startswith("/budgets/")


def test_an_empty_post_shows_the_required_fields_inline(admin: Client) -> None:
    response = admin.post("/budgets/new/", {}, **HTMX)

    page = response.content.decode()
    assert 'id="id_name-errors"' in page and 'id="id_limit-errors"' in page
    assert not Budget.objects.exists()


def test_the_list_pages_searches_and_sorts_many_budgets(pm: Client) -> None:
    for i in range(120):
        budget(name=f"tenant {i:03d} monthly", tenant=f"t{i:03d}", limit=Decimal(1 + i))
    Budget.objects.filter(tenant="t007").update(spend=Decimal("7.5"))  # 94% used at the last evaluation

    first = pm.get("/budgets/").content.decode()
    assert "120 budgets" in first and "Page 1 of 3" in first
    assert first.index("tenant 007 monthly") < first.index("tenant 000 monthly")  # most used first

    by_name = pm.get("/budgets/?sort=name&page=3").content.decode()
    assert "Page 3 of 3" in by_name and "tenant 119 monthly" in by_name and "tenant 000 monthly" not in by_name

    found = pm.get("/budgets/?q=t11", **HTMX, HTTP_HX_TARGET="budget-table")
    fragment = found.content.decode()
    assert found.status_code == 200 and "<h1>" not in fragment  # only the table comes back
    assert "10 budgets matching" in fragment and "tenant 110 monthly" in fragment
    assert "tenant 007 monthly" not in fragment


@pytest.mark.parametrize("query", ["sort=%27%3Bdrop", "page=-1", "page=abc", "page=999999", "q=" + "x" * 5000])
def test_odd_list_parameters_give_a_page_not_an_error(pm: Client, query: str) -> None:
    budget(name="acme monthly")
    response = pm.get(f"/budgets/?{query}")
    assert response.status_code == 200


def test_the_list_shows_each_budgets_evaluated_spend_and_says_when_evaluation_stalled(pm: Client) -> None:
    now = timezone.now()
    tracked = budget(name="acme monthly", limit=Decimal("10"))
    spend("4", at=now - dt.timedelta(minutes=5))
    budgets_evaluate(now=now - dt.timedelta(minutes=3))  # then evaluation stopped
    spend("2", at=now - dt.timedelta(minutes=2))

    listed = pm.get("/budgets/").content.decode()
    own_page = pm.get(f"/budgets/{tracked.pk}/").content.decode()

    assert "$4.00" in listed and "as of " in listed  # the last evaluation's figure, marked as old
    assert "$6.00" in own_page  # the budget's page reads live
