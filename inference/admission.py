"""Admission: a bounded priority queue in front of each model's running slots.

Requests wait here until the engine (or upstream) has a free slot. Priority classes come first
(the ``X-Wattson-Priority`` hint, capped by the key's tier). Inside a class the queue is fair
between tenants (``inference.fair_share``, Virtual Token Counter scheduling): the backlogged tenant
that has received the least weighted service goes first, a tenant's weight set by its tier, and
with ``fair_by_feature`` the same rule picks a feature inside that tenant; a tenant's own requests
go by tier, then arrival. A ruleset's ``concurrency`` caps hold a scope's requests back while it has
``max_running`` of them running (others may take the slot) and refuse one past ``max_queued`` waiting.

Over the queue's depth a waiting request of the lowest class present is shed, from the tenant
furthest above its share of the queue (the most waiting requests for its weight), its least
important, newest request; the newcomer itself is shed when it would be that request. Past the
longest allowed wait a request is shed too. With a target wait, the queue also sheds before it is
full: while the estimated wait (the requests waiting, drained at the observed service rate) is past
the target, waiting low-priority requests are shed, lowest first, and past twice the target normal
ones too; high-priority work is only ever shed by a full queue or its own wait. Slots can be kept
for high-priority work (``high_reserve``): other work runs in the rest, so a high-priority request
finds a slot at once instead of waiting for one to free.

Preemption: a high-priority request that finds every slot busy pauses the least important running
request whose work can be paused (the local engine's, which keeps its KV cache aside: see
``Slot.attach``), lowest priority, then tier, newest first. While high-priority work runs, at most
``high_max_running`` requests run in all, and the others over it are paused too: on a CPU a smaller
batch decodes each token sooner. A paused request waits for a slot again after high-priority work
and before everything else; its pause counts as queue wait, it is not paused once its wait reaches
the longest wait, and then it resumes at the next free slot ahead of everything, so it is never
held back without bound. Shed requests get 503 with ``Retry-After`` (the API's job); a waiting
client that goes away simply leaves the queue.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

from inference.backlog import Backlog, Key, Waiter
from inference.config import Tier
from inference.fair_share import CapReached, ConcurrencyCap, FairShare, TenantService

PriorityName = Literal["low", "normal", "high"]
PRIORITY_RANK: dict[str, int] = {"low": 0, "normal": 1, "high": 2}
TIER_RANK: dict[str, int] = {"free": 0, "standard": 1, "premium": 2}
# The highest priority each tier may ask for: free keys cannot jump the queue.
TIER_PRIORITY_CAP: dict[str, PriorityName] = {"free": "normal", "standard": "high", "premium": "high"}


def effective_priority(hint: PriorityName, tier: Tier) -> PriorityName:
    cap = TIER_PRIORITY_CAP[tier]
    return hint if PRIORITY_RANK[hint] <= PRIORITY_RANK[cap] else cap


ShedReason = Literal["queue_full", "queue_timeout", "displaced", "overloaded"]
# How far past the target wait the queue may be before waiting work of each priority is shed.
SHED_PAST_TARGET: dict[int, float] = {PRIORITY_RANK["low"]: 1.0, PRIORITY_RANK["normal"]: 2.0}
_PRIORITY_NAME = {rank: name for name, rank in PRIORITY_RANK.items()}
_HIGH = PRIORITY_RANK["high"]


class Shed(Exception):
    """The request was not admitted; ``retry_after_s`` says when trying again is sensible."""

    def __init__(self, reason: ShedReason, retry_after_s: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s




class Pausable(Protocol):
    """Running work that can step aside and carry on later (an engine sequence)."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...


