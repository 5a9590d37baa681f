"""The runtime's telemetry reaches the collector over real HTTP: every request once, through a
collector outage and a runtime restart, with runtime samples beside the events."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from inference.contracts import RequestEvent
from inference.engine.models import LoadedModel
from inference.gpu import GpuMonitor
from tests.inference.collector import Collector
from tests.inference.fake_nvml import FakeGpu, FakeNvml
from tests.inference.live import ACME, LiveRuntime, serve, tiny_config

TOKEN = "ingest-token-1"


def ask(live: LiveRuntime, n: int, feature: str) -> None:
    client = openai.OpenAI(base_url=live.base_url + "/v1", api_key=ACME, max_retries=0,
                           default_headers={"X-Wattson-Feature": feature})
    for i in range(n):
        client.completions.create(model="tiny-random", prompt=f"request {i}", max_tokens=2,
                                  extra_body={"ignore_eos": True})


def until(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(condition())


def test_no_event_is_lost_or_duplicated_across_an_outage_and_a_restart(
    tiny_model: LoadedModel, collector: Collector, tmp_path: Path
) -> None:
    config = tiny_config(finops_url=collector.url, finops_token=TOKEN, spool_dir=tmp_path / "spool",
                         export_interval_s=0.1)
    with serve(config, preloaded=(tiny_model,)) as live:
        ask(live, 3, "before-outage")
        assert until(lambda: len(collector.events) == 3)
        collector.down()
        ask(live, 4, "during-outage")
        sent_before_restart = [e.event_id for e in live.events]
    assert len(collector.events) == 3

    with serve(config, preloaded=(tiny_model,)) as restarted:
        ask(restarted, 2, "after-restart")
        collector.up()
        assert until(lambda: len(collector.events) == 9)
        served = sent_before_restart + [e.event_id for e in restarted.events]

    assert sorted(collector.events) == sorted(str(i) for i in served)
    assert collector.duplicates == 0
    assert collector.authorizations[-1] == f"Bearer {TOKEN}"
    features = [collector.events[i]["feature"] for i in collector.event_order]
    assert features == ["before-outage"] * 3 + ["during-outage"] * 4 + ["after-restart"] * 2, "sent in order"


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_a_request_is_recorded_before_the_last_byte_of_its_answer_leaves(tiny_model: LoadedModel,
                                                                          stream: bool) -> None:
    # A slow listener holds the event loop inside ``record``: an answer that left before its
    # event was recorded reaches the client while nothing has been seen yet.
    seen: list[RequestEvent] = []

    def slow_listener(event: RequestEvent) -> None:
        time.sleep(0.5)
        seen.append(event)

    with serve(tiny_config(), preloaded=(tiny_model,)) as live:
        live.runtime.subscribe(slow_listener)
        body = {"model": "tiny-random", "prompt": "hello", "max_tokens": 2, "stream": stream}
        with live.client() as client, client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = []
            for line in response.iter_lines():
                lines.append(line)
                if line == "data: [DONE]":
                    break
            recorded_when_answered = len(seen)

    assert (lines[-1] == "data: [DONE]") is stream
    assert recorded_when_answered == 1


def test_runtime_samples_carry_queue_state_and_gpu_readings(
    tiny_model: LoadedModel, collector: Collector, tmp_path: Path
) -> None:
    gpu = FakeGpu(uuid="GPU-11111111-2222-3333-4444-555555555555", util_gpu=73, power_mw=215_000,
                  energy_mj=9_000_000, temperature_c=61)
    monitor = GpuMonitor(FakeNvml([gpu]))  # NVML stand-in: this machine has no GPU
    config = tiny_config(finops_url=collector.url, finops_token=TOKEN, spool_dir=tmp_path / "spool",
                         export_interval_s=0.1, sample_interval_s=0.2)
    with serve(config, preloaded=(tiny_model,), gpu=monitor) as live:
        ask(live, 2, "search")
        assert until(lambda: len(collector.samples) >= 2)
    sample = collector.samples[-1]
    assert sample["runtime_id"] == "test-runtime"
    assert sample["queue_depth"] == 0 and sample["running"] == 0
    assert any(s["tokens_per_s"] > 0 for s in collector.samples)
    (device,) = sample["devices"]
    assert device == {"device": gpu.uuid, "name": gpu.name, "gpu_util": 73.0, "mem_used": gpu.mem_used,
                      "mem_total": gpu.mem_total, "power_w": 215.0, "energy_joules_total": 9000.0,
                      "temperature_c": 61.0, "power_limit_w": 700.0}


def test_samples_on_a_cpu_machine_have_no_device_readings(
    tiny_model: LoadedModel, collector: Collector, tmp_path: Path
) -> None:
    config = tiny_config(finops_url=collector.url, finops_token=TOKEN, spool_dir=tmp_path / "spool",
                         export_interval_s=0.1, sample_interval_s=0.2)
    with serve(config, preloaded=(tiny_model,), gpu=GpuMonitor(FakeNvml([]))) as live:
        ask(live, 1, "search")
        assert until(lambda: len(collector.samples) >= 1)
    assert all(s["devices"] == [] for s in collector.samples), "no GPU: no readings, never zeros"
