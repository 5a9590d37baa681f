"""Names with control characters (stored before ingest refused them, and still in the rollups) never
break a page: every page that lists a tenant, feature or model answers 200, shows such a name with
its control characters escaped, and links it to a page that shows the same name, or does not link it
where no browser could ask for that page."""

from __future__ import annotations

import datetime as dt
import html
import json
import re
from urllib.parse import unquote

import pytest
from django.db import connection
from django.test import Client
from django.utils import timezone

from finops.dashboards import charts
from finops.dashboards.names import visible
from finops.telemetry.capacity import runtime_history
from finops.telemetry.rollups import rollup_run
from tests.finops.budget_factories import request_event, store
from tests.finops.dashboard_factories import logged_in, runtime_samples

pytestmark = pytest.mark.django_db

HOSTILE = ["line\nbreak", "tab\tand\rreturn", "nul\x00byte", "bell\x07\x1b[31m", "del\x7f\x85", "rtl\u202eevil",
           "sep\u2028arator", "50%41 off", "  padded  ", "a/b/", "a/../b", "..", "<b>bold</b> & co"]
DIMENSIONS = [("tenant", "tenants"), ("feature", "features"), ("model", "models")]


@pytest.fixture
def pm() -> Client:
    return logged_in("product-manager", "pat")


def hostile_traffic(name: str) -> None:
    """Requests under ``name`` as tenant, feature, served model and end user, rolled up, beside a
    tenant with an ordinary name."""
    if "\x00" in name and connection.vendor == "postgresql":
        pytest.skip("PostgreSQL cannot store a NUL in text")
    now = timezone.now()
    store([request_event(started_at=now - dt.timedelta(minutes=30), tenant=name, feature=name,
                         model_served=name, end_user=name),
           request_event(started_at=now - dt.timedelta(minutes=20), tenant="acme", end_user="alice")])
    rollup_run(now=now)


def breakdown_cells(page: str) -> list[str]:
    table = page.split('id="breakdown"')[1].split("</table>")[0]
    return re.findall(r"<tr>\s*<td>(.*?)</td>", table, flags=re.S)


@pytest.mark.parametrize("name", HOSTILE)
def test_every_page_listing_a_hostile_name_answers_and_shows_it_escaped(pm: Client, name: str) -> None:
    hostile_traffic(name)
    shown = html.escape(visible(name), quote=False)

    for url in ["/", "/features/", "/tenants/", "/models/", "/gpus/"]:
        for headers in ({}, {"HTTP_HX_REQUEST": "true"}):
            response = pm.get(url, **headers)
            assert response.status_code == 200, (url, headers)
    for plural in ("tenants", "features", "models"):
        page = pm.get(f"/{plural}/").content.decode()
        (cell,) = [c for c in breakdown_cells(page) if shown in c]
        assert html.unescape(re.sub(r"<[^>]+>", "", cell)) == visible(name)
        export = pm.get(f"/{plural}/?format=csv")
        assert export.status_code == 200 and name.strip() in export.content.decode()


@pytest.mark.parametrize("name", HOSTILE)
def test_a_linked_name_leads_to_its_own_page(pm: Client, name: str) -> None:
    hostile_traffic(name)

    for dimension, plural in DIMENSIONS:
        page = pm.get(f"/{plural}/").content.decode()
        (cell,) = [c for c in breakdown_cells(page) if html.escape(visible(name), quote=False) in c]
        link = re.search(r'href="([^"]*)"', cell)
        if link is None:  # shown, not linked: a browser resolves "." and ".." away, and a NUL is no name
            assert "\x00" in name or {".", ".."} & set(name.split("/"))
            continue
        path = html.unescape(link.group(1))
        assert not re.search(r"[\x00-\x20\x7f]", path), "a browser drops control characters from a URL"
        assert unquote(path) == f"/{plural}/{name}/"
        detail = pm.get(path)
        assert detail.status_code == 200
        heading = re.search(r"<h1>(.*?)</h1>", detail.content.decode(), flags=re.S).group(1)
        assert html.unescape(re.sub(r"<[^>]+>", "", heading)).endswith(f"› {visible(name)}")
        body = detail.content.decode()
        for part in re.findall(r'(?:hx-get|action)="([^"]*)"', body):
            assert not re.search(r"[\x00-\x20\x7f]", html.unescape(part)), part
        for table in ("end-users", "budgets"):
            assert pm.get(f"{path}?format=csv&table={table}").status_code == 200
        end_users = pm.get(f"{path}?part=end-users", HTTP_HX_REQUEST="true")
        assert end_users.status_code == 200
        if dimension == "tenant":
            assert html.escape(visible(name), quote=False) in end_users.content.decode()


def test_a_name_is_shown_with_its_control_characters_escaped(pm: Client) -> None:
    hostile_traffic("ads\ncampaign\u202e")

    page = pm.get("/features/").content.decode()

    assert "ads\\ncampaign\\u202e" in page
    assert "ads\ncampaign" not in page and "\u202e" not in page


def test_the_filter_menus_offer_only_names_the_filter_bar_can_carry(pm: Client) -> None:
    hostile_traffic("line\nbreak")

    page = pm.get("/").content.decode()
    menu = page.split('<select name="tenant">')[1].split("</select>")[0]

    assert 'value="acme"' in menu
    assert "line" not in menu


def test_a_path_with_a_nul_is_no_name_and_not_found(pm: Client) -> None:
    assert pm.get("/tenants/a%00b/").status_code == 404


def test_a_hostile_name_reaches_the_spend_chart_as_text_not_markup(pm: Client) -> None:
    name = '<a href="https://evil.example">x</a> <span style="font-size:99px">$x$</span>'
    hostile_traffic(name)

    page = pm.get("/").content.decode()
    figure = json.loads(re.search(r'<script id="figure-spend" type="application/json">(.*?)</script>', page,
                                  flags=re.S).group(1))

    names = {trace["name"] for trace in figure["data"]}
    assert names == {"chat", "&lt;a href=\"https://evil.example\"&gt;x&lt;/a&gt; "
                             "&lt;span style=\"font-size:99px\"&gt;&#36;x&#36;&lt;/span&gt;"}


def test_a_runtime_name_reaches_the_runtime_charts_as_text_not_markup() -> None:
    now = timezone.now()
    runtime_samples("<i>gpu</i>\n&amp;", now)

    history = runtime_history(start=now - dt.timedelta(hours=1), end=now, step="minute")

    assert [trace["name"] for trace in charts.queue_depth(history).figure["data"]] == [
        "&lt;i&gt;gpu&lt;/i&gt;\\n&amp;amp;"]
