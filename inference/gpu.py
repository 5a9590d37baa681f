"""GPU readings through NVML: utilisation, memory, power, temperature and the total-energy counter.

On a machine without an NVIDIA driver (or without ``pynvml``) the monitor says so with
``available = False`` and returns no readings: a number the runtime cannot measure is reported as
missing, never invented. A reading one GPU does not support (older boards have no energy counter)
is ``None`` for that field only.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from inference.contracts import DeviceSample

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class _Device:
    index: int
    handle: Any
    uuid: str
    name: str | None


class GpuMonitor:
    """Reads every visible NVIDIA GPU through NVML.

    ``nvml`` is the ``pynvml`` module by default; tests pass an object with the same functions
    (``tests/inference/fake_nvml.py``) so the unit conversions are checked on CPU-only machines.
    NVML calls are thread-safe, so the sampler and the engine may read at the same time.
    """

    def __init__(self, nvml: Any | None = None) -> None:
        self.available = False
        self.unavailable_reason: str | None = None
        self._devices: dict[int, _Device] = {}
        self._lock = threading.Lock()
        self._nvml: Any | None = None
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError:
                self.unavailable_reason = "pynvml is not installed (pip install nvidia-ml-py)"
                return
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            self.unavailable_reason = f"NVML could not start: {exc}"
            logger.info("GPU metrics off: %s", self.unavailable_reason)
            return
        self._nvml = nvml
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            self.unavailable_reason = f"NVML could not count GPUs: {exc}"
            self.close()
            return
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            except nvml.NVMLError as exc:
                # A lost or inaccessible GPU is left out rather than reported with made-up numbers.
                logger.warning("GPU %d is not readable through NVML: %s", index, exc)
                continue
            raw_name = self._read(nvml.nvmlDeviceGetName, handle)
            name = _text(raw_name) if raw_name is not None else None
            self._devices[index] = _Device(index=index, handle=handle, uuid=uuid, name=name)
        if not self._devices:
            self.unavailable_reason = "NVML found no GPUs"
            self.close()
            return
        self.available = True

    def devices(self) -> list[str]:
        """The UUIDs of the GPUs being read, in NVML index order (empty when unavailable)."""
        return [d.uuid for d in self._devices.values()]

    def index_of(self, uuid: str) -> int | None:
        """The NVML index of the GPU with this UUID (e.g. a loaded model's device label), if read."""
        return next((d.index for d in self._devices.values() if d.uuid == uuid), None)

    def listed(self) -> list[tuple[int, str, str | None]]:
        """(NVML index, UUID, name) of each GPU being read."""
        return [(d.index, d.uuid, d.name) for d in self._devices.values()]

    def uuid_of(self, index: int) -> str | None:
        """The UUID of the GPU at this NVML index, if it is read."""
        device = self._devices.get(index)
        return device.uuid if device is not None else None

    def sample(self) -> list[DeviceSample]:
        """One reading per GPU; a field is ``None`` where NVML cannot supply it."""
        nvml = self._nvml
        if not self.available or nvml is None:
            return []
        samples: list[DeviceSample] = []
        for device in self._devices.values():
            handle = device.handle
            utilization = self._read(nvml.nvmlDeviceGetUtilizationRates, handle)
            memory = self._read(nvml.nvmlDeviceGetMemoryInfo, handle)
            power_mw = self._read(nvml.nvmlDeviceGetPowerUsage, handle)
            temperature = self._read(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
            limit_mw = self._read(nvml.nvmlDeviceGetPowerManagementLimit, handle)
            samples.append(
                DeviceSample(
                    device=device.uuid,
                    name=device.name,
                    gpu_util=float(utilization.gpu) if utilization is not None else None,
                    mem_used=int(memory.used) if memory is not None else None,
                    mem_total=int(memory.total) if memory is not None else None,
                    power_w=power_mw / 1000.0 if power_mw is not None else None,
                    energy_joules_total=self._energy(device),
                    temperature_c=float(temperature) if temperature is not None else None,
                    power_limit_w=limit_mw / 1000.0 if limit_mw is not None else None,
                )
            )
        return samples

    def energy_joules(self, device_index: int = 0) -> float | None:
        """The GPU's total-energy counter in joules since the driver loaded.

        The engine reads it around each step and splits the difference among the batch. ``None``
        when there is no such GPU or it has no counter (pre-Volta boards). The counter updates every
        20-100 ms, so only differences over a second or more are meaningful.
        """
        device = self._devices.get(device_index)
        if not self.available or device is None:
            return None
        return self._energy(device)

    def power_limit_w(self, device_index: int) -> float | None:
        """The GPU's power limit in watts now, or ``None`` when it cannot be read."""
        device = self._devices.get(device_index)
        nvml = self._nvml
        if not self.available or device is None or nvml is None:
            return None
        milliwatts = self._read(nvml.nvmlDeviceGetPowerManagementLimit, device.handle)
        return milliwatts / 1000.0 if milliwatts is not None else None

    def set_power_limit_w(self, device_index: int, watts: float) -> None:
        """Set the GPU's power limit through ``nvmlDeviceSetPowerManagementLimit``.

        Raises ``PowerLimitRefused`` with the driver's reason: not root (NO_PERMISSION), outside the
        board's range (INVALID_ARGUMENT, the range read and named when NVML gives it), not supported.
        """
        device = self._devices.get(device_index)
        nvml = self._nvml
        if not self.available or device is None or nvml is None:
            raise PowerLimitRefused("no_device", f"GPU {device_index} is not readable through NVML")
        try:
            nvml.nvmlDeviceSetPowerManagementLimit(device.handle, round(watts * 1000))
        except nvml.NVMLError as exc:
            reason = _REFUSALS.get(getattr(exc, "value", None), "driver_error")
            detail = str(exc)
            if reason == "out_of_range":
                limits = self._read(nvml.nvmlDeviceGetPowerManagementLimitConstraints, device.handle)
                if limits is not None:
                    detail += f"; this board allows {limits[0] / 1000:g}-{limits[1] / 1000:g} W"
            raise PowerLimitRefused(reason, f"GPU {device.uuid} refused a {watts:g} W power limit: {detail}") \
                from None

    def close(self) -> None:
        """Shut NVML down; safe to call twice. Readings are empty afterwards."""
        with self._lock:
            nvml, self._nvml = self._nvml, None
            self.available = False
            self._devices = {}
        if nvml is not None:
            try:
                nvml.nvmlShutdown()
            except nvml.NVMLError as exc:
                logger.debug("nvmlShutdown failed: %s", exc)

    def __enter__(self) -> GpuMonitor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _energy(self, device: _Device) -> float | None:
        nvml = self._nvml
        if nvml is None:
            return None
        millijoules = self._read(nvml.nvmlDeviceGetTotalEnergyConsumption, device.handle)
        return millijoules / 1000.0 if millijoules is not None else None

    def _read(self, query: Callable[..., T], *args: Any) -> T | None:
        """Run one NVML query; any NVML error (NotSupported included) means "not measured"."""
        nvml = self._nvml
        if nvml is None:
            return None
        try:
            return query(*args)
        except nvml.NVMLError:
            return None


class PowerLimitRefused(RuntimeError):
    """The driver would not set a power limit; ``reason`` is a short label for metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# NVML return codes (nvml.h) a refused power limit comes back with, as metric labels.
_REFUSALS = {2: "out_of_range", 3: "not_supported", 4: "no_permission"}


def _text(value: str | bytes) -> str:
    # nvidia-ml-py returns str; older pynvml releases returned bytes.
    return value.decode() if isinstance(value, bytes) else value
