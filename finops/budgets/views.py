"""Budget pages. Every logged-in user reads; budget admins create, edit, pause and delete (403 for
anyone else). Forms post with htmx and come back as their own fragment (``#form``) with errors
inline, or as a client redirect when saved; without htmx the same views work as plain forms."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HttpResponseClientRedirect

from finops.budgets.exports import alerts_table, budgets_table
from finops.budgets.forms import BudgetForm
from finops.budgets.models import Budget
from finops.budgets.permissions import budget_admin_required, can_edit_budgets
from finops.budgets.selectors import (
    budget_alert_log,
    budget_grants,
    budget_page,
    budget_state_history,
    budget_status,
    budget_statuses,
)
from finops.budgets.services import budget_create, budget_delete, budget_pause, budget_update
from finops.lib.tables import csv_response
from finops.lib.timezones import org_time_zone
from finops.runtimes.selectors import runtime_ruleset_states


def _render(request: HttpRequest, template: str, context: dict) -> HttpResponse:
    """Times on the pages are the organisation's, like its budget periods."""
    with timezone.override(org_time_zone()):
        return render(request, template, context)


def _go(request: HttpRequest, url: str) -> HttpResponse:
    return HttpResponseClientRedirect(url) if request.htmx else redirect(url)


@login_required
@require_GET
def budget_list(request: HttpRequest) -> HttpResponse:
    if request.GET.get("format") == "csv":  # the dashboards' CSV export: ?format=csv&table=budgets|alerts
        if request.GET.get("table") == "alerts":
            return csv_response(alerts_table(budget_alert_log(limit=1000), stem="budget-alerts"))
        return csv_response(budgets_table(budget_statuses(), stem="budgets"))
    listing = budget_page(search=request.GET.get("q", ""), order=request.GET.get("sort", ""),
                          page=request.GET.get("page", 1))
    context = {"listing": listing, "can_edit": can_edit_budgets(request.user)}
    if request.htmx and request.htmx.target == "budget-table":  # a search, a sort or another page
        return _render(request, "budgets/budget_list.html#budget-table", context)
    return _render(request, "budgets/budget_list.html", {
        **context, "alerts": budget_alert_log(limit=20), "runtimes": runtime_ruleset_states(),
    })


@login_required
@require_GET
def budget_detail(request: HttpRequest, pk: int) -> HttpResponse:
    budget = get_object_or_404(Budget, pk=pk)
    status = budget_status(budget=budget)
    return _render(request, "budgets/budget_detail.html", {
        "status": status, "budget": budget, "can_edit": can_edit_budgets(request.user),
        "history": budget_state_history(budget=budget), "alerts": budget_alert_log(budget=budget),
        "grants": budget_grants(budget=budget, period=status.period) if budget.is_hard else None,
    })


def _form_response(request: HttpRequest, form: BudgetForm, budget: Budget | None) -> HttpResponse:
    template = "budgets/budget_form.html#form" if request.htmx else "budgets/budget_form.html"
    return _render(request, template, {"form": form, "budget": budget})


def _save(form: BudgetForm, budget: Budget | None) -> Budget | None:
    """The service's verdict on a valid form: the budget, or None with its errors on the form."""
    try:
        if budget is None:
            return budget_create(fields=form.cleaned_data)
        return budget_update(budget=budget, fields=form.cleaned_data)
    except ValidationError as exc:
        form.add_error(None, exc)
        return None


@budget_admin_required
@require_http_methods(["GET", "POST"])
def budget_new(request: HttpRequest) -> HttpResponse:
    form = BudgetForm(request.POST if request.method == "POST" else None)
    if request.method == "POST" and form.is_valid() and (budget := _save(form, None)):
        return _go(request, budget.get_absolute_url())
    return _form_response(request, form, None)


@budget_admin_required
@require_http_methods(["GET", "POST"])
def budget_edit(request: HttpRequest, pk: int) -> HttpResponse:
    budget = get_object_or_404(Budget, pk=pk)
    form = BudgetForm(request.POST if request.method == "POST" else None, instance=budget)
    if request.method == "POST" and form.is_valid() and (saved := _save(form, budget)):
        return _go(request, saved.get_absolute_url())
    return _form_response(request, form, budget)


@budget_admin_required
@require_POST
def budget_pause_toggle(request: HttpRequest, pk: int) -> HttpResponse:
    budget = get_object_or_404(Budget, pk=pk)
    wanted = request.POST.get("paused")
    if wanted not in ("0", "1"):
        return HttpResponseBadRequest("'paused' must be 1 (pause) or 0 (resume).")
    budget_pause(budget=budget, paused=wanted == "1")
    if request.htmx:
        return _render(request, "budgets/budget_list.html#budget-row",
                      {"status": budget_status(budget=budget), "can_edit": True})
    return redirect(budget.get_absolute_url())


@budget_admin_required
@require_POST
def budget_remove(request: HttpRequest, pk: int) -> HttpResponse:
    budget_delete(budget=get_object_or_404(Budget, pk=pk))
    return _go(request, reverse("budgets:list"))
