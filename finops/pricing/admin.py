"""Price books in the admin: a book and its model and device rows on one page, and the one explicit
way to move past costs, the re-price action."""

from __future__ import annotations

import datetime as dt

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from finops.pricing.models import DevicePrice, ModelPrice, PriceBook
from finops.pricing.repricing import RepricingRefused, reprice_range
from finops.telemetry.retention import raw_retention_start


class ModelPriceInline(admin.TabularInline):
    model = ModelPrice
    extra = 1


class DevicePriceInline(admin.TabularInline):
    model = DevicePrice
    extra = 1


@admin.register(PriceBook)
class PriceBookAdmin(admin.ModelAdmin):
    list_display = ("name", "effective_from", "created_at")
    search_fields = ("name", "note")
    date_hierarchy = "effective_from"
    inlines = [ModelPriceInline, DevicePriceInline]
    # Events are priced once, on arrival, under the book in force when they started: saving a book
    # moves no past cost until its period is re-priced with this action.
    actions = ["reprice_period"]

    @admin.action(description="Re-price the raw events in these books' periods (within raw retention)")
    def reprice_period(self, request: HttpRequest, queryset: QuerySet[PriceBook]) -> None:
        now = timezone.now()
        starts = sorted(PriceBook.objects.values_list("effective_from", flat=True))
        for book in queryset.order_by("effective_from"):
            later = [moment for moment in starts if moment > book.effective_from]
            start = max(book.effective_from, raw_retention_start(now))
            end = later[0] if later else now + dt.timedelta(days=1)  # runtimes' clocks may run a little ahead
            if start >= end:
                self.message_user(request, f"{book}: its period is past raw retention; nothing re-priced",
                                  messages.WARNING)
                continue
            try:
                changed = reprice_range(start=start, end=end, now=now)
            except RepricingRefused as exc:
                self.message_user(request, f"{book}: {exc}", messages.ERROR)
            else:
                self.message_user(request, f"{book}: {changed} events re-priced from {start:%Y-%m-%d %H:%M} UTC")


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    list_display = ("book", "model", "prompt_per_1m", "completion_per_1m")
    list_filter = ("book",)
    search_fields = ("model",)


@admin.register(DevicePrice)
class DevicePriceAdmin(admin.ModelAdmin):
    list_display = ("book", "device_type", "per_gpu_hour", "per_kwh")
    list_filter = ("book",)
    search_fields = ("device_type",)
