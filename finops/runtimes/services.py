"""Writes to the runtime registry: register a runtime, issue, rotate and revoke its tokens.

A plain token exists only in the return value of the service that issued it; the database keeps
its SHA-256 digest and first characters (``RuntimeToken.issue``).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from finops.runtimes.models import Runtime, RuntimeToken


def runtime_register(*, name: str, base_url: str) -> tuple[Runtime, str]:
    """Register a runtime and issue its first token; return the runtime and the plain token.

    Raises ``ValidationError`` for a name that is not a slug, a URL that is not http(s), or a name
    already registered (a runtime is renamed or re-keyed, never registered twice).
    """
    runtime = Runtime(name=name, base_url=base_url)
    # Django's URL validator wants a dotted host; runtimes are often reached by a bare host name.
    runtime.full_clean(exclude=["base_url"], validate_unique=False)
    try:
        runtime_url_validate(base_url)
    except ValidationError as exc:
        raise ValidationError({"base_url": exc.messages}) from exc
    if Runtime.objects.filter(name=name).exists():
        raise _duplicate(name)
    try:
        with transaction.atomic():
            runtime.save()
            _, plain = RuntimeToken.issue(runtime)
    except IntegrityError as exc:  # registered concurrently between the check and the insert
        raise _duplicate(name) from exc
    return runtime, plain


def runtime_token_rotate(*, runtime: Runtime) -> str:
    """Issue a new token for ``runtime`` and revoke every token it had; return the plain new one.

    Rotation is for a token that may have leaked, so the old ones stop working at once; the
    runtime's exporter spools telemetry until it is restarted with the new token.
    """
    with transaction.atomic():
        RuntimeToken.objects.filter(runtime=runtime, revoked_at__isnull=True).update(revoked_at=timezone.now())
        _, plain = RuntimeToken.issue(runtime)
    return plain


def runtime_token_revoke(*, token: RuntimeToken) -> None:
    """Revoke ``token`` (idempotent: a token already revoked keeps its first revocation time)."""
    now = timezone.now()
    if RuntimeToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=now):
        token.revoked_at = now
    else:
        token.refresh_from_db(fields=["revoked_at"])


def runtime_url_validate(url: str) -> None:
    """Accept http(s) URLs with any host (``http://gpu-1:8080``, ``http://10.0.0.5:8080``)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ValidationError(f"{url!r} is not a valid URL", code="invalid") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError(f"{url!r} is not a URL starting with http:// or https:// and a host", code="invalid")
    if len(url) > Runtime._meta.get_field("base_url").max_length:
        raise ValidationError("the URL is too long", code="max_length")


def _duplicate(name: str) -> ValidationError:
    return ValidationError({"name": ValidationError(f"a runtime named {name!r} is already registered",
                                                    code="duplicate")})
