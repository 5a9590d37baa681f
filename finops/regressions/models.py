"""Cost regressions: a sustained rise in a feature's tokens per request or cost per successful task.

A detection run writes a ``CostRegression`` row (the state change); the alert sender claims rows
whose email is pending and sends each once (``alerts.py``, the budgets' claim-then-send shape); an
admin acknowledges a regression in the admin once someone has looked at it.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models.functions import Now


class Metric(models.TextChoices):
    TOKENS_PER_REQUEST = "tokens_per_request", "tokens per request"
    COST_PER_SUCCESSFUL_TASK = "cost_per_successful_task", "cost per successful task"


class AlertStatus(models.TextChoices):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    NO_RECIPIENTS = "no_recipients"


class CostRegression(models.Model):
    feature = models.CharField(max_length=100)
    model = models.CharField(max_length=200, blank=True, help_text="Empty: every model of the feature")
    metric = models.CharField(max_length=30, choices=Metric.choices)
    started_at = models.DateTimeField(help_text="The first hour at the new level (UTC)")
    detected_at = models.DateTimeField(help_text="The end of the hour whose figures raised the alarm")
    before = models.FloatField(help_text="Per request or task, at the baseline levels and the same mix")
    after = models.FloatField(help_text="Per request or task, as measured since started_at")
    score = models.FloatField(help_text="The CUSUM when it crossed the threshold")
    created_at = models.DateTimeField(db_default=Now())
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    acknowledged_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                        related_name="+")
    alert_status = models.CharField(max_length=16, choices=AlertStatus.choices, default=AlertStatus.PENDING)
    claimed_at = models.DateTimeField(null=True, blank=True)
    claim_token = models.UUIDField(null=True, blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    sent_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["feature", "model", "metric", "started_at"],
                                               name="one_regression_per_start")]
        indexes = [models.Index(fields=["feature", "started_at"])]
        ordering = ["-started_at"]

    def __str__(self) -> str:
        scope = f"{self.feature}/{self.model}" if self.model else self.feature
        return f"{scope}: {self.get_metric_display()} {self.change:+.0%} from {self.started_at:%Y-%m-%d %H:00}"

    @property
    def change(self) -> float:
        """The relative change, +0.35 for 35% more."""
        return self.after / self.before - 1 if self.before else float("inf")

    @property
    def scope_label(self) -> str:
        return f"feature {self.feature}" + (f", model {self.model}" if self.model else "")
