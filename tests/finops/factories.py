"""Small builders for control-plane tests: a runtime with its token, a price book, and telemetry
records as the runtime puts them on the wire (JSON-ready dicts: UUIDs and times as strings)."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from django.utils import timezone

from finops.pricing.models import DevicePrice, ModelPrice, PriceBook
from finops.runtimes.models import Runtime, RuntimeToken

RUNTIME = "rt-1"


def runtime_with_token(name: str = RUNTIME, *, base_url: str = "http://runtime.test:8000") -> tuple[Runtime, str]:
    """A registered runtime and its plain bearer token."""
    runtime = Runtime.objects.create(name=name, base_url=base_url)
    _, token = RuntimeToken.issue(runtime)
    return runtime, token


def price_book(
    *,
    effective_from: dt.datetime,
    models: Mapping[str, tuple[str, str]] | None = None,
    devices: Mapping[str, tuple[str, str]] | None = None,
    name: str = "",
) -> PriceBook:
    """A book with model rows ``{model: (prompt_per_1m, completion_per_1m)}`` and device rows
    ``{device_type: (per_gpu_hour, per_kwh)}`` (USD, as strings so they stay exact)."""
    book = PriceBook.objects.create(name=name or f"book from {effective_from:%Y-%m-%d %H:%M}",
                                    effective_from=effective_from)
    for model, (prompt, completion) in (models if models is not None else {"smollm2": ("0.10", "0.40")}).items():
        ModelPrice.objects.create(book=book, model=model, prompt_per_1m=Decimal(prompt),
                                  completion_per_1m=Decimal(completion))
    for device_type, (per_hour, per_kwh) in (devices if devices is not None else {"cpu": ("0.36", "0.36")}).items():
        DevicePrice.objects.create(book=book, device_type=device_type, per_gpu_hour=Decimal(per_hour),
                                   per_kwh=Decimal(per_kwh))
    return book


def iso(moment: dt.datetime) -> str:
    """A timestamp as the runtime's pydantic models write it."""
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def event_dict(*, started_at: Any = None, duration_ms: float = 250.0, **fields: Any) -> dict[str, Any]:
    """A valid request event (contract v1) as JSON-ready data, started a minute ago or at
    ``started_at`` (a datetime; any other value is put on the wire as it is, for hostile records).
    ``fields`` override any key; a key set to ``...`` is left out."""
    started = started_at if isinstance(started_at, dt.datetime) else timezone.now() - dt.timedelta(minutes=1)
    if started_at is not None and not isinstance(started_at, dt.datetime):
        fields = {"started_at": started_at, **fields}
    record: dict[str, Any] = {
        "event_id": str(uuid.uuid4()), "runtime_id": RUNTIME,
        "started_at": iso(started), "finished_at": iso(started + dt.timedelta(milliseconds=duration_ms)),
        "tenant": "acme", "feature": "chat", "end_user": None, "api_key_id": "key-1",
        "model_requested": "smollm2", "model_served": "smollm2", "route_reason": "requested", "rule_id": None,
        "priority": "normal", "status": "ok", "http_status": 200, "error_type": None,
        "prompt_tokens": 1000, "completion_tokens": 500, "cache_hit": False,
        "queue_wait_ms": 1.5, "ttft_ms": 40.0, "e2e_ms": duration_ms, "tpot_ms": 8.0,
        "queue_depth_at_admit": 0, "mean_batch_size": 4.0, "gpu_seconds": 2.0, "energy_joules": 1000.0,
        "device": "cpu",
    }
    record.update(fields)
    return {k: v for k, v in record.items() if v is not ...}


def device_dict(**fields: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "device": "GPU-00000000-0000-0000-0000-000000000001", "name": "NVIDIA H100 80GB HBM3", "gpu_util": 87.0,
        "mem_used": 40 * 2**30, "mem_total": 80 * 2**30, "power_w": 550.0, "energy_joules_total": 1.2e6,
        "temperature_c": 61.0,
    }
    record.update(fields)
    return {k: v for k, v in record.items() if v is not ...}


def sample_dict(*, at: dt.datetime | None = None, devices: list[dict[str, Any]] | None = None,
                **fields: Any) -> dict[str, Any]:
    """A valid runtime sample (contract v1) as JSON-ready data."""
    record: dict[str, Any] = {
        "runtime_id": RUNTIME, "at": iso(at or timezone.now() - dt.timedelta(minutes=2)), "queue_depth": 3,
        "running": 8, "tokens_per_s": 180.5, "kv_cache_used": 12_000, "devices": devices if devices is not None else [],
    }
    record.update(fields)
    return {k: v for k, v in record.items() if v is not ...}


def batch_body(*, events: Sequence[Any] = (), samples: Sequence[Any] = ()) -> bytes:
    """A request body; NaN and infinities become the bare JSON literals a careless client sends."""
    return json.dumps({"events": list(events), "samples": list(samples)}).encode()
