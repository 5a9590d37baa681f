"""Power caps: the ruleset's ``power_cap`` rules held on this host's GPUs through NVML.

``reconcile`` is called every second with the caps of the ruleset in force: each GPU a live cap
covers is set to the lowest such cap's watts (``nvmlDeviceSetPowerManagementLimit``), the limit it
had before its first cap remembered; a GPU no live cap covers any more (the rule expired, or a
newer document dropped it) gets that limit back, and so does every capped GPU when the runtime
stops. A limit the driver refuses (not root, outside the board's range, unsupported) is logged with
the driver's reason and counted in ``wattson_power_cap_failures_total``; it is not retried until the
wanted limit changes, so a refusal is one log line, not one a second.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

from inference.gpu import GpuMonitor, PowerLimitRefused
from inference.metrics import LiveSample, counter, gauge
from inference.rules.compiled import CompiledPowerCap

log = logging.getLogger("inference.power_caps")


class PowerCaps:
    """The power limits this runtime set on its GPUs. ``reconcile`` and ``restore_all`` hold a lock:
    a reconcile still running in its worker thread when the runtime stops finishes before the
    restore, so no cap is set after its GPU was given its limit back."""

    def __init__(self, gpu: GpuMonitor, *, clock: Callable[[], float] = time.time) -> None:
        self.gpu = gpu
        self._clock = clock
        self._original: dict[int, float] = {}  # index -> watts before the first cap
        self._applied: dict[int, float] = {}  # index -> watts this runtime set
        self._refused: dict[int, float] = {}  # index -> watts the driver refused (not retried)
        self._uuids: dict[int, str] = {}
        self.failures: Counter[tuple[str, str]] = Counter()  # (device, reason)
        self.changes_total = 0
        self._lock = threading.Lock()
        self._stopped = False

    def applied(self) -> dict[str, float]:
        """The cap in force per GPU UUID (only GPUs this runtime capped)."""
        return {self._uuids[index]: watts for index, watts in self._applied.items()}

    def reconcile(self, caps: Sequence[CompiledPowerCap]) -> None:
        with self._lock:
            if not self._stopped:
                self._reconcile(caps)

    def _reconcile(self, caps: Sequence[CompiledPowerCap]) -> None:
        now = self._clock()
        for index, uuid, name in self.gpu.listed():
            self._uuids[index] = uuid
            wanted = min((c.action.watts for c in caps if c.live(now) and c.action.covers(uuid, name)), default=None)
            if wanted is None:
                self._refused.pop(index, None)
                if index in self._applied:
                    self._restore(index)
                continue
            if self._applied.get(index) == wanted or self._refused.get(index) == wanted:
                continue
            if index not in self._original:
                before = self.gpu.power_limit_w(index)
                if before is None:  # without it the GPU could not be given its limit back: leave it alone
                    self._refuse(index, uuid, wanted, "unreadable",
                                 f"GPU {uuid}: its power limit cannot be read, so no cap is set")
                    continue
                self._original[index] = before
            try:
                self.gpu.set_power_limit_w(index, wanted)
            except PowerLimitRefused as exc:
                self._refuse(index, uuid, wanted, exc.reason, str(exc))
                if index not in self._applied:
                    self._original.pop(index, None)
                continue
            self._refused.pop(index, None)
            self._applied[index] = wanted
            self.changes_total += 1
            log.info("GPU %s power limit set to %g W (was %g W)", uuid, wanted, self._original[index])

    def restore_all(self) -> None:
        """Give every GPU this runtime capped its limit from before; no cap is set after this (the
        runtime is stopping)."""
        with self._lock:
            self._stopped = True
            for index in list(self._applied):
                self._restore(index)

    def samples(self) -> list[LiveSample]:
        rows: list[LiveSample] = []
        for uuid, watts in self.applied().items():
            rows += gauge("wattson_power_cap_watts", "Power limit a power_cap rule holds the GPU at", watts,
                          device=uuid)
        for (uuid, reason), count in self.failures.items():
            rows += counter("wattson_power_cap_failures_total", "Power limits the driver refused to set or restore",
                            count, device=uuid, reason=reason)
        rows += counter("wattson_power_cap_changes_total", "Power limits set by power_cap rules", self.changes_total)
        return rows

    def _restore(self, index: int) -> None:
        uuid = self._uuids.get(index, str(index))
        original = self._original.pop(index)
        self._applied.pop(index, None)
        try:
            self.gpu.set_power_limit_w(index, original)
        except PowerLimitRefused as exc:
            self.failures[(uuid, exc.reason)] += 1
            log.error("power cap on GPU %s could not be lifted back to %g W: %s", uuid, original, exc)
            return
        self.changes_total += 1
        log.info("GPU %s power limit restored to %g W", uuid, original)

    def _refuse(self, index: int, uuid: str, watts: float, reason: str, message: str) -> None:
        self._refused[index] = watts
        self.failures[(uuid, reason)] += 1
        log.error("power cap of %g W not applied: %s", watts, message)
