"""Degradation under load: past the queue's target wait, low-priority work is shed first (then
normal, never high for the estimate), free-tier keys get a capped max_tokens, and the response and
the event say what happened."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import httpx
import pytest

from inference.admission import AdmissionQueue, Shed
from inference.config import ConfigError, load_config
from inference.degradation import cap_under_load
from inference.engine.models import LoadedModel
from tests.inference.live import ACME, INITECH, LiveRuntime, serve, slowed, tiny_config
from tests.inference.test_overload import LONG, OpenStream, wait_idle, wait_until

SHORT = {"model": "tiny-random", "prompt": "The keeper", "max_tokens": 2, "ignore_eos": True}


async def _arrive(queue: AdmissionQueue, name: str, priority: str, admitted: list[str]) -> str:
    try:
        slot = await queue.admit(priority=priority, tier="standard")  # type: ignore[arg-type]
    except Shed as shed:
        return f"{name}:{shed.reason}"
    admitted.append(name)
    await asyncio.sleep(0)
    slot.release()
    return f"{name}:ok"


def test_past_the_target_wait_low_work_is_shed_first_then_normal_and_never_high() -> None:
    async def scenario() -> tuple[list[str], list[str], dict]:
        queue = AdmissionQueue(capacity=1, max_depth=50, max_wait_s=5, target_wait_s=1.5)
        queue._mean_service_s = 1.0  # as if each request had held the slot for 1 s
        holder = await queue.admit(priority="normal", tier="standard")
        admitted: list[str] = []
        tasks = []
        # Each arrival's estimated wait is (requests waiting) x 1 s: low is shed past 1.5 s, normal past 3 s.
        for name, priority in [("low-1", "low"), ("normal-1", "normal"), ("high-1", "high"), ("normal-2", "normal"),
                               ("normal-3", "normal"), ("low-2", "low"), ("high-2", "high")]:
            tasks.append(asyncio.create_task(_arrive(queue, name, priority, admitted)))
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        holder.release()
        outcomes = await asyncio.gather(*tasks)
        return outcomes, admitted, dict(queue.shed_total)

    outcomes, admitted, shed = asyncio.run(scenario())
    assert outcomes == ["low-1:overloaded", "normal-1:ok", "high-1:ok", "normal-2:overloaded", "normal-3:overloaded",
                        "low-2:overloaded", "high-2:ok"]
    assert admitted == ["high-1", "high-2", "normal-1"]
    assert shed["overloaded"] == 4


def test_without_a_service_estimate_or_a_target_nothing_is_shed_for_the_estimate() -> None:
    async def scenario(target: float | None, service: float | None) -> list[str]:
        queue = AdmissionQueue(capacity=1, max_depth=50, max_wait_s=5, target_wait_s=target)
        queue._mean_service_s = service
        holder = await queue.admit(priority="normal", tier="standard")
        tasks = [asyncio.create_task(_arrive(queue, f"low-{i}", "low", [])) for i in range(5)]
        await asyncio.sleep(0)
        holder.release()
        return await asyncio.gather(*tasks)

    assert all(o.endswith(":ok") for o in asyncio.run(scenario(1.5, None)))
    assert all(o.endswith(":ok") for o in asyncio.run(scenario(None, 1.0)))


def test_a_request_that_would_be_shed_on_arrival_is_shed_before_any_work() -> None:
    async def scenario() -> list[str]:
        queue = AdmissionQueue(capacity=1, max_depth=50, max_wait_s=5, target_wait_s=1.5)
        queue._mean_service_s = 1.0
        holder = await queue.admit(priority="normal", tier="standard")
        outcomes = []
        queue.shed_early(priority="low", tier="standard")  # one waiting would be 1 s: not past 1.5 s
        waiting = asyncio.create_task(queue.admit(priority="low", tier="premium"))
        await asyncio.sleep(0)
        for priority, tier in [("low", "premium"), ("low", "standard"), ("low", "free"), ("normal", "free"),
                               ("high", "free")]:
            try:
                queue.shed_early(priority=priority, tier=tier)  # type: ignore[arg-type]
                outcomes.append(f"{priority}/{tier}:admit")
            except Shed as shed:
                outcomes.append(f"{priority}/{tier}:{shed.reason}")
        holder.release()
        (await waiting).release()
        return outcomes

    # A premium low request would displace nobody (the waiter is as important and came first); a
    # standard or free one neither; normal and high work would shed the waiting low request instead.
    assert asyncio.run(scenario()) == ["low/premium:overloaded", "low/standard:overloaded", "low/free:overloaded",
                                       "normal/free:admit", "high/free:admit"]


def test_free_keys_are_capped_from_half_the_target_before_low_work_is_shed() -> None:
    async def scenario() -> list[tuple[int, int | None, bool]]:
        # 8 slots, 2 s a request: each waiting request adds 0.25 s to the estimated wait; target 2 s.
        queue = AdmissionQueue(capacity=8, max_depth=50, max_wait_s=10, target_wait_s=2.0)
        queue._mean_service_s = 2.0
        held = [await queue.admit(priority="normal", tier="standard") for _ in range(8)]
        seen = []
        waiting = []
        for depth in range(10):
            cap = cap_under_load(limit=8, tier="free", admission=queue, asked=16, cap=None, default_max_tokens=256)
            try:
                queue.shed_early(priority="low", tier="free")
                shed = False
            except Shed:
                shed = True
            seen.append((depth, cap, shed))
            waiting.append(asyncio.create_task(queue.admit(priority="normal", tier="standard")))
            await asyncio.sleep(0)
        for slot in held:
            slot.release()
        for task in waiting:
            (await task).release()
        return seen

    seen = asyncio.run(scenario())
    capped = [depth for depth, cap, _ in seen if cap == 8]
    shed = [depth for depth, _, was_shed in seen if was_shed]
    assert capped == [5, 6, 7, 8, 9], "past 1 s (half the target) of estimated wait"
    assert shed == [8, 9], "joining would make the wait past 2 s"
    assert cap_under_load(limit=8, tier="standard", admission=AdmissionQueue(capacity=1, max_depth=1, max_wait_s=1,
                          target_wait_s=0.5), asked=16, cap=None, default_max_tokens=256) is None


def test_a_kept_slot_lets_high_priority_work_start_while_other_work_waits() -> None:
    async def scenario() -> list[str]:
        queue = AdmissionQueue(capacity=3, max_depth=10, max_wait_s=5, high_reserve=1)
        shared = [await queue.admit(priority="normal", tier="standard") for _ in range(2)]
        events: list[str] = []

        async def arrive(name: str, priority: str) -> None:
            slot = await queue.admit(priority=priority, tier="standard")  # type: ignore[arg-type]
            events.append(f"{name} runs")
            await asyncio.sleep(0.01)
            slot.release()

        normal = asyncio.create_task(arrive("normal", "normal"))
        await asyncio.sleep(0)
        events.append(f"waiting {queue.depth}, running {queue.in_use}")  # the third slot is kept
        high = asyncio.create_task(arrive("high", "high"))
        await asyncio.sleep(0)
        for slot in shared:
            slot.release()
        await asyncio.gather(normal, high)
        return events

    assert asyncio.run(scenario()) == ["waiting 1, running 2", "high runs", "normal runs"]


def test_degradation_options_are_checked() -> None:
    config = load_config(["--queue-target-wait-s", "2", "--free-max-tokens-under-load", "64"], environ={})
    assert (config.queue_target_wait_s, config.free_max_tokens_under_load) == (2.0, 64)
    with pytest.raises(ConfigError, match="below max_queue_wait_s"):
        load_config(["--queue-target-wait-s", "40", "--max-queue-wait-s", "30"], environ={})
    with pytest.raises(ConfigError, match="needs --queue-target-wait-s"):
        load_config(["--free-max-tokens-under-load", "64"], environ={})
    assert load_config(["--high-priority-slots", "1", "--max-batch-size", "4"], environ={}).high_priority_slots == 1
    with pytest.raises(ConfigError, match="leave other work at least one slot"):
        load_config(["--high-priority-slots", "4", "--max-batch-size", "4"], environ={})


# -- against a live runtime --------------------------------------------------------------------

@pytest.fixture(scope="module")
def loaded(tiny_model: LoadedModel) -> Iterator[LiveRuntime]:
    """One slot on a model slowed to ~20 ms a step, with a service time observed."""
    config = tiny_config(max_batch_size=1, max_queue_depth=16, max_queue_wait_s=30.0, queue_target_wait_s=1.0,
                         free_max_tokens_under_load=3)
    with serve(config, preloaded=(slowed(tiny_model, 0.02),)) as server:
        with server.client() as client:
            assert client.post("/v1/completions", json={**SHORT, "max_tokens": 10}).status_code == 200
        yield server


def hold_the_slot(live: LiveRuntime) -> OpenStream:
    """Occupy the only slot, and set the target wait to 1.6 service times: with S the mean service
    time, n waiting requests are an estimated n x S, so low work is shed from 2 waiting on, normal
    work from 4 (whatever this machine's speed; S does not move until a slot is released)."""
    wait_idle(live)
    admission = live.runtime.backends["tiny-random"].admission
    assert admission.mean_service_s is not None
    admission.target_wait_s = 1.6 * admission.mean_service_s
    live.events.clear()
    return OpenStream(live, LONG)


def post_in_thread(live: LiveRuntime, body: dict, results: dict, name: str, key: str = ACME,
                   **headers: str) -> threading.Thread:
    def run() -> None:
        with live.client(key, **headers) as client:
            results[name] = client.post("/v1/completions", json=body)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def post(live: LiveRuntime, body: dict, key: str = ACME, **headers: str) -> httpx.Response:
    with live.client(key, **headers) as client:
        return client.post("/v1/completions", json=body)


def assert_overloaded(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) >= 1
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("server_overloaded", "overloaded")
    assert "shed first" in error["message"]


def test_low_priority_work_is_shed_before_normal_and_high(loaded: LiveRuntime) -> None:
    running = hold_the_slot(loaded)
    results: dict[str, httpx.Response] = {}
    threads = [post_in_thread(loaded, SHORT, results, "low-1", **{"X-Wattson-Priority": "low"})]
    wait_until(lambda: loaded.runtime.queue_depth() == 1)
    threads.append(post_in_thread(loaded, SHORT, results, "normal-1"))
    wait_until(lambda: "low-1" in results and loaded.runtime.queue_depth() == 1)
    assert_overloaded(results["low-1"])  # a normal request arrived: the waiting low one made room
    threads.append(post_in_thread(loaded, SHORT, results, "high-1", **{"X-Wattson-Priority": "high"}))
    wait_until(lambda: loaded.runtime.queue_depth() == 2)
    low_again = post(loaded, SHORT, **{"X-Wattson-Priority": "low"})
    assert_overloaded(low_again)
    running.close()
    for thread in threads:
        thread.join(timeout=30)
    assert results["normal-1"].status_code == 200 and results["high-1"].status_code == 200

    shed = [e for e in loaded.wait_for_events(5) if e.status == "shed"]
    assert sorted(e.priority for e in shed) == ["low", "low"]
    assert all(e.http_status == 503 and e.error_type == "overloaded" for e in shed)
    with loaded.client() as client:
        metrics = client.get("/metrics").text
    assert 'wattson_shed_requests_total{model="tiny-random",reason="overloaded"} 2.0' in metrics


def test_under_load_free_keys_get_a_capped_max_tokens_and_are_told(loaded: LiveRuntime) -> None:
    wait_idle(loaded)
    calm = post(loaded, {**SHORT, "max_tokens": 5}, key=INITECH)
    assert calm.json()["usage"]["completion_tokens"] == 5 and "x-wattson-degraded" not in calm.headers

    running = hold_the_slot(loaded)
    results: dict[str, httpx.Response] = {}
    threads = []
    for i in (1, 2):  # two waiting: the estimated wait is past the target
        threads.append(post_in_thread(loaded, {**SHORT, "max_tokens": 5}, results, f"premium-{i}"))
        wait_until(lambda i=i: loaded.runtime.queue_depth() == i)
    threads.append(post_in_thread(loaded, {**SHORT, "max_tokens": 5}, results, "free", key=INITECH))
    wait_until(lambda: loaded.runtime.queue_depth() == 3)
    running.close()
    for thread in threads:
        thread.join(timeout=30)

    free = results["free"]
    assert free.status_code == 200
    assert free.headers["x-wattson-degraded"] == "max_tokens_capped=3"
    assert free.json()["usage"]["completion_tokens"] == 3
    for name in ("premium-1", "premium-2"):
        assert results[name].json()["usage"]["completion_tokens"] == 5, "only the free tier is capped"
        assert "x-wattson-degraded" not in results[name].headers
    capped = [e for e in loaded.wait_for_events(4) if e.tenant == "initech"]
    assert [e.rule_id for e in capped] == ["load:free_max_tokens"]
