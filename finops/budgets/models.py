"""Budgets, the log of what happened to them, and the allowances granted to runtimes for hard ones.

A ``Budget`` limits what one scope (a tenant, a feature, or both; ``*`` for any) may spend in a
period of the organisation's time zone. Its evaluation (``services.budgets_evaluate``) keeps the
last-seen state on the row and writes every state change, threshold crossing and forecast as a
``BudgetEvent``; alert emails are sent from those rows, never from the code that noticed the change.
A hard budget's limit is split into ``Grant`` rows, one per (budget, period, runtime), that only
grow and never add up to more than the limit (docs/RULESET.md, "allowances").
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Decimal

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator, validate_email
from django.db import models
from django.db.models import Q
from django.urls import reverse

from finops.budgets.periods import DAILY, MONTHLY, PERIOD_NOUNS, WEEKLY
from finops.pricing.models import COST
from finops.runtimes.models import Runtime

ANY = "*"
# What the runtime accepts as a tenant name (inference.config); features are held to the same.
SCOPE_VALUE = re.compile(r"^(\*|[A-Za-z0-9_\-.]{1,100})$")
DEFAULT_THRESHOLDS = (50, 80, 100)
MAX_THRESHOLD = 1000
LIMIT = {"max_digits": 24, "decimal_places": 6}


def default_thresholds() -> list[int]:
    return list(DEFAULT_THRESHOLDS)


def scope_value_validate(value: str) -> None:
    if not SCOPE_VALUE.match(value or ""):
        raise ValidationError("Use '*' for any, or 1-100 letters, digits, '_', '-' or '.'.", code="invalid_scope")


def thresholds_validate(value: object) -> None:
    if not isinstance(value, list) or not value:
        raise ValidationError("Give at least one threshold.", code="invalid_thresholds")
    if any(isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= MAX_THRESHOLD for t in value):
        raise ValidationError(f"Each threshold is a whole percentage from 1 to {MAX_THRESHOLD}.",
                              code="invalid_thresholds")
    if sorted(set(value)) != value:
        raise ValidationError("Thresholds must be distinct and in increasing order.", code="invalid_thresholds")


def recipients_validate(value: object) -> None:
    if not isinstance(value, list) or any(not isinstance(v, str) for v in value):
        raise ValidationError("Recipients must be a list of email addresses.", code="invalid_recipients")
    for address in value:
        validate_email(address)


def amount_label(unit: str, value: Decimal) -> str:
    """An amount in a budget's unit as people read it: $12.04, $0.0042, 125,000 tokens, 3.25 GPU-hours."""
    if unit in (Unit.USD_LIST, Unit.USD_HARDWARE):
        places = Decimal("0.01") if abs(value) >= 1 or value == 0 else Decimal("0.0001")
        return f"${value.quantize(places, ROUND_HALF_UP):,}"
    if unit == Unit.TOKENS:
        return f"{int(value):,} tokens"
    return f"{value.quantize(Decimal('0.01'), ROUND_HALF_UP):,} GPU-hours"


class Period(models.TextChoices):
    DAILY = DAILY, "Daily"
    WEEKLY = WEEKLY, "Weekly (from Monday)"
    MONTHLY = MONTHLY, "Monthly"


class Unit(models.TextChoices):
    USD_LIST = "usd_list", "USD at list price"
    USD_HARDWARE = "usd_hardware", "USD of hardware cost"
    TOKENS = "tokens", "Tokens (prompt + completion)"
    GPU_HOURS = "gpu_hours", "GPU-hours"


# Units a runtime can reserve exactly before a request runs (prompt + max_tokens, priced).
HARD_UNITS = (Unit.USD_LIST, Unit.TOKENS)


class Action(models.TextChoices):
    ALERT_ONLY = "alert_only", "Alert only"
    THROTTLE = "throttle", "Throttle"
    DOWNGRADE = "downgrade", "Downgrade to a cheaper model"
    BLOCK = "block", "Block"


class Enforcement(models.TextChoices):
    SOFT = "soft", "Soft: act once the spend reported so far reaches the limit"
    HARD = "hard", "Hard: runtimes reserve each request against an allowance; cannot be overspent"


class OnExpiry(models.TextChoices):
    CLOSED = "closed", "Closed: refuse matching requests"
    OPEN = "open", "Open: serve matching requests unchecked"


class State(models.TextChoices):
    OK = "ok", "OK"
    WARNING = "warning", "Warning"
    EXCEEDED = "exceeded", "Exceeded"


