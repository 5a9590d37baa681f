"""One function per chart: telemetry's reads in, a plotly figure out (a plain dict in plotly's JSON
figure format, which the page hands to ``Plotly.react``), or an empty state saying what to do.

Figures are built as dicts rather than through ``plotly.graph_objects``: validating a figure object
costs tens of milliseconds each, a dozen times a page; the tests check every figure against
plotly's schema instead (``go.Figure(figure)``). Times on the x axis are wall-clock times in the
organisation's time zone, written without an offset so plotly shows them as they are.
Sparklines are inline SVG, not plotly: a table of plotly sparklines is one plot per row in the browser.

Names a client chose (tenants, features, runtimes, devices) reach a figure through ``_label``:
plotly.js reads trace names, categories and hover text as its "pseudo-HTML" (``svg_text_utils.js``):
``<a href>``, ``<span style>``, ``<b>``, ``<i>``, ``<em>``, ``<s>``, ``<u>``, ``<sub>``, ``<sup>`` become
markup, ``<br>`` a line break, entities (``&lt;``, ``&#60;``) are decoded, and text between two ``$``
is typeset as LaTeX where MathJax is loaded.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from django.utils import timezone

from finops.dashboards.names import visible
from finops.lib.timezones import org_time_zone
from finops.regressions.models import CostRegression
from finops.telemetry.capacity import DeviceGauge, RuntimeGauge, RuntimeHistoryPoint
from finops.telemetry.fairness import FairnessPoint
from finops.telemetry.latency import LatencyPoint
from finops.telemetry.ranges import STEP_LENGTH
from finops.telemetry.task_costs import TaskPoint
from finops.telemetry.usage import SeriesPoint, SpendPoint

NO_REQUESTS = ("No requests in this range — send traffic to a runtime registered with "
               "`manage.py register_runtime`, or widen the range.")
NO_SAMPLES = ("No runtime samples in this range — start a runtime registered with `manage.py register_runtime`; "
              "it reports its queue and devices every few seconds.")
NO_GPU = ("No GPU measured in this range: runtimes on a CPU report no utilisation, memory or power "
          "(shown as n/a, never as zero).")
PALETTE = ["#3e7bfa", "#2f9e6e", "#d9822b", "#9b59b6", "#d64545", "#14919b", "#8d6e63", "#e6a700", "#5c6bc0",
           "#7cb342"]


@dataclass(frozen=True)
class Chart:
    id: str
    title: str
    figure: dict[str, Any] | None  # None: show ``empty`` instead
    empty: str = NO_REQUESTS
    note: str = ""

    @property
    def dom_id(self) -> str:
        return f"figure-{self.id}"


def _label(name: str) -> str:
    """A client-chosen name as a figure shows it, character for character: control characters as
    their escapes (as on the pages), then ``&``, ``<``, ``>`` and ``$`` as entities, which plotly
    decodes into text after it has looked for tags and LaTeX, so none of them is ever markup."""
    text = visible(name)
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("$", "&#36;")


def _x(moment: dt.datetime) -> str:
    return timezone.localtime(moment, org_time_zone()).strftime("%Y-%m-%d %H:%M")


def _layout(*, y_title: str = "", stacked: bool = False, y_format: str = "", y_suffix: str = "",
            y_prefix: str = "", y_range: Sequence[float] | None = None) -> dict[str, Any]:
    yaxis: dict[str, Any] = {"title": {"text": y_title}, "rangemode": "tozero", "gridcolor": "#e4e7eb",
                             "tickformat": y_format, "ticksuffix": y_suffix, "tickprefix": y_prefix}
    if y_range is not None:
        yaxis["range"] = list(y_range)
    layout: dict[str, Any] = {
        "height": 260, "margin": {"l": 56, "r": 16, "t": 8, "b": 36},
        "paper_bgcolor": "#fff", "plot_bgcolor": "#fff", "font": {"size": 12, "color": "#1f2933"},
        "hovermode": "x unified", "showlegend": True,
        "legend": {"orientation": "h", "y": -0.18, "x": 0},
        "xaxis": {"type": "date", "gridcolor": "#f0f2f5"},
        "yaxis": yaxis,
    }
    if stacked:
        layout["barmode"] = "stack"
    return layout


def _line(name: str, xs: list[str], ys: list[float | None], color: int = 0, **extra: Any) -> dict[str, Any]:
    trace = {"type": "scatter", "mode": "lines", "name": name, "x": xs, "y": ys,
             "line": {"color": PALETTE[color % len(PALETTE)], "width": 2}, "connectgaps": False}
    trace.update(extra)
    return trace


def _any_requests(points: Iterable[SeriesPoint]) -> bool:
    return any(point.requests for point in points)


def _per_value(points: Iterable[Any], value_of: Any) -> dict[str, tuple[list[str], list[Any]]]:
    lines: dict[str, tuple[list[str], list[Any]]] = {}
    for point in points:
        xs, ys = lines.setdefault(point.value if point.value is not None else "", ([], []))
        xs.append(_x(point.at))
        ys.append(value_of(point))
    return lines


def _bar_width(step: str) -> float:
    """A bar's width on a date axis, in milliseconds: most of its step (plotly guesses wrong for one bar)."""
    return STEP_LENGTH[step].total_seconds() * 1000 * 0.8


