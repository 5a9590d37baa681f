"""The fairness view: each tenant's share of service against its share of demand per step, from
the runtime samples' tenants; shown on the tenants page as a plotly chart, n/a where nothing was."""

from __future__ import annotations

import datetime as dt
from typing import Any

import plotly.graph_objects as go
import pytest
from django.utils import timezone

from finops.dashboards import charts
from finops.telemetry.fairness import tenant_fairness
from finops.telemetry.models import RuntimeSample
from tests.finops.dashboard_factories import logged_in

pytestmark = pytest.mark.django_db


def tenant(name: str, tokens_per_s: float, *, waiting: int = 0, running: int = 0,
           wait_ms: float | None = None) -> dict[str, Any]:
    return {"tenant": name, "tokens_per_s": tokens_per_s, "queue_wait_ms": wait_ms, "waiting": waiting,
            "running": running}


def sample(runtime_id: str, at: dt.datetime, tenants: list[dict[str, Any]] | None) -> None:
    RuntimeSample.objects.create(runtime_id=runtime_id, at=at, queue_depth=0, running=0, tokens_per_s=0.0,
                                 tenants=tenants)


def minute_ago(now: dt.datetime, minutes: int, seconds: int = 0) -> dt.datetime:
    return now.replace(second=0, microsecond=0) - dt.timedelta(minutes=minutes) + dt.timedelta(seconds=seconds)


def test_a_flooder_has_most_of_the_demand_and_the_others_still_get_their_service() -> None:
    now = timezone.now()
    for seconds in (0, 20, 40):  # one minute: the flooder waits with 60 requests, the light tenant with 1
        at = minute_ago(now, 3, seconds)
        sample("rt-1", at, [tenant("flood", 60.0, waiting=58, running=2, wait_ms=9000.0),
                            tenant("light", 40.0, waiting=0, running=2, wait_ms=150.0)])

    points = {p.value: p for p in tenant_fairness(start=now - dt.timedelta(hours=1), end=now, step="minute")}

    assert points["flood"].demand_share == pytest.approx(60 / 62)
    assert points["flood"].service_share == pytest.approx(0.6)
    assert points["light"].service_share == pytest.approx(0.4) and points["light"].demand_share == pytest.approx(2 / 62)
    assert points["light"].tokens_per_s == pytest.approx(40.0)
    assert (points["flood"].queue_wait_ms, points["light"].queue_wait_ms) == (9000.0, 150.0)


def test_runtimes_add_their_mean_rates_and_a_step_with_no_service_is_na_not_zero() -> None:
    now = timezone.now()
    at = minute_ago(now, 5)
    sample("rt-1", at, [tenant("acme", 100.0, running=1)])
    sample("rt-1", at + dt.timedelta(seconds=30), [tenant("acme", 50.0, running=1)])
    sample("rt-2", at, [tenant("acme", 10.0, running=1), tenant("globex", 30.0, running=1)])
    idle = minute_ago(now, 2)
    sample("rt-1", idle, [tenant("acme", 0.0, waiting=3, wait_ms=None)])
    sample("rt-1", minute_ago(now, 1), None)  # an older runtime: no tenants, left out

    points = tenant_fairness(start=now - dt.timedelta(hours=1), end=now, step="minute")

    busy = {p.value: p for p in points if p.at == at}
    assert busy["acme"].tokens_per_s == pytest.approx(75.0 + 10.0)  # rt-1's mean over the minute, plus rt-2's
    assert busy["acme"].service_share == pytest.approx(85 / 115)
    (waiting,) = [p for p in points if p.at == idle]
    assert (waiting.service_share, waiting.demand_share, waiting.queue_wait_ms) == (None, 1.0, None)
    assert {p.at for p in points} == {at, idle}


def test_the_chart_draws_service_solid_and_demand_dotted_per_tenant() -> None:
    now = timezone.now()
    sample("rt-1", minute_ago(now, 3), [tenant("flood", 60.0, waiting=9, running=1, wait_ms=900.0),
                                       tenant("light", 40.0, running=1)])

    chart = charts.fairness(tenant_fairness(start=now - dt.timedelta(hours=1), end=now, step="minute"))

    assert chart.figure is not None
    go.Figure(chart.figure)
    traces = {t["name"]: t for t in chart.figure["data"]}
    assert set(traces) == {"flood service", "flood demand", "light service", "light demand"}
    assert traces["light demand"]["line"]["dash"] == "dot" and "dash" not in traces["light service"]["line"]
    assert traces["light service"]["customdata"] == [["40.0", "n/a"]]
    assert charts.fairness([]).figure is None and "every few seconds" in charts.fairness([]).empty


def test_the_tenants_page_shows_the_fairness_view() -> None:
    now = timezone.now()
    sample("rt-1", minute_ago(now, 3), [tenant("flood", 60.0, waiting=9, running=1)])
    response = logged_in("product-manager", "pat").get("/tenants/?range=1h")

    assert response.status_code == 200
    body = response.content.decode()
    assert "figure-fairness" in body and "flood service" in body
    assert "figure-fairness" not in logged_in("product-manager", "pm2").get("/features/?range=1h").content.decode()
