"""Telemetry in the admin: everything is read-only, because every row here is either what a runtime
measured or what the rollups derived from it; an edit would make the two disagree."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from finops.telemetry import sketch
from finops.telemetry.models import (
    STATUS_CLASSES,
    ClientTask,
    Device,
    DeviceRollup,
    DeviceSample,
    DeviceUseRollup,
    FillState,
    Granularity,
    MarginalRollup,
    RequestEvent,
    Rollup,
    RollupQuarantine,
    RuntimeEventCount,
    RuntimeRollup,
    RuntimeSample,
)


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class RolledUpValueFilter(admin.SimpleListFilter):
    """Filter raw events by a value, offering the values the day rollups have seen: a DISTINCT over
    the few marginal rows of that dimension instead of over every raw event (the admin's default
    for a text field)."""

    rollup_field = ""
    event_field = ""

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        values = (MarginalRollup.objects.filter(granularity=Granularity.DAY, dimension=self.rollup_field)
                  .order_by("value").values_list("value", flat=True).distinct())
        return [(value, value or "(none)") for value in values]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value is None:
            return queryset
        if value == "" and self.event_field == "model_served":
            return queryset.filter(model_served__isnull=True)
        return queryset.filter(**{self.event_field: value})


class TenantFilter(RolledUpValueFilter):
    title, parameter_name, rollup_field, event_field = "tenant", "tenant", "tenant", "tenant"


class FeatureFilter(RolledUpValueFilter):
    title, parameter_name, rollup_field, event_field = "feature", "feature", "feature", "feature"


class ModelFilter(RolledUpValueFilter):
    title, parameter_name, rollup_field, event_field = "model served", "model", "model", "model_served"


class StatusFilter(admin.SimpleListFilter):
    title, parameter_name = "status", "status"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(status, status) for status in STATUS_CLASSES]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset.filter(status=self.value()) if self.value() else queryset


@admin.register(RequestEvent)
class RequestEventAdmin(ReadOnlyAdmin):
    list_display = ("started_at", "tenant", "feature", "model_served", "status", "prompt_tokens",
                    "completion_tokens", "e2e_ms", "list_cost", "hardware_cost", "runtime_id")
    list_filter = ("status_class", StatusFilter, TenantFilter, FeatureFilter, ModelFilter)
    search_fields = ("tenant", "feature", "model_served", "status", "end_user")
    date_hierarchy = "started_at"
    ordering = ("-started_at",)
    show_full_result_count = False  # a COUNT(*) over every raw partition on each page is not worth it


@admin.register(Rollup)
class RollupAdmin(ReadOnlyAdmin):
    list_display = ("granularity", "bucket", "tenant", "feature", "model", "status_class", "requests",
                    "prompt_tokens", "completion_tokens", "list_cost", "hardware_cost", "unpriced", "e2e_p50_p99")
    list_filter = ("granularity", "status_class", "tenant", "feature", "model")
    search_fields = ("tenant", "feature", "model")
    date_hierarchy = "bucket"
    ordering = ("-bucket", "granularity")

    @admin.display(description="e2e p50 / p99 (ms)")
    def e2e_p50_p99(self, row: Rollup | MarginalRollup) -> str:
        p50, p99 = sketch.quantile(row.e2e_hist, 0.5), sketch.quantile(row.e2e_hist, 0.99)
        return "n/a" if p50 is None or p99 is None else f"{p50:.1f} / {p99:.1f}"


@admin.register(MarginalRollup)
class MarginalRollupAdmin(RollupAdmin):
    list_display = ("granularity", "bucket", "dimension", "value", "status_class", "requests", "prompt_tokens",
                    "completion_tokens", "list_cost", "hardware_cost", "unpriced", "e2e_p50_p99")
    list_filter = ("granularity", "dimension", "status_class")
    search_fields = ("value",)


@admin.register(ClientTask)
class ClientTaskAdmin(ReadOnlyAdmin):
    """Tasks as the rollup run has counted them: each one's attempts, outcome and cost in all."""

    list_display = ("first_started_at", "tenant", "task_id", "feature", "model", "attempts", "requests", "succeeded",
                    "list_cost", "hardware_cost")
    list_filter = ("succeeded", "tenant", "feature", "model")
    search_fields = ("task_id", "tenant", "feature")
    date_hierarchy = "first_started_at"
    ordering = ("-first_started_at",)
    show_full_result_count = False


