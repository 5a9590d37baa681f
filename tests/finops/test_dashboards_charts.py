"""Charts: each is a valid plotly figure built from selector results, times on the x axis are in the
organisation's time zone, and a chart with nothing to draw says what to do instead."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import plotly.graph_objects as go
import pytest
from django.utils import timezone

from finops.dashboards import charts, page_data
from finops.dashboards.filterbar import filter_state_parse
from finops.regressions.models import CostRegression, Metric
from finops.telemetry.capacity import runtime_gauges, runtime_history
from finops.telemetry.latency import LatencyPoint, latency_percentiles, latency_series
from finops.telemetry.models import Rollup
from finops.telemetry.ranges import Filters
from finops.telemetry.rollups import rollup_run
from finops.telemetry.sums import Sums
from finops.telemetry.usage import SeriesPoint
from tests.finops.budget_factories import request_event, store
from tests.finops.dashboard_factories import runtime_samples, traffic

pytestmark = pytest.mark.django_db


def every_chart(now: dt.datetime, regressions: tuple[CostRegression, ...] = ()) -> list[charts.Chart]:
    state = filter_state_parse({"range": "1h"}, now=now)
    filters = state.filters()
    total, by = page_data.series(state=state, split="feature")
    history = runtime_history(start=state.start, end=state.end, step=state.step)
    gauges = runtime_gauges(start=state.start, end=state.end)
    return [
        charts.spend_by(by, dimension="feature", step=state.step),
        charts.task_costs(page_data.task_points(state=state), step=state.step, regressions=regressions),
        charts.tokens_per_request(total, regressions=regressions),
        charts.tokens_per_second(total, step=state.step),
        charts.latency(latency_series(filters=filters, step=state.step, metric="e2e")),
        charts.time_to_first_token(latency_series(filters=filters, step=state.step, metric="ttft")),
        charts.queue_depth(history),
        charts.queue_wait(total),
        charts.cache_hit_rate(total),
        charts.rejections_by_reason(total, step=state.step),
        charts.gpu_utilisation(history),
        charts.gpu_power(history),
        charts.gpu_memory(gauges),
    ]


def test_every_chart_is_a_valid_plotly_figure_with_traffic() -> None:
    now = timezone.now()
    traffic(now, with_gpu_runtime=True)
    rollup_run(now=timezone.now() + dt.timedelta(minutes=1))  # tasks are counted by the rollup run
    marks = tuple(CostRegression(feature="search", metric=metric, started_at=now - dt.timedelta(minutes=30),
                                 detected_at=now, before=1.0, after=1.3, score=7.0) for metric in Metric.values)
    built = every_chart(now, marks)
    assert all(chart.figure is not None for chart in built), [c.id for c in built if c.figure is None]
    for chart in built:
        go.Figure(chart.figure)  # raises on anything plotly.js would not understand


def test_without_data_every_chart_is_an_empty_state_with_a_next_step() -> None:
    for chart in every_chart(timezone.now()):
        assert chart.figure is None
        assert chart.empty, chart.id
    assert "register_runtime" in charts.spend_by([], dimension="feature", step="hour").empty


def test_spend_is_stacked_by_feature_in_dollars() -> None:
    now = timezone.now()
    traffic(now)
    chart = every_chart(now)[0]
    traces = {trace["name"]: trace for trace in chart.figure["data"]}
    assert set(traces) == {"chat", "search"}
    assert chart.figure["layout"]["barmode"] == "stack"
    assert sum(traces["chat"]["y"]) == pytest.approx(3.0)


@pytest.mark.parametrize("rolled", [False, True])
def test_rejections_are_split_by_reason_from_rollups_and_tail(rolled: bool) -> None:
    now = timezone.now()
    traffic(now)
    store([request_event(started_at=now - dt.timedelta(minutes=m), status="shed", http_status=503,
                         model_served=None, queue_wait_ms=None) for m in (40, 2)])
    if rolled:
        rollup_run(now=now - dt.timedelta(minutes=8))  # the shed request of 40 minutes ago is rolled up
    assert Rollup.objects.filter(status_class="rejected").exists() is rolled
    state = filter_state_parse({"range": "1h"}, now=now)
    chart = charts.rejections_by_reason(page_data.series(state=state)[0], step=state.step)
    assert {trace["name"]: sum(trace["y"]) for trace in chart.figure["data"]} == {"budget": 1, "load shedding": 2}


def test_rejections_counted_before_reasons_were_kept_say_so() -> None:
    at = dt.datetime(2026, 11, 22, 10, 0, tzinfo=dt.UTC)
    point = SeriesPoint.of(Sums(requests=3, rejections=3, shed=1), at=at, value=None)
    chart = charts.rejections_by_reason([point], step="hour")
    assert {trace["name"]: trace["y"] for trace in chart.figure["data"]} == {
        "load shedding": [1], "reason not recorded": [2]}


@pytest.mark.parametrize("rolled", [False, True])
def test_queue_wait_is_the_mean_and_worst_of_the_requests_that_queued(rolled: bool) -> None:
    now = timezone.now().replace(second=30)
    store([request_event(started_at=now - dt.timedelta(minutes=30, seconds=s), queue_wait_ms=wait)
           for s, wait in ((1, 10.0), (2, 50.0), (3, None))])
    if rolled:
        rollup_run(now=now)
    assert Rollup.objects.exists() is rolled
    state = filter_state_parse({"range": "1h"}, now=now)
    chart = charts.queue_wait(page_data.series(state=state)[0])
    lines = {trace["name"]: [y for y in trace["y"] if y is not None] for trace in chart.figure["data"]}
    assert lines == {"mean": [30.0], "max": [50.0]}


def test_a_cpu_runtime_has_no_gpu_chart_but_says_why() -> None:
    now = timezone.now()
    runtime_samples("rt-1", now)
    state = filter_state_parse({"range": "1h"}, now=now)
    history = runtime_history(start=state.start, end=state.end, step=state.step)
    chart = charts.gpu_utilisation(history)
    assert chart.figure is None and "n/a, never as zero" in chart.empty
    assert charts.queue_depth(history).figure is not None


def test_times_on_the_x_axis_are_in_the_org_time_zone(settings) -> None:
    settings.ORG_TIME_ZONE = "Asia/Kolkata"
    point = LatencyPoint(at=dt.datetime(2026, 11, 22, 10, 0, tzinfo=dt.UTC), requests=1,
                         quantiles={0.5: 10.0, 0.95: 20.0})
    chart = charts.latency([point])
    assert chart.figure["data"][0]["x"] == ["2026-11-22 15:30"]


@pytest.mark.parametrize(("rolled", "tenant"), [(False, ""), (True, ""), (True, "acme")])
@pytest.mark.parametrize("metric", ["e2e", "ttft"])
def test_the_latency_chart_series_agrees_with_the_percentile_selector_step_by_step(
    rolled: bool, tenant: str, metric: str
) -> None:
    now = timezone.now()
    traffic(now)
    if rolled:  # most events in rollups, the rest in the raw tail
        rollup_run(now=now - dt.timedelta(minutes=8))
    state = filter_state_parse({"range": "1h", "tenant": tenant}, now=now)
    filters = state.filters()
    points = latency_series(filters=filters, step=state.step, metric=metric)
    assert len(points) == 60 and any(p.quantiles[0.5] is not None for p in points)
    for point in points:
        window = Filters(start=point.at, end=point.at + dt.timedelta(minutes=1), tenants=filters.tenants)
        assert point.quantiles == latency_percentiles(filters=window, metric=metric)


def test_a_sparkline_scales_values_into_its_box() -> None:
    line = charts.sparkline([0.0, 1.0, 2.0], width=100, height=20)
    assert line.points == "0.0,19.0 50.0,10.0 100.0,1.0"
    assert charts.sparkline([0.0, 0.0]).points == ""
    assert charts.sparkline([Decimal(1)]).points == ""


def test_a_regression_is_marked_at_its_start_on_its_metric_s_chart_only() -> None:
    now = timezone.now().replace(second=0, microsecond=0)
    traffic(now)
    rollup_run(now=timezone.now() + dt.timedelta(minutes=1))
    mark = CostRegression(feature="search", metric=Metric.TOKENS_PER_REQUEST, started_at=now - dt.timedelta(minutes=30),
                          detected_at=now, before=400.0, after=540.0, score=7.0)
    state = filter_state_parse({"range": "1h"}, now=now)
    total, _ = page_data.series(state=state)
    tokens = charts.tokens_per_request(total, regressions=[mark]).figure
    costs = charts.task_costs(page_data.task_points(state=state), step=state.step, regressions=[mark]).figure
    assert tokens is not None and costs is not None
    assert [a["text"] for a in tokens["layout"]["annotations"]] == ["regression +35%"]
    assert tokens["layout"]["shapes"][0]["x0"] == charts._x(mark.started_at)
    assert costs["layout"]["annotations"] == []
