"""Registered runtimes and the tokens they send telemetry with (stored hashed, shown once)."""

from __future__ import annotations

import hashlib
import secrets

from django.db import models


def token_digest(token: str) -> str:
    """Tokens are 256-bit random strings, so one SHA-256 is enough to store them safely."""
    return hashlib.sha256(token.encode()).hexdigest()


class Runtime(models.Model):
    name = models.SlugField(max_length=100, unique=True, help_text="The runtime's --runtime-id.")
    base_url = models.URLField(help_text="Where the control plane reaches the runtime (rulesets).")
    created_at = models.DateTimeField(auto_now_add=True)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    last_ruleset_ack = models.PositiveBigIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


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
