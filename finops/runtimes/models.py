"""Registered runtimes, the tokens they send telemetry with (stored hashed, shown once), the
ruleset document compiled for each of them, and the power caps and concurrency caps put in their documents."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q


def token_digest(token: str) -> str:
    """Tokens are 256-bit random strings, so one SHA-256 is enough to store them safely."""
    return hashlib.sha256(token.encode()).hexdigest()


def admin_token_salt() -> str:
    return secrets.token_urlsafe(24)


class Runtime(models.Model):
    name = models.SlugField(max_length=100, unique=True, help_text="The runtime's --runtime-id.")
    base_url = models.URLField(help_text="Where the control plane reaches the runtime (rulesets).")
    created_at = models.DateTimeField(auto_now_add=True)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    last_ruleset_ack = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="The ruleset version the runtime last said it holds (push or pull).")
    admin_token_salt = models.CharField(max_length=64, default=admin_token_salt, editable=False,
                                        help_text="Mixed into the admin token; a new salt is a new token.")

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def admin_token(self) -> str:
        """The bearer token the control plane pushes rulesets with (the runtime's ``--admin-token``).

        It is derived, HMAC-SHA256(SECRET_KEY, name + salt), rather than stored: the database alone
        does not give it away, and the push can recompute it. Changing SECRET_KEY therefore changes
        every runtime's admin token: each runtime must then be given its new one
        (``manage.py register_runtime NAME --rotate-admin-token``).
        """
        message = f"wattson-runtime-admin-token\x00{self.name}\x00{self.admin_token_salt}".encode()
        digest = hmac.new(settings.SECRET_KEY.encode(), message, hashlib.sha256).digest()
        return "wat_" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class RuntimeToken(models.Model):
    runtime = models.ForeignKey(Runtime, on_delete=models.CASCADE, related_name="tokens")
    digest = models.CharField(max_length=64, unique=True, editable=False)
    prefix = models.CharField(max_length=8, editable=False, help_text="The token's first characters, to tell it apart.")
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.runtime.name} {self.prefix}…"

    @classmethod
    def issue(cls, runtime: Runtime) -> tuple[RuntimeToken, str]:
        """Create a token for ``runtime``; the plain token is returned here and never stored."""
        plain = "wrt_" + secrets.token_urlsafe(32)
        return cls.objects.create(runtime=runtime, digest=token_digest(plain), prefix=plain[:8]), plain


class Ruleset(models.Model):
    """The ruleset document compiled for one runtime (docs/RULESET.md). ``version`` only grows, and
    only when the content (everything but ``version`` and ``issued_at``) changes; ``digest`` is the
    content's SHA-256 so the comparison is one string."""

    runtime = models.OneToOneField(Runtime, on_delete=models.CASCADE, related_name="ruleset")
    version = models.PositiveBigIntegerField(default=0)
    digest = models.CharField(max_length=64, blank=True)
    document = models.JSONField(default=dict)
    issued_at = models.DateTimeField(null=True, blank=True)
    push_started_at = models.DateTimeField(null=True, blank=True)
    last_push_at = models.DateTimeField(null=True, blank=True, help_text="When the last push finished.")
    last_push_version = models.PositiveBigIntegerField(null=True, blank=True)
    last_push_outcome = models.CharField(max_length=300, blank=True)

    class Meta:
        ordering = ["runtime__name"]

    def __str__(self) -> str:
        return f"{self.runtime} v{self.version}"


class PowerCap(models.Model):
    """A power limit on runtimes' GPUs, sent to them as a ``power_cap`` rule (docs/RULESET.md)
    while its schedule is in force: from ``starts_at`` (at once when blank) until ``ends_at``
    (open-ended when blank). The runtime sets it through NVML and restores the GPU's own limit when
    the rule expires or leaves the document."""

    name = models.CharField(max_length=100, help_text="What the cap is for, shown in the rule's reason.")
    runtime = models.ForeignKey(Runtime, on_delete=models.CASCADE, null=True, blank=True, related_name="power_caps",
                                help_text="Blank: every runtime.")
    device_type = models.CharField(max_length=200, default="*",
                                   help_text="The GPUs' NVML name (e.g. 'NVIDIA H100 80GB HBM3'), or * for any.")
    device = models.CharField(max_length=100, default="*", help_text="One GPU's UUID, or * for any.")
    watts = models.PositiveIntegerField(validators=[MinValueValidator(1), MaxValueValidator(100_000)])
    starts_at = models.DateTimeField(null=True, blank=True)
    ends_at = models.DateTimeField(null=True, blank=True)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name", "pk"]
        constraints = [
            models.CheckConstraint(condition=models.Q(ends_at__isnull=True) | models.Q(starts_at__isnull=True)
                                   | models.Q(ends_at__gt=models.F("starts_at")), name="power_cap_ends_after_start"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.watts} W)"

    def clean(self) -> None:
        if self.starts_at and self.ends_at and self.ends_at <= self.starts_at:
            raise ValidationError({"ends_at": "A cap must end after it starts."})


# A scope value as the ruleset carries it: a literal tenant, feature or model name, or "*".
SCOPE_VALUE = re.compile(r"^(\*|[A-Za-z0-9_\-.]{1,100})$")
ANY = "*"


def scope_value_validate(value: str) -> None:
    if not SCOPE_VALUE.match(value or ""):
        raise ValidationError("Use '*' or a name of letters, digits, '_', '-' and '.' (up to 100).")


class ConcurrencyCap(models.Model):
    """A limit on one scope's requests at once on every runtime: at most ``max_running`` holding a
    running slot of a model (others wait while other tenants' work runs) and at most ``max_queued``
    waiting (more are refused with 429). Compiled into every runtime's ruleset as a ``concurrency``
    rule (docs/RULESET.md). It is a limit on how runtimes serve traffic, not on money, so it lives
    with the runtimes and their rulesets rather than with the budgets; it applies from the next
    ruleset compilation (the budget evaluation pass, every few seconds)."""

    tenant = models.CharField(max_length=100, validators=[scope_value_validate],
                              help_text="A tenant, or '*' for all of them together.")
    feature = models.CharField(max_length=100, default=ANY, validators=[scope_value_validate],
                               help_text="A feature of the tenant, or '*' for all of them.")
    model = models.CharField(max_length=100, default=ANY, validators=[scope_value_validate],
                             help_text="The model requested, or '*' for any.")
    max_running = models.PositiveIntegerField(
        null=True, blank=True,
        help_text="Most of the scope's requests running at once on one runtime (blank: no limit).")
    max_queued = models.PositiveIntegerField(
        null=True, blank=True, help_text="Most of the scope's requests waiting for a slot on one runtime; more are "
        "refused with 429 (blank: no limit; 0: none may wait).")
    note = models.CharField(max_length=500, blank=True, help_text="Why: shown to a refused client.")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["tenant", "feature", "model"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "feature", "model"], name="one_cap_per_scope"),
            models.CheckConstraint(condition=Q(max_running__isnull=False) | Q(max_queued__isnull=False),
                                   name="cap_limits_something"),
            models.CheckConstraint(condition=Q(max_running__isnull=True) | Q(max_running__gte=1),
                                   name="cap_runs_at_least_one"),
        ]

    def __str__(self) -> str:
        return f"{self.tenant}/{self.feature}/{self.model}"

    def clean(self) -> None:
        if self.max_running is None and self.max_queued is None:
            raise ValidationError("Set max running, max queued or both.")
        if self.max_running is not None and self.max_running < 1:
            raise ValidationError({"max_running": "At least 1 (leave it blank for no limit)."})

    @property
    def reason(self) -> str:
        limits = [f"{self.max_running} running" if self.max_running is not None else "",
                  f"{self.max_queued} waiting" if self.max_queued is not None else ""]
        scope = f"tenant '{self.tenant}'" if self.tenant != ANY else "all tenants"
        if self.feature != ANY:
            scope += f", feature '{self.feature}'"
        said = f"Concurrency cap for {scope}: at most {' and '.join(x for x in limits if x)} request(s) at once."
        return f"{said} {self.note}".strip()
