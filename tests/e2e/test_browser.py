"""In a real browser: log in, open every page without a JavaScript error, change a filter and see
the charts redrawn without a reload, export a CSV, create a budget through the htmx form as a
budget admin; a product manager sees no edit controls; a client-chosen name is text in a chart's
legend, never a link, and a name with a line break links to its own page."""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import Group, User
from django.test import Client
from django.utils import timezone

from tests.finops.budget_factories import request_event, store
from tests.finops.dashboard_factories import traffic

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "correct horse battery staple"
# Every kind of page once (the three detail pages share one view and template).
PAGES = ["/", "/features/", "/tenants/", "/models/", "/gpus/", "/tenants/acme/", "/budgets/"]


def user(username: str, group: str) -> User:
    # Transactional tests flush the groups the migration made: make them again.
    member = User.objects.create_user(username, f"{username}@example.com", PASSWORD)
    member.groups.add(Group.objects.get_or_create(name=group)[0])
    return member


def log_in(page: Any, username: str) -> None:
    page.goto("/accounts/login/?next=/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/$"))


def session_for(page: Any, live_server: Any, username: str) -> None:
    """Log ``username`` in without the form (the first test goes through it): its session cookie."""
    client = Client()
    client.force_login(User.objects.get(username=username))
    cookie = client.cookies[settings.SESSION_COOKIE_NAME]
    page.context.add_cookies([{"name": cookie.key, "value": cookie.value, "url": live_server.url}])


def charts_drawn(page: Any) -> None:
    page.wait_for_selector("#dashboard-body [data-figure][data-drawn]", state="attached")


def test_every_page_opens_without_javascript_errors(page: Any) -> None:
    traffic(timezone.now(), with_gpu_runtime=True)
    user("pat", "product-manager")
    log_in(page, "pat")
    for url in PAGES:
        response = page.goto(url)
        assert response.status == 200, url
        if url != "/budgets/":
            charts_drawn(page)
            assert page.locator(".js-plotly-plot").count() >= 1, url
    assert page.errors == []


def test_changing_a_filter_redraws_the_charts_without_a_reload(page: Any) -> None:
    traffic(timezone.now())
    user("pat", "product-manager")
    log_in(page, "pat")
    charts_drawn(page)
    requests = page.locator(".kpi:has(.label:text-is('Requests')) .value")
    assert requests.inner_text() == "6"
    page.evaluate("window.stillTheSamePage = true")
    page.select_option("select[name=tenant]", "globex")
    page.wait_for_selector("#dashboard-body[data-query='?tenant=globex']")
    charts_drawn(page)
    assert "tenant=globex" in page.url  # pushed: the view can be shared
    assert requests.inner_text() == "3"
    assert page.evaluate("window.stillTheSamePage") is True
    page.click("label:has(input[value='7d'])")
    page.wait_for_selector("#dashboard-body[data-query='?range=7d&tenant=globex']")
    assert page.errors == []


def test_a_table_exports_as_csv(page: Any, live_server: Any) -> None:
    traffic(timezone.now())
    user("pat", "product-manager")
    session_for(page, live_server, "pat")
    page.goto("/tenants/")
    with page.expect_download() as download_info:
        page.click("a.export")
    download = download_info.value
    assert re.fullmatch(r"tenants-\d{8}T\d{4}-\d{8}T\d{4}\.csv", download.suggested_filename)
    rows = list(csv.DictReader(io.StringIO(Path(download.path()).read_text())))
    assert {row["tenant"] for row in rows} == {"acme", "globex"}


def test_a_budget_admin_creates_a_budget_through_the_htmx_form(page: Any, live_server: Any) -> None:
    user("ada", "budget-admin")
    session_for(page, live_server, "ada")
    page.goto("/budgets/")
    page.click("text=New budget")
    page.wait_for_selector("#budget-form")
    page.fill("#budget-form input[name=name]", "globex daily")
    page.fill("#budget-form input[name=tenant]", "globex")
    page.fill("#budget-form input[name=limit]", "")
    page.click("#budget-form button[type=submit]")
    page.wait_for_selector("#budget-form .errorlist")  # the error comes back inline, same page
    assert page.url.endswith("/budgets/")
    page.fill("#budget-form input[name=limit]", "25")
    page.click("#budget-form button[type=submit]")
    page.wait_for_url(re.compile(r"/budgets/\d+/$"))
    assert "globex daily" in page.content()
    assert page.errors == []


def test_a_product_manager_sees_no_edit_controls(page: Any, live_server: Any) -> None:
    traffic(timezone.now())
    user("pat", "product-manager")
    session_for(page, live_server, "pat")
    page.goto("/budgets/")
    assert page.locator("text=New budget").count() == 0
    page.goto("/tenants/acme/")
    charts_drawn(page)
    page.wait_for_selector("#end-users")  # loaded after the page, from raw events
    assert page.locator("#end-users td:text-is('alice')").count() == 1
    assert page.locator("a:text-is('Create one')").count() == 0
    assert page.locator("a[href='/budgets/new/']").count() == 0
    assert page.errors == []


def test_a_name_is_text_in_a_chart_legend_and_a_line_break_still_links_to_its_page(page: Any,
                                                                                 live_server: Any) -> None:
    markup = '<a href="https://evil.example/">click</a> <span style="font-size:71px">big</span>'
    ago = timezone.now() - dt.timedelta(minutes=20)
    store([request_event(started_at=ago, feature=markup), request_event(started_at=ago, feature="ads\ncampaign")])
    user("pat", "product-manager")
    session_for(page, live_server, "pat")

    page.goto("/features/")
    charts_drawn(page)

    legend = page.locator("#chart-spend .legendtext")
    assert markup in legend.all_text_contents()
    assert page.locator("#chart-spend svg a").count() == 0
    assert page.locator("#chart-spend [style*='71px']").count() == 0
    page.click("#breakdown a:text-is('ads\\\\ncampaign')")
    page.wait_for_url(re.compile(r"/features/ads%0Acampaign/$"))
    assert page.locator("h1").inner_text().endswith("ads\\ncampaign")
    assert page.errors == []
