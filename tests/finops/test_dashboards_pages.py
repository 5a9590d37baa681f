"""The dashboard pages: every page renders for a logged-in user, with traffic and without; a
visitor who is not logged in is sent to the login page; an htmx request gets only the page's
fragment; filters live in the URL; a bad parameter gets a message and the defaults, never an error."""

from __future__ import annotations

import html
import re

import pytest
from django.test import Client
from django.utils import timezone

from tests.finops.budget_factories import budget
from tests.finops.dashboard_factories import logged_in, runtime_samples, traffic

pytestmark = pytest.mark.django_db

HTMX = {"HTTP_HX_REQUEST": "true"}
PAGES = ["/", "/features/", "/tenants/", "/models/", "/gpus/", "/tenants/acme/", "/features/chat/",
         "/models/smollm2/"]


@pytest.fixture
def pm() -> Client:
    return logged_in("product-manager", "pat")


@pytest.fixture
def admin() -> Client:
    return logged_in("budget-admin", "ada")


def text(response) -> str:
    return html.unescape(re.sub(r"\s+", " ", response.content.decode()))


@pytest.mark.parametrize("url", PAGES)
def test_every_page_needs_a_login(client: Client, url: str) -> None:
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/?next=")


@pytest.mark.parametrize("url", PAGES)
def test_every_page_renders_with_traffic(pm: Client, url: str) -> None:
    traffic()
    response = pm.get(url)
    assert response.status_code == 200
    page = text(response)
    assert "<html" in page and 'id="filter-bar"' in page and 'id="dashboard-body"' in page
    assert "/static/plotly/plotly.min.js" in page


@pytest.mark.parametrize("url", PAGES)
def test_every_page_renders_empty_with_a_next_step(pm: Client, url: str) -> None:
    response = pm.get(url)
    assert response.status_code == 200
    assert "register_runtime" in text(response)


def test_the_overview_shows_kpis_and_charts_of_the_traffic(pm: Client) -> None:
    traffic()
    page = text(pm.get("/"))
    assert "Spend month to date</div><div class=\"value\">$3.50" in page
    assert '<div class="label">Requests</div><div class="value">6</div>' in page
    assert "16.7%" in page  # one cache hit, one rejection in six requests
    assert "1 repeats served from cache · saved $0.25" in page
    for chart in ("spend", "tokens", "latency", "ttft", "queue-depth", "queue-wait", "cache", "rejections"):
        assert f'id="chart-{chart}"' in page
        assert f'id="figure-{chart}"' in page, f"{chart} should have a figure"


def test_unmeasured_energy_and_gpu_show_na_not_zero(pm: Client) -> None:
    traffic()  # a CPU runtime: energy null on every request, no device samples
    page = text(pm.get("/"))
    assert '<div class="label">Energy</div><div class="value">n/a</div>' in page
    assert '<div class="label">GPU utilisation</div><div class="value">n/a</div>' in page
    gpus = text(pm.get("/gpus/"))
    assert "0 J" not in gpus and "0%" not in gpus.split('id="runtimes"')[1].split("</table>")[0]
    assert "n/a" in gpus


def test_a_gpu_runtime_shows_utilisation_power_and_idle_capacity(pm: Client) -> None:
    runtime_samples("gpu-1", timezone.now(), gpu=True)
    page = text(pm.get("/gpus/"))
    assert "NVIDIA H100 80GB HBM3" in page
    assert "80%" in page and "500 W" in page
    assert 'id="idle"' in page and "gpu-1" in page
    assert 'id="figure-gpu-util"' in page and 'id="figure-gpu-power"' in page


def test_the_runtime_table_shows_last_seen_and_the_acknowledged_ruleset(pm: Client) -> None:
    runtime = runtime_samples("rt-1", timezone.now())
    runtime.last_seen_at = timezone.now()
    runtime.last_ruleset_ack = 7
    runtime.save()
    page = text(pm.get("/gpus/"))
    assert "v7 /" in page
    assert timezone.localtime(runtime.last_seen_at).strftime("%Y-%m-%d %H:%M") in page


def test_an_htmx_request_gets_only_the_fragment(pm: Client) -> None:
    traffic()
    for url in PAGES:
        response = pm.get(url, **HTMX)
        page = text(response)
        assert response.status_code == 200
        assert "<html" not in page and 'id="filter-bar"' not in page
        assert page.strip().startswith('<div id="dashboard-body"'), url


def test_the_overview_refreshes_itself_while_visible(pm: Client) -> None:
    page = text(pm.get("/?range=7d", **HTMX))
    assert 'hx-trigger="every 10s [document.visibilityState === \'visible\']"' in page
    assert 'hx-get="/?range=7d"' in page


def test_filters_in_the_url_apply_to_tables_and_totals(pm: Client) -> None:
    traffic()
    tenants = text(pm.get("/tenants/?tenant=globex"))
    assert 'href="/tenants/globex/?tenant=globex"' in tenants
    assert "/tenants/acme/" not in tenants
    overview = text(pm.get("/?feature=chat"))
    assert '<div class="label">Requests</div><div class="value">3</div>' in overview
    assert '<option value="chat" selected>' in overview


def test_the_range_preset_is_kept_in_links_and_the_filter_bar(pm: Client) -> None:
    traffic()
    page = text(pm.get("/features/?range=7d"))
    assert 'value="7d" checked' in page
    assert 'href="/features/chat/?range=7d"' in page
    assert "charts per hour" in page


