"""The requests waiting in one model's queue, and which is next (``Backlog``): priority classes
first; inside a class fair share between tenants (``inference.fair_share``: the least-served
backlogged tenant, and with ``by_feature`` its least-served feature), a tenant's own requests by
tier, then arrival; or, with fair share off, first come, first served inside a class (by tier, then
arrival). It also says whom a full queue sheds: in the lowest class waiting, the tenant furthest
above its share of the waiting places, its least important, newest request. ``AdmissionQueue``
holds the slots and decides when to grant or shed; this holds the order.
"""

from __future__ import annotations

import asyncio
import heapq
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from inference.config import Tier
from inference.fair_share import ConcurrencyCap, FairShare, feature_key

if TYPE_CHECKING:
    from inference.admission import Slot

Key = tuple[int, int, int]  # (-priority rank, -tier rank, arrival): the smallest goes first in a tenant
RANKS = (2, 1, 0)  # high, normal, low


@dataclass(order=True)
class Waiter:
    key: Key
    future: asyncio.Future[Slot] = field(compare=False)
    enqueued_at: float = field(compare=False)
    tenant: str = field(default="", compare=False)
    feature: str = field(default="", compare=False)
    tier: Tier = field(default="standard", compare=False)
    prompt_tokens: int = field(default=0, compare=False)
    caps: Sequence[ConcurrencyCap] = field(default=(), compare=False)
    done: bool = field(default=False, compare=False)

    @property
    def rank(self) -> int:
        return -self.key[0]

    def can_run(self) -> bool:
        return all(cap.can_run() for cap in self.caps)


# rank -> tenant -> feature -> heap of waiters (tier, then arrival)
Classes = dict[int, dict[str, dict[str, list[Waiter]]]]
Tenants = dict[str, dict[str, list[Waiter]]]


