"""Admin for the runtime registry and the concurrency caps its rulesets carry. Tokens are shown by
prefix only: the plain token exists once, in the output of ``manage.py register_runtime``, so the
admin can revoke tokens but never issue them."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest

from finops.runtimes.models import ConcurrencyCap, PowerCap, Ruleset, Runtime, RuntimeToken
from finops.runtimes.services import runtime_token_revoke, runtime_url_validate

TOKEN_FIELDS = ("prefix", "created_at", "last_used_at", "revoked_at")


class RuntimeTokenInline(admin.TabularInline):
    model = RuntimeToken
    fields = TOKEN_FIELDS
    readonly_fields = TOKEN_FIELDS
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Runtime | None = None) -> bool:
        return False


class RuntimeForm(forms.ModelForm):
    """Edits ``base_url`` with the registry's own check: the model's URLField would refuse the bare
    host names runtimes are usually reached by (``http://gpu-1:8080``)."""

    url = forms.CharField(label="Base URL", max_length=200, validators=[runtime_url_validate],
                          help_text=Runtime._meta.get_field("base_url").help_text)

    class Meta:
        model = Runtime
        fields: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            self.fields["url"].initial = self.instance.base_url

    def save(self, commit: bool = True) -> Runtime:
        self.instance.base_url = self.cleaned_data["url"]
        return super().save(commit=commit)


@admin.register(Runtime)
class RuntimeAdmin(admin.ModelAdmin):
    form = RuntimeForm
    list_display = ("name", "base_url", "active_tokens", "last_seen_at", "last_ruleset_ack", "created_at")
    search_fields = ("name", "base_url")
    readonly_fields = ("name", "created_at", "last_seen_at", "last_ruleset_ack")
    inlines = [RuntimeTokenInline]
    actions = ["revoke_all_tokens"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Runtime]:
        return super().get_queryset(request).annotate(
            _active_tokens=Count("tokens", filter=Q(tokens__revoked_at__isnull=True))
        )

    @admin.display(description="active tokens", ordering="_active_tokens")
    def active_tokens(self, runtime: Runtime) -> int:
        return runtime._active_tokens  # type: ignore[attr-defined]

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Registering issues a token that must be shown exactly once: `manage.py register_runtime`.
        return False

    @admin.action(description="Revoke every token of the selected runtimes")
    def revoke_all_tokens(self, request: HttpRequest, queryset: QuerySet[Runtime]) -> None:
        tokens = RuntimeToken.objects.filter(runtime__in=queryset, revoked_at__isnull=True)
        revoked = 0
        for token in tokens:
            runtime_token_revoke(token=token)
            revoked += 1
        self.message_user(request, f"Revoked {revoked} token(s).", messages.SUCCESS)


@admin.register(RuntimeToken)
class RuntimeTokenAdmin(admin.ModelAdmin):
    list_display = ("runtime", "prefix", "created_at", "last_used_at", "revoked_at")
    list_filter = (("revoked_at", admin.EmptyFieldListFilter), "runtime")
    list_select_related = ("runtime",)
    fields = ("runtime", *TOKEN_FIELDS)
    readonly_fields = ("runtime", *TOKEN_FIELDS)
    actions = ["revoke"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description="Revoke the selected tokens")
    def revoke(self, request: HttpRequest, queryset: QuerySet[RuntimeToken]) -> None:
        revoked = 0
        for token in queryset.filter(revoked_at__isnull=True):
            runtime_token_revoke(token=token)
            revoked += 1
        self.message_user(request, f"Revoked {revoked} token(s).", messages.SUCCESS)


@admin.register(Ruleset)
class RulesetAdmin(admin.ModelAdmin):
    """Compiled documents are the budgets' output: read them here, change the budgets instead."""

    list_display = ("runtime", "version", "acknowledged", "issued_at", "last_push_at", "last_push_outcome")
    list_select_related = ("runtime",)
    readonly_fields = ("runtime", "version", "digest", "document", "issued_at", "push_started_at", "last_push_at",
                       "last_push_version", "last_push_outcome")

    @admin.display(description="acknowledged")
    def acknowledged(self, ruleset: Ruleset) -> int | None:
        return ruleset.runtime.last_ruleset_ack

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Ruleset | None = None) -> bool:
        return False


@admin.register(PowerCap)
class PowerCapAdmin(admin.ModelAdmin):
    """Power caps reach the runtimes with the next evaluation pass's rulesets (docs/RULESET.md)."""

    list_display = ("name", "runtime", "device_type", "device", "watts", "starts_at", "ends_at", "enabled")
    list_filter = ("enabled", "runtime")
    list_select_related = ("runtime",)
    search_fields = ("name", "device_type", "device")
@admin.register(ConcurrencyCap)
class ConcurrencyCapAdmin(admin.ModelAdmin):
    """Caps reach the runtimes with the next ruleset compilation (the budget evaluation pass)."""

    list_display = ("tenant", "feature", "model", "max_running", "max_queued", "note", "updated_at")
    search_fields = ("tenant", "feature", "note")
    fields = ("tenant", "feature", "model", "max_running", "max_queued", "note")
