"""The runtime: the models it serves, their admission queues, metrics and telemetry, wired together.

``Runtime`` owns every long-lived part and their start and stop order; the HTTP layer (``api.py``)
only asks it to authenticate, to find a model's backend and to record what happened.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Iterable

import httpx

from inference.admission import AdmissionQueue
from inference.auth import bearer_token, token_digest
from inference.backends import LocalBackend, UpstreamBackend
from inference.breaker import BreakerSettings, CircuitBreakers
from inference.cache import CacheFallback, ResponseCache
from inference.config import ApiKey, RuntimeConfig, Upstream
from inference.contracts import RequestEvent
from inference.embedding import Embedder
from inference.engine.engine import Engine
from inference.engine.models import LoadedModel, load_model, resolve_device
from inference.engine.threads import DEFAULT_THREADS, pin_torch_threads, run_in_own_thread
from inference.errors import ApiError
from inference.fair_share import TenantService
from inference.fallback import NO_CACHE, FallbackCache
from inference.gpu import GpuMonitor
from inference.measurement import RequestMeasurement
from inference.metrics import LiveSample, RuntimeMetrics, counter, gauge
from inference.power_caps import PowerCaps
from inference.retries import Retries
from inference.routing import ModelRouter
from inference.rules import RuleEnforcer, RulesetKeeper, RulesetPuller
from inference.semantic_cache import SemanticCache
from inference.telemetry.exporter import TelemetryExporter
from inference.telemetry.sampler import RuntimeSampler
from inference.upstream_attribution import UpstreamAttribution

log = logging.getLogger("inference.runtime")

# How often the ruleset's power caps are held against the GPUs: a new or expired cap takes effect within it.
POWER_CAP_INTERVAL_S = 1.0

Backend = LocalBackend | UpstreamBackend


class Runtime:
    def __init__(
        self,
        config: RuntimeConfig,
        *,
        gpu: GpuMonitor | None = None,
        preloaded: Iterable[LoadedModel] = (),
        embedder: Embedder | None = None,
    ) -> None:
        self.config = config
        self.gpu = gpu
        self.metrics = RuntimeMetrics()
        self.backends: dict[str, Backend] = {}
        self.exporter: TelemetryExporter | None = None
        self.sampler: RuntimeSampler | None = None
        self._preloaded = {m.name: m for m in preloaded}
        self._keys = {token_digest(k.key): k for k in config.api_keys}
        self._http: httpx.AsyncClient | None = None
        self.ready = False
        self._listeners: list[Callable[[RequestEvent], None]] = []
        self.breakers = CircuitBreakers(_breaker_settings(config), {f.model: f.steps for f in config.fallbacks})
        self.metrics.watch(self.breakers.samples)
        self.retries = Retries(retries=config.upstream_retries, backoff_base_s=config.upstream_retry_backoff_s,
                               budget_ratio=config.retry_budget_ratio, budget_min=config.retry_budget_min)
        self.metrics.watch(self.retries.samples)
        # The fallback chains' "cache" step: a response cache sets itself here (inference.fallback).
        self.fallback_cache: FallbackCache = NO_CACHE
        self.rules = RuleEnforcer()
        self.ruleset = RulesetKeeper(self.rules, config.resolved_state_dir, runtime_id=config.runtime_id)
        self.puller: RulesetPuller | None = None
        self.router: ModelRouter | None = None
        self.cache: ResponseCache | None = None
        self.power_caps: PowerCaps | None = None
        self._power_task: asyncio.Task[None] | None = None
        # Always there, idle until a policy (a flag or the ruleset's) turns it on for a feature: the
        # embedding model loads then (at start, for a flag).
        self.semantic_cache = SemanticCache(
            flag_policies=tuple(dataclasses.replace(p, ttl_s=config.semantic_cache_ttl_s)
                                for p in config.semantic_cache),
            redis_url=config.cache_redis_url, device=config.device,
            max_entries=config.semantic_cache_max_entries, embedder=embedder)
        self.metrics.watch(self._live_samples)
        self.metrics.watch(lambda: self.cache.samples() if self.cache is not None else [])
        self.metrics.watch(self.semantic_cache.samples)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        # The held ruleset and ledger first: no request is served before the rules are in force.
        await asyncio.to_thread(self.ruleset.open)
        # The semantic cache follows the held ruleset's policies, and each new one's (loading the
        # embedding model as soon as a policy needs it, not at the first request).
        self.semantic_cache.follow(self.rules.compiled.document if self.rules.compiled is not None else None)
        self.ruleset.on_accept = self.semantic_cache.follow
        if self.gpu is None:
            self.gpu = await asyncio.to_thread(GpuMonitor)
        if self.gpu.available:
            self.power_caps = PowerCaps(self.gpu)
            self.metrics.watch(self.power_caps.samples)
            self._power_task = asyncio.get_running_loop().create_task(self._hold_power_caps(self.power_caps))
        threads = config.torch_threads or DEFAULT_THREADS
        pin_torch_threads(1)  # the event loop's thread, and the helpers' threads it starts, run kernels on one core
        device = resolve_device(config.device)
        for spec in config.models:
            loaded = self._preloaded.get(spec) or await run_in_own_thread(
                load_model, spec, device=device, cache_dir=config.model_cache_dir, threads=threads,
                max_model_len=config.max_model_len, dtype=config.dtype, quantization=config.quantization,
            )
            self.backends[loaded.name] = self._local_backend(loaded)
        if config.upstreams:
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(config.upstream_timeout_s, connect=5.0),
                limits=httpx.Limits(max_connections=config.upstream_max_concurrency * len(config.upstreams),
                                    max_keepalive_connections=config.upstream_max_concurrency),
            )
            for upstream in config.upstreams:
                admission = self._admission(config.upstream_max_concurrency)
                attribution, device_label = self._upstream_attribution(upstream)
                self.backends[upstream.name] = UpstreamBackend(upstream, self._http, admission,
                                                               attribution=attribution, device_label=device_label)
        # Checked against what really loaded: a preloaded model may be named otherwise than its spec.
        self.router = ModelRouter.from_config(config, self.backends)
        self.metrics.serve_models([*self.backends, *([self.router.alias] if self.router is not None else [])])
        if config.cache_enabled:
            self.cache = ResponseCache.from_config(config)
            self.fallback_cache = CacheFallback(self.cache, default_max_tokens=config.default_max_tokens)
        if config.semantic_cache:
            await self.semantic_cache.load()
        if config.finops_url:
            self.exporter = TelemetryExporter(
                url=config.finops_url,
                token=config.finops_token,
                spool_dir=config.spool_dir,
                spool_max_bytes=int(config.spool_max_mb * 1024 * 1024),
                batch_size=config.export_batch_size,
                interval_s=config.export_interval_s,
                stale_after_s=config.telemetry_stale_after_s,
            )
            self.exporter.start()
            self.puller = RulesetPuller(self.ruleset, url=config.finops_url, token=config.finops_token,
                                        interval_s=config.ruleset_pull_interval_s)
            self.puller.start()
        self.breakers.track(self.backends)
        self.retries.track(self.backends)
        self.sampler = RuntimeSampler(self, interval_s=config.sample_interval_s)
        self.sampler.start()
        self.ready = True
        log.info("serving %s on %s:%d", ", ".join(self.backends), config.host, config.port)

    async def stop(self) -> None:
        self.ready = False
        if self.puller is not None:
            await self.puller.stop()
        if self.sampler is not None:
            self.sampler.stop()
        for backend in self.backends.values():
            if isinstance(backend, LocalBackend):
                await asyncio.to_thread(backend.engine.stop)
        if self._http is not None:
            await self._http.aclose()
        if self.cache is not None:
            await self.cache.close()
        await self.semantic_cache.close()
        if self.exporter is not None:
            await asyncio.to_thread(self.exporter.close)
        if self._power_task is not None:
            self._power_task.cancel()
            await asyncio.gather(self._power_task, return_exceptions=True)
        if self.power_caps is not None:  # a stopped runtime leaves no GPU capped
            await asyncio.to_thread(self.power_caps.restore_all)
        if self.gpu is not None:
            self.gpu.close()
        await self.ruleset.close()

    def _admission(self, capacity: int) -> AdmissionQueue:
        return AdmissionQueue(capacity=capacity, max_depth=self.config.max_queue_depth,
                              max_wait_s=self.config.max_queue_wait_s, target_wait_s=self.config.queue_target_wait_s,
                              high_reserve=self.config.high_priority_slots,
                              high_max_running=self.config.high_priority_max_running,
                              fair=self.config.fair_share, tier_weights=self.config.tier_weights,
                              fair_by_feature=self.config.fair_by_feature)

    async def _hold_power_caps(self, caps: PowerCaps) -> None:
        while True:
            compiled = self.rules.compiled
            try:
                await asyncio.to_thread(caps.reconcile, compiled.power_caps if compiled is not None else ())
            except Exception:  # a bug here must not stop caps being held (or lifted) from then on
                log.exception("power caps could not be reconciled")
            await asyncio.sleep(POWER_CAP_INTERVAL_S)

    def _local_backend(self, loaded: LoadedModel) -> LocalBackend:
        energy_reader = None
        if self.gpu is not None and loaded.device.type == "cuda":
            index = self.gpu.index_of(loaded.device_label)
            if index is not None:
                gpu = self.gpu
                energy_reader = lambda: gpu.energy_joules(index)  # noqa: E731
        engine = Engine(
            loaded,
            max_batch_size=self.config.max_batch_size,
            max_prefill_tokens=self.config.max_prefill_tokens,
            prefill_chunk_tokens=self.config.prefill_chunk_tokens,
            energy_reader=energy_reader,
            on_step=self.metrics.step_observer(loaded.name),
            torch_threads=self.config.torch_threads,
        )
        engine.start()
        return LocalBackend(loaded, engine, self._admission(self.config.max_batch_size),
                            default_max_tokens=self.config.default_max_tokens)

    def _upstream_attribution(self, upstream: Upstream) -> tuple[UpstreamAttribution, str]:
        """The upstream's ledger, reading its GPU's energy counter when ``--upstream-device`` names a
        GPU this host's NVML sees; its events then name that GPU, so its idle time is idle capacity."""
        wanted = next((d.gpu for d in self.config.upstream_devices if d.name == upstream.name), None)
        gpu = self.gpu
        if wanted is None:
            return UpstreamAttribution(), "upstream"
        index = uuid = None
        if gpu is not None and gpu.available:
            index = int(wanted) if wanted.isdigit() else gpu.index_of(wanted)
            uuid = gpu.uuid_of(index) if index is not None else None
        if gpu is None or index is None or uuid is None:
            reason = gpu.unavailable_reason if gpu is not None and not gpu.available else "no such GPU"
            log.warning("upstream %s: GPU %s is not readable here (%s); its energy is not measured",
                        upstream.name, wanted, reason)
            return UpstreamAttribution(), "upstream"
        return UpstreamAttribution(energy_reader=lambda: gpu.energy_joules(index)), uuid

    # -- requests ------------------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> ApiKey:
        token = bearer_token(authorization)
        if token is None:
            raise ApiError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key")
        key = self._keys.get(token_digest(token))
        if key is None:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        return key

    def backend(self, model: str) -> Backend:
        backend = self.backends.get(model)
        if backend is None:
            raise ApiError(404, f"The model '{model}' does not exist on this runtime. Available: "
                           f"{', '.join(sorted(self.backends))}.", code="model_not_found", param="model")
        return backend

    def settle(self, measurement: RequestMeasurement) -> None:
        """Book what the request used against the rules' reservations it held (once)."""
        reservation = measurement.reservation
        if reservation is not None:
            result = measurement.result
            self.rules.settle(reservation, prompt_tokens=measurement.prompt_tokens,
                              completion_tokens=measurement.completion_tokens,
                              gpu_seconds=result.gpu_seconds if result is not None else None)

    def record(self, measurement: RequestMeasurement) -> None:
        """Settle a finished request's reservations, count it and hand its event to the exporter
        (never blocks). Every request is recorded exactly once, however it ended."""
        try:
            self.settle(measurement)
        except Exception:  # a bug in accounting must not lose the event
            log.exception("request %s could not be settled", measurement.event_id)
        try:
            event = measurement.to_event()
        except ValueError:  # a measurement outside the contract is a bug: say so, never fail the response
            log.exception("request %s could not be recorded", measurement.event_id)
            return
        self.metrics.observe_event(event)
        self.breakers.observe(event)
        if self.exporter is not None:
            self.exporter.record_event(event)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("an event listener failed")

    def subscribe(self, listener: Callable[[RequestEvent], None]) -> None:
        """Also hand every request event to ``listener`` (called on the event loop; must not block)."""
        self._listeners.append(listener)

    # -- state for /metrics, /health and samples ------------------------------------------------

    def queue_depth(self) -> int:
        return sum(b.admission.depth for b in self.backends.values())

    def running(self) -> int:
        return sum(b.admission.in_use for b in self.backends.values())

    def tenant_service(self) -> dict[str, TenantService]:
        """Each tenant's service over every model's queue (``inference.fair_share``)."""
        totals: dict[str, TenantService] = {}
        for backend in list(self.backends.values()):
            for tenant, service in backend.admission.tenant_service().items():
                totals.setdefault(tenant, TenantService()).add(service)
        return totals

    def _live_samples(self) -> list[LiveSample]:
        rows: list[LiveSample] = []
        for name, b in self.backends.items():
            rows += gauge("wattson_queue_depth", "Requests waiting for a slot", b.admission.depth, model=name)
            rows += gauge("wattson_running_requests", "Requests holding a slot", b.admission.in_use, model=name)
            for reason, count in b.admission.shed_total.items():
                rows += counter("wattson_shed_requests_total", "Requests shed by admission", count,
                                model=name, reason=reason)
            rows += counter("wattson_preemptions_total", "Running requests paused for high-priority work",
                            b.admission.preemptions_total, model=name)
            if isinstance(b, LocalBackend):
                s = b.engine.stats
                rows += gauge("wattson_running_sequences", "Sequences in the engine's batch", s.running, model=name)
                rows += gauge("wattson_kv_cache_tokens", "KV cache slots held, padding included",
                              s.kv_tokens_held, model=name)
                rows += gauge("wattson_paused_sequences", "Sequences paused for high-priority work (KV kept)",
                              s.paused, model=name)
                rows += counter("wattson_engine_busy_seconds_total", "Measured engine step time",
                                s.busy_seconds_total, model=name)
                rows += counter("wattson_engine_energy_joules_total", "Measured energy of engine steps",
                                s.energy_joules_total, model=name)
            else:
                a = b.attribution
                rows += counter("wattson_upstream_busy_seconds_total", "Time with a request in flight to the upstream",
                                a.busy_seconds, model=name)
                rows += counter("wattson_upstream_idle_seconds_total", "Time with nothing in flight to the upstream",
                                a.idle_seconds, model=name)
                if a.measures_energy:
                    rows += counter("wattson_upstream_busy_joules_total",
                                    "Upstream GPU energy while a request was in flight", a.busy_joules, model=name)
                    rows += counter("wattson_upstream_idle_joules_total",
                                    "Upstream GPU energy with nothing in flight", a.idle_joules, model=name)
        for d in self.gpu.sample() if self.gpu is not None else []:
            for field, help_text in (("gpu_util", "GPU utilisation %"), ("mem_used", "GPU memory used bytes"),
                                     ("power_w", "GPU power W"), ("temperature_c", "GPU temperature C")):
                rows += gauge(f"wattson_gpu_{field}", help_text, getattr(d, field), device=d.device)
            rows += gauge("wattson_gpu_mem_capacity", "GPU memory bytes", d.mem_total, device=d.device)
            rows += counter("wattson_gpu_energy_joules_total", "GPU energy counter J", d.energy_joules_total,
                            device=d.device)
        rows += self._tenant_samples()
        rows += self._rule_samples()
        if self.exporter is not None:
            rows += self.exporter.samples()
        return rows

    def _tenant_samples(self) -> list[LiveSample]:
        rows: list[LiveSample] = []
        for tenant, s in sorted(self.tenant_service().items()):
            rows += counter("wattson_tenant_tokens_served_total", "Prompt and completion tokens served to the tenant "
                            "(rate(): its service in tokens/s)", s.tokens_served, tenant=tenant)
            rows += counter("wattson_tenant_admitted_total", "The tenant's requests given a slot", s.admitted,
                            tenant=tenant)
            rows += counter("wattson_tenant_queue_wait_seconds_total", "Time the tenant's requests waited for a "
                            "slot (over wattson_tenant_admitted_total: the mean wait)", s.queue_wait_s_total,
                            tenant=tenant)
            rows += gauge("wattson_tenant_waiting_requests", "The tenant's requests waiting for a slot", s.waiting,
                          tenant=tenant)
            rows += gauge("wattson_tenant_running_requests", "The tenant's requests holding a slot", s.running,
                          tenant=tenant)
        for name, b in self.backends.items():
            for tenant, value in sorted(b.admission.fair.tenants.values.items()):
                rows += gauge("wattson_tenant_virtual_tokens", "The tenant's fair-share counter in the model's queue "
                              "(weighted tokens served, lifted on arrival)", value, tenant=tenant, model=name)
        return rows

    def _rule_samples(self) -> list[LiveSample]:
        c = self.rules.counters
        rows = gauge("wattson_ruleset_version", "Version of the ruleset this runtime holds (0: none)",
                     self.rules.version)
        rows += gauge("wattson_ruleset_stale", "1 while any allowance is past its expiry without a newer ruleset",
                      1.0 if self.rules.stale() else 0.0)
        rows += counter("wattson_ruleset_fail_open_total", "Requests let through an expired 'open' allowance",
                        c.fail_open)
        rows += counter("wattson_ruleset_fail_closed_total", "Requests refused by an expired 'closed' allowance",
                        c.fail_closed)
        for reason, count in c.rejections.items():
            rows += counter("wattson_rule_rejections_total", "Requests refused by the ruleset", count, reason=reason)
        rows += counter("wattson_rule_downgrades_total", "Requests served by a cheaper model by a downgrade rule",
                        c.downgrades)
        rows += counter("wattson_rule_downgrades_ignored_total",
                        "Downgrade rules skipped: their model is not served here", c.downgrades_ignored)
        rows += counter("wattson_rule_capped_total", "Requests whose max_tokens a cap rule bounded", c.capped)
        if self.puller is not None:
            rows += counter("wattson_ruleset_pull_failures_total", "Ruleset pulls that failed",
                            self.puller.failed_total)
        return rows


def _breaker_settings(config: RuntimeConfig) -> BreakerSettings:
    # A probe is over within its longest queue wait and its slowest answer, retries included, and
    # within its request's deadline in any case.
    lease = min(config.max_queue_wait_s + config.upstream_timeout_s * (config.upstream_retries + 1),
                max(config.request_deadline_s, config.job_deadline_s)) + 60
    return BreakerSettings(window_s=config.breaker_window_s, min_requests=config.breaker_min_requests,
                           error_rate=config.breaker_error_rate, cooldown_s=config.breaker_cooldown_s,
                           probes=config.breaker_probes, probe_lease_s=lease)