class Budget(models.Model):
    name = models.CharField(max_length=200)
    tenant = models.CharField(max_length=100, default=ANY, validators=[scope_value_validate],
                              help_text="A tenant, or * for every tenant.")
    feature = models.CharField(max_length=100, default=ANY, validators=[scope_value_validate],
                               help_text="A feature, or * for every feature.")
    period = models.CharField(max_length=10, choices=Period.choices, default=Period.MONTHLY,
                              help_text="Periods start at midnight in the organisation's time zone.")
    unit = models.CharField(max_length=20, choices=Unit.choices, default=Unit.USD_LIST)
    limit = models.DecimalField(**LIMIT, validators=[MinValueValidator(Decimal("0.000001"))],
                                help_text="The most the scope may use in one period, in the unit.")
    thresholds = models.JSONField(default=default_thresholds, validators=[thresholds_validate],
                                  help_text="Percentages of the limit that send an alert, once each per period.")
    recipients = models.JSONField(default=list, blank=True, validators=[recipients_validate],
                                  help_text="Email addresses that receive the alerts.")
    action = models.CharField(max_length=20, choices=Action.choices, default=Action.ALERT_ONLY,
                              help_text="What the runtimes do once the limit is reached, until the period resets.")
    throttle_tokens_per_minute = models.PositiveIntegerField(null=True, blank=True)
    throttle_requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    downgrade_model = models.CharField(max_length=200, blank=True,
                                       help_text="The cheaper model requests are served by instead.")
    cap_max_tokens = models.PositiveIntegerField(
        null=True, blank=True,
        help_text="With throttle or downgrade: also clip each request's max_tokens to this.")
    enforcement = models.CharField(
        max_length=10, choices=Enforcement.choices, default=Enforcement.SOFT,
        help_text="A hard budget is enforced inside the runtimes: each runtime reserves a request's worst "
                  "case (prompt tokens + max_tokens, priced) against its allowance before the request runs, "
                  "so concurrent requests cannot overspend. Only USD at list price and tokens can be "
                  "reserved exactly, so only those units can be hard, and a hard budget blocks at 100%. "
                  "A soft budget acts on the spend reported so far, a few seconds behind.")
    on_expiry = models.CharField(
        max_length=10, choices=OnExpiry.choices, default=OnExpiry.CLOSED,
        help_text="Hard budgets: what a runtime does when it has not heard from the control plane for a while.")
    paused = models.BooleanField(default=False, help_text="A paused budget is not evaluated and not enforced.")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    # The last evaluation: the state of ``period_start``'s period and the spend it was based on.
    state = models.CharField(max_length=10, choices=State.choices, default=State.OK, editable=False)
    period_start = models.DateTimeField(null=True, blank=True, editable=False)
    spend = models.DecimalField(**COST, default=0, editable=False)
    evaluated_at = models.DateTimeField(null=True, blank=True, editable=False)
    # Hard budgets: the grants of period ``grants_period_start`` count the events received up to
    # ``grants_settled_through`` in their ``reported`` (one watermark for all of a budget's grants:
    # they are settled together, and moving it is one row's write, not one per runtime).
    grants_period_start = models.DateTimeField(null=True, blank=True, editable=False)
    grants_settled_through = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["name", "id"]
        constraints = [
            models.CheckConstraint(condition=Q(limit__gt=0), name="budget_limit_positive"),
            models.CheckConstraint(
                condition=Q(enforcement="soft") | Q(unit__in=[u.value for u in HARD_UNITS], action="block"),
                name="budget_hard_only_blocks_exact_units"),
        ]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return reverse("budgets:detail", args=[self.pk])

    @property
    def is_hard(self) -> bool:
        return self.enforcement == Enforcement.HARD

    @property
    def scope_label(self) -> str:
        parts = [f"tenant {self.tenant}" if self.tenant != ANY else "",
                 f"feature {self.feature}" if self.feature != ANY else ""]
        return ", ".join(p for p in parts if p) or "all traffic"

    @property
    def period_noun(self) -> str:
        return PERIOD_NOUNS[self.period]

    @property
    def specificity(self) -> int:
        """How narrow the scope is: rules for narrower scopes come first in a ruleset."""
        return (self.tenant != ANY) * 2 + (self.feature != ANY)

    def clean(self) -> None:
        errors: dict[str, list[str]] = {}
        if self.enforcement == Enforcement.HARD:
            if self.unit not in HARD_UNITS:
                errors.setdefault("enforcement", []).append(
                    "Only USD at list price and tokens can be hard: the runtime cannot know a request's "
                    "hardware cost or GPU time before it runs.")
            if self.action != Action.BLOCK:
                errors.setdefault("action", []).append(
                    "A hard budget blocks at 100% (that is what makes it hard): choose Block, or make it soft.")
        throttles = self.throttle_tokens_per_minute or self.throttle_requests_per_minute
        if self.action == Action.THROTTLE and not throttles:
            errors.setdefault("throttle_tokens_per_minute", []).append(
                "Throttling needs tokens per minute, requests per minute, or both.")
        if self.action == Action.DOWNGRADE and not self.downgrade_model.strip():
            errors.setdefault("downgrade_model", []).append("Name the model to downgrade to.")
        if self.cap_max_tokens is not None and self.action not in (Action.THROTTLE, Action.DOWNGRADE):
            errors.setdefault("cap_max_tokens", []).append("A max_tokens cap goes with throttle or downgrade.")
        for name in ("throttle_tokens_per_minute", "throttle_requests_per_minute", "cap_max_tokens"):
            if getattr(self, name) == 0:
                errors.setdefault(name, []).append("Must be at least 1 (leave it empty for none).")
        if errors:
            raise ValidationError(errors)


