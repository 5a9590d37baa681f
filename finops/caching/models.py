"""Semantic cache policies: which feature (of which tenant) runtimes may answer from the semantic
cache, at what similarity and for how long. They reach runtimes in the ruleset (docs/RULESET.md,
``semantic_cache``); the semantic cache is off for every feature without one."""

from __future__ import annotations

from decimal import Decimal

from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models

# The runtime's default (inference/semantic_policy.py): under 1% false hits on the labelled pairs.
DEFAULT_THRESHOLD = Decimal("0.930")
DEFAULT_TTL_SECONDS = 24 * 3600
MAX_TTL_SECONDS = 366 * 24 * 3600
# What a runtime accepts as a feature (X-Wattson-Feature), and "*" or a tenant name.
FEATURE_PATTERN = r"^[A-Za-z0-9_.:/\-]{1,100}$"
TENANT_PATTERN = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]{1,100}$"


class SemanticCachePolicy(models.Model):
    feature = models.CharField(max_length=100, validators=[RegexValidator(FEATURE_PATTERN, "1-100 letters, digits "
                                                                          "or _ . : / - (as X-Wattson-Feature)")])
    tenant = models.CharField(max_length=100, default="*", validators=[RegexValidator(TENANT_PATTERN)],
                              help_text="One tenant, or * for every tenant (a tenant's own policy wins over *)")
    threshold = models.DecimalField(
        max_digits=4, decimal_places=3, default=DEFAULT_THRESHOLD,
        validators=[MinValueValidator(Decimal("0.5")), MaxValueValidator(Decimal("1"))],
        help_text="Cosine similarity a question needs to get a stored answer (0.5-1). 0.93 gave 0.6% false "
                  "hits on the labelled pairs (docs/BENCHMARKS.md); lower answers more, and more often wrongly")
    ttl_seconds = models.PositiveIntegerField(
        default=DEFAULT_TTL_SECONDS, validators=[MinValueValidator(1), MaxValueValidator(MAX_TTL_SECONDS)],
        help_text="How long an answer is kept")
    enabled = models.BooleanField(default=True)
    flushed_at = models.DateTimeField(null=True, blank=True, help_text="Answers stored before this are never served "
                                      "(set by the admin's flush action)")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["feature", "tenant"], name="one_semantic_policy_per_scope")]
        ordering = ["feature", "tenant"]
        verbose_name_plural = "semantic cache policies"

    def __str__(self) -> str:
        return f"{self.feature} ({self.tenant}) ≥ {self.threshold}"
