"""High-priority work preempts running lower-priority work rather than wait for its slot.

The paused request steps aside (its engine sequence leaves the batch), waits for a slot again ahead of
everything that arrived after it, and resumes where it stopped, never paused twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import httpx

from inference.admission import AdmissionQueue, Slot
from inference.engine.models import LoadedModel
from tests.inference.live import post_in_thread, serve, slowed, tiny_config, wait_until

T = TypeVar("T")


class Work:
    """Running work that records what admission asked of it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause(self) -> None:
        self.calls.append("pause")

    def resume(self) -> None:
        self.calls.append("resume")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def running(queue: AdmissionQueue, priority: str, tier: str = "standard") -> tuple[Slot, Work]:
    slot = await queue.admit(priority=priority, tier=tier)  # type: ignore[arg-type]
    work = Work()
    slot.attach(work)
    return slot, work


def test_a_high_priority_request_preempts_the_least_important_newest_running_work() -> None:
    async def scenario() -> None:
        queue = AdmissionQueue(capacity=3, max_depth=10, max_wait_s=5)
        _, normal = await running(queue, "normal")
        _, older_low = await running(queue, "low")
        _, newer_low = await running(queue, "low")

        high = await asyncio.wait_for(queue.admit(priority="high", tier="standard"), timeout=1)

        assert high.queue_wait_s == 0
        assert (normal.calls, older_low.calls, newer_low.calls) == ([], [], ["pause"])
        assert queue.in_use == 3 and queue.depth == 1 and queue.preemptions_total == 1

    run(scenario())


def test_the_paused_request_resumes_after_high_priority_work_and_before_the_rest() -> None:
    async def scenario() -> None:
        queue = AdmissionQueue(capacity=1, max_depth=10, max_wait_s=5)
        victim, work = await running(queue, "normal")
        earlier_normal = asyncio.create_task(queue.admit(priority="normal", tier="premium"))
        await asyncio.sleep(0)
        high = await queue.admit(priority="high", tier="standard")
        later_high = asyncio.create_task(queue.admit(priority="high", tier="standard"))
        await asyncio.sleep(0)

        high.release()
        second_high = await asyncio.wait_for(later_high, timeout=1)
        assert work.calls == ["pause"] and victim.paused
        second_high.release()
        assert work.calls == ["pause", "resume"] and not victim.paused
        assert not earlier_normal.done(), "a paused request goes before waiting work of its own priority"
        victim.release()
        (await asyncio.wait_for(earlier_normal, timeout=1)).release()
        assert victim.queue_wait_s > 0, "the time it spent paused counts as queue wait"

    run(scenario())


def test_a_request_paused_past_the_longest_wait_resumes_ahead_of_high_priority_work() -> None:
    async def scenario() -> None:
        queue = AdmissionQueue(capacity=1, max_depth=10, max_wait_s=0.2)
        victim, work = await running(queue, "low")
        high = await queue.admit(priority="high", tier="standard")
        await asyncio.sleep(0.25)
        later_high = asyncio.create_task(queue.admit(priority="high", tier="standard"))
        await asyncio.sleep(0)
        high.release()
        assert work.calls == ["pause", "resume"], "its pause is bounded"
        assert not later_high.done()
        victim.release()
        (await asyncio.wait_for(later_high, timeout=1)).release()

    run(scenario())


def test_while_high_priority_work_runs_at_most_high_max_running_requests_run() -> None:
    async def scenario() -> None:
        queue = AdmissionQueue(capacity=4, max_depth=10, max_wait_s=5, high_max_running=2)
        others = [await running(queue, "normal") for _ in range(3)]
        high = await queue.admit(priority="high", tier="standard")
        assert queue.in_use == 2, "two of the three others are paused"
        assert [w.calls for _, w in others] == [[], ["pause"], ["pause"]]
        newcomer = asyncio.create_task(queue.admit(priority="low", tier="standard"))
        await asyncio.sleep(0)
        assert not newcomer.done(), "a free slot is not for other work while high-priority work runs"
        high.release()
        assert [w.calls for _, w in others] == [[], ["pause", "resume"], ["pause", "resume"]]
        (await asyncio.wait_for(newcomer, timeout=1)).release()

    run(scenario())


