"""Dashboard pages. Each view parses the filter bar (query parameters), reads through ``page_data``
and telemetry's reads, builds its charts with ``charts``, and renders the whole page — or, for an htmx
request, only the page's ``#body`` partial (one template holds both). ``?format=csv&table=NAME``
returns one of the page's tables as CSV instead."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import replace
from functools import wraps
from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBadRequest
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import patch_vary_headers
from django.utils.encoding import escape_uri_path
from django.views.decorators.http import require_GET

from finops.budgets.exports import budgets_table
from finops.budgets.permissions import can_edit_budgets
from finops.caching.selectors import semantic_policies_in_force
from finops.dashboards import charts, exports, page_data
from finops.dashboards.filterbar import CUSTOM, PRESETS, FilterState, filter_state_parse, filterable
from finops.dashboards.names import detail_url
from finops.lib.tables import Table, csv_response
from finops.lib.timezones import org_time_zone
from finops.runtimes.selectors import runtime_ruleset_states
from finops.telemetry.breakers import breaker_states
from finops.telemetry.capacity import idle_capacity, runtime_gauges, runtime_history
from finops.telemetry.fairness import tenant_fairness
from finops.telemetry.focus import FocusRangeRefused, focus_days, focus_table
from finops.telemetry.power_limits import WINDOW as POWER_WINDOW
from finops.telemetry.power_limits import power_limit_changes
from finops.telemetry.ranges import Dimension, Filters
from finops.telemetry.selectors import event_completeness
from finops.telemetry.tail import tail_snapshot
from finops.telemetry.usage import dimension_values, top_end_users, usage_by, usage_totals

PLURAL = {"tenant": "tenants", "feature": "features", "model": "models"}
# On a tenant's page spend is split by feature, and the other way round; models split by feature.
SPLIT: dict[str, Dimension] = {"tenant": "feature", "feature": "tenant", "model": "feature"}
RANGE_CHOICES = [*((key, key) for key in PRESETS), (CUSTOM, "Custom")]
SORT_COLUMNS = [("name", None), ("requests", "Requests"), ("tokens", "Tokens"), ("cost", "List cost"),
                ("hardware", "Hardware cost"), ("cost_per_1k", "Per 1k tokens"), ("cache", "Cache hits"),
                ("errors", "Errors"), ("rejections", "Rejected"), ("energy", "Energy / 1k tokens"),
                ("tasks", "Tasks ok / all"), ("per_task", "Per successful task"), ("waste", "Waste")]


def _one_tail_read(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Run a dashboard view with the raw tail's span read once, for all of its selectors and menus
    (``tail.tail_snapshot``)."""
    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        with tail_snapshot():
            return view(request, *args, **kwargs)
    return wrapper


def _render(request: HttpRequest, template: str, context: dict[str, Any], *, state: FilterState,
            fixed: dict[str, str] | None = None, problems: list[str] | None = None) -> HttpResponse:
    """The page, or its ``#body`` partial for htmx; times shown in the organisation's time zone."""
    context = {"state": state, "problems": [*state.problems, *(problems or [])], "ranges": RANGE_CHOICES,
               "time_zone": org_time_zone().key, "path": _path(request), **context}
    fragment = request.htmx and not request.htmx.boosted and not request.htmx.history_restore_request
    with timezone.override(org_time_zone()):
        if fragment:
            response = render(request, f"{template}#body", context)
        else:
            context["menus"] = _menus(state, fixed or {})
            response = render(request, template, context)
    # One URL, two bodies (page or fragment): a browser cache must keep them apart, or the back
    # button after an htmx filter change shows a bare fragment.
    patch_vary_headers(response, ("HX-Request",))
    return response


def _path(request: HttpRequest) -> str:
    """This page's path as a link (``request.path`` is decoded: a name in it may hold a line break,
    which a browser drops from a URL, or a ``%``)."""
    return escape_uri_path(request.path)


def _menus(state: FilterState, fixed: dict[str, str]) -> list[dict[str, Any]]:
    """The filter bar's tenant, feature and model menus: values seen in the range that the bar can
    carry (and the chosen one even if it was not seen). A dimension a page is fixed to has no menu."""
    filters = state.filters()
    menus = []
    for name in ("tenant", "feature", "model"):
        if name in fixed:
            continue
        values = [v for v in dimension_values(filters=_without(filters, name), dimension=name) if v and filterable(v)]
        current = getattr(state, name)
        if current and current not in values:
            values.append(current)
        menus.append({"name": name, "label": name.capitalize(), "values": values, "current": current})
    return menus


def _without(filters: Filters, dimension: str) -> Filters:
    """The filters without their own choice for ``dimension``, so its menu lists every value."""
    return replace(filters, **{PLURAL[dimension]: ()})


