"""One request's measurement, from arrival to the request event it becomes (DESIGN.md contract).

Times are taken with ``time.perf_counter`` for durations and the wall clock only for the
``started_at``/``finished_at`` stamps, so a clock step never makes a latency negative.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from inference.contracts import CacheKind, EventStatus, Priority, RequestEvent
from inference.engine.engine import GenerationResult

if TYPE_CHECKING:
    from inference.admission import NoQueue, Slot
    from inference.rules import Reservation


@dataclass
class RequestMeasurement:
    runtime_id: str
    tenant: str
    api_key_id: str
    feature: str
    priority: Priority
    model_requested: str = ""
    end_user: str | None = None
    model_served: str | None = None
    route_reason: str = "requested"
    rule_id: str | None = None
    device: str | None = None
    status: EventStatus = "ok"
    http_status: int = 200
    error_type: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_hit: bool = False
    cache_stale: bool = False
    cache_kind: CacheKind | None = None
    cache_similarity: float | None = None
    cache_lookup_ms: float | None = None
    queue_wait_s: float | None = None
    queue_depth_at_admit: int | None = None
    result: GenerationResult | None = None
    request_id: str | None = None
    attempt: int | None = None
    task_id: str | None = None
    event_id: uuid.UUID = field(default_factory=uuid.uuid4)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    t0: float = field(default_factory=time.perf_counter)
    t_end: float | None = None
    # What the rules reserved for this request; settled when the request is recorded.
    reservation: Reservation | None = field(default=None, repr=False)

    def next_attempt(self, attempt: int, *, route_reason: str) -> RequestMeasurement:
        """The measurement of another attempt at the same client request (a retry or a fallback):
        the same client, request and rules, an event, a clock and an outcome of its own."""
        return RequestMeasurement(runtime_id=self.runtime_id, tenant=self.tenant, api_key_id=self.api_key_id,
                                  feature=self.feature, priority=self.priority, model_requested=self.model_requested,
                                  end_user=self.end_user, route_reason=route_reason, rule_id=self.rule_id,
                                  request_id=self.request_id, attempt=attempt, task_id=self.task_id)

    def answers_since(self, first: RequestMeasurement) -> None:
        """This attempt is the one that answers the client: its times run from when the client's
        request arrived (``first``'s start), so its latency is the one the client saw, earlier
        attempts and backoffs included. A failed attempt keeps its own times."""
        self.started_at, self.t0 = first.started_at, first.t0

    def slot_released(self, slot: Slot | NoQueue) -> None:
        """The request gave its slot back: its queue wait is final now (a preempted request's pause
        counts), and is written here only. A cache replay passes ``NO_QUEUE``: no wait, no depth."""
        self.queue_wait_s, self.queue_depth_at_admit = slot.queue_wait_s, slot.depth_at_admit

    def fail(self, status: EventStatus, http_status: int, error_type: str | None) -> None:
        self.status, self.http_status, self.error_type = status, http_status, error_type

    def finish(self, result: GenerationResult | None = None) -> None:
        if result is not None:
            self.result = result
            self.prompt_tokens = result.prompt_tokens
            self.completion_tokens = result.completion_tokens
        self.t_end = result.finished_at if result is not None else time.perf_counter()

    def to_event(self) -> RequestEvent:
        end = self.t_end if self.t_end is not None else time.perf_counter()
        e2e_s = max(0.0, end - self.t0)
        r = self.result
        ttft_ms = tpot_ms = None
        if r is not None and r.first_token_at is not None:
            ttft_ms = max(0.0, r.first_token_at - self.t0) * 1000
            if r.completion_tokens > 1:
                tpot_ms = max(0.0, r.finished_at - r.first_token_at) * 1000 / (r.completion_tokens - 1)
        return RequestEvent(
            **{name: getattr(self, name) for name in _RECORDED},
            finished_at=self.started_at + timedelta(seconds=e2e_s),
            queue_wait_ms=None if self.queue_wait_s is None else self.queue_wait_s * 1000,
            ttft_ms=ttft_ms,
            e2e_ms=e2e_s * 1000,
            tpot_ms=tpot_ms,
            mean_batch_size=r.mean_batch_size if r else None,
            gpu_seconds=r.gpu_seconds if r else None,
            energy_joules=r.energy_joules if r else None,
            device_use_source=r.device_use_source if r is not None and r.gpu_seconds is not None else None,
        )


# The event's fields a measurement holds as they are, by the same name; ``to_event`` computes the rest
# (times from the clock readings, device use from the engine's result). A new field the runtime
# measures is a ``RequestMeasurement`` field of the contract's name: ``to_event`` copies it.
_RECORDED = tuple(name for name in RequestEvent.model_fields if name in RequestMeasurement.__dataclass_fields__)
