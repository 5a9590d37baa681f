"""Runtime samples every few seconds: queue depth, running requests, tokens/s, each GPU's state,
and each tenant's service (tokens/s) and queue wait since the previous sample."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from inference.contracts import RuntimeSample, TenantSample
from inference.fair_share import TenantService

if TYPE_CHECKING:
    from inference.runtime import Runtime

log = logging.getLogger("inference.telemetry")


class RuntimeSampler:
    def __init__(self, runtime: Runtime, *, interval_s: float) -> None:
        self._runtime = runtime
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="runtime-sampler", daemon=True)
        self._last_tokens: int | None = None
        self._last_at = time.perf_counter()
        self._last_service: dict[str, TenantService] = {}
        self.last: RuntimeSample | None = None

    def start(self) -> None:
        self.take()  # a baseline for the first tokens/s
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def take(self) -> RuntimeSample:
        runtime = self._runtime
        tokens = _completion_tokens(runtime)
        now = time.perf_counter()
        elapsed = now - self._last_at
        rate = (tokens - self._last_tokens) / elapsed if self._last_tokens is not None and elapsed > 0 else 0.0
        self._last_tokens, self._last_at = tokens, now
        tenants = self._tenants(elapsed)
        kv = [b.engine.stats.kv_tokens_held for b in runtime.backends.values() if hasattr(b, "engine")]
        sample = RuntimeSample(
            runtime_id=runtime.config.runtime_id,
            at=datetime.now(UTC),
            queue_depth=runtime.queue_depth(),
            running=runtime.running(),
            tokens_per_s=max(0.0, rate),
            kv_cache_used=sum(kv) if kv else None,
            devices=runtime.gpu.sample() if runtime.gpu is not None else [],
            breakers=runtime.breakers.states(),
            tenants=tenants,
        )
        self.last = sample
        return sample

    def _tenants(self, elapsed: float) -> list[TenantSample] | None:
        """Each tenant with work now or service since the previous sample; None for the first sample
        (no interval yet)."""
        current = self._runtime.tenant_service()
        previous, self._last_service = self._last_service, current
        if elapsed <= 0 or self.last is None:
            return None
        rows = []
        for tenant, now in sorted(current.items()):
            before = previous.get(tenant, TenantService())
            tokens = now.tokens_served - before.tokens_served
            admitted = now.admitted - before.admitted
            if not (tokens or admitted or now.waiting or now.running):
                continue
            wait_ms = (now.queue_wait_s_total - before.queue_wait_s_total) * 1000 / admitted if admitted else None
            rows.append(TenantSample(tenant=tenant, tokens_per_s=max(0.0, tokens / elapsed),
                                     queue_wait_ms=None if wait_ms is None else max(0.0, wait_ms),
                                     waiting=now.waiting, running=now.running))
        return rows

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                sample = self.take()
            except Exception:  # a failed reading must not stop the next one
                log.exception("runtime sample failed")
                continue
            if self._runtime.exporter is not None:
                self._runtime.exporter.record_sample(sample)


def _completion_tokens(runtime: Runtime) -> int:
    total = 0
    for backend in runtime.backends.values():
        stats = getattr(backend, "engine", None)
        total += stats.stats.completion_tokens_total if stats is not None else backend.completion_tokens_total
    return total
