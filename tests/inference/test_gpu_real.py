"""On a real NVIDIA GPU (skipped elsewhere; ``python -m bench.gpu_check`` runs these first): NVML
through ``pynvml`` reads the board, the engine on CUDA attributes the energy counter's growth to
its sequences, and a power limit round-trips through the driver."""

from __future__ import annotations

import queue
import time

import pytest
import torch

from inference.engine.engine import Engine, GenerationRequest, GenerationResult
from inference.engine.models import load_model
from inference.engine.sampling import SamplingParams
from inference.gpu import GpuMonitor, PowerLimitRefused

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]


def test_nvml_reads_the_gpu_torch_sees_with_an_energy_counter() -> None:
    with GpuMonitor() as monitor:
        assert monitor.available, monitor.unavailable_reason
        (sample, *_) = monitor.sample()
        assert sample.mem_total and sample.mem_total > 0
        first = monitor.energy_joules(0)
        time.sleep(1.0)
        assert first is not None and (monitor.energy_joules(0) or 0) >= first


def test_the_engine_on_cuda_attributes_energy_and_time_to_every_sequence(tmp_path_factory: pytest.TempPathFactory
                                                                         ) -> None:
    loaded = load_model("tiny-random", device=torch.device("cuda"), cache_dir=tmp_path_factory.mktemp("m"),
                        max_model_len=256)
    with GpuMonitor() as monitor:
        index = monitor.index_of(loaded.device_label)
        assert index is not None, f"NVML does not list {loaded.device_label}"
        engine = Engine(loaded, max_batch_size=8, energy_reader=lambda: monitor.energy_joules(index))
        engine.start()
        try:
            sinks: list[queue.Queue] = [queue.Queue() for _ in range(8)]
            for sink in sinks:
                engine.submit(GenerationRequest([1, 2, 3, 4], SamplingParams(max_tokens=64, ignore_eos=True)), sink.put)
            results = []
            for sink in sinks:
                while not isinstance(output := sink.get(timeout=120), GenerationResult):
                    continue
                results.append(output)
        finally:
            engine.stop()
    assert all(r.gpu_seconds and r.gpu_seconds > 0 for r in results)
    assert all(r.energy_joules is not None and r.energy_joules >= 0 for r in results)
    assert sum(r.energy_joules or 0 for r in results) == pytest.approx(engine.stats.energy_joules_total, rel=1e-6)


def test_a_power_limit_round_trips_or_the_driver_says_why() -> None:
    with GpuMonitor() as monitor:
        before = monitor.power_limit_w(0)
        assert before is not None
        try:
            monitor.set_power_limit_w(0, before)
        except PowerLimitRefused as refused:
            assert refused.reason in {"no_permission", "not_supported", "out_of_range"}, str(refused)
            return
        assert monitor.power_limit_w(0) == before