class Backlog:
    def __init__(self, fair: FairShare, *, fair_ordering: bool, wake: Callable[[], None]) -> None:
        self.fair = fair
        self.fair_ordering = fair_ordering
        self._wake = wake  # called when a cap holding a waiter back frees a place
        self._classes: Classes = {}
        self.waiting_tenants: dict[str, int] = defaultdict(int)
        self.running_tenants: dict[str, int] = defaultdict(int)
        self._waiting_features: dict[str, int] = defaultdict(int)
        self._running_features: dict[str, int] = defaultdict(int)

    def __bool__(self) -> bool:
        return bool(self._classes)

    def arrive(self, tenant: str, feature: str) -> None:
        """A request arrives, before it is granted a slot or queued: a tenant (or feature) with
        nothing waiting has its counter lifted to the least of the backlogged ones, or when none
        waits, of those running, or when the queue is idle, to the counter of the last one served."""
        fair = self.fair
        if not self.waiting_tenants.get(tenant):
            backlogged = [t for t, n in self.waiting_tenants.items() if n]
            fair.tenants.lift(tenant, backlogged or [t for t, n in self.running_tenants.items() if n],
                              idle_floor=fair.tenants.last_dispatched)
        fkey = feature_key(tenant, feature)
        if fair.by_feature and not self._waiting_features.get(fkey):
            prefix = feature_key(tenant, "")
            backlogged = [f for f, n in self._waiting_features.items() if n and f.startswith(prefix)]
            fair.features.lift(fkey, backlogged or [f for f, n in self._running_features.items()
                                                    if n and f.startswith(prefix)])

    def push(self, waiter: Waiter) -> None:
        """Queue ``waiter`` (``arrive`` has lifted its counters)."""
        tenant = waiter.tenant
        fkey = feature_key(tenant, waiter.feature)
        heap = self._classes.setdefault(waiter.rank, {}).setdefault(tenant, {}).setdefault(waiter.feature, [])
        heapq.heappush(heap, waiter)
        self.waiting_tenants[tenant] += 1
        self._waiting_features[fkey] += 1
        for cap in waiter.caps:
            cap.queued += 1
            cap.on_release(id(self), self._wake)

    def remove(self, waiter: Waiter) -> bool:
        """Take ``waiter`` out (once); whether it was waiting."""
        if waiter.done:
            return False
        waiter.done = True
        tenants = self._classes[waiter.rank]
        features = tenants[waiter.tenant]
        heap = features[waiter.feature]
        heap.remove(waiter)
        heapq.heapify(heap)
        if not heap:
            del features[waiter.feature]
            if not features:
                del tenants[waiter.tenant]
                if not tenants:
                    del self._classes[waiter.rank]
        self.waiting_tenants[waiter.tenant] -= 1
        self._count_down(self._waiting_features, feature_key(waiter.tenant, waiter.feature))
        for cap in waiter.caps:
            cap.queued -= 1
        return True

    def started(self, tenant: str, feature: str) -> None:
        """One of the tenant's requests holds a slot now."""
        self.running_tenants[tenant] += 1
        self._running_features[feature_key(tenant, feature)] += 1

    def ended(self, tenant: str, feature: str) -> None:
        """One of the tenant's requests gave its slot back."""
        self.running_tenants[tenant] -= 1
        self._count_down(self._running_features, feature_key(tenant, feature))

    def pick(self, ranks: Sequence[int] = RANKS) -> Waiter | None:
        """The waiter to serve next among ``ranks`` (highest class first): the least-served
        backlogged tenant's (its least-served feature's, with ``by_feature``) first request by tier
        and arrival, skipping those a ``concurrency`` cap holds back."""
        fair = self.fair
        for rank in ranks:
            tenants = self._classes.get(rank)
            if not tenants:
                continue
            if not self.fair_ordering:
                head = min((h for features in tenants.values() for heap in features.values() for h in heap
                            if h.can_run()), default=None)
                if head is not None:
                    return head
                continue
            for tenant in sorted(tenants, key=lambda t: (fair.tenants[t], _first(tenants[t]).key)):
                features = tenants[tenant]
                if fair.by_feature:
                    order = sorted(features, key=lambda f: (fair.features[feature_key(tenant, f)], features[f][0].key))
                else:
                    order = sorted(features, key=lambda f: features[f][0].key)
                for feature in order:
                    head = features[feature][0]
                    if head.can_run():
                        return head
        return None

    def shed_candidate(self) -> Waiter | None:
        """The waiter a full or overloaded queue sheds: in the lowest class waiting, the heaviest
        tenant's least important request (lowest tier, newest)."""
        if not self._classes:
            return None
        tenants = self._classes[min(self._classes)]
        if not self.fair_ordering:
            return max(_last(features) for features in tenants.values())
        return _last(tenants[self._heaviest(tenants)])

    def displaceable(self, rank: int, tier_rank: int, tenant: str) -> Waiter | None:
        """The waiter a full queue would shed for a newcomer (``rank``, ``tier_rank``, ``tenant``),
        or None when the newcomer itself is the one to shed."""
        if not self._classes:
            return None
        lowest_rank = min(self._classes)
        if lowest_rank > rank:
            return None
        tenants = self._classes[lowest_rank]
        if not self.fair_ordering:
            lowest = max(_last(features) for features in tenants.values())
            return lowest if lowest.key[:2] > (-rank, -tier_rank) else None
        if lowest_rank < rank:
            return _last(tenants[self._heaviest(tenants)])
        heaviest = self._heaviest(tenants, extra=tenant)
        if heaviest != tenant:
            return _last(tenants[heaviest])
        own = _last(tenants[tenant]) if tenant in tenants else None
        return own if own is not None and own.key[:2] > (-rank, -tier_rank) else None

    def _heaviest(self, tenants: Tenants, extra: str | None = None) -> str:
        """The tenant furthest above its share of this class's waiting places: the most waiting
        requests for its weight (``extra``: one more for a newcomer), then the most service."""
        def load(tenant: str) -> tuple[float, float, str]:
            count = sum(len(h) for h in tenants.get(tenant, {}).values()) + (tenant == extra)
            return count / self.fair.tenant_weight.get(tenant, 1.0), self.fair.tenants[tenant], tenant
        names = set(tenants) | ({extra} if extra is not None else set())
        return max(names, key=load)

    def _count_down(self, counts: dict[str, int], key: str) -> None:
        """One fewer of a feature's requests in ``counts``; a feature with none left waiting or
        running is forgotten (features are named by clients: their number has no bound)."""
        counts[key] -= 1
        if not counts[key]:
            del counts[key]
            if not self._waiting_features.get(key) and not self._running_features.get(key):
                self._waiting_features.pop(key, None)
                self._running_features.pop(key, None)
                self.fair.forget_feature(key)


def _first(features: dict[str, list[Waiter]]) -> Waiter:
    return min(heap[0] for heap in features.values())


def _last(features: dict[str, list[Waiter]]) -> Waiter:
    """A tenant's least important waiter in one class: lowest tier, newest."""
    return max(max(heap) for heap in features.values())