def spend_by(points: list[SpendPoint], *, dimension: str, step: str, chart_id: str = "spend") -> Chart:
    """List-price spend per step, stacked by ``dimension``'s values."""
    title = f"Spend by {dimension} (list price)"
    if not any(point.requests for point in points):
        return Chart(chart_id, title, None)
    traces = []
    for i, (value, (xs, ys)) in enumerate(sorted(_per_value(points, lambda p: float(p.list_cost)).items())):
        traces.append({"type": "bar", "name": _label(value) if value else "(none)", "x": xs, "y": ys,
                       "width": _bar_width(step), "marker": {"color": PALETTE[i % len(PALETTE)]},
                       "hovertemplate": "%{y:$,.4f}"})
    return Chart(chart_id, title, {"data": traces, "layout": _layout(stacked=True, y_prefix="$")})


def _marked(layout: dict[str, Any], regressions: Sequence[CostRegression], metric: str) -> dict[str, Any]:
    """A dashed line at the start hour of each of ``metric``'s regressions, labelled with its size."""
    shown = [r for r in regressions if r.metric == metric]
    layout["shapes"] = [{"type": "line", "xref": "x", "yref": "paper", "x0": _x(r.started_at), "x1": _x(r.started_at),
                         "y0": 0, "y1": 1, "line": {"color": "#d64545", "width": 2, "dash": "dash"}} for r in shown]
    layout["annotations"] = [
        {"x": _x(r.started_at), "xref": "x", "y": 1, "yref": "paper", "yanchor": "bottom", "showarrow": False,
         "font": {"color": "#d64545", "size": 11},
         "text": _label(f"regression {r.change:+.0%}" + (f" ({r.model})" if r.model else "")
                        + (" · acknowledged" if r.acknowledged_at else ""))} for r in shown]
    return layout


def task_costs(points: list[TaskPoint], *, step: str, regressions: Sequence[CostRegression] = ()) -> Chart:
    """Cost per successful task (line) and waste (bars: the cost of tasks that did not succeed) per
    step of the tasks' first attempts, with the start of each cost regression marked."""
    title = "Cost per successful task and waste (list price)"
    if not any(p.tasks for p in points):
        return Chart("task-costs", title, None, empty=(
            "No task counted in this range yet: tasks are counted by the rollup run, a minute or so behind."))
    xs = [_x(p.at) for p in points if p.at is not None]
    per_task = [float(p.cost_per_successful_task) if p.cost_per_successful_task is not None else None for p in points]
    traces = [
        {"type": "bar", "name": "waste", "x": xs, "y": [float(p.waste) for p in points], "width": _bar_width(step),
         "marker": {"color": "#e6a700"}, "hovertemplate": "%{y:$,.6f}"},
        _line("cost per successful task", xs, per_task, 0, mode="lines+markers", yaxis="y2",
              hovertemplate="%{y:$,.6f}"),
    ]
    layout = _layout(y_title="waste", y_prefix="$")
    layout["yaxis2"] = {"title": {"text": "per successful task"}, "overlaying": "y", "side": "right",
                        "rangemode": "tozero", "tickprefix": "$", "showgrid": False}
    layout["margin"]["r"] = 56
    return Chart("task-costs", title, {"data": traces, "layout": _marked(layout, regressions,
                                                                         "cost_per_successful_task")},
                 note="tasks in the step of their first attempt")