class Slot:
    """A running slot held by one request; ``release`` it exactly once when the request ends."""

    def __init__(self, queue: AdmissionQueue, key: Key, *, queue_wait_s: float, depth_at_admit: int,
                 tenant: str = "", feature: str = "", tier: Tier = "standard",
                 caps: Sequence[ConcurrencyCap] = ()) -> None:
        self._queue = queue
        self.key = key
        self.queue_wait_s = queue_wait_s
        self.depth_at_admit = depth_at_admit
        self.tenant, self.feature, self.tier, self.caps = tenant, feature, tier, caps
        self._held_since = time.perf_counter()
        self._paused_since: float | None = None
        self._paused_s = 0.0
        self._work: Pausable | None = None
        self._released = False
        self._charged_prompt = 0
        self._charged_completion = 0

    @property
    def rank(self) -> int:
        return -self.key[0]

    @property
    def paused(self) -> bool:
        return self._paused_since is not None

    def paused_for_s(self, now: float) -> float:
        return 0.0 if self._paused_since is None else now - self._paused_since

    @property
    def preemptible(self) -> bool:
        return self._work is not None and not self._released and not self.paused and self.rank < _HIGH

    def attach(self, work: Pausable) -> None:
        """The work this slot runs can be paused: high-priority work may preempt it."""
        self._work = work
        self._queue._make_room_for_high()

    def served(self, *, prompt_tokens: int | None = None, completion_tokens: int | None = None) -> None:
        """The request has been served this many tokens so far (running totals): its tenant's
        fair-share counter is charged what is new. Totals never go back: a smaller one changes nothing."""
        fair = self._queue.fair
        if prompt_tokens is not None and prompt_tokens > self._charged_prompt:
            fair.charge(self.tenant, self.feature, self.tier, prompt_tokens - self._charged_prompt)
            self._charged_prompt = prompt_tokens
        if completion_tokens is not None and completion_tokens > self._charged_completion:
            fair.charge(self.tenant, self.feature, self.tier, completion_tokens - self._charged_completion)
            self._charged_completion = completion_tokens

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._queue._release(self, time.perf_counter() - self._held_since - self._paused_s)

    def _pause(self) -> None:
        assert self._work is not None
        self._paused_since = time.perf_counter()
        self._work.pause()

    def _resume(self) -> None:
        assert self._work is not None and self._paused_since is not None
        waited = time.perf_counter() - self._paused_since
        self._paused_s += waited
        self.queue_wait_s += waited  # waiting for a slot again is queue wait too
        self._paused_since = None
        self._work.resume()


class NoQueue:
    """Where a request answered from the cache stood instead of a slot: it waited for none, found
    no queue, and has nothing to release."""

    queue_wait_s = 0.0
    depth_at_admit: int | None = None

    def served(self, *, prompt_tokens: int | None = None, completion_tokens: int | None = None) -> None:
        """A cached answer is no service from a model: nothing to charge."""

    def release(self) -> None:
        """Nothing was held."""


NO_QUEUE = NoQueue()



