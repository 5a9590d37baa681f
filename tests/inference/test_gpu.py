"""GPU monitoring: real units from NVML where it answers, ``None`` (never a guess) where it does not."""

from __future__ import annotations

import pynvml
import pytest

from inference.gpu import GpuMonitor
from tests.inference.fake_nvml import FakeGpu, FakeNvml

UUID_0 = "GPU-11111111-2222-3333-4444-555555555555"
UUID_1 = "GPU-66666666-7777-8888-9999-000000000000"


def two_gpus(*, unsupported: set[str] | None = None, errors: dict[str, int] | None = None) -> FakeNvml:
    """An H100 at work and an idle A10G; ``unsupported`` and ``errors`` apply to the A10G."""
    return FakeNvml(
        [
            FakeGpu(
                uuid=UUID_0,
                name="NVIDIA H100 80GB HBM3",
                util_gpu=87,
                mem_used=30 * 1024**3,
                mem_total=80 * 1024**3,
                power_mw=312_456,
                energy_mj=987_654_321,
                temperature_c=61,
            ),
            FakeGpu(
                uuid=UUID_1,
                name="NVIDIA A10G",
                power_mw=60_000,
                energy_mj=5_000,
                unsupported=unsupported or set(),
                errors=errors or {},
            ),
        ]
    )


@pytest.mark.parametrize(
    "error_code", [pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED]
)
def test_machine_without_nvml_reports_unavailable_and_no_readings(error_code: int) -> None:
    monitor = GpuMonitor(FakeNvml(init_error=error_code))

    assert monitor.available is False
    assert "NVML" in (monitor.unavailable_reason or "")
    assert monitor.devices() == []
    assert monitor.sample() == []
    assert monitor.energy_joules() is None
    monitor.close()


def test_real_pynvml_on_this_machine_reads_gpus_or_reports_none() -> None:
    with GpuMonitor() as monitor:
        if not monitor.available:
            assert monitor.sample() == []
            assert monitor.energy_joules() is None
        else:
            assert [s.device for s in monitor.sample()] == monitor.devices()


def test_driver_with_no_gpus_is_unavailable_and_shut_down() -> None:
    nvml = FakeNvml([])
    monitor = GpuMonitor(nvml)

    assert monitor.available is False
    assert monitor.sample() == []
    assert nvml.shutdown_calls == 1


def test_two_gpus_are_read_in_nvml_units_converted() -> None:
    monitor = GpuMonitor(two_gpus())

    assert monitor.available is True
    assert monitor.devices() == [UUID_0, UUID_1]
    first, second = monitor.sample()
    assert first.device == UUID_0
    assert first.name == "NVIDIA H100 80GB HBM3"
    assert first.gpu_util == 87.0
    assert first.mem_used == 30 * 1024**3
    assert first.mem_total == 80 * 1024**3
    assert first.power_w == pytest.approx(312.456)
    assert first.energy_joules_total == pytest.approx(987_654.321)
    assert first.temperature_c == 61.0
    assert first.power_limit_w == pytest.approx(700.0), "NVML's milliwatts, in watts"
    assert second.device == UUID_1
    assert second.name == "NVIDIA A10G"
    assert second.power_w == pytest.approx(60.0)
    assert second.energy_joules_total == pytest.approx(5.0)


def test_unsupported_energy_counter_is_none_for_that_field_only() -> None:
    monitor = GpuMonitor(two_gpus(unsupported={"nvmlDeviceGetTotalEnergyConsumption"}))

    first, second = monitor.sample()

    assert second.energy_joules_total is None
    assert second.power_w == pytest.approx(60.0)
    assert second.mem_total is not None
    assert second.temperature_c is not None
    assert first.energy_joules_total == pytest.approx(987_654.321)
    assert monitor.energy_joules(1) is None
    assert monitor.energy_joules(0) == pytest.approx(987_654.321)


def test_any_nvml_error_on_a_reading_leaves_just_that_field_null() -> None:
    monitor = GpuMonitor(
        two_gpus(
            unsupported={"nvmlDeviceGetPowerUsage", "nvmlDeviceGetPowerManagementLimit"},
            errors={"nvmlDeviceGetTemperature": pynvml.NVML_ERROR_UNKNOWN,
                    "nvmlDeviceGetUtilizationRates": pynvml.NVML_ERROR_NO_PERMISSION},
        )
    )

    _, second = monitor.sample()

    assert second.power_w is None
    assert second.power_limit_w is None
    assert second.temperature_c is None
    assert second.gpu_util is None
    assert second.mem_used == 0
    assert second.energy_joules_total == pytest.approx(5.0)


def test_a_gpu_that_cannot_be_identified_is_left_out() -> None:
    monitor = GpuMonitor(two_gpus(errors={"nvmlDeviceGetUUID": pynvml.NVML_ERROR_GPU_IS_LOST}))

    assert monitor.devices() == [UUID_0]
    assert [s.device for s in monitor.sample()] == [UUID_0]
    assert monitor.energy_joules(1) is None


def test_energy_counter_differences_give_the_energy_used() -> None:
    nvml = two_gpus()
    monitor = GpuMonitor(nvml)

    before = monitor.energy_joules(0)
    nvml.gpus[0].advance_energy(12.5)
    after = monitor.energy_joules(0)

    assert before is not None and after is not None
    assert after - before == pytest.approx(12.5)


def test_energy_counter_can_advance_by_a_fixed_step_on_every_read() -> None:
    monitor = GpuMonitor(FakeNvml([FakeGpu(uuid=UUID_0, energy_mj=1_000, energy_mj_per_read=250)]))

    readings = [monitor.energy_joules(0) for _ in range(3)]

    assert readings == [pytest.approx(1.0), pytest.approx(1.25), pytest.approx(1.5)]


def test_unknown_device_index_has_no_energy() -> None:
    assert GpuMonitor(two_gpus()).energy_joules(7) is None


def test_index_of_maps_a_uuid_to_its_nvml_index() -> None:
    monitor = GpuMonitor(two_gpus())

    assert monitor.index_of(UUID_1) == 1
    assert monitor.index_of("GPU-unknown") is None


def test_close_shuts_nvml_down_once_and_stops_readings() -> None:
    nvml = two_gpus()
    monitor = GpuMonitor(nvml)

    monitor.close()
    monitor.close()

    assert nvml.shutdown_calls == 1
    assert monitor.available is False
    assert monitor.sample() == []
    assert monitor.energy_joules(0) is None
