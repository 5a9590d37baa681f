"""Wire contracts (version 1) from the runtime to the control plane.

These are the only shapes the runtime and ``finops`` share; ``DESIGN.md`` ("Contracts") is their
prose form. ``finops`` validates against the JSON schemas these models produce.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

CONTRACT_VERSION = 1

EventStatus = Literal["ok", "error", "rejected_rule", "rejected_budget", "shed", "timeout", "cancelled"]
Priority = Literal["low", "normal", "high"]
BreakerState = Literal["closed", "half_open", "open"]
# How an event's gpu_seconds and energy_joules were obtained: measured by this runtime's engine per
# step (a cache hit, which ran nothing, too), or attributed from outside an upstream engine from its
# busy time and device counters (docs/TELEMETRY.md).
DeviceUseSource = Literal["measured", "attributed"]
CacheKind = Literal["exact", "semantic"]


class RequestEvent(BaseModel):
    """One served, refused or failed request, as measured by the runtime."""

    model_config = ConfigDict(extra="forbid")

    event_id: uuid.UUID
    runtime_id: str
    started_at: datetime
    finished_at: datetime
    tenant: str
    feature: str
    end_user: str | None = None
    api_key_id: str
    model_requested: str
    model_served: str | None
    route_reason: str
    rule_id: str | None = None
    priority: Priority
    status: EventStatus
    http_status: int
    error_type: str | None = None
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    cache_hit: bool = False
    queue_wait_ms: float | None = Field(default=None, ge=0)
    ttft_ms: float | None = Field(default=None, ge=0)
    e2e_ms: float = Field(ge=0)
    tpot_ms: float | None = Field(default=None, ge=0)
    queue_depth_at_admit: int | None = Field(default=None, ge=0)
    mean_batch_size: float | None = Field(default=None, ge=0)
    gpu_seconds: float | None = Field(default=None, ge=0)
    energy_joules: float | None = Field(default=None, ge=0)
    device: str | None = None
    # This runtime's count of events recorded, this one included (1, 2, 3, ... for one runtime_id,
    # never repeated): the control plane counts gaps as records lost. None from older runtimes.
    seq: int | None = Field(default=None, ge=1)
    # The client request this event is one attempt of: its retries, its fallbacks and a job's attempts
    # share the id (a job's is the job id) and are numbered 1, 2, 3... The highest-numbered attempt is
    # the one whose answer or error the client got. None from older runtimes.
    request_id: str | None = Field(default=None, max_length=100)
    attempt: int | None = Field(default=None, ge=1)
    # The task this attempt belongs to: the client's name for it (``X-Wattson-Task`` or the body's
    # ``metadata.task_id``), else the request's ``request_id``. Every attempt of every request a
    # client sends under one task id counts toward that one task. None from older runtimes.
    task_id: str | None = Field(default=None, max_length=100)
    # A cached answer served past its freshness because no model of the fallback chain could answer.
    cache_stale: bool = False
    # How gpu_seconds and energy_joules were obtained; None when gpu_seconds is. None from older runtimes.
    device_use_source: DeviceUseSource | None = None
    # Which cache answered (``cache_hit`` true): the exact one (the same request) or the semantic one
    # (a similar question, ``cache_similarity`` its cosine similarity); None for other requests.
    cache_kind: CacheKind | None = None
    cache_similarity: float | None = Field(default=None, ge=-1, le=1)
    # Time spent looking the request up in the caches (the semantic cache's embedding and scan
    # included); None when no cache was looked up.
    cache_lookup_ms: float | None = Field(default=None, ge=0)


class DeviceSample(BaseModel):
    """One accelerator's readings; every field is null where it cannot be measured."""

    model_config = ConfigDict(extra="forbid")

    device: str
    name: str | None = None
    gpu_util: float | None = None
    mem_used: int | None = None
    mem_total: int | None = None
    power_w: float | None = None
    energy_joules_total: float | None = None
    temperature_c: float | None = None
    # The board's power limit now (a power_cap rule's, or its own); None from older runtimes.
    power_limit_w: float | None = None


class TenantSample(BaseModel):
    """One tenant's service since the runtime's previous sample, and its requests now."""

    model_config = ConfigDict(extra="forbid")

    tenant: str
    tokens_per_s: float = Field(ge=0)  # prompt and completion tokens served, over the interval
    queue_wait_ms: float | None = Field(default=None, ge=0)  # mean wait of those given a slot; None: none was
    waiting: int = Field(ge=0)
    running: int = Field(ge=0)


class RuntimeSample(BaseModel):
    """The runtime's state every few seconds."""

    model_config = ConfigDict(extra="forbid")

    runtime_id: str
    at: datetime
    queue_depth: int = Field(ge=0)
    running: int = Field(ge=0)
    tokens_per_s: float = Field(ge=0)
    kv_cache_used: int | None = None
    devices: list[DeviceSample] = Field(default_factory=list)
    # Each served model's circuit breaker; absent from runtimes older than this field.
    breakers: dict[str, BreakerState] | None = None
    # The highest ``seq`` this runtime has given an event so far: what it recorded, for the control
    # plane to hold against what it stored. None from older runtimes.
    events_recorded: int | None = Field(default=None, ge=0)
    # Each tenant with work or service since the previous sample (fair share); None from older runtimes.
    tenants: list[TenantSample] | None = None


class TelemetryBatch(BaseModel):
    """The body of ``POST /api/v1/events``."""

    events: list[RequestEvent] = Field(default_factory=list)
    samples: list[RuntimeSample] = Field(default_factory=list)
