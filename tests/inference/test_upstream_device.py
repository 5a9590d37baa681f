"""``--upstream-device NAME=GPU``: an upstream whose GPU this host's NVML sees (here a fake NVML with
the real API's shape). Its requests' events name that GPU and carry the energy counter's growth
split among them; what they add up to is what the counter moved while a request was in flight."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator

import httpx
import pytest

from inference.config import Upstream, UpstreamDevice
from inference.gpu import GpuMonitor
from tests.inference.fake_nvml import FakeGpu, FakeNvml
from tests.inference.fake_upstream import FakeUpstream, fake_upstream
from tests.inference.live import ACME, LiveRuntime, serve, tiny_config

UUID = "GPU-upstream-0"


@pytest.fixture
def board() -> FakeGpu:
    # Every read of the counter finds it 2 J further on: a GPU drawing power the whole time.
    return FakeGpu(uuid=UUID, energy_mj=9_000_000, energy_mj_per_read=2_000)


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with fake_upstream() as upstream:
        yield upstream


@pytest.fixture
def live(fake: FakeUpstream, board: FakeGpu) -> Iterator[LiveRuntime]:
    config = tiny_config(models=(), upstreams=(Upstream("big", fake.url, "vendor/big"),),
                         upstream_devices=(UpstreamDevice("big", "1"),), upstream_retries=0)
    # The upstream's GPU is the second one NVML lists: index 1 is what the flag names.
    with serve(config, gpu=GpuMonitor(nvml=FakeNvml([FakeGpu(uuid="GPU-other"), board]))) as runtime:
        yield runtime


def test_concurrent_requests_share_the_upstream_gpus_time_and_energy_and_name_it(
        live: LiveRuntime, fake: FakeUpstream) -> None:
    fake.reply(pieces=6, delay_s=0.02, tokens_per_piece=1, prompt_tokens=5)

    def ask() -> None:
        with live.client(ACME) as client:
            response = client.post("/v1/chat/completions", json={
                "model": "big", "stream": True, "messages": [{"role": "user", "content": "Hi"}]})
            assert response.status_code == 200

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    events = live.wait_for_events(4)

    ledger = live.runtime.backends["big"].attribution
    assert {e.device for e in events} == {UUID}
    assert {e.device_use_source for e in events} == {"attributed"}
    assert all(e.energy_joules is not None and e.energy_joules > 0 for e in events)
    assert math.fsum(e.gpu_seconds or 0 for e in events) == pytest.approx(ledger.busy_seconds, rel=1e-9)
    assert math.fsum(e.energy_joules or 0 for e in events) == pytest.approx(ledger.busy_joules, rel=1e-9)


def test_the_upstreams_busy_and_idle_time_and_energy_are_metrics(live: LiveRuntime, fake: FakeUpstream) -> None:
    fake.reply(pieces=2)
    with live.client(ACME) as client:
        assert client.post("/v1/completions", json={"model": "big", "prompt": "Hi"}).status_code == 200
        live.wait_for_events(1)
        text = httpx.get(live.base_url + "/metrics").text

    for name in ("busy_seconds", "idle_seconds", "busy_joules", "idle_joules"):
        assert f'wattson_upstream_{name}_total{{model="big"}}' in text


def test_an_upstream_device_nvml_cannot_read_leaves_energy_unmeasured(fake: FakeUpstream) -> None:
    config = tiny_config(models=(), upstreams=(Upstream("big", fake.url, "vendor/big"),),
                         upstream_devices=(UpstreamDevice("big", "3"),), upstream_retries=0)
    fake.reply(pieces=2)
    with serve(config, gpu=GpuMonitor(nvml=FakeNvml([FakeGpu(uuid=UUID)]))) as live, live.client(ACME) as client:
        assert client.post("/v1/completions", json={"model": "big", "prompt": "Hi"}).status_code == 200
        (event,) = live.wait_for_events(1)

    assert (event.device, event.energy_joules, event.device_use_source) == ("upstream", None, "attributed")
    assert event.gpu_seconds is not None and event.gpu_seconds > 0