@admin.register(FillState)
class FillStateAdmin(ReadOnlyAdmin):
    """Moving a watermark by hand would count events twice or never: the rollups alone move it."""

    list_display = ("name", "watermark", "updated_at")


@admin.register(RuntimeSample)
class RuntimeSampleAdmin(ReadOnlyAdmin):
    list_display = ("runtime_id", "at", "queue_depth", "running", "tokens_per_s", "kv_cache_used", "breakers")
    list_filter = ("runtime_id",)
    date_hierarchy = "at"
    ordering = ("-at",)


@admin.register(DeviceSample)
class DeviceSampleAdmin(ReadOnlyAdmin):
    list_display = ("runtime_id", "device", "name", "at", "gpu_util", "mem_used", "power_w", "temperature_c")
    list_filter = ("runtime_id", "name")
    search_fields = ("device", "name")
    date_hierarchy = "at"
    ordering = ("-at",)


@admin.register(RuntimeRollup)
class RuntimeRollupAdmin(ReadOnlyAdmin):
    list_display = ("granularity", "bucket", "runtime_id", "samples", "queue_depth_avg", "queue_depth_max",
                    "tokens_per_s_avg")
    list_filter = ("granularity", "runtime_id")
    date_hierarchy = "bucket"
    ordering = ("-bucket", "granularity")

    @admin.display(description="queue depth avg")
    def queue_depth_avg(self, row: RuntimeRollup) -> str:
        return f"{row.queue_depth_sum / row.samples:.2f}" if row.samples else "n/a"

    @admin.display(description="tokens/s avg")
    def tokens_per_s_avg(self, row: RuntimeRollup) -> str:
        return f"{row.tokens_per_s_sum / row.samples:.1f}" if row.samples else "n/a"


@admin.register(DeviceUseRollup)
class DeviceUseRollupAdmin(ReadOnlyAdmin):
    list_display = ("granularity", "bucket", "runtime_id", "device", "requests", "gpu_seconds")
    list_filter = ("granularity", "runtime_id")
    search_fields = ("device",)
    date_hierarchy = "bucket"
    ordering = ("-bucket", "granularity")


@admin.register(DeviceRollup)
class DeviceRollupAdmin(ReadOnlyAdmin):
    list_display = ("granularity", "bucket", "runtime_id", "device", "name", "samples", "gpu_util_avg",
                    "power_avg_w", "energy")
    list_filter = ("granularity", "runtime_id", "name")
    search_fields = ("device", "name")
    date_hierarchy = "bucket"
    ordering = ("-bucket", "granularity")

    @admin.display(description="GPU util avg")
    def gpu_util_avg(self, row: DeviceRollup) -> str:
        return f"{row.gpu_util_sum / row.gpu_util_count:.1f}" if row.gpu_util_count else "n/a"

    @admin.display(description="power avg (W)")
    def power_avg_w(self, row: DeviceRollup) -> str:
        return f"{row.power_w_sum / row.power_w_count:.1f}" if row.power_w_count else "n/a"

    @admin.display(description="energy (J)")
    def energy(self, row: DeviceRollup) -> str:
        return f"{row.energy_joules:.0f}" if row.energy_count else "n/a"


@admin.register(Device)
class DeviceAdmin(ReadOnlyAdmin):
    list_display = ("runtime_id", "uuid", "name", "last_seen_at")
    list_filter = ("name", "runtime_id")
    search_fields = ("uuid", "name")


@admin.register(RuntimeEventCount)
class RuntimeEventCountAdmin(ReadOnlyAdmin):
    """Counted by ingest as it stores events; the GPUs page shows recorded / stored / missing."""

    list_display = ("runtime_id", "recorded", "stored", "highest_stored", "updated_at")
    search_fields = ("runtime_id",)


@admin.register(RollupQuarantine)
class RollupQuarantineAdmin(ReadOnlyAdmin):
    """What rollup runs left out instead of stopping; each row is logged when written."""

    list_display = ("created_at", "stat", "source", "count", "reason")
    list_filter = ("stat", "source")
    ordering = ("-created_at",)
