"""Fair share inside a priority class: Virtual Token Counter scheduling (Sheng et al., "Fairness in
Serving Large Language Models", OSDI 2024), per tenant and optionally per feature inside a tenant.

Each tenant has a counter of the service it has received: its prompt tokens when a request starts,
and its completion tokens as they are generated, each divided by its tier's weight (a premium
tenant with weight 2 is charged half as much per token, so it gets twice the service while both
are backlogged). The queue serves the backlogged tenant with the smallest counter first. A tenant
that becomes backlogged (it had nothing waiting) has its counter lifted to the smallest counter
among the backlogged tenants — or, when none is, among the tenants running work, and when the queue
is idle, the counter of the tenant last given a slot — so time spent idle banks no credit to spend
later in a burst that would starve the others, and a tenant served much in the past does not wait
behind newcomers until they have caught up with all of it. With ``by_feature``, the
same rule picks a feature inside the chosen tenant.

``TenantService`` keeps what a tenant was really served (tokens, unweighted) and how long its
requests waited, for ``/metrics`` and the runtime sample. ``ConcurrencyCap`` is a ruleset's limit
on the requests one scope may have queued and running (docs/RULESET.md, ``concurrency``); its counts
live here, across every model's queue, and it outlives a ruleset version that keeps the same rule.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from inference.config import Tier

# Service weight per tier: a tenant's share while backlogged is proportional to its weight.
DEFAULT_TIER_WEIGHTS: dict[str, float] = {"free": 0.5, "standard": 1.0, "premium": 2.0}


class VirtualCounters:
    """Counters of weighted service, one per key (a tenant, or a tenant's feature)."""

    def __init__(self) -> None:
        self.values: dict[str, float] = defaultdict(float)
        self._last_dispatched: str | None = None  # the key last given a slot

    def charge(self, key: str, amount: float) -> None:
        self.values[key] += amount

    def dispatched(self, key: str) -> None:
        self._last_dispatched = key

    @property
    def last_dispatched(self) -> float | None:
        """The counter, now, of the key last given a slot (None before any was)."""
        return None if self._last_dispatched is None else self.values.get(self._last_dispatched, 0.0)

    def lift(self, key: str, floor_keys: Iterable[str], *, idle_floor: float | None = None) -> None:
        """``key`` became backlogged: raise its counter to the least of ``floor_keys``' (the VTC
        rule), or to ``idle_floor`` when there are none."""
        floors = [self.values[k] for k in floor_keys if k != key]
        floor = min(floors) if floors else idle_floor
        if floor is not None:
            self.values[key] = max(self.values.get(key, 0.0), floor)

    def __getitem__(self, key: str) -> float:
        return self.values.get(key, 0.0)


@dataclass
class TenantService:
    """What one tenant was served (real tokens) and how its requests waited: running totals, and
    the requests it has waiting and holding a slot now."""

    tokens_served: int = 0
    admitted: int = 0
    queue_wait_s_total: float = 0.0
    waiting: int = 0
    running: int = 0

    def add(self, other: TenantService) -> None:
        self.tokens_served += other.tokens_served
        self.admitted += other.admitted
        self.queue_wait_s_total += other.queue_wait_s_total
        self.waiting += other.waiting
        self.running += other.running


@dataclass
class ConcurrencyCap:
    """A limit on requests of one scope queued (waiting for a slot) and running at once."""

    rule_id: str
    reason: str
    max_running: int | None
    max_queued: int | None
    running: int = 0
    queued: int = 0
    # Queues holding a waiter this cap holds back: a slot it frees may let one of them start.
    _wake: dict[int, Callable[[], None]] = field(default_factory=dict, repr=False)

    def can_run(self) -> bool:
        return self.max_running is None or self.running < self.max_running

    def can_queue(self) -> bool:
        return self.max_queued is None or self.queued < self.max_queued

    def on_release(self, key: int, wake: Callable[[], None]) -> None:
        self._wake[key] = wake

    def released(self) -> None:
        self.running -= 1
        for wake in list(self._wake.values()):
            wake()


class CapReached(Exception):
    """The request's scope already has ``max_queued`` requests waiting (a ruleset's cap)."""

    def __init__(self, cap: ConcurrencyCap) -> None:
        super().__init__(cap.reason or f"Too many requests waiting under rule '{cap.rule_id}'.")
        self.cap = cap


class FairShare:
    """The VTC state of one queue: tenant counters, feature counters, weights and service."""

    def __init__(self, *, weights: Mapping[str, float] | None = None, by_feature: bool = False) -> None:
        self.weights = dict(DEFAULT_TIER_WEIGHTS if weights is None else weights)
        for tier, weight in self.weights.items():
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"the weight of tier {tier!r} must be a positive number")
        self.by_feature = by_feature
        self.tenants = VirtualCounters()
        self.features = VirtualCounters()  # keyed "tenant\x00feature"
        self.tenant_weight: dict[str, float] = {}
        self.service: dict[str, TenantService] = defaultdict(TenantService)

    def weight(self, tier: Tier) -> float:
        return self.weights.get(tier, 1.0)

    def charge(self, tenant: str, feature: str, tier: Tier, tokens: int) -> None:
        """``tokens`` of service given to a request of ``tenant`` (prompt or completion tokens)."""
        if tokens <= 0:
            return
        amount = tokens / self.weight(tier)
        self.tenants.charge(tenant, amount)
        if self.by_feature:
            self.features.charge(feature_key(tenant, feature), amount)
        self.service[tenant].tokens_served += tokens

    def forget_feature(self, key: str) -> None:
        """A feature with nothing waiting or running: its counter goes (a client names features, so
        keeping every one would grow without bound). It loses nothing it is owed: were it kept, it
        would be lifted to the least of its tenant's active features on its return anyway."""
        self.features.values.pop(key, None)

    def waited(self, tenant: str, wait_s: float) -> None:
        service = self.service[tenant]
        service.admitted += 1
        service.queue_wait_s_total += wait_s


def feature_key(tenant: str, feature: str) -> str:
    return f"{tenant}\x00{feature}"