def test_a_custom_range_in_the_org_time_zone(pm: Client, settings) -> None:
    settings.ORG_TIME_ZONE = "Europe/Paris"
    page = text(pm.get("/?range=custom&start=2026-11-01T00:00&end=2026-11-03T00:00"))
    assert "2026-11-01 00:00 – 2026-11-03 00:00 CET" in page
    assert "charts per hour" in page


@pytest.mark.parametrize(("query", "message"), [
    ("range=fortnight", "Unknown range 'fortnight'"),
    ("range=custom&start=yesterday", "A custom range needs a start and an end"),
    ("range=custom&start=2026-11-03T00:00&end=2026-11-01T00:00", "start must be before its end"),
    ("range=custom&start=2020-01-01T00:00&end=2026-11-01T00:00", "at most 400 days"),
    ("range=custom&start=9999-12-30T00:00&end=9999-12-31T23:59", "between 2000-01-01 and tomorrow"),
    ("tenant=%01acme", "The tenant filter is not a valid name"),
])
def test_a_bad_parameter_gets_a_message_and_the_defaults(pm: Client, query: str, message: str) -> None:
    for url in ("/", "/tenants/", "/gpus/", "/features/chat/"):
        response = pm.get(f"{url}?{query}")
        assert response.status_code == 200
        page = text(response)
        assert message in page
        assert 'value="24h" checked' in page


def test_an_unknown_sort_column_falls_back_to_cost(pm: Client) -> None:
    traffic()
    page = text(pm.get("/tenants/?sort=bogus"))
    assert "Cannot sort by 'bogus'" in page
    assert page.index("/tenants/acme/") < page.index("/tenants/globex/")


def test_tables_sort_by_any_column_both_ways(pm: Client) -> None:
    traffic()
    by_name = text(pm.get("/tenants/?sort=name"))
    assert by_name.index("/tenants/acme/") < by_name.index("/tenants/globex/")
    reverse = text(pm.get("/tenants/?sort=-name"))
    assert reverse.index("/tenants/globex/") < reverse.index("/tenants/acme/")
    by_requests = text(pm.get("/tenants/?sort=-requests"))
    assert by_requests.index("/tenants/acme/") < by_requests.index("/tenants/globex/")  # 3 each: stable
    assert 'aria-sort="ascending"' in by_requests


def test_rows_carry_a_sparkline_of_spend(pm: Client) -> None:
    traffic()
    page = text(pm.get("/features/?range=1h"))
    assert re.search(r'<svg class="spark"[^>]*><polyline points="[0-9., ]+"/></svg>', page)


def test_a_detail_page_is_filtered_to_its_value_and_lists_end_users_and_budgets(pm: Client) -> None:
    traffic()
    budget(name="acme monthly", tenant="acme")
    page = text(pm.get("/tenants/acme/"))
    assert '<div class="label">Requests</div><div class="value">3</div>' in page
    assert "acme monthly" in page and "Budgets are set per tenant" not in page
    assert 'id="figure-spend"' in page  # split by feature
    # The end users, read from raw events, load after the page from the URL it names.
    assert 'id="end-users"' not in page
    url = page.split('id="end-users-section" hx-get="')[1].split('"')[0]
    assert url.startswith("/tenants/acme/?") and "part=end-users" in url
    part = text(pm.get(url))
    assert part.strip().startswith('<section id="end-users-section">') and "<html" not in part
    users = part.split('id="end-users"')[1].split("</table>")[0]
    assert users.index("alice") < users.index("bob") and "carol" not in users


def test_a_product_manager_sees_no_budget_edit_controls(pm: Client, admin: Client) -> None:
    traffic()
    assert "Create one" not in text(pm.get("/tenants/globex/"))
    assert "Create one" in text(admin.get("/tenants/globex/"))
    for url in PAGES:
        page = text(pm.get(url))
        assert "/budgets/new/" not in page and ">Edit<" not in page and ">Delete<" not in page


def test_the_overview_spend_tile_compares_with_the_budget_for_its_scope(pm: Client) -> None:
    traffic()
    budget(name="acme monthly", tenant="acme", limit="10")
    page = text(pm.get("/?tenant=acme"))
    assert "$3.00</div> <div class=\"sub\">of $10.00" in page
    assert 'style="width: 30%"' in page


def test_the_nav_links_every_dashboard_page_and_the_budgets(pm: Client) -> None:
    page = text(pm.get("/"))
    for href in ("/", "/features/", "/tenants/", "/models/", "/gpus/", "/budgets/"):
        assert f'href="{href}"' in page


def test_the_overview_gpu_utilisation_comes_from_the_gpu_runtimes(pm: Client) -> None:
    traffic(with_gpu_runtime=True)  # rt-1 on a CPU (not measured), gpu-1 at 80%
    page = text(pm.get("/?range=1h"))
    assert '<div class="label">GPU utilisation</div><div class="value">80%</div>' in page


def test_a_history_restore_gets_the_whole_page_and_responses_vary_on_htmx(pm: Client) -> None:
    restored = pm.get("/tenants/", HTTP_HX_HISTORY_RESTORE_REQUEST="true", **HTMX)
    assert "<html" in text(restored)
    assert "HX-Request" in restored["Vary"]
    assert "HX-Request" in pm.get("/tenants/", **HTMX)["Vary"]
