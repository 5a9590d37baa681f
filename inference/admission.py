"""Admission: a bounded priority queue in front of each model's running slots.

Requests wait here until the engine (or upstream) has a free slot. The order is effective priority
(the ``X-Wattson-Priority`` hint, capped by the key's tier), then tier, then arrival. Over the
queue's depth the lowest-priority waiting request is shed; past the longest allowed wait a request
is shed too. With a target wait, the queue also sheds before it is full: while the estimated wait
(the requests waiting, drained at the observed service rate) is past the target, waiting low-priority
requests are shed, lowest first, and past twice the target normal ones too; high-priority work is
only ever shed by a full queue or its own wait. Slots can be kept for high-priority work
(``high_reserve``): other work runs in the rest, so a high-priority request finds a slot at once
instead of waiting for one to free. Shed requests get 503 with ``Retry-After`` (the API's job); a
waiting client that goes away simply leaves the queue.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Literal

from inference.config import Tier

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


@dataclass(order=True)
class _Waiter:
    key: tuple[int, int, int]
    future: asyncio.Future[Slot] = field(compare=False)
    enqueued_at: float = field(compare=False)
    done: bool = field(default=False, compare=False)


class Slot:
    """A running slot held by one request; ``release`` it exactly once when the request ends."""

    def __init__(self, queue: AdmissionQueue, *, queue_wait_s: float, depth_at_admit: int) -> None:
        self._queue = queue
        self.queue_wait_s = queue_wait_s
        self.depth_at_admit = depth_at_admit
        self._held_since = time.perf_counter()
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._queue._release(time.perf_counter() - self._held_since)


class AdmissionQueue:
    def __init__(self, *, capacity: int, max_depth: int, max_wait_s: float, target_wait_s: float | None = None,
                 high_reserve: int = 0) -> None:
        if not 0 <= high_reserve < capacity:
            raise ValueError("high_reserve must leave at least one slot to other work")
        self.capacity = capacity
        self.high_reserve = high_reserve
        self.max_depth = max_depth
        self.max_wait_s = max_wait_s
        self.target_wait_s = target_wait_s
        self.in_use = 0
        self._heap: list[_Waiter] = []
        self._depth = 0
        self._arrivals = itertools.count()
        self._mean_service_s: float | None = None
        self.shed_total: dict[ShedReason, int] = {"queue_full": 0, "queue_timeout": 0, "displaced": 0,
                                                  "overloaded": 0}

    @property
    def depth(self) -> int:
        """Requests waiting now (not counting those running)."""
        return self._depth

    async def admit(self, *, priority: PriorityName, tier: Tier) -> Slot:
        """Wait for a running slot; raise ``Shed`` if the request is not to be served."""
        depth_at_admit = self._depth
        rank = PRIORITY_RANK[priority]
        # A high-priority request may take a kept slot while other work waits for a shared one
        # (high work never waits while a slot is free: it would have been granted).
        if self.in_use < self._slots_for(rank) and (self._depth == 0 or rank == _HIGH):
            self.in_use += 1
            return Slot(self, queue_wait_s=0.0, depth_at_admit=0)
        key = (-rank, -TIER_RANK[tier], next(self._arrivals))
        if self._depth >= self.max_depth:
            lowest = max((w for w in self._heap if not w.done), default=None)
            if lowest is None or lowest.key < key:
                self._count_shed("queue_full")
                raise Shed("queue_full", self.retry_after_s(), "The queue is full; try again later.")
            self._drop(lowest)
            self._count_shed("displaced")
            lowest.future.set_exception(
                Shed("displaced", self.retry_after_s(), "Shed for higher-priority work; try again later.")
            )
        waiter = _Waiter(key, asyncio.get_running_loop().create_future(), time.perf_counter())
        heapq.heappush(self._heap, waiter)
        self._depth += 1
        self._shed_past_target()  # possibly this very request: then the wait below raises at once
        try:
            slot = await asyncio.wait_for(asyncio.shield(waiter.future), timeout=self.max_wait_s)
        except TimeoutError:
            if waiter.future.done() and not waiter.future.exception():
                waiter.future.result().release()  # granted at the last moment: give it back
            elif not waiter.future.done():
                self._drop(waiter)
                waiter.future.cancel()
            self._count_shed("queue_timeout")
            raise Shed(
                "queue_timeout",
                self.retry_after_s(),
                f"The request waited over {self.max_wait_s:g} s in the queue; try again later.",
            ) from None
        except asyncio.CancelledError:  # the client went away while waiting
            if waiter.future.done() and not waiter.future.cancelled() and not waiter.future.exception():
                waiter.future.result().release()
            elif not waiter.future.done():
                self._drop(waiter)
                waiter.future.cancel()
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

    def shed_early(self, *, priority: PriorityName, tier: Tier) -> None:
        """Raise ``Shed`` now if the request would be shed the moment it joined the queue (it would
        be the least important waiter, and the wait it would make is past its priority's share of
        the target). Called before the request is tokenized, so overload costs as little as it can."""
        target, service = self.target_wait_s, self._mean_service_s
        rank = PRIORITY_RANK[priority]
        factor = SHED_PAST_TARGET.get(rank)
        if target is None or service is None or factor is None or (self.in_use < self.capacity and not self._depth):
            return
        wait = (self._depth + 1) * service / (self.capacity - self.high_reserve)
        if wait <= target * factor:
            return
        key = (-rank, -TIER_RANK[tier])
        if any(w.key[:2] > key for w in self._heap if not w.done):
            return  # a less important waiter would be shed in its place
        self._count_shed("overloaded")
        raise self._overloaded(wait, rank)

    def _shed_past_target(self) -> None:
        target = self.target_wait_s
        if target is None:
            return
        while (wait := self.estimated_wait_s()) is not None:
            lowest = max((w for w in self._heap if not w.done), default=None)
            if lowest is None:
                return
            rank = -lowest.key[0]
            factor = SHED_PAST_TARGET.get(rank)
            if factor is None or wait <= target * factor:
                return
            self._drop(lowest)
            self._count_shed("overloaded")
            lowest.future.set_exception(self._overloaded(wait, rank))

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

    def _slots_for(self, rank: int) -> int:
        return self.capacity if rank == _HIGH else self.capacity - self.high_reserve

    def _drop(self, waiter: _Waiter) -> None:
        if not waiter.done:
            waiter.done = True
            self._depth -= 1

    def _count_shed(self, reason: ShedReason) -> None:
        self.shed_total[reason] += 1

    def _release(self, held_s: float) -> None:
        self._mean_service_s = held_s if self._mean_service_s is None else 0.9 * self._mean_service_s + 0.1 * held_s
        self.in_use -= 1
        while self._heap:
            waiter = self._heap[0]
            if not waiter.done and self.in_use >= self._slots_for(-waiter.key[0]):
                break  # the most important waiter cannot run yet, so nobody after it can
            heapq.heappop(self._heap)
            if waiter.done:
                continue
            self._drop(waiter)
            if waiter.future.done():
                continue
            self.in_use += 1
            waiter.future.set_result(
                Slot(self, queue_wait_s=time.perf_counter() - waiter.enqueued_at, depth_at_admit=0)
            )
