"""A stand-in for real NVML (the ``pynvml`` module) on CPU-only machines, for tests only.

It is not a simulator of any GPU: it returns exactly the readings a test sets, in the units real
NVML uses (milliwatts, millijoules, bytes, percent, degrees C), through functions with the same
names and signatures as ``pynvml``'s. Errors are ``pynvml``'s own exception classes, so code that
catches ``nvml.NVMLError`` or ``NVMLError_NotSupported`` behaves as it would against a driver.
The energy counter only moves when the test moves it (``advance_energy``) or by a fixed
``energy_mj_per_read`` on every read, so energy attribution is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TypeVar

import pynvml

NVMLError = pynvml.NVMLError
NVMLError_NotSupported = pynvml.NVMLError_NotSupported
NVMLError_Uninitialized = pynvml.NVMLError_Uninitialized
NVMLError_InvalidArgument = pynvml.NVMLError_InvalidArgument
NVMLError_LibraryNotFound = pynvml.NVMLError_LibraryNotFound
NVMLError_DriverNotLoaded = pynvml.NVMLError_DriverNotLoaded
NVMLError_NoPermission = pynvml.NVMLError_NoPermission
NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU

T = TypeVar("T")


@dataclass
class FakeGpu:
    """One fake board's readings, in NVML's units.

    A function named in ``unsupported`` raises ``NVMLError_NotSupported`` for this board; one named
    in ``errors`` raises the NVML error with that code (e.g. ``pynvml.NVML_ERROR_GPU_IS_LOST``).
    """

    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    util_gpu: int = 0
    util_memory: int = 0
    mem_used: int = 0
    mem_total: int = 80 * 1024**3
    power_mw: int = 70_000
    energy_mj: int = 0
    energy_mj_per_read: int = 0
    temperature_c: int = 35
    # The power limit and its allowed range, in milliwatts, as NVML keeps them; ``limit_history``
    # is every limit set through ``nvmlDeviceSetPowerManagementLimit``, in order.
    power_limit_mw: int = 700_000
    power_limit_min_mw: int = 200_000
    power_limit_max_mw: int = 700_000
    limit_history: list[int] = field(default_factory=list)
    unsupported: set[str] = field(default_factory=set)
    errors: dict[str, int] = field(default_factory=dict)

    def advance_energy(self, joules: float) -> None:
        """Move the total-energy counter forward, as the board would while working."""
        self.energy_mj += round(joules * 1000)


class FakeNvml:
    """The subset of ``pynvml`` that ``inference.gpu`` uses, over a list of ``FakeGpu``.

    ``init_error`` is an NVML error code (e.g. ``pynvml.NVML_ERROR_LIBRARY_NOT_FOUND``) that
    ``nvmlInit`` raises, as on a machine without a driver.
    """

    NVMLError = NVMLError
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_Uninitialized = NVMLError_Uninitialized
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU

    def __init__(self, gpus: list[FakeGpu] | None = None, *, init_error: int | None = None) -> None:
        self.gpus = list(gpus or [])
        self.init_error = init_error
        self.initialized = False
        self.shutdown_calls = 0

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self._check_init()
        self.initialized = False
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self) -> int:
        self._check_init()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self._check_init()
        if not 0 <= index < len(self.gpus):
            raise NVMLError_InvalidArgument()
        return self.gpus[index]

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str:
        return self._query(handle, "nvmlDeviceGetUUID", handle.uuid)

    def nvmlDeviceGetName(self, handle: FakeGpu) -> str:
        return self._query(handle, "nvmlDeviceGetName", handle.name)

    def nvmlDeviceGetUtilizationRates(self, handle: FakeGpu) -> SimpleNamespace:
        return self._query(
            handle,
            "nvmlDeviceGetUtilizationRates",
            SimpleNamespace(gpu=handle.util_gpu, memory=handle.util_memory),
        )

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu, version: int | None = None) -> SimpleNamespace:
        return self._query(
            handle,
            "nvmlDeviceGetMemoryInfo",
            SimpleNamespace(
                used=handle.mem_used, total=handle.mem_total, free=handle.mem_total - handle.mem_used
            ),
        )

    def nvmlDeviceGetPowerUsage(self, handle: FakeGpu) -> int:
        return self._query(handle, "nvmlDeviceGetPowerUsage", handle.power_mw)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeGpu) -> int:
        value = self._query(handle, "nvmlDeviceGetTotalEnergyConsumption", handle.energy_mj)
        handle.energy_mj += handle.energy_mj_per_read
        return value

    def nvmlDeviceGetPowerManagementLimit(self, handle: FakeGpu) -> int:
        return self._query(handle, "nvmlDeviceGetPowerManagementLimit", handle.power_limit_mw)

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: FakeGpu) -> list[int]:
        return self._query(handle, "nvmlDeviceGetPowerManagementLimitConstraints",
                           [handle.power_limit_min_mw, handle.power_limit_max_mw])

    def nvmlDeviceSetPowerManagementLimit(self, handle: FakeGpu, limit: int) -> None:
        """As the driver does: root only (``errors`` stands in for NO_PERMISSION), and a limit outside
        the board's constraints is INVALID_ARGUMENT."""
        self._query(handle, "nvmlDeviceSetPowerManagementLimit", None)
        if not handle.power_limit_min_mw <= limit <= handle.power_limit_max_mw:
            raise NVMLError_InvalidArgument()
        handle.power_limit_mw = limit
        handle.limit_history.append(limit)

    def nvmlDeviceGetTemperature(self, handle: FakeGpu, sensor: int) -> int:
        if sensor != NVML_TEMPERATURE_GPU:
            raise NVMLError_InvalidArgument()
        return self._query(handle, "nvmlDeviceGetTemperature", handle.temperature_c)

    def _check_init(self) -> None:
        if not self.initialized:
            raise NVMLError_Uninitialized()

    def _query(self, handle: FakeGpu, function: str, value: T) -> T:
        self._check_init()
        if function in handle.unsupported:
            raise NVMLError_NotSupported()
        if function in handle.errors:
            raise NVMLError(handle.errors[function])
        return value
