"""Semantic cache policies in the admin: enable the cache for a feature (optionally one tenant) with
a threshold and a TTL, and flush a feature's stored answers."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from finops.caching.models import SemanticCachePolicy
from finops.caching.services import semantic_policies_flush


@admin.register(SemanticCachePolicy)
class SemanticCachePolicyAdmin(admin.ModelAdmin):
    list_display = ("feature", "tenant", "threshold", "ttl_seconds", "enabled", "flushed_at", "updated_at")
    list_filter = ("enabled",)
    search_fields = ("feature", "tenant")
    readonly_fields = ("flushed_at", "updated_at")
    actions = ("flush",)

    @admin.action(description="Flush the stored answers of the selected policies")
    def flush(self, request: HttpRequest, queryset: QuerySet[SemanticCachePolicy]) -> None:
        count = semantic_policies_flush(policies=queryset)
        self.message_user(request, f"Flushed {count} semantic cache polic{'y' if count == 1 else 'ies'}: runtimes "
                          "stop serving their stored answers with their next ruleset.", messages.SUCCESS)