class EventKind(models.TextChoices):
    STATE_CHANGE = "state_change", "State change"
    THRESHOLD = "threshold", "Threshold crossed"
    FORECAST = "forecast", "Forecast breach"


class AlertStatus(models.TextChoices):
    NONE = "", "No alert"
    PENDING = "pending", "Pending"
    SENDING = "sending", "Sending"
    SENT = "sent", "Sent"
    FAILED = "failed", "Failed"
    NO_RECIPIENTS = "no_recipients", "No recipients"


class BudgetEvent(models.Model):
    """Something that happened to a budget in one period. Threshold and forecast events carry an
    alert: claimed by one sender (``alert_status`` pending → sending, with a ``claim_token`` of its
    own) before it is sent, so no two senders send it; a claim whose sender did not finish within
    the lease is claimed again (``alerts``). At most one of each per budget, period and threshold,
    by constraint."""

    budget = models.ForeignKey(Budget, on_delete=models.CASCADE, related_name="events")
    kind = models.CharField(max_length=20, choices=EventKind.choices)
    period_start = models.DateTimeField()
    threshold = models.PositiveSmallIntegerField(null=True, blank=True)
    from_state = models.CharField(max_length=10, choices=State.choices, blank=True)
    to_state = models.CharField(max_length=10, choices=State.choices, blank=True)
    spend = models.DecimalField(**COST)
    limit = models.DecimalField(**LIMIT)
    unit = models.CharField(max_length=20, choices=Unit.choices)
    forecast_at = models.DateTimeField(null=True, blank=True, help_text="When the limit is projected to be reached.")
    note = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    alert_status = models.CharField(max_length=20, choices=AlertStatus.choices, blank=True, default="")
    claimed_at = models.DateTimeField(null=True, blank=True)
    claim_token = models.UUIDField(null=True, blank=True, editable=False)
    sent_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    last_error = models.TextField(blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["budget", "period_start", "threshold"],
                                    condition=Q(kind="threshold"), name="one_alert_per_threshold_per_period"),
            models.UniqueConstraint(fields=["budget", "period_start"], condition=Q(kind="forecast"),
                                    name="one_forecast_per_period"),
        ]
        indexes = [models.Index(fields=["alert_status", "id"], name="budget_event_alert_queue")]

    @property
    def spend_label(self) -> str:
        return amount_label(self.unit, self.spend)

    def __str__(self) -> str:
        if self.kind == EventKind.THRESHOLD:
            return f"{self.budget} crossed {self.threshold}%"
        if self.kind == EventKind.FORECAST:
            return f"{self.budget} forecast to reach its limit"
        return f"{self.budget}: {self.from_state or '-'} → {self.to_state}"


class Grant(models.Model):
    """How much of a hard budget's limit one runtime may spend in one period (cumulative: only
    grows), and what the control plane has stored from that runtime for it so far.

    ``reported`` counts the runtime's events in the budget's scope and period received up to the
    budget's ``grants_settled_through`` (a ``received_at`` watermark, advanced over new events only);
    the events received since are added on read (``grants.grants_reported_many``)."""

    budget = models.ForeignKey(Budget, on_delete=models.CASCADE, related_name="grants")
    runtime = models.ForeignKey(Runtime, on_delete=models.CASCADE, related_name="budget_grants")
    period_start = models.DateTimeField()
    granted = models.DecimalField(**COST, default=0)
    reported = models.DecimalField(**COST, default=0)
    last_chunk = models.DecimalField(**COST, default=0, help_text="The size of the last top-up.")
    reported_at_last_chunk = models.DecimalField(**COST, default=0)
    expires_at = models.DateTimeField(null=True, blank=True,
                                      help_text="When the runtime falls back to the budget's on-expiry policy.")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["budget", "-period_start", "runtime"]
        constraints = [
            models.UniqueConstraint(fields=["budget", "period_start", "runtime"],
                                    name="one_grant_per_runtime_per_period"),
            models.CheckConstraint(condition=Q(granted__gte=0), name="grant_not_negative"),
        ]

    def __str__(self) -> str:
        return f"{self.budget} → {self.runtime}: {self.granted}"
