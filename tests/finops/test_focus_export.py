"""The FOCUS export: every column FOCUS 1.2 marks Mandatory, with the spec's types and nullability;
one row per day × runtime × model × tenant × feature; BilledCost adds up to the dashboards' spend
over the same days; a range it cannot export is refused with a clear message."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
from decimal import Decimal
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.test import Client, override_settings
from django.utils import timezone

from finops.telemetry.ranges import Filters
from finops.telemetry.rollups import rollup_run
from finops.telemetry.usage import usage_by, usage_totals
from tests.finops.test_rollups import SECOND, event, store

pytestmark = pytest.mark.django_db

# FOCUS 1.2's Mandatory columns (specification/columns/*.md: "Feature level: Mandatory"), and those
# of them that "MUST NOT be null" for a usage row.
MANDATORY = ["BilledCost", "BillingAccountId", "BillingAccountName", "BillingCurrency", "BillingPeriodEnd",
             "BillingPeriodStart", "ChargeCategory", "ChargeClass", "ChargeDescription", "ChargePeriodEnd",
             "ChargePeriodStart", "ContractedCost", "EffectiveCost", "InvoiceIssuerName", "ListCost",
             "PricingQuantity", "PricingUnit", "ProviderName", "PublisherName", "ServiceCategory", "ServiceName"]
NULLABLE = {"ChargeClass"}
DECIMALS = ["BilledCost", "ContractedCost", "EffectiveCost", "ListCost", "PricingQuantity", "ConsumedQuantity",
            "x_HardwareCost"]
DATETIMES = ["BillingPeriodEnd", "BillingPeriodStart", "ChargePeriodEnd", "ChargePeriodStart"]
DATETIME_FORMAT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
DAY = dt.timedelta(days=1)


@pytest.fixture
def days() -> tuple[dt.datetime, dt.datetime]:
    today = timezone.now().astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - 3 * DAY, today - 2 * DAY


@pytest.fixture
def traffic(days: tuple[dt.datetime, dt.datetime]) -> None:
    first, second = days
    noon = dt.timedelta(hours=12)
    store(
        event(started_at=first + noon, runtime_id="rt-1", tenant="acme", feature="chat", list_cost=Decimal("0.0123")),
        event(started_at=first + noon + SECOND, runtime_id="rt-1", tenant="acme", feature="chat",
              list_cost=Decimal("0.0200"), attempt=2, request_id="r1", task_id="r1"),
        event(started_at=first + noon, runtime_id="rt-2", tenant="acme", feature="chat", model_served="big",
              list_cost=Decimal("0.5")),
        event(started_at=first + noon, runtime_id="rt-1", tenant="globex", feature="=search",
              list_cost=Decimal("0.25")),
        event(started_at=first + noon, runtime_id="rt-1", tenant="globex", feature="=search", cache_hit=True,
              list_cost=Decimal(0), saved_cost=Decimal("0.25")),
        event(started_at=first + noon, runtime_id="rt-1", tenant="acme", feature="chat", list_cost=None,
              hardware_cost=None),  # no price applied
        event(started_at=first + noon, tenant="acme", feature="chat", status="rejected_budget", model_served=None,
              list_cost=Decimal(0), prompt_tokens=0, completion_tokens=0),
        event(started_at=second + noon, runtime_id="rt-1", tenant="acme", feature="chat", list_cost=Decimal("1.75")),
        event(started_at=second + 3 * DAY, runtime_id="rt-1", tenant="acme", feature="chat",
              list_cost=Decimal("9")),  # after the range
    )
    rollup_run(now=second + noon)  # the first day rolled up, the second still raw tail


def export(start: dt.datetime, end: dt.datetime, tmp_path: Path) -> list[dict[str, str]]:
    out = tmp_path / "focus.csv"
    call_command("export_focus", "--start", f"{start:%Y-%m-%d}", "--end", f"{end:%Y-%m-%d}", "--output", str(out))
    return list(csv.DictReader(io.StringIO(out.read_text())))


def test_every_mandatory_column_is_there_with_the_spec_s_types_and_nullability(
        traffic: None, days: tuple[dt.datetime, dt.datetime], tmp_path: Path) -> None:
    rows = export(*days, tmp_path)
    assert rows
    assert set(MANDATORY) <= set(rows[0])
    for row in rows:
        for column in MANDATORY:
            assert column in NULLABLE or row[column] != "", (column, row)
        assert row["ChargeClass"] == ""  # no row corrects an earlier billing period
        for column in DECIMALS:
            Decimal(row[column])
        for column in DATETIMES:
            assert DATETIME_FORMAT.match(row[column]), (column, row[column])
        assert row["ChargeCategory"] == "Usage" and row["BillingCurrency"] == "USD"
        assert (row["ServiceCategory"], row["ServiceSubcategory"]) == ("AI and Machine Learning", "Generative AI")
        assert row["ChargePeriodEnd"] > row["ChargePeriodStart"]
        assert row["BillingPeriodStart"] <= row["ChargePeriodStart"] < row["BillingPeriodEnd"]
        tags = json.loads(row["Tags"])
        assert set(tags) == {"tenant", "feature"}
        assert Decimal(row["BilledCost"]) == Decimal(row["EffectiveCost"]) == Decimal(row["ListCost"])


def test_one_row_per_day_runtime_model_tenant_and_feature(
        traffic: None, days: tuple[dt.datetime, dt.datetime], tmp_path: Path) -> None:
    rows = export(*days, tmp_path)
    keys = [(r["ChargePeriodStart"], r["ResourceId"], r["SkuId"], json.loads(r["Tags"])["tenant"],
             json.loads(r["Tags"])["feature"]) for r in rows]
    assert len(keys) == len(set(keys)) == 5
    refused = next(r for r in rows if r["SkuId"] == "(no model served)")
    assert (refused["ConsumedQuantity"], refused["x_Requests"], Decimal(refused["BilledCost"])) == ("0", "1", 0)
    chat = next(r for r in rows if r["ResourceId"] == "rt-1/smollm2" and r["SubAccountId"] == "acme"
                and r["ChargePeriodStart"].startswith(f"{days[0]:%Y-%m-%d}"))
    # Three attempts of two requests, one of them unpriced; cache hits' tokens are not consumed.
    assert (chat["x_Requests"], chat["x_Attempts"], chat["x_UnpricedAttempts"]) == ("2", "3", "1")
    assert Decimal(chat["BilledCost"]) == Decimal("0.0323")
    search = next(r for r in rows if r["SubAccountId"] == "globex")
    assert search["ConsumedQuantity"] == "30" and search["ConsumedUnit"] == "Tokens"
    assert Decimal(search["PricingQuantity"]) == Decimal("0.00003")
    assert json.loads(search["Tags"])["feature"] == "=search"  # a JSON value, never a formula cell


def test_billed_cost_adds_up_to_the_dashboards_spend_for_the_same_days(
        traffic: None, days: tuple[dt.datetime, dt.datetime], tmp_path: Path) -> None:
    rows = export(*days, tmp_path)
    filters = Filters(start=days[0], end=days[1] + DAY)
    assert sum(Decimal(r["BilledCost"]) for r in rows) == usage_totals(filters=filters).list_cost
    assert sum(Decimal(r["x_HardwareCost"]) for r in rows) == usage_totals(filters=filters).hardware_cost
    by_tenant = {row.value: row.list_cost for row in usage_by(filters=filters, dimension="tenant")}
    for tenant, spend in by_tenant.items():
        assert sum(Decimal(r["BilledCost"]) for r in rows if r["SubAccountId"] == tenant) == spend


def test_a_range_that_cannot_be_exported_is_refused_with_a_reason(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="not a date"):
        call_command("export_focus", "--start", "yesterday", "--end", "2026-01-01", "--output", str(tmp_path / "x"))
    with pytest.raises(CommandError, match="must not be before"):
        call_command("export_focus", "--start", "2026-12-05", "--end", "2026-12-04", "--output", str(tmp_path / "x"))
    with pytest.raises(CommandError, match="kept for 30 days"):
        call_command("export_focus", "--start", "2020-01-01", "--end", "2020-01-02", "--output", str(tmp_path / "x"))


def test_the_overview_offers_the_range_as_a_focus_download(traffic: None, days: tuple[dt.datetime, dt.datetime]
                                                          ) -> None:
    client = Client()
    client.force_login(get_user_model().objects.create_user("pm", password="pw"))
    query = {"range": "custom", "start": f"{days[0]:%Y-%m-%dT%H:%M}", "end": f"{days[1] + DAY:%Y-%m-%dT%H:%M}"}
    assert 'id="focus-export" href="/exports/focus.csv?range=custom' in client.get("/", query).content.decode()
    response = client.get("/exports/focus.csv", query)
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert sum(Decimal(r["BilledCost"]) for r in rows) == Decimal("2.5323")
    old = client.get("/exports/focus.csv", {"range": "custom", "start": "2020-01-01T00:00", "end": "2020-01-02T00:00"})
    assert old.status_code == 400 and b"kept for 30 days" in old.content


@override_settings(FOCUS_API_TOKEN="focus-secret-1")
def test_a_finops_tool_pulls_the_export_with_its_token(traffic: None, days: tuple[dt.datetime, dt.datetime]) -> None:
    client = Client()
    query = {"start": f"{days[0]:%Y-%m-%d}", "end": f"{days[1]:%Y-%m-%d}"}
    response = client.get("/api/v1/focus", query, HTTP_AUTHORIZATION="Bearer focus-secret-1")
    assert response.status_code == 200, response.content
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert sum(Decimal(r["BilledCost"]) for r in rows) == Decimal("2.5323")
    for token, code in ((None, "missing_token"), ("focus-secret-2", "invalid_token"), ("x" * 600, "invalid_token")):
        headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token else {}
        refused = client.get("/api/v1/focus", query, **headers)
        assert (refused.status_code, refused.json()["error"]["code"]) == (401, code)
    bad_days = (({"start": "2026-13-01"}, "start"), ({"end": "tomorrow"}, "end"), ({"start": "2020-01-01"}, "start"))
    for bad, param in bad_days:
        answer = client.get("/api/v1/focus", {**query, **bad}, HTTP_AUTHORIZATION="Bearer focus-secret-1")
        assert (answer.status_code, answer.json()["error"]["param"]) == (400, param), answer.content


def test_without_a_token_configured_the_pull_api_is_off() -> None:
    response = Client().get("/api/v1/focus", {"start": "2026-12-01", "end": "2026-12-01"},
                            HTTP_AUTHORIZATION="Bearer anything")
    assert (response.status_code, response.json()["error"]["code"]) == (404, "focus_api_off")