def _csv(request: HttpRequest, tables: dict[str, Callable[[], Table]]) -> HttpResponse | None:
    """The requested table as CSV, a 400 naming the tables there are, or None for a page request."""
    if request.GET.get("format") != "csv":
        return None
    name = request.GET.get("table") or next(iter(tables))
    if name not in tables:
        return HttpResponseBadRequest(f"No table {name[:40]!r} here; export one of: {', '.join(tables)}.",
                                      content_type="text/plain; charset=utf-8")
    return csv_response(tables[name]())


def _csv_urls(request: HttpRequest, state: FilterState, names: list[str], **extra: str) -> dict[str, str]:
    return {name: _path(request) + state.query(format="csv", table=name, **extra) for name in names}


def _request_charts(state: FilterState, overview: page_data.Overview, *, fixed: dict[str, str], split: Dimension,
                    with_queue_depth: bool = False) -> list[charts.Chart]:
    total, by = page_data.series(state=state, fixed=fixed, split=split)
    regressions = page_data.regressions_marked(state=state, fixed=fixed)
    result = [
        charts.spend_by(by, dimension=split, step=state.step),
        charts.task_costs(page_data.task_points(state=state, fixed=fixed), step=state.step, regressions=regressions),
        charts.tokens_per_request(total, regressions=regressions),
        charts.tokens_per_second(total, step=state.step),
        charts.latency(overview.latency.points),
        charts.time_to_first_token(overview.ttft.points),
    ]
    if with_queue_depth:
        history = runtime_history(start=state.start, end=state.end, step=state.step)
        result.append(charts.queue_depth(history, span=(state.start, state.end)))
    result += [
        charts.queue_wait(total),
        charts.cache_hit_rate(total),
        charts.rejections_by_reason(total, step=state.step),
    ]
    return result


@login_required
@require_GET
@_one_tail_read
def overview(request: HttpRequest) -> HttpResponse:
    state = filter_state_parse(request.GET)
    overview = page_data.overview(state=state)
    return _render(request, "dashboards/overview.html", {
        "nav": "overview",
        "overview": overview,
        "semantic_policies": semantic_policies_in_force(),
        "charts": _request_charts(state, overview, fixed={}, split="feature", with_queue_depth=True),
        "focus_url": reverse("dashboards:focus") + state.query(),
    }, state=state)


@login_required
@require_GET
def focus_export(request: HttpRequest) -> HttpResponse:
    """The filter bar's range, widened to whole UTC days, as FOCUS CSV (``telemetry.focus``)."""
    state = filter_state_parse(request.GET)
    last = (state.end.astimezone(dt.UTC) - dt.timedelta(microseconds=1)).date()
    try:
        start, end = focus_days(first=state.start.astimezone(dt.UTC).date(), last=last)
    except FocusRangeRefused as exc:
        return HttpResponseBadRequest(f"Cannot export this range: {exc}.", content_type="text/plain; charset=utf-8")
    return csv_response(focus_table(start=start, end=end))


@login_required
@require_GET
@_one_tail_read
def breakdown(request: HttpRequest, dimension: Dimension) -> HttpResponse:
    state = filter_state_parse(request.GET)
    sort = request.GET.get("sort") or page_data.DEFAULT_SORT
    problems = []
    if sort.lstrip("-") not in page_data.SORT_KEYS:
        problems.append(f"Cannot sort by {sort[:40]!r}; sorted by list cost instead.")
        sort = page_data.DEFAULT_SORT
    table = page_data.breakdown(state=state, dimension=dimension, sort=sort)
    rows = table.rows
    stem = f"{PLURAL[dimension]}-{state.start:%Y%m%dT%H%M}-{state.end:%Y%m%dT%H%M}"
    csv = _csv(request, {PLURAL[dimension]: lambda: exports.breakdown_table(rows, dimension=dimension, stem=stem)})
    if csv is not None:
        return csv
    columns = []
    for key, label in SORT_COLUMNS:
        # A second click on the sorted column flips its order.
        target = f"-{key}" if sort == key else key
        columns.append({"key": key, "label": label or dimension.capitalize(), "active": sort.lstrip("-") == key,
                        "descending": not sort.startswith("-"), "url": _path(request) + state.query(sort=target)})
    return _render(request, "dashboards/breakdown.html", {
        "nav": PLURAL[dimension], "dimension": dimension, "title": PLURAL[dimension].capitalize(),
        "charts": [charts.spend_by(table.series, dimension=dimension, step=state.step),
                   *([charts.fairness(tenant_fairness(start=state.start, end=state.end, step=state.step))]
                     if dimension == "tenant" else [])],
        "rows": [{"item": row, "tasks": row.tasks, "spark": charts.sparkline(row.spark),
                  "url": detail_url(dimension=dimension, name=row.row.value)} for row in rows],
        "columns": columns, "sort": sort if sort != page_data.DEFAULT_SORT else "",
        "csv": _csv_urls(request, state, [PLURAL[dimension]]),
    }, state=state, problems=problems)