def tokens_per_request(points: list[SeriesPoint], *, regressions: Sequence[CostRegression] = ()) -> Chart:
    """Tokens a model processed per request it answered, with the start of each regression marked."""
    title = "Tokens per request"
    answered = [p.ok - p.cache_hits if p.ok > p.cache_hits else 0 for p in points]
    if not any(answered):
        return Chart("tokens-per-request", title, None)
    xs = [_x(p.at) for p in points]
    ys = [p.spent_tokens / n if n else None for p, n in zip(points, answered, strict=True)]
    layout = _marked(_layout(y_title="tokens", y_format="~s"), regressions, "tokens_per_request")
    return Chart("tokens-per-request", title, {"data": [_line("tokens per request", xs, ys, 2, mode="lines+markers")],
                                                "layout": layout},
                 note="requests a model answered, not from the cache")
NO_FAIRNESS = ("No runtime sample in this range says how its tenants were served — runtimes report each "
               "tenant's service and demand every few seconds.")


def fairness(points: list[FairnessPoint]) -> Chart:
    """Each tenant's share of service (solid) against its share of demand (dotted), per step."""
    title = "Fair share: each tenant's share of service (solid) and of demand (dotted)"
    if not any(p.service_share is not None or p.demand_share is not None for p in points):
        return Chart("fairness", title, None, empty=NO_FAIRNESS)
    traces = []
    by_tenant: dict[str, list[FairnessPoint]] = {}
    for point in points:
        by_tenant.setdefault(point.value, []).append(point)
    for i, (tenant, mine) in enumerate(sorted(by_tenant.items())):
        xs, name = [_x(p.at) for p in mine], _label(tenant)
        waits = [f"{p.queue_wait_ms:,.0f} ms" if p.queue_wait_ms is not None else "n/a" for p in mine]
        traces.append(_line(f"{name} service", xs, [p.service_share for p in mine], i, legendgroup=name,
                            customdata=[[f"{p.tokens_per_s:,.1f}", w] for p, w in zip(mine, waits, strict=True)],
                            hovertemplate="%{y:.0%} of service (%{customdata[0]} tokens/s, mean wait "
                                          "%{customdata[1]})"))
        traces.append(_line(f"{name} demand", xs, [p.demand_share for p in mine], i, legendgroup=name,
                            line={"color": PALETTE[i % len(PALETTE)], "width": 2, "dash": "dot"},
                            hovertemplate="%{y:.0%} of demand"))
    return Chart("fairness", title, {"data": traces, "layout": _layout(y_format=".0%", y_range=(0, 1))},
                 note="demand: requests waiting or running; service: tokens served; n/a where nothing was")


def tokens_per_second(points: list[SeriesPoint], *, step: str) -> Chart:
    """Prompt and completion tokens per second, averaged over each step."""
    title = "Tokens per second"
    if not _any_requests(points):
        return Chart("tokens", title, None)
    seconds = STEP_LENGTH[step].total_seconds()
    xs = [_x(p.at) for p in points]
    traces = [
        _line("completion", xs, [p.completion_tokens / seconds for p in points], 0, stackgroup="tokens"),
        _line("prompt", xs, [p.prompt_tokens / seconds for p in points], 1, stackgroup="tokens"),
    ]
    return Chart("tokens", title, {"data": traces, "layout": _layout(y_title="tokens/s", y_format="~s")},
                 note=f"averaged over each {step}")


def _percentile_chart(points: list[LatencyPoint], *, chart_id: str, title: str, empty: str) -> Chart:
    if not any(v is not None for p in points for v in p.quantiles.values()):
        return Chart(chart_id, title, None, empty=empty)
    xs = [_x(p.at) for p in points]
    traces = [_line(f"p{round(q * 100)}", xs, [p.quantiles.get(q) for p in points], i, mode="lines+markers")
              for i, q in enumerate(sorted(points[0].quantiles))]
    return Chart(chart_id, title, {"data": traces, "layout": _layout(y_title="ms", y_format="~s")})


