"""Builders for the dashboard tests: a morning's worth of traffic written straight to the raw events
(no rollups, so every selector reads it from the raw tail), runtime and device samples, users."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from django.test import Client
from django.utils import timezone

from finops.runtimes.models import Runtime
from finops.telemetry.models import DeviceSample, RuntimeSample
from finops.telemetry.sample_rollups import sample_rollup_run
from finops.telemetry.sketch import bucket_index
from tests.finops.budget_factories import request_event, store, user_in

GPU = "GPU-00000000-0000-0000-0000-000000000001"


def logged_in(group: str | None = "product-manager", username: str = "pat") -> Client:
    client = Client()
    client.force_login(user_in(group, username))
    return client


def traffic(now: dt.datetime | None = None, *, with_gpu_runtime: bool = False) -> None:
    """Two tenants and two features over the last hour on the CPU runtime ``rt-1``: acme's chat
    costs $3 over three requests (two by end user alice), globex's search $0.50; one globex request
    was served from the cache (saving $0.25), one rejected by a budget. Energy is not measured (a CPU runtime).
    With ``with_gpu_runtime`` the GPU runtime ``gpu-1`` is sampled too (it served none of these)."""
    now = now or timezone.now()
    minutes = [now - dt.timedelta(minutes=m) for m in (50, 30, 20, 10, 5, 3)]
    events = [
        request_event(started_at=minutes[0], tenant="acme", feature="chat", cost="1", end_user="alice"),
        request_event(started_at=minutes[1], tenant="acme", feature="chat", cost="1.5", end_user="alice",
                      e2e_ms=900.0),
        request_event(started_at=minutes[2], tenant="acme", feature="chat", cost="0.5", end_user="bob"),
        request_event(started_at=minutes[3], tenant="globex", feature="search", cost="0.5", end_user="carol"),
        request_event(started_at=minutes[4], tenant="globex", feature="search", cost="0", cache_hit=True,
                      gpu_seconds=0.0, saved_cost=Decimal("0.25")),
        request_event(started_at=minutes[5], tenant="globex", feature="search", cost=None, status="rejected_budget",
                      http_status=429, model_served=None, prompt_tokens=0, completion_tokens=0, ttft_ms=None,
                      e2e_ms=1.0, gpu_seconds=None, rule_id="b1-block"),
    ]
    for event in events:  # bucketed as ingest does, so rolled-up events keep their latencies
        event.e2e_bucket, event.ttft_bucket = bucket_index(event.e2e_ms), bucket_index(event.ttft_ms)
    store(events)
    runtime_samples("rt-1", now, roll=not with_gpu_runtime)
    if with_gpu_runtime:
        runtime_samples("gpu-1", now, gpu=True)


def runtime_samples(runtime_id: str, now: dt.datetime, *, minutes: int = 10, gpu: bool = False,
                    roll: bool = True) -> Runtime:
    """A registered runtime sampled every 10 s for the last ``minutes``; with a GPU when ``gpu``.
    ``roll`` runs the sample rollups (once per test: the watermark then passes every sample made so far)."""
    runtime, _ = Runtime.objects.get_or_create(name=runtime_id, defaults={"base_url": "http://runtime.test:8000"})
    start = now.replace(second=0, microsecond=0) - dt.timedelta(minutes=minutes)
    for i in range(minutes * 6):
        at = start + dt.timedelta(seconds=10 * i)
        received = at + dt.timedelta(seconds=1)
        RuntimeSample.objects.create(runtime_id=runtime_id, at=at, received_at=received, queue_depth=i % 4,
                                     running=2, tokens_per_s=120.0)
        if gpu:
            DeviceSample.objects.create(runtime_id=runtime_id, at=at, received_at=received, device=GPU,
                                        name="NVIDIA H100 80GB HBM3",
                                        gpu_util=80.0, mem_used=40 * 2**30, mem_total=80 * 2**30, power_w=500.0,
                                        energy_joules_total=1e6 + 5000.0 * i, temperature_c=60.0)
    if roll:
        sample_rollup_run(now=now)  # the history charts read the sample rollups
    return runtime
