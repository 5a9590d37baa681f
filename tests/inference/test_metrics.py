"""/metrics: every running total (``*_total``) is a Prometheus counter and every level a gauge,
under the names scrapers already know."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inference.engine.models import LoadedModel
from inference.gpu import GpuMonitor
from inference.metrics import UNSERVED_MODEL, counter, gauge
from inference.telemetry.sampler import RuntimeSampler
from tests.inference.collector import Collector
from tests.inference.fake_nvml import FakeGpu, FakeNvml
from tests.inference.live import ACME, GLOBEX, LiveRuntime, serve, tiny_config
from tests.inference.rulesets import ADMIN_TOKEN, at, document, push, rule, scope

# What a runtime with a GPU, a response cache, a ruleset and a control plane shows after a cache hit
# and a refused request (an upstream's fallbacks, Redis errors and CUDA step energy need more).
TOTALS = {
    "wattson_requests_total", "wattson_tokens_total", "wattson_shed_requests_total", "wattson_preemptions_total",
    "wattson_engine_busy_seconds_total", "wattson_gpu_energy_joules_total", "wattson_telemetry_sent_records_total",
    "wattson_ruleset_fail_open_total", "wattson_ruleset_fail_closed_total", "wattson_rule_rejections_total",
    "wattson_rule_downgrades_total", "wattson_rule_downgrades_ignored_total", "wattson_rule_capped_total",
    "wattson_ruleset_pull_failures_total", "wattson_cache_hits_total", "wattson_cache_misses_total",
    "wattson_cache_stores_total", "wattson_cache_evictions_total", "wattson_cache_saved_tokens_total",
    "wattson_cache_saved_gpu_seconds_total", "wattson_breaker_opens_total", "wattson_retries_total",
    "wattson_telemetry_rejected_records_total", "wattson_telemetry_io_errors_total",
    "wattson_telemetry_events_recorded_total", "wattson_telemetry_lost_records_total",
}
LEVELS = {
    "wattson_queue_depth", "wattson_running_requests", "wattson_running_sequences", "wattson_kv_cache_tokens",
    "wattson_paused_sequences", "wattson_gpu_gpu_util", "wattson_gpu_mem_used", "wattson_gpu_power_w",
    "wattson_gpu_temperature_c", "wattson_ruleset_version", "wattson_ruleset_stale", "wattson_cache_entries",
    "wattson_cache_bytes", "wattson_breaker_state", "wattson_telemetry_queued", "wattson_telemetry_spool_full",
    "wattson_gpu_mem_capacity", "wattson_telemetry_set_aside_records", "wattson_telemetry_set_aside_bytes",
    "wattson_telemetry_oldest_unsent_age_seconds", "wattson_telemetry_failing_attempts",
}


def test_every_total_on_metrics_is_a_counter_and_every_level_a_gauge(
    tiny_model: LoadedModel, collector: Collector, tmp_path: Path
) -> None:
    gpu = GpuMonitor(FakeNvml([FakeGpu(uuid="GPU-11111111-2222-3333-4444-555555555555", energy_mj=9_000_000)]))
    config = tiny_config(cache_enabled=True, admin_token=ADMIN_TOKEN, finops_url=collector.url,
                         spool_dir=tmp_path / "spool")
    with serve(config, preloaded=(tiny_model,), gpu=gpu) as live:
        push(live, document(rules=[rule("globex-block", {"type": "block"}, where=scope(tenant="globex"),
                                        expires_at=at(3600))]))
        body = {"model": "tiny-random", "prompt": "The lighthouse keeper", "max_tokens": 4, "temperature": 0}
        with live.client() as client:
            assert [client.post("/v1/completions", json=body).headers["x-wattson-cache"] for _ in range(2)] == [
                "miss", "hit"]
        with live.client(GLOBEX) as client:
            assert client.post("/v1/completions", json=body).status_code == 429
        text = httpx.get(live.base_url + "/metrics", timeout=10).text

    families = list(text_string_to_metric_families(text))
    types = {sample.name: family.type for family in families for sample in family.samples}
    assert not (TOTALS | LEVELS) - types.keys(), "every name as before"
    totals = {name: kind for name, kind in types.items() if name.endswith("_total")}
    assert set(totals.values()) == {"counter"}, {name for name, kind in totals.items() if kind != "counter"}
    for family in families:
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), f"{family.name} counts, named as a total"
    assert {types[name] for name in LEVELS} == {"gauge"}
    assert 'wattson_shed_requests_total{model="tiny-random",reason="queue_full"} 0.0' in text, "labels as before"
    assert 'wattson_cache_saved_tokens_total{kind="prompt"}' in text


def test_a_live_sample_is_typed_by_its_name() -> None:
    assert counter("wattson_cache_hits_total", "hits", 3)[0].counter
    assert not gauge("wattson_cache_entries", "entries", 3)[0].counter
    assert counter("wattson_x_total", "unmeasured", None) == [], "absent, never zero"
    with pytest.raises(ValueError, match="running total"):
        gauge("wattson_shed_requests_total", "a total read as a level", 1)
    with pytest.raises(ValueError, match="not named as a running total"):
        counter("wattson_queue_depth", "a level read as a total", 1)


def test_requests_for_models_this_runtime_does_not_serve_share_one_label(live: LiveRuntime) -> None:
    def metrics() -> str:
        return httpx.get(live.base_url + "/metrics", timeout=10).text

    with live.client() as client:
        for n in range(3):
            assert client.post("/v1/completions", json={"model": f"made-up-{n}", "prompt": "hi"}).status_code == 404
        before = metrics()
        for n in range(3, 200):
            client.post("/v1/completions", json={"model": f"made-up-{n}" + '\n"}', "prompt": "hi"})
    after = metrics()

    assert "made-up" not in after, "a client's string is never a label"
    assert f'wattson_requests_total{{model="{UNSERVED_MODEL}",status="error"}} 200.0' in after
    assert len(after) - len(before) < 100, "a new made-up name adds no series"


def test_each_tenants_service_and_wait_are_on_metrics_and_in_the_runtime_sample(live: LiveRuntime) -> None:
    sampler = RuntimeSampler(live.runtime, interval_s=3600)  # taken by hand: no thread shares its intervals
    sampler.take()
    before = tenant_series(live)
    body = {"model": "tiny-random", "prompt": "The lighthouse keeper", "max_tokens": 4, "ignore_eos": True}
    used = {"acme": 0, "globex": 0}
    for key, tenant, times in ((ACME, "acme", 2), (GLOBEX, "globex", 1)):
        with live.client(key) as client:
            for _ in range(times):
                used[tenant] += client.post("/v1/completions", json=body).json()["usage"]["total_tokens"]
    sample = sampler.take()
    after = tenant_series(live)

    for tenant, admitted in (("acme", 2), ("globex", 1)):
        served = after[("wattson_tenant_tokens_served_total", tenant)] - before.get(
            ("wattson_tenant_tokens_served_total", tenant), 0)
        assert served == used[tenant]
        assert after[("wattson_tenant_admitted_total", tenant)] - before.get(
            ("wattson_tenant_admitted_total", tenant), 0) == admitted
        assert ("wattson_tenant_queue_wait_seconds_total", tenant) in after
        assert after[("wattson_tenant_waiting_requests", tenant)] == 0
    rows = {row.tenant: row for row in sample.tenants or []}
    assert set(rows) >= {"acme", "globex"}
    assert rows["acme"].tokens_per_s > rows["globex"].tokens_per_s > 0
    assert rows["acme"].queue_wait_ms is not None and rows["acme"].waiting == rows["acme"].running == 0
    assert sampler.take().tenants == [], "no service since the last sample: no tenant row, not a row of zeros"


def tenant_series(live: LiveRuntime) -> dict[tuple[str, str], float]:
    text = httpx.get(live.base_url + "/metrics", timeout=10).text
    return {(s.name, s.labels["tenant"]): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name.startswith("wattson_tenant_") and "model" not in s.labels}