def latency(points: list[LatencyPoint]) -> Chart:
    """End-to-end latency p50/p95/p99 per window."""
    return _percentile_chart(points, chart_id="latency", title="Latency p50 / p95 / p99 (end to end)",
                             empty=NO_REQUESTS)


def time_to_first_token(points: list[LatencyPoint]) -> Chart:
    """Time to first token p50/p95/p99 per window."""
    return _percentile_chart(points, chart_id="ttft", title="Time to first token p50 / p95 / p99",
                             empty="No streamed or completed request measured a first token in this range.")


def cache_hit_rate(points: list[SeriesPoint]) -> Chart:
    title = "Cache hit rate"
    if not _any_requests(points):
        return Chart("cache", title, None)
    xs = [_x(p.at) for p in points]
    exact = _line("exact", xs, [p.exact_hit_rate for p in points], 1, mode="lines+markers")
    semantic = _line("semantic", xs, [p.semantic_hit_rate for p in points], 2, mode="lines+markers")
    return Chart("cache", title, {"data": [exact, semantic], "layout": _layout(y_format=".0%", y_range=[0, 1])})


def _span(layout: dict[str, Any], span: tuple[dt.datetime, dt.datetime] | None) -> dict[str, Any]:
    """Pin the x axis to the page's range, so a chart with few points lines up with the others."""
    if span is not None:
        layout["xaxis"]["range"] = [_x(span[0]), _x(span[1])]
    return layout


def queue_depth(history: list[RuntimeHistoryPoint], *, span: tuple[dt.datetime, dt.datetime] | None = None) -> Chart:
    """Mean queue depth per runtime and step, from the runtimes' samples."""
    title = "Queue depth (per runtime)"
    if not any(p.samples for p in history):
        return Chart("queue-depth", title, None, empty=NO_SAMPLES)
    lines: dict[str, tuple[list[str], list[float | None]]] = {}
    for p in history:
        xs, ys = lines.setdefault(p.runtime_id, ([], []))
        xs.append(_x(p.bucket))
        ys.append(p.queue_depth_avg)
    traces = [_line(_label(name), xs, ys, i, mode="lines+markers")
              for i, (name, (xs, ys)) in enumerate(sorted(lines.items()))]
    return Chart("queue-depth", title, {"data": traces, "layout": _span(_layout(y_title="requests waiting"), span)},
                 note="all tenants: runtimes sample their whole queue")


def queue_wait(points: list[SeriesPoint]) -> Chart:
    """Mean and worst queue wait per step of the requests that waited in a runtime's queue."""
    title = "Queue wait"
    if not any(p.queue_wait_ms_max is not None for p in points):
        return Chart("queue-wait", title, None, empty=(
            "No request waited in a runtime's queue in this range (rejected and cached requests never queue)."))
    xs = [_x(p.at) for p in points]
    traces = [_line("mean", xs, [p.queue_wait_ms_mean for p in points], 0, mode="lines+markers"),
              _line("max", xs, [p.queue_wait_ms_max for p in points], 1, mode="lines+markers")]
    return Chart("queue-wait", title, {"data": traces, "layout": _layout(y_title="ms", y_format="~s")})


REJECTION_REASONS = (("rule", "rejected_rule"), ("budget", "rejected_budget"), ("load shedding", "shed"))


def rejections_by_reason(points: list[SeriesPoint], *, step: str) -> Chart:
    """Rejected requests per step, stacked by reason (rule, budget, load shedding)."""
    title = "Rejections by reason"
    if not any(p.rejections for p in points):
        return Chart("rejections", title, None,
                     empty="No request was rejected in this range: no rule, budget or load shedding turned one away.")
    xs = [_x(p.at) for p in points]
    reasons = [(name, [getattr(p, field) for p in points]) for name, field in REJECTION_REASONS]
    # Rejections counted before the rollups kept their reasons.
    unknown = [p.rejections - p.rejected_rule - p.rejected_budget - p.shed for p in points]
    if any(unknown):
        reasons.append(("reason not recorded", unknown))
    traces = [{"type": "bar", "name": name, "x": xs, "y": ys, "width": _bar_width(step),
               "marker": {"color": PALETTE[(i + 3) % len(PALETTE)]}}
              for i, (name, ys) in enumerate(reasons) if any(ys)]
    return Chart("rejections", title, {"data": traces, "layout": _layout(y_title="requests", stacked=True)})