@login_required
@require_GET
@_one_tail_read
def detail(request: HttpRequest, dimension: Dimension, value: str) -> HttpResponse:
    if "\x00" in value:  # no query carries a NUL to PostgreSQL, and no page links a name with one
        raise Http404(f"No {dimension} has a NUL in its name.")
    state = filter_state_parse(request.GET)
    fixed = {dimension: value}
    filters = state.filters(**fixed)
    stem = f"{dimension}-{value}"
    csv = _csv(request, {
        "end-users": lambda: exports.end_users_table(top_end_users(filters=filters)[0],
                                                     stem=f"{stem}-end-users"),
        "budgets": lambda: budgets_table(page_data.budgets_for(dimension=dimension, value=value),
                                                 stem=f"{stem}-budgets"),
    })
    if csv is not None:
        return csv
    csv_urls = _csv_urls(request, state, ["end-users", "budgets"])
    if request.GET.get("part") == "end-users":
        users, users_from = top_end_users(filters=filters)
        return render(request, "dashboards/detail.html#end_users", {
            "state": state, "end_users": users, "end_users_from": users_from, "csv": csv_urls})
    overview = page_data.overview(state=state, fixed=fixed)
    return _render(request, "dashboards/detail.html", {
        "nav": PLURAL[dimension], "dimension": dimension, "value": value,
        "list_name": f"dashboards:{PLURAL[dimension]}", "plural": PLURAL[dimension],
        "overview": overview,
        "semantic_policies": semantic_policies_in_force(**({dimension: value} if dimension != "model" else {})),
        "charts": _request_charts(state, overview, fixed=fixed, split=SPLIT[dimension]),
        "end_users_url": _path(request) + state.query(part="end-users"),
        "budgets": page_data.budgets_for(dimension=dimension, value=value),
        "can_edit": can_edit_budgets(request.user),
        "csv": csv_urls,
    }, state=state, fixed=fixed)


@login_required
@require_GET
@_one_tail_read
def gpus(request: HttpRequest) -> HttpResponse:
    state = filter_state_parse(request.GET)
    gauges = runtime_gauges(start=state.start, end=state.end)
    rulesets = {s.name: s for s in runtime_ruleset_states()}
    completeness = event_completeness()
    breakers = breaker_states(runtime_ids=[g.runtime_id for g in gauges])
    stem = f"{state.start:%Y%m%dT%H%M}-{state.end:%Y%m%dT%H%M}"
    # Paid device time is counted in sampled minutes (minute rollups and raw samples, kept for
    # MINUTE_ROLLUP_RETENTION_DAYS and SAMPLE_RETENTION_DAYS): before that it is not known.
    sample_days = min(settings.SAMPLE_RETENTION_DAYS, settings.MINUTE_ROLLUP_RETENTION_DAYS)
    kept_from = (timezone.now() - dt.timedelta(days=sample_days)).replace(minute=0, second=0, microsecond=0)
    idle_from = max(state.start, kept_from + dt.timedelta(hours=1))
    idle = idle_capacity(start=idle_from, end=state.end) if idle_from < state.end else []
    by_model = usage_by(filters=state.filters(), dimension="model")
    csv = _csv(request, {
        "runtimes": lambda: exports.runtimes_table(gauges, rulesets, completeness, breakers,
                                                   stem=f"runtimes-{stem}"),
        "devices": lambda: exports.devices_table(gauges, stem=f"devices-{stem}"),
        "idle": lambda: exports.idle_table(idle, stem=f"idle-capacity-{stem}"),
        "energy": lambda: exports.breakdown_table([page_data.BreakdownRow(r, []) for r in by_model],
                                                  dimension="model", stem=f"energy-by-model-{stem}"),
    })
    if csv is not None:
        return csv
    history = runtime_history(start=state.start, end=state.end, step=state.step)
    span = (state.start, state.end)
    runtimes = [{"gauge": g, "ruleset": rulesets.get(g.runtime_id), "events": completeness.get(g.runtime_id),
                 "breakers": breakers.get(g.runtime_id, [])} for g in gauges]
    return _render(request, "dashboards/gpus.html", {
        "nav": "gpus", "runtimes": runtimes, "devices": [d for g in gauges for d in g.devices],
        "idle": idle, "idle_from": idle_from if idle_from > state.start else None,
        "sample_days": sample_days, "by_model": by_model,
        "power_changes": power_limit_changes(start=state.start, end=state.end),
        "power_window_minutes": int(POWER_WINDOW.total_seconds() // 60),
        "totals": usage_totals(filters=state.filters()),
        "gpu_util": page_data.gpu_utilisation(gauges),
        "charts": [charts.gpu_utilisation(history, span=span), charts.gpu_memory(gauges),
                   charts.gpu_power(history, span=span), charts.queue_depth(history, span=span)],
        "csv": _csv_urls(request, state, ["runtimes", "devices", "idle", "energy"]),
    }, state=state)
