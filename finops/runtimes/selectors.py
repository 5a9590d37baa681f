"""Reads from the runtime registry."""

from __future__ import annotations

from finops.runtimes.models import Runtime, RuntimeToken, token_digest


def runtime_get_by_token(*, token: str) -> Runtime | None:
    """The runtime a bearer token belongs to, or None if the token is unknown or revoked."""
    if not token:
        return None
    row = (
        RuntimeToken.objects.select_related("runtime")
        .filter(digest=token_digest(token), revoked_at__isnull=True)
        .first()
    )
    return row.runtime if row else None
