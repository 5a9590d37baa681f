"""Reads from the runtime registry."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from django.db.models import F, Q

from finops.runtimes.models import ConcurrencyCap, PowerCap, Ruleset, Runtime, RuntimeToken, token_digest


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


# A document the runtime has not acknowledged is pushed again at most this often after the last
# attempt (a push that failed through all its retries; each attempt records its time, so a push
# whose retries are still going is not queued twice); the runtime's own pull heals in between.
REPUSH_INTERVAL = dt.timedelta(seconds=30)
# One attempt lasts at most a few sends of PUSH_TIMEOUT (seconds each); one started longer ago
# than this has ended, whether or not it managed to record so (a killed worker).
PUSH_IN_FLIGHT = dt.timedelta(seconds=45)


def rulesets_to_push(*, now: dt.datetime) -> list[int]:
    """Runtimes (pks) that do not hold their newest ruleset, are not being pushed it right now,
    and were not pushed it in the last ``REPUSH_INTERVAL``."""
    behind = Q(runtime__last_ruleset_ack__isnull=True) | Q(runtime__last_ruleset_ack__lt=F("version"))
    recent = Q(last_push_at__gte=now - REPUSH_INTERVAL, last_push_version=F("version"))
    in_flight = Q(push_started_at__gte=now - PUSH_IN_FLIGHT) & (
        Q(last_push_at__isnull=True) | Q(push_started_at__gt=F("last_push_at")))
    return list(Ruleset.objects.filter(behind, version__gt=0).exclude(recent).exclude(in_flight)
                .order_by("runtime__name").values_list("runtime_id", flat=True))


@dataclass(frozen=True)
class RuntimeRulesetState:
    name: str
    base_url: str
    last_seen_at: dt.datetime | None
    version: int | None  # the newest issued, None before the first compile
    acknowledged: int | None
    last_push_at: dt.datetime | None
    last_push_outcome: str

    @property
    def in_sync(self) -> bool:
        return self.version is not None and self.acknowledged == self.version


def runtime_ruleset_states() -> list[RuntimeRulesetState]:
    """Every runtime with the ruleset version issued to it and the one it acknowledged."""
    states = []
    # Not the documents: a fleet's are hundreds of kilobytes each.
    for runtime in Runtime.objects.select_related("ruleset").defer("ruleset__document").order_by("name"):
        ruleset = getattr(runtime, "ruleset", None)
        issued = ruleset.version if ruleset and ruleset.version else None
        states.append(RuntimeRulesetState(
            runtime.name, runtime.base_url, runtime.last_seen_at, issued, runtime.last_ruleset_ack,
            ruleset.last_push_at if ruleset else None, ruleset.last_push_outcome if ruleset else ""))
    return states


def power_caps_in_force(*, now: dt.datetime) -> list[PowerCap]:
    """Enabled caps whose schedule covers ``now``, in a stable order (runtime-wide ones included)."""
    return list(PowerCap.objects.filter(enabled=True)
                .filter(Q(starts_at__isnull=True) | Q(starts_at__lte=now))
                .filter(Q(ends_at__isnull=True) | Q(ends_at__gt=now)).order_by("pk"))
def concurrency_caps() -> list[ConcurrencyCap]:
    """Every concurrency cap, in a stable order (the ruleset's content, and so its version, depends on it)."""
    return list(ConcurrencyCap.objects.order_by("tenant", "feature", "model", "pk"))