def test_a_request_that_has_waited_the_longest_wait_is_not_paused_again() -> None:
    async def scenario() -> None:
        queue = AdmissionQueue(capacity=1, max_depth=10, max_wait_s=0.2)
        _, work = await running(queue, "low")
        first_high = await queue.admit(priority="high", tier="standard")
        await asyncio.sleep(0.25)
        first_high.release()  # the low request resumes, having waited 0.25 s paused
        second_high = asyncio.create_task(queue.admit(priority="high", tier="standard"))
        await asyncio.sleep(0.01)
        assert work.calls == ["pause", "resume"]
        assert not second_high.done(), "it waits for the slot instead of pausing the same request again"
        second_high.cancel()

    run(scenario())


def test_a_request_may_be_paused_again_within_the_longest_wait() -> None:
    async def scenario() -> None:
        queue = AdmissionQueue(capacity=1, max_depth=10, max_wait_s=5)
        _, work = await running(queue, "low")
        (await queue.admit(priority="high", tier="standard")).release()
        (await asyncio.wait_for(queue.admit(priority="high", tier="standard"), timeout=1)).release()
        assert work.calls == ["pause", "resume", "pause", "resume"]

    run(scenario())


def test_high_priority_work_and_work_that_cannot_pause_are_never_preempted() -> None:
    async def scenario() -> None:
        queue = AdmissionQueue(capacity=2, max_depth=10, max_wait_s=5)
        _, high_work = await running(queue, "high")
        await queue.admit(priority="low", tier="standard")  # an upstream's request: nothing to pause
        waiting = asyncio.create_task(queue.admit(priority="high", tier="standard"))
        await asyncio.sleep(0.01)
        assert not waiting.done() and high_work.calls == [] and queue.preemptions_total == 0
        waiting.cancel()

    run(scenario())


def test_work_that_becomes_pausable_while_high_priority_work_waits_is_preempted_at_once() -> None:
    async def scenario() -> None:
        queue = AdmissionQueue(capacity=1, max_depth=10, max_wait_s=5)
        granted = await queue.admit(priority="normal", tier="standard")  # its engine work not started yet
        high = asyncio.create_task(queue.admit(priority="high", tier="standard"))
        await asyncio.sleep(0)
        assert not high.done()
        work = Work()
        granted.attach(work)
        assert (await asyncio.wait_for(high, timeout=1)).queue_wait_s >= 0
        assert work.calls == ["pause"]

    run(scenario())


def test_a_paused_request_whose_client_leaves_gives_up_its_place() -> None:
    async def scenario() -> None:
        queue = AdmissionQueue(capacity=1, max_depth=10, max_wait_s=5)
        victim, work = await running(queue, "normal")
        high = await queue.admit(priority="high", tier="standard")
        victim.release()  # the client went away while paused
        assert queue.depth == 0
        high.release()
        assert queue.in_use == 0 and work.calls == ["pause"]

    run(scenario())


LONG = {"model": "tiny-random", "prompt": "The keeper", "max_tokens": 60, "ignore_eos": True, "temperature": 0}


def test_over_http_a_high_priority_request_runs_at_once_and_the_paused_one_still_completes(
        tiny_model: LoadedModel) -> None:
    """Both slots are taken by low-priority streams; a high request is served without waiting for
    them, and the paused stream goes on to give the same text as an unpaused run."""
    config = tiny_config(max_batch_size=2, max_queue_depth=4, max_queue_wait_s=30.0)
    with serve(config, preloaded=(slowed(tiny_model, 0.02),)) as live:
        with live.client() as client:
            alone = client.post("/v1/completions", json=LONG).json()["choices"][0]["text"]
        live.events.clear()
        lows: list[httpx.Response] = []
        highs: list[httpx.Response] = []
        low_threads = [post_in_thread(live, LONG, lows, **{"X-Wattson-Priority": "low"}) for _ in range(2)]
        wait_until(lambda: live.runtime.running() == 2 and all(
            b.engine.stats.running == 2 for b in live.runtime.backends.values()))
        post_in_thread(live, {**LONG, "max_tokens": 4}, highs, **{"X-Wattson-Priority": "high"}).join(timeout=30)
        for thread in low_threads:
            thread.join(timeout=60)
        events = live.wait_for_events(3)
        metrics = httpx.get(live.base_url + "/metrics").text

    assert [r.status_code for r in highs] == [200]
    assert [r.status_code for r in lows] == [200, 200]
    assert all(r.json()["choices"][0]["text"] == alone for r in lows)
    by_priority = {e.priority: e for e in events if e.priority == "high"}
    assert by_priority["high"].queue_wait_ms == 0
    paused = [e for e in events if e.priority == "low" and e.queue_wait_ms > 0]
    assert len(paused) == 1, "one low stream was paused, and its pause is its queue wait"
    assert 'wattson_preemptions_total{model="tiny-random"} 1' in metrics

