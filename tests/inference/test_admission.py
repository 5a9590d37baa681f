"""Admission: priority order, bounded depth with shedding of the lowest, bounded wait."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from inference.admission import AdmissionQueue, Shed, Slot, effective_priority

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_a_free_slot_admits_at_once() -> None:
    async def scenario() -> Slot:
        return await AdmissionQueue(capacity=2, max_depth=4, max_wait_s=1).admit(priority="normal", tier="standard")

    slot = run(scenario())
    assert slot.queue_wait_s == 0 and slot.depth_at_admit == 0


def test_waiting_requests_are_served_by_priority_then_tier_then_arrival() -> None:
    async def scenario() -> list[str]:
        queue = AdmissionQueue(capacity=1, max_depth=10, max_wait_s=5)
        holder = await queue.admit(priority="normal", tier="standard")
        order: list[str] = []

        async def wait(name: str, priority: str, tier: str) -> None:
            slot = await queue.admit(priority=priority, tier=tier)  # type: ignore[arg-type]
            order.append(name)
            await asyncio.sleep(0)
            slot.release()

        tasks = []
        for name, priority, tier in [("low-premium", "low", "premium"), ("normal-free", "normal", "free"),
                                     ("high-standard", "high", "standard"), ("normal-premium", "normal", "premium"),
                                     ("normal-free-2", "normal", "free")]:
            tasks.append(asyncio.create_task(wait(name, priority, tier)))
            await asyncio.sleep(0)
        assert queue.depth == 5
        holder.release()
        await asyncio.gather(*tasks)
        return order

    assert run(scenario()) == ["high-standard", "normal-premium", "normal-free", "normal-free-2", "low-premium"]


def test_a_full_queue_sheds_the_newcomer_when_it_is_not_more_important() -> None:
    async def scenario() -> Shed:
        queue = AdmissionQueue(capacity=1, max_depth=1, max_wait_s=5)
        await queue.admit(priority="normal", tier="standard")
        waiting = asyncio.create_task(queue.admit(priority="normal", tier="standard"))
        await asyncio.sleep(0)
        with pytest.raises(Shed) as shed:
            await queue.admit(priority="normal", tier="standard")
        waiting.cancel()
        return shed.value

    shed = run(scenario())
    assert shed.reason == "queue_full" and shed.retry_after_s >= 1


def test_a_full_queue_sheds_its_lowest_priority_waiter_for_a_more_important_one() -> None:
    async def scenario() -> tuple[Shed, int]:
        queue = AdmissionQueue(capacity=1, max_depth=1, max_wait_s=5)
        holder = await queue.admit(priority="normal", tier="standard")
        low = asyncio.create_task(queue.admit(priority="low", tier="free"))
        await asyncio.sleep(0)
        high = asyncio.create_task(queue.admit(priority="high", tier="premium"))
        await asyncio.sleep(0)
        with pytest.raises(Shed) as shed:
            await low
        holder.release()
        slot = await high
        return shed.value, queue.shed_total["displaced"] + (slot.queue_wait_s >= 0)

    shed, count = run(scenario())
    assert shed.reason == "displaced" and count == 2


def test_a_request_is_shed_after_the_longest_allowed_wait() -> None:
    async def scenario() -> tuple[Shed, int]:
        queue = AdmissionQueue(capacity=1, max_depth=5, max_wait_s=0.05)
        await queue.admit(priority="high", tier="premium")
        with pytest.raises(Shed) as shed:
            await queue.admit(priority="high", tier="premium")
        return shed.value, queue.depth

    shed, depth = run(scenario())
    assert shed.reason == "queue_timeout" and depth == 0


def test_a_waiter_that_goes_away_leaves_the_queue_and_takes_no_slot() -> None:
    async def scenario() -> tuple[int, int]:
        queue = AdmissionQueue(capacity=1, max_depth=5, max_wait_s=5)
        holder = await queue.admit(priority="normal", tier="standard")
        gone = asyncio.create_task(queue.admit(priority="normal", tier="standard"))
        await asyncio.sleep(0)
        gone.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gone
        depth_after_cancel = queue.depth
        holder.release()
        return depth_after_cancel, queue.in_use

    assert run(scenario()) == (0, 0)


def test_releasing_a_slot_twice_frees_it_once() -> None:
    async def scenario() -> int:
        queue = AdmissionQueue(capacity=2, max_depth=5, max_wait_s=5)
        slot = await queue.admit(priority="normal", tier="standard")
        await queue.admit(priority="normal", tier="standard")
        slot.release()
        slot.release()
        return queue.in_use

    assert run(scenario()) == 1


@pytest.mark.parametrize(("hint", "tier", "expected"), [
    ("high", "free", "normal"), ("high", "standard", "high"), ("low", "premium", "low"), ("normal", "free", "normal"),
])
def test_a_keys_tier_caps_its_priority_hint(hint: str, tier: str, expected: str) -> None:
    assert effective_priority(hint, tier) == expected  # type: ignore[arg-type]