def _device_chart(history: list[RuntimeHistoryPoint], *, chart_id: str, title: str, field: str,
                  layout: dict[str, Any], span: tuple[dt.datetime, dt.datetime] | None) -> Chart:
    if not any(p.samples for p in history):
        return Chart(chart_id, title, None, empty=NO_SAMPLES)
    if all(getattr(p, field) is None for p in history):
        return Chart(chart_id, title, None, empty=NO_GPU)
    lines: dict[str, tuple[list[str], list[float | None]]] = {}
    for p in history:
        xs, ys = lines.setdefault(p.runtime_id, ([], []))
        xs.append(_x(p.bucket))
        ys.append(getattr(p, field))
    traces = [_line(_label(name), xs, ys, i, mode="lines+markers")
              for i, (name, (xs, ys)) in enumerate(sorted(lines.items())) if any(y is not None for y in ys)]
    return Chart(chart_id, title, {"data": traces, "layout": _span(layout, span)})


def gpu_utilisation(history: list[RuntimeHistoryPoint], *, span: tuple[dt.datetime, dt.datetime] | None = None
                    ) -> Chart:
    """Mean GPU utilisation per runtime and step."""
    return _device_chart(history, chart_id="gpu-util", title="GPU utilisation", field="gpu_util_avg",
                         layout=_layout(y_suffix="%", y_range=[0, 100]), span=span)


def gpu_power(history: list[RuntimeHistoryPoint], *, span: tuple[dt.datetime, dt.datetime] | None = None) -> Chart:
    """Power drawn per runtime (all its GPUs) and step."""
    return _device_chart(history, chart_id="gpu-power", title="GPU power", field="power_avg_w",
                         layout=_layout(y_title="W", y_format="~s"), span=span)


def gpu_memory(gauges: list[RuntimeGauge]) -> Chart:
    """Peak memory used against memory installed, per GPU."""
    title = "GPU memory (peak used / total)"
    devices: list[DeviceGauge] = [d for g in gauges for d in g.devices if d.mem_total or d.mem_used_max]
    if not devices:
        return Chart("gpu-memory", title, None, empty=NO_GPU if any(g.samples for g in gauges) else NO_SAMPLES)
    names = [_label(f"{d.runtime_id} · {d.name or d.device}") for d in devices]
    used = [d.mem_used_max for d in devices]
    free = [(d.mem_total - d.mem_used_max) if d.mem_total is not None and d.mem_used_max is not None else None
            for d in devices]
    layout = _layout(y_title="bytes", stacked=True, y_format="~s")
    layout["xaxis"] = {"type": "category"}
    traces = [{"type": "bar", "name": "peak used", "x": names, "y": used, "marker": {"color": PALETTE[0]}},
              {"type": "bar", "name": "headroom", "x": names, "y": free, "marker": {"color": "#cbd2d9"}}]
    return Chart("gpu-memory", title, {"data": traces, "layout": layout})


@dataclass(frozen=True)
class Sparkline:
    """An inline SVG polyline; ``points`` is its ``points`` attribute ("" when nothing to draw)."""

    points: str
    width: int
    height: int
    peak: float


def sparkline(values: Sequence[float], *, width: int = 120, height: int = 24) -> Sparkline:
    """Values (oldest first) scaled into a ``width`` × ``height`` box, zero at the bottom."""
    if len(values) < 2 or not any(values):
        return Sparkline("", width, height, max(values, default=0.0))
    peak = max(values)
    step = width / (len(values) - 1)
    points = " ".join(f"{i * step:.1f},{height - 1 - (v / peak) * (height - 2):.1f}" for i, v in enumerate(values))
    return Sparkline(points, width, height, peak)
