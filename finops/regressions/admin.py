from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from finops.regressions.models import CostRegression
from finops.regressions.services import regression_acknowledge


@admin.register(CostRegression)
class CostRegressionAdmin(admin.ModelAdmin):
    list_display = ["feature", "model", "metric", "started_at", "before", "after", "detected_at", "alert_status",
                    "acknowledged_at", "acknowledged_by"]
    list_filter = ["metric", "alert_status", ("acknowledged_at", admin.EmptyFieldListFilter)]
    search_fields = ["feature", "model"]
    actions = ["acknowledge"]
    readonly_fields = [f.name for f in CostRegression._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # detection writes them

    @admin.action(description="Acknowledge the selected regressions")
    def acknowledge(self, request: HttpRequest, queryset: QuerySet[CostRegression]) -> None:
        for regression in queryset:
            regression_acknowledge(regression=regression, user=request.user)
        self.message_user(request, f"{queryset.count()} acknowledged.", messages.SUCCESS)
