"""Fair share inside a priority class (Virtual Token Counter): the least-served backlogged tenant
first, a newly active tenant lifted to the backlogged minimum, weights per tier, shedding from the
heaviest tenant, a ruleset's concurrency caps; priority classes still come first. The queue alone,
then the real runtime over HTTP."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from inference.admission import AdmissionQueue, Shed, Slot
from inference.config import ApiKey
from inference.engine.models import LoadedModel
from inference.fair_share import CapReached, ConcurrencyCap
from tests.inference.live import GLOBEX, KEYS, LiveRuntime, serve, slowed, tiny_config, wait_until

T = TypeVar("T")
TOKENS_PER_REQUEST = 10
UMBRELLA = "sk-umbrella-standard-04"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class Served:
    """Requests that record the order they got a slot in, each served ``TOKENS_PER_REQUEST``
    completion tokens before it gives the slot back."""

    def __init__(self, queue: AdmissionQueue) -> None:
        self.queue = queue
        self.order: list[str] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.go = asyncio.Event()

    async def enqueue(self, tenant: str, *, tier: str = "standard", priority: str = "normal",
                      feature: str = "default", count: int = 1) -> None:
        for _ in range(count):
            self.tasks.append(asyncio.create_task(self._one(tenant, tier, priority, feature)))
            await asyncio.sleep(0)

    async def _one(self, tenant: str, tier: str, priority: str, feature: str) -> None:
        slot = await self.queue.admit(priority=priority, tier=tier, tenant=tenant,  # type: ignore[arg-type]
                                      feature=feature)
        self.order.append(tenant if feature == "default" else f"{tenant}/{feature}")
        slot.served(completion_tokens=TOKENS_PER_REQUEST)
        await asyncio.sleep(0)
        slot.release()

    async def finish(self) -> list[str]:
        await asyncio.gather(*self.tasks)
        return self.order


async def holder(queue: AdmissionQueue, tenant: str = "holder") -> Slot:
    return await queue.admit(priority="normal", tier="standard", tenant=tenant)


def order_served(*groups: tuple[str, dict[str, Any]], **queue_options: Any) -> list[str]:
    """The order in which one slot serves ``groups`` of requests (tenant, ``Served.enqueue``'s
    options), all queued while the slot is held, on a queue made with ``queue_options``."""

    async def scenario() -> list[str]:
        queue = AdmissionQueue(capacity=1, max_depth=30, max_wait_s=5, **queue_options)
        held = await holder(queue)
        served = Served(queue)
        for tenant, options in groups:
            await served.enqueue(tenant, **options)
        held.release()
        return await served.finish()

    return run(scenario())


def test_the_least_served_backlogged_tenant_goes_first_even_when_it_arrived_last() -> None:
    order = order_served(("flood", {"count": 4}), ("light", {}))
    # Lifted to the flooder's counter on arrival, the light tenant is served as soon as the
    # flooder has been charged for one request, not after all four.
    assert order.index("light") == 1


def test_first_come_first_served_when_fair_share_is_off() -> None:
    assert order_served(("flood", {"count": 4}), ("light", {}), fair=False) == ["flood"] * 4 + ["light"]


def test_a_newly_active_tenant_is_lifted_to_the_backlogged_minimum_so_idle_time_banks_no_credit() -> None:
    async def scenario() -> tuple[float, float, list[str]]:
        queue = AdmissionQueue(capacity=1, max_depth=20, max_wait_s=5)
        held = await holder(queue)
        queue.fair.charge("flood", "default", "standard", 1000)  # it has been served for a long while
        served = Served(queue)
        await served.enqueue("flood", count=4)
        flood_counter = queue.fair.tenants["flood"]
        await served.enqueue("newcomer", count=4)  # idle until now: its counter is 0
        lifted = queue.fair.tenants["newcomer"]
        held.release()
        return flood_counter, lifted, await served.finish()

    flood_counter, lifted, order = run(scenario())
    assert lifted == flood_counter == 1000
    # Without the lift the newcomer would take the next four slots in a row (1000 tokens of credit).
    assert order == ["flood", "newcomer", "flood", "newcomer", "flood", "newcomer", "flood", "newcomer"]


def test_a_tenant_that_was_backlogged_keeps_its_counter_when_it_arrives_again() -> None:
    async def scenario() -> float:
        queue = AdmissionQueue(capacity=1, max_depth=20, max_wait_s=5)
        held = await holder(queue)
        queue.fair.charge("ahead", "default", "standard", 500)
        served = Served(queue)
        await served.enqueue("behind", count=2)  # lifted to nothing: no other tenant waits or runs
        await served.enqueue("ahead")
        held.release()
        await served.finish()
        return queue.fair.tenants["ahead"]

    # A counter is only ever lifted, never lowered to the backlogged minimum.
    assert run(scenario()) == 500 + TOKENS_PER_REQUEST


def test_tier_weights_give_a_premium_tenant_twice_a_standard_tenants_service() -> None:
    first_nine = order_served(("standard-co", {"tier": "standard", "count": 8}),
                              ("premium-co", {"tier": "premium", "count": 8}))[:9]
    assert first_nine.count("premium-co") == 6 and first_nine.count("standard-co") == 3


def test_configured_tier_weights_replace_the_defaults() -> None:
    first_eight = order_served(("free-co", {"tier": "free", "count": 8}),
                               ("standard-co", {"tier": "standard", "count": 8}),
                               tier_weights={"free": 1, "standard": 3})[:8]
    assert first_eight.count("standard-co") == 6 and first_eight.count("free-co") == 2


def test_with_fair_by_feature_a_tenants_features_share_its_turns() -> None:
    order = order_served(("acme", {"feature": "batch", "count": 4}), ("acme", {"feature": "chat", "count": 2}),
                         fair_by_feature=True)
    assert order[:4] == ["acme/batch", "acme/chat", "acme/batch", "acme/chat"]


def test_without_fair_by_feature_a_tenants_requests_go_in_arrival_order() -> None:
    order = order_served(("acme", {"feature": "batch", "count": 3}), ("acme", {"feature": "chat"}))
    assert order == ["acme/batch", "acme/batch", "acme/batch", "acme/chat"]


def test_a_full_queue_sheds_the_heaviest_tenants_newest_request_not_the_newcomer() -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        queue = AdmissionQueue(capacity=1, max_depth=4, max_wait_s=5)
        held = await holder(queue)
        outcomes: dict[int, str] = {}

        async def request(n: int, tenant: str) -> None:
            try:
                slot = await queue.admit(priority="normal", tier="standard", tenant=tenant)
            except Shed as shed:
                outcomes[n] = f"{tenant}:{shed.reason}"
                return
            outcomes[n] = f"{tenant}:served"
            await asyncio.sleep(0)
            slot.release()

        tasks = []
        for n, tenant in enumerate(["flood", "flood", "flood", "light", "other"]):
            tasks.append(asyncio.create_task(request(n, tenant)))
            await asyncio.sleep(0)
        # The queue is full; the flooder asks again and is refused itself: it is the heaviest.
        tasks.append(asyncio.create_task(request(5, "flood")))
        await asyncio.sleep(0)
        held.release()
        await asyncio.gather(*tasks)
        return [outcomes[n] for n in range(6)], [t for t in queue.tenants()]

    outcomes, left = run(scenario())
    assert outcomes == ["flood:served", "flood:served", "flood:displaced", "light:served", "other:served",
                        "flood:queue_full"]
    assert left == []


def test_weights_count_when_choosing_whom_to_shed() -> None:
    async def scenario() -> str:
        queue = AdmissionQueue(capacity=1, max_depth=4, max_wait_s=5)
        held = await holder(queue)
        shed: list[str] = []

        async def request(tenant: str, tier: str) -> None:
            try:
                (await queue.admit(priority="normal", tier=tier, tenant=tenant)).release()  # type: ignore[arg-type]
            except Shed:
                shed.append(tenant)

        tasks = [asyncio.create_task(request("premium-co", "premium")) for _ in range(2)]
        tasks += [asyncio.create_task(request("free-co", "free")) for _ in range(2)]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(request("standard-co", "standard")))
        await asyncio.sleep(0)
        held.release()
        await asyncio.gather(*tasks)
        return shed[0]

    # Two places each, but a free tenant's share of the queue is a quarter of a premium one's.
    assert run(scenario()) == "free-co"


def test_a_lower_priority_class_is_shed_before_any_tenant_of_a_higher_one() -> None:
    async def scenario() -> list[str]:
        queue = AdmissionQueue(capacity=1, max_depth=3, max_wait_s=5)
        held = await holder(queue)
        shed: list[str] = []

        async def request(name: str, tenant: str, priority: str) -> None:
            try:
                (await queue.admit(priority=priority, tier="standard", tenant=tenant)).release()  # type: ignore[arg-type]
            except Shed:
                shed.append(name)

        tasks = [asyncio.create_task(request("flood-normal", "flood", "normal")) for _ in range(2)]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(request("light-low", "light", "low")))
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(request("other-normal", "other", "normal")))
        await asyncio.sleep(0)
        held.release()
        await asyncio.gather(*tasks)
        return shed

    assert run(scenario()) == ["light-low"]


def test_high_priority_still_goes_before_a_less_served_tenants_normal_work() -> None:
    async def scenario() -> list[str]:
        queue = AdmissionQueue(capacity=1, max_depth=20, max_wait_s=5)
        held = await holder(queue)
        queue.fair.charge("busy", "default", "standard", 10_000)
        served = Served(queue)
        await served.enqueue("idle", count=2)
        await served.enqueue("busy", priority="high")
        held.release()
        return await served.finish()

    assert run(scenario()) == ["busy", "idle", "idle"]


def test_a_running_cap_holds_a_tenants_request_back_while_others_take_the_free_slot() -> None:
    async def scenario() -> tuple[bool, bool, bool]:
        queue = AdmissionQueue(capacity=3, max_depth=10, max_wait_s=5)
        cap = ConcurrencyCap("cap-acme", "acme: one at a time", max_running=1, max_queued=None)
        first = await queue.admit(priority="normal", tier="standard", tenant="acme", caps=[cap])
        second = asyncio.create_task(queue.admit(priority="normal", tier="standard", tenant="acme", caps=[cap]))
        await asyncio.sleep(0)
        held_back = not second.done() and queue.depth == 1
        other = await asyncio.wait_for(queue.admit(priority="normal", tier="standard", tenant="globex"), 1)
        other_ran_at_once = other.queue_wait_s == 0
        first.release()
        await asyncio.wait_for(second, 1)
        return held_back, other_ran_at_once, cap.running == 1

    assert run(scenario()) == (True, True, True)


def test_a_cap_wakes_a_waiter_in_another_models_queue_when_it_frees() -> None:
    async def scenario() -> bool:
        small = AdmissionQueue(capacity=2, max_depth=10, max_wait_s=5)
        large = AdmissionQueue(capacity=2, max_depth=10, max_wait_s=5)
        cap = ConcurrencyCap("cap-acme", "", max_running=1, max_queued=None)
        running = await small.admit(priority="normal", tier="standard", tenant="acme", caps=[cap])
        waiting = asyncio.create_task(large.admit(priority="normal", tier="standard", tenant="acme", caps=[cap]))
        await asyncio.sleep(0)
        running.release()
        slot = await asyncio.wait_for(waiting, 1)
        return slot.queue_wait_s >= 0 and large.in_use == 1

    assert run(scenario())


def test_a_queued_cap_refuses_the_request_past_it() -> None:
    async def scenario() -> tuple[str, int]:
        queue = AdmissionQueue(capacity=1, max_depth=10, max_wait_s=5)
        cap = ConcurrencyCap("cap-acme", "", max_running=None, max_queued=1)
        held = await queue.admit(priority="normal", tier="standard", tenant="acme", caps=[cap])
        waiting = asyncio.create_task(queue.admit(priority="normal", tier="standard", tenant="acme", caps=[cap]))
        await asyncio.sleep(0)
        with pytest.raises(CapReached) as refused:
            await queue.admit(priority="normal", tier="standard", tenant="acme", caps=[cap])
        held.release()
        (await waiting).release()
        return refused.value.cap.rule_id, cap.queued

    assert run(scenario()) == ("cap-acme", 0)


def test_service_and_wait_are_kept_per_tenant() -> None:
    async def scenario() -> AdmissionQueue:
        queue = AdmissionQueue(capacity=1, max_depth=10, max_wait_s=5)
        held = await holder(queue)
        served = Served(queue)
        await served.enqueue("acme", count=2)
        await asyncio.sleep(0.05)
        held.release()
        await served.finish()
        return queue

    queue = run(scenario())
    acme = queue.fair.service["acme"]
    assert acme.tokens_served == 2 * TOKENS_PER_REQUEST and acme.admitted == 2
    assert acme.queue_wait_s_total >= 0.05


def test_features_named_by_clients_leave_nothing_behind_once_their_requests_end() -> None:
    async def scenario() -> AdmissionQueue:
        queue = AdmissionQueue(capacity=1, max_depth=300, max_wait_s=5, fair_by_feature=True)
        held = await holder(queue)
        served = Served(queue)
        for n in range(200):
            await served.enqueue("acme", feature=f"made-up-{n}")
        held.release()
        await served.finish()
        return queue

    queue = run(scenario())
    backlog = queue.backlog
    assert queue.fair.features.values == {} and not backlog._waiting_features and not backlog._running_features
    assert queue.fair.tenants["acme"] > 0, "the tenant's own counter is kept"


def test_a_newcomer_does_not_take_a_free_slot_ahead_of_a_paused_request() -> None:
    class Work:
        def pause(self) -> None: ...

        def resume(self) -> None: ...

    async def scenario() -> bool:
        queue = AdmissionQueue(capacity=2, max_depth=10, max_wait_s=5, high_max_running=1)
        normal = await queue.admit(priority="normal", tier="standard", tenant="acme")
        normal.attach(Work())
        high = await queue.admit(priority="high", tier="premium", tenant="globex")  # pauses acme's
        newcomer = asyncio.create_task(queue.admit(priority="normal", tier="standard", tenant="initech"))
        await asyncio.sleep(0)
        waited = not newcomer.done() and normal.paused
        high.release()  # the paused request resumes first
        slot = await asyncio.wait_for(newcomer, 1)
        return waited and not normal.paused and slot.queue_wait_s > 0

    assert run(scenario())


# -- over HTTP, on the real runtime ----------------------------------------------------------------

@pytest.fixture(params=[True, False], ids=["fair", "fifo"])
def one_slot(request: pytest.FixtureRequest, tiny_model: LoadedModel) -> Iterator[tuple[LiveRuntime, bool]]:
    """One running slot on a model slowed to ~5 ms a step, with fair share on or off."""
    config = tiny_config(max_batch_size=1, max_queue_depth=32, fair_share=request.param,
                         api_keys=(*KEYS, ApiKey(UMBRELLA, "umbrella", "standard")))
    with serve(config, preloaded=(slowed(tiny_model, 0.005),)) as server:
        yield server, request.param


def test_a_tenant_flooding_the_queue_does_not_make_another_wait_behind_its_backlog(
        one_slot: tuple[LiveRuntime, bool]) -> None:
    live, fair = one_slot
    finished: list[str] = []

    def send(key: str, tenant: str, max_tokens: int) -> threading.Thread:
        body = {"model": "tiny-random", "prompt": "The keeper", "max_tokens": max_tokens, "ignore_eos": True}

        def run() -> None:
            with live.client(key) as client:
                assert client.post("/v1/completions", json=body).status_code == 200
            finished.append(tenant)
        thread = threading.Thread(target=run)
        thread.start()
        return thread

    threads = [send(GLOBEX, "flood", 40) for _ in range(6)]  # each holds the slot for 40 steps or more
    wait_until(lambda: live.runtime.queue_depth() == 5)
    threads.append(send(UMBRELLA, "light", 12))  # the same tier as the flooder: only fair share tells them apart
    for thread in threads:
        thread.join(timeout=60)

    assert len(finished) == 7
    if fair:  # lifted to the flooder's counter, it goes next once the flooder has been charged
        assert finished.index("light") <= 2, finished
    else:  # first come, first served: behind the whole backlog
        assert finished.index("light") == 6, finished


def test_a_tenant_arriving_at_an_idle_queue_starts_level_with_the_last_one_served() -> None:
    async def scenario() -> tuple[float, list[str]]:
        queue = AdmissionQueue(capacity=1, max_depth=20, max_wait_s=5)
        veteran = await queue.admit(priority="normal", tier="standard", tenant="veteran")
        veteran.served(completion_tokens=1000)  # served alone for a long while
        veteran.release()
        held = await holder(queue, tenant="fresh")  # the queue was idle: no one waits or runs
        lifted = queue.fair.tenants["fresh"]
        served = Served(queue)
        await served.enqueue("fresh", count=3)
        await served.enqueue("veteran", count=3)
        held.release()
        return lifted, await served.finish()

    lifted, order = run(scenario())
    # Without the lift the newcomer would have 1000 tokens of credit, and the veteran would wait for
    # all of its requests.
    assert lifted == 1000
    assert order[:4].count("veteran") == 2
