"""Budgets in the admin. Budgets are edited here with the same validation as the pages; events and
grants are records of what happened, so they are read-only (failed or interrupted alerts can be
queued again)."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from finops.budgets.alerts import alerts_requeue
from finops.budgets.models import Budget, BudgetEvent, Grant
from finops.budgets.services import FIXED_AFTER_CREATE


@admin.register(Budget)
class BudgetAdmin(admin.ModelAdmin):
    list_display = ("name", "tenant", "feature", "period", "unit", "limit", "enforcement", "action", "state", "spend",
                    "paused", "evaluated_at")
    list_filter = ("state", "period", "unit", "enforcement", "action", "paused")
    search_fields = ("name", "tenant", "feature")
    readonly_fields = ("state", "period_start", "spend", "evaluated_at", "created_at", "updated_at")

    def get_readonly_fields(self, request: HttpRequest, obj: Budget | None = None) -> tuple[str, ...]:
        # What a budget measures is fixed once it exists, as on the budget pages.
        return (*FIXED_AFTER_CREATE, *self.readonly_fields) if obj else self.readonly_fields


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(BudgetEvent)
class BudgetEventAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "budget", "kind", "threshold", "from_state", "to_state", "spend", "alert_status",
                    "attempts", "sent_at")
    list_filter = ("kind", "alert_status")
    list_select_related = ("budget",)
    search_fields = ("budget__name",)
    actions = ["requeue"]

    @admin.action(description="Queue the selected failed or interrupted alerts again")
    def requeue(self, request: HttpRequest, queryset: QuerySet[BudgetEvent]) -> None:
        count = alerts_requeue(events=queryset)
        self.message_user(request, f"Queued {count} alert(s) again.", messages.SUCCESS)


@admin.register(Grant)
class GrantAdmin(ReadOnlyAdmin):
    list_display = ("budget", "runtime", "period_start", "granted", "reported", "last_chunk",
                    "expires_at")
    list_filter = ("runtime",)
    list_select_related = ("budget", "runtime")
    search_fields = ("budget__name", "runtime__name")