class AdmissionQueue:
    def __init__(self, *, capacity: int, max_depth: int, max_wait_s: float, target_wait_s: float | None = None,
                 high_reserve: int = 0, high_max_running: int | None = None,
                 fair: bool = True, tier_weights: Mapping[str, float] | None = None,
                 fair_by_feature: bool = False) -> None:
        if not 0 <= high_reserve < capacity:
            raise ValueError("high_reserve must leave at least one slot to other work")
        if high_max_running is not None and high_max_running < 1:
            raise ValueError("high_max_running must be at least 1")
        self.capacity = capacity
        self.high_reserve = high_reserve
        # While high-priority work runs, at most this many requests run in all: a smaller batch
        # decodes each token sooner where steps cost more with more sequences (a CPU).
        self.high_max_running = min(capacity, high_max_running or capacity)
        self.max_depth = max_depth
        self.max_wait_s = max_wait_s
        self.target_wait_s = target_wait_s
        self.fair = FairShare(weights=tier_weights, by_feature=fair_by_feature and fair)
        self.in_use = 0
        self._running: set[Slot] = set()
        self._paused: list[Slot] = []  # preempted, waiting to resume, in the order they were paused
        # ``fair`` off: first come, first served inside a class (by tier, then arrival), as before
        # fair share; the counters still run, for the metrics.
        self.backlog = Backlog(self.fair, fair_ordering=fair, wake=self._grant_next)
        self._depth = 0
        self._arrivals = itertools.count()
        self._mean_service_s: float | None = None
        self.shed_total: dict[ShedReason, int] = {"queue_full": 0, "queue_timeout": 0, "displaced": 0,
                                                  "overloaded": 0}
        self.preemptions_total = 0

    @property
    def depth(self) -> int:
        """Requests waiting now (not counting those running)."""
        return self._depth

    def tenants(self) -> dict[str, tuple[int, int]]:
        """Each tenant with work here: (requests waiting, requests holding a slot)."""
        waiting, running = dict(self.backlog.waiting_tenants), dict(self.backlog.running_tenants)
        names = {t for t, n in waiting.items() if n} | {t for t, n in running.items() if n}
        return {t: (waiting.get(t, 0), running.get(t, 0)) for t in names}

    def tenant_service(self) -> dict[str, TenantService]:
        """Every tenant this queue has served: its totals, and what it has waiting and running now.
        (Read from other threads too: the copies are taken whole before they are read.)"""
        waiting, running = dict(self.backlog.waiting_tenants), dict(self.backlog.running_tenants)
        return {tenant: TenantService(s.tokens_served, s.admitted, s.queue_wait_s_total,
                                      waiting.get(tenant, 0), running.get(tenant, 0))
                for tenant, s in list(self.fair.service.items())}

    async def admit(self, *, priority: PriorityName, tier: Tier, tenant: str = "", feature: str = "",
                    prompt_tokens: int = 0, caps: Sequence[ConcurrencyCap] = ()) -> Slot:
        """Wait for a running slot; raise ``Shed`` if the request is not to be served, or
        ``CapReached`` when one of ``caps`` already has as many requests waiting as it allows.
        ``prompt_tokens`` is charged to the tenant's fair share when the request starts."""
        depth_at_admit = self._depth
        rank = PRIORITY_RANK[priority]
        key = (-rank, -TIER_RANK[tier], next(self._arrivals))
        self.fair.tenant_weight[tenant] = self.fair.weight(tier)
        self.backlog.arrive(tenant, feature)
        request = Waiter(key, asyncio.get_running_loop().create_future(), time.perf_counter(), tenant, feature,
                          tier, prompt_tokens, caps)
        # A high-priority request may take a kept slot while other work waits for a shared one
        # (high work never waits while a slot is free: it would have been granted), or else the
        # slot of running work it preempts.
        if rank == _HIGH and self._waiting_high() is None and request.can_run():
            if self.in_use >= self.capacity and (victim := self._victim()) is not None:
                self._preempt(victim)
            if self.in_use < self.capacity:
                slot = self._grant(request, queue_wait_s=0.0)
                self._make_room_for_high()
                return slot
        elif (rank != _HIGH and self.in_use < self._others_limit() and request.can_run()
              and not self._paused and self.backlog.pick() is None):
            return self._grant(request, queue_wait_s=0.0)
        for cap in caps:
            if not cap.can_queue():
                raise CapReached(cap)
        if self._depth >= self.max_depth:
            victim_waiter = self.backlog.displaceable(rank, TIER_RANK[tier], tenant)
            if victim_waiter is None:
                self._count_shed("queue_full")
                raise Shed("queue_full", self.retry_after_s(), "The queue is full; try again later.")
            self._remove(victim_waiter)
            self._count_shed("displaced")
            victim_waiter.future.set_exception(
                Shed("displaced", self.retry_after_s(),
                     "Shed for more important work or a tenant with less of the queue; try again later.")
            )
        future = request.future
        self._push(request)
        self._shed_past_target()  # possibly this very request: then the wait below raises at once
        try:
            slot = await asyncio.wait_for(asyncio.shield(future), timeout=self.max_wait_s)
        except TimeoutError:
            if future.done() and not future.exception():
                future.result().release()  # granted at the last moment: give it back
            elif not future.done():
                self._remove(request)
                future.cancel()
            self._count_shed("queue_timeout")
            raise Shed(
                "queue_timeout",
                self.retry_after_s(),
                f"The request waited over {self.max_wait_s:g} s in the queue; try again later.",
            ) from None
        except asyncio.CancelledError:  # the client went away while waiting
            if future.done() and not future.cancelled() and not future.exception():
                future.result().release()
            elif not future.done():
                self._remove(request)
                future.cancel()
            raise
        slot.depth_at_admit = depth_at_admit
        return slot

    @property
    def mean_service_s(self) -> float | None:
        """How long a request has held its slot, on average lately (None until one has finished)."""
        return self._mean_service_s

    def estimated_wait_s(self) -> float | None:
        """How long a request joining the back of the queue now would wait: the requests waiting,
        drained at the observed service rate (None until a request has finished)."""
        if self._mean_service_s is None:
            return None
        return self._depth * self._mean_service_s / (self.capacity - self.high_reserve)

    def past_target(self, fraction: float = 1.0) -> bool:
        """Whether the queue's estimated wait is past ``fraction`` of its target (never, without one)."""
        wait = self.estimated_wait_s()
        return self.target_wait_s is not None and wait is not None and wait > self.target_wait_s * fraction

    def shed_early(self, *, priority: PriorityName, tier: Tier, tenant: str = "") -> None:
        """Raise ``Shed`` now if the request would be shed the moment it joined the queue (no waiter
        would be shed in its place, and the wait it would make is past its priority's share of the
        target). Called before the request is tokenized, so overload costs as little as it can."""
        target, service = self.target_wait_s, self._mean_service_s
        rank = PRIORITY_RANK[priority]
        factor = SHED_PAST_TARGET.get(rank)
        if target is None or service is None or factor is None or (self.in_use < self.capacity and not self._depth):
            return
        wait = (self._depth + 1) * service / (self.capacity - self.high_reserve)
        if wait <= target * factor:
            return
        if self.backlog.displaceable(rank, TIER_RANK[tier], tenant) is not None:
            return  # a waiter from a lower class or a heavier tenant would be shed in its place
        self._count_shed("overloaded")
        raise self._overloaded(wait, rank)

    def _shed_past_target(self) -> None:
        target = self.target_wait_s
        if target is None:
            return
        while (wait := self.estimated_wait_s()) is not None:
            lowest = self.backlog.shed_candidate()
            if lowest is None:
                return
            factor = SHED_PAST_TARGET.get(lowest.rank)
            if factor is None or wait <= target * factor:
                return
            self._remove(lowest)
            self._count_shed("overloaded")
            lowest.future.set_exception(self._overloaded(wait, lowest.rank))

    def _overloaded(self, wait: float, rank: int) -> Shed:
        return Shed("overloaded", self.retry_after_s(),
                    f"The runtime is overloaded: the queue's estimated wait is {wait:.1f} s, past its target of "
                    f"{self.target_wait_s:g} s, and {_PRIORITY_NAME[rank]}-priority work is shed first; "
                    "try again later.")

    def retry_after_s(self) -> int:
        """A client's sensible wait: the queue ahead drained at the observed service rate."""
        service = self._mean_service_s if self._mean_service_s is not None else 1.0
        estimate = (self._depth + 1) * service / (self.capacity - self.high_reserve)
        return int(min(60, max(1, math.ceil(estimate))))

    def _high_running(self) -> bool:
        return any(s.rank == _HIGH for s in self._running)

    def _others_limit(self) -> int:
        """How many requests may run for a request that is not high-priority to start (or resume)."""
        limit = self.capacity - self.high_reserve
        return min(limit, self.high_max_running) if self._high_running() else limit

    def _push(self, waiter: Waiter) -> None:
        self.backlog.push(waiter)
        self._depth += 1

    def _remove(self, waiter: Waiter) -> None:
        if self.backlog.remove(waiter):
            self._depth -= 1

    # -- slots ----------------------------------------------------------------------------------------

    def _count_shed(self, reason: ShedReason) -> None:
        self.shed_total[reason] += 1

    def _grant(self, waiter: Waiter, *, queue_wait_s: float) -> Slot:
        slot = Slot(self, waiter.key, queue_wait_s=queue_wait_s, depth_at_admit=0, tenant=waiter.tenant,
                    feature=waiter.feature, tier=waiter.tier, caps=waiter.caps)
        self.in_use += 1
        self._running.add(slot)
        self.backlog.started(waiter.tenant, waiter.feature)
        for cap in waiter.caps:
            cap.running += 1
        self.fair.waited(waiter.tenant, queue_wait_s)
        self.fair.tenants.dispatched(waiter.tenant)
        slot.served(prompt_tokens=waiter.prompt_tokens)
        return slot

    def _victim(self) -> Slot | None:
        """The running request a high-priority one may preempt: the least important, newest first."""
        return max((s for s in self._running if s.preemptible and s.queue_wait_s < self.max_wait_s),
                   key=lambda s: s.key, default=None)

    def _waiting_high(self) -> Waiter | None:
        """The high-priority request to serve first (none held back by a cap)."""
        return self.backlog.pick((_HIGH,))

    def _preempt(self, victim: Slot) -> None:
        """Pause ``victim``: it waits to resume, and its slot is free for high-priority work."""
        victim._pause()
        self._running.discard(victim)
        self.in_use -= 1
        self.preemptions_total += 1
        self._paused.append(victim)
        self._depth += 1

    def _make_room_for_high(self) -> None:
        """Preempt what must step aside for high-priority work: running work whose slot a waiting
        high-priority request needs (work becomes preemptible only once it has started), and work
        over ``high_max_running`` while high-priority work runs."""
        while (waiter := self._waiting_high()) is not None and (victim := self._victim()) is not None:
            self._preempt(victim)
            self._grant_waiter(waiter, time.perf_counter())
        while (self.in_use > self.high_max_running and self._high_running()
               and (victim := self._victim()) is not None):
            self._preempt(victim)

    def _release(self, slot: Slot, held_s: float) -> None:
        # A paused request still counts against its tenant and its caps: it holds its KV cache.
        self.backlog.ended(slot.tenant, slot.feature)
        if slot.paused:  # its request ended while paused (a client gone): it no longer waits
            self._paused.remove(slot)
            self._depth -= 1
        else:
            self._mean_service_s = held_s if self._mean_service_s is None else 0.9 * self._mean_service_s + 0.1 * held_s
            self._running.discard(slot)
            self.in_use -= 1
        for cap in slot.caps:
            cap.released()  # wakes every queue a cap holds a waiter back in, this one too
        self._grant_next()

    def _grant_next(self) -> None:
        """Give free slots to waiters: high-priority requests first, then paused requests (in the
        order they were paused), then the rest by priority and fair share. A paused request whose
        wait (before it started, and paused) is past the longest wait resumes at the next free slot,
        ahead of everything, so no request is held back without bound."""
        now = time.perf_counter()
        while True:
            top = self.backlog.pick()
            paused = self._paused[0] if self._paused else None
            high_first = top is not None and top.rank == _HIGH
            if paused is not None and self.in_use < self.capacity and (
                    paused.queue_wait_s + paused.paused_for_s(now) > self.max_wait_s
                    or (not high_first and self.in_use < self._others_limit())):
                self._resume(paused)
            elif top is not None and self.in_use < (self.capacity if high_first else self._others_limit()):
                self._grant_waiter(top, now)
            else:
                return

    def _grant_waiter(self, waiter: Waiter, now: float) -> None:
        self._remove(waiter)
        if not waiter.future.done():
            waiter.future.set_result(self._grant(waiter, queue_wait_s=now - waiter.enqueued_at))

    def _resume(self, slot: Slot) -> None:
        self._paused.remove(slot)
        self._depth -= 1
        self.in_use += 1
        self._running.add(slot)
        slot._resume()

