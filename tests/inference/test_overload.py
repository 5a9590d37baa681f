"""Under overload the runtime sheds with 503 and Retry-After, and a client that leaves frees its slot."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from inference.engine.models import LoadedModel
from tests.inference.live import LiveRuntime, post_in_thread, serve, slowed, tiny_config, wait_until

LONG = {"model": "tiny-random", "prompt": "The keeper", "max_tokens": 400, "ignore_eos": True}


@pytest.fixture(scope="module")
def one_slot(tiny_model: LoadedModel) -> Iterator[LiveRuntime]:
    """One running slot and room for one waiter, on a model slowed to ~10 ms a step."""
    config = tiny_config(max_batch_size=1, max_queue_depth=1, max_queue_wait_s=5.0)
    with serve(config, preloaded=(slowed(tiny_model, 0.01),)) as server:
        yield server


def wait_idle(live: LiveRuntime) -> None:
    wait_until(lambda: live.runtime.running() == 0 and live.runtime.queue_depth() == 0)


class OpenStream:
    """A streaming completion held open (its first token already read) until ``close``."""

    def __init__(self, live: LiveRuntime, body: dict, priority: str = "normal") -> None:
        self.client = live.client(**{"X-Wattson-Priority": priority})
        request = self.client.build_request("POST", "/v1/completions", json={**body, "stream": True})
        self.response = self.client.send(request, stream=True)
        assert self.response.status_code == 200
        self.lines = self.response.iter_lines()  # kept: dropping the iterator would close the stream
        while not next(self.lines).startswith("data: {"):
            pass

    def close(self) -> None:
        self.response.close()
        self.client.close()


def test_a_full_queue_sheds_with_503_and_retry_after(one_slot: LiveRuntime) -> None:
    wait_idle(one_slot)
    one_slot.events.clear()
    running = OpenStream(one_slot, LONG)
    waiting: list[httpx.Response] = []
    thread = post_in_thread(one_slot, {**LONG, "max_tokens": 2}, waiting)
    wait_until(lambda: one_slot.runtime.queue_depth() == 1)

    with one_slot.client() as other:
        shed = other.post("/v1/completions", json={**LONG, "max_tokens": 2})

    assert shed.status_code == 503
    assert int(shed.headers["Retry-After"]) >= 1
    assert shed.json()["error"]["code"] == "queue_full"
    running.close()
    thread.join(timeout=30)
    assert waiting[0].status_code == 200, "the waiting request is served once the slot frees"
    statuses = sorted(e.status for e in one_slot.wait_for_events(3))
    assert statuses == ["cancelled", "ok", "shed"]


def test_a_high_priority_request_displaces_a_low_priority_waiter(one_slot: LiveRuntime) -> None:
    wait_idle(one_slot)
    running = OpenStream(one_slot, LONG, priority="high")  # high work is never preempted
    low: list[httpx.Response] = []
    high: list[httpx.Response] = []
    low_thread = post_in_thread(one_slot, {**LONG, "max_tokens": 2}, low, **{"X-Wattson-Priority": "low"})
    wait_until(lambda: one_slot.runtime.queue_depth() == 1)
    high_thread = post_in_thread(one_slot, {**LONG, "max_tokens": 2}, high, **{"X-Wattson-Priority": "high"})
    low_thread.join(timeout=30)
    running.close()
    high_thread.join(timeout=30)
    assert low[0].status_code == 503 and low[0].json()["error"]["code"] == "displaced"
    assert "Retry-After" in low[0].headers
    assert high[0].status_code == 200


def test_a_request_that_waits_too_long_is_shed(tiny_model: LoadedModel) -> None:
    config = tiny_config(max_batch_size=1, max_queue_depth=4, max_queue_wait_s=0.2)
    with serve(config, preloaded=(slowed(tiny_model, 0.01),)) as live:
        running = OpenStream(live, LONG)
        with live.client() as other:
            started = time.monotonic()
            shed = other.post("/v1/completions", json={**LONG, "max_tokens": 2})
            waited = time.monotonic() - started
        running.close()
    assert shed.status_code == 503 and shed.json()["error"]["code"] == "queue_timeout"
    assert 0.2 <= waited < 5
    assert int(shed.headers["Retry-After"]) >= 1


def test_a_client_that_disconnects_mid_stream_is_cancelled_and_frees_its_slot(one_slot: LiveRuntime) -> None:
    wait_idle(one_slot)
    one_slot.events.clear()
    OpenStream(one_slot, LONG).close()
    wait_idle(one_slot)
    (event,) = one_slot.wait_for_events(1)
    assert event.status == "cancelled"
    assert 0 < event.completion_tokens < LONG["max_tokens"]
    assert event.gpu_seconds is not None and event.gpu_seconds > 0, "work done before the cancel is charged"
    assert one_slot.runtime.backends["tiny-random"].engine.stats.running == 0


def test_a_client_that_disconnects_while_queued_leaves_the_queue(one_slot: LiveRuntime) -> None:
    wait_idle(one_slot)
    one_slot.events.clear()
    running = OpenStream(one_slot, LONG)
    queued = httpx.Client(base_url=one_slot.base_url, headers={"Authorization": "Bearer sk-acme-premium-0001"},
                          timeout=0.5)
    with pytest.raises(httpx.ReadTimeout):
        queued.post("/v1/completions", json={**LONG, "max_tokens": 2})
    queued.close()
    wait_until(lambda: one_slot.runtime.queue_depth() == 0)
    running.close()
    wait_idle(one_slot)
    events = one_slot.wait_for_events(2)
    assert sorted(e.status for e in events) == ["cancelled", "cancelled"]
    assert sum(e.completion_tokens for e in events if e.queue_wait_ms and e.queue_wait_ms > 0) == 0


def test_metrics_show_queue_and_shedding(one_slot: LiveRuntime) -> None:
    with one_slot.client() as client:
        text = client.get("/metrics").text
    for name in ("wattson_queue_depth", "wattson_running_requests", "wattson_shed_requests_total",
                 "wattson_requests_total", "wattson_ttft_seconds_bucket", "wattson_queue_wait_seconds_bucket",
                 "wattson_e2e_latency_seconds_bucket", "wattson_engine_batch_size_bucket",
                 "wattson_engine_busy_seconds_total"):
        assert name in text, name
    shed = [line for line in text.splitlines() if line.startswith("wattson_shed_requests_total{")]
    assert any(float(line.rsplit(" ", 1)[1]) >= 1 for line in shed)
    assert "wattson_gpu_" not in text, "no GPU gauges on a machine without one"
    json.dumps(text)  # plain text, no binary
