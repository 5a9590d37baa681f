"""The raw tail: request events the rollups have not counted yet, read once per page.

Every request selector adds the rollups (events received up to the ``requests`` watermark) to the
raw events received after it (see ``selectors``). A page asks a dozen selectors, and each used to
read that tail with its own query over every daily partition of its range — most of a page's SQL
time, although the tail is only the last seconds of traffic when the rollups keep up.

``tail_snapshot`` reads it once instead: the events that started in a range and were received after
the watermark of that moment, a few columns each. Selectors called inside the ``with`` block take
their tail from it, keeping only the events received after the watermark *they* read their rollup
rows at (it only moves forward), so an event a rollup run counted meanwhile is never counted twice.
Events that arrive after the snapshot was taken wait for the next page load, as they would have
with a page rendered a moment earlier. A selector called outside any snapshot, or for a range the
snapshot does not cover, takes its own.

The tail's sums, groups and histograms are computed here in Python; they are exact (costs are
Decimals) and agree with the rollups' sums field by field.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, NamedTuple

from django.db.models import Value
from django.db.models.functions import Coalesce

from finops.telemetry.models import FillState, RequestEvent

ROLLUP_FILL_STATE = "requests"
COLUMNS = ("started_at", "received_at", "tenant", "feature", "model", "status_class", "prompt_tokens",
           "completion_tokens", "cache_hit", "gpu_seconds", "energy_joules", "list_cost", "hardware_cost",
           "e2e_ms", "e2e_bucket", "ttft_ms", "ttft_bucket", "runtime_id", "device")


class TailEvent(NamedTuple):
    started_at: dt.datetime
    received_at: dt.datetime
    tenant: str
    feature: str
    model: str  # the served model, "" when none served it (a rejection)
    status_class: str
    prompt_tokens: int
    completion_tokens: int
    cache_hit: bool
    gpu_seconds: float | None
    energy_joules: float | None
    list_cost: Any  # Decimal | None
    hardware_cost: Any
    e2e_ms: float | None
    e2e_bucket: int | None
    ttft_ms: float | None
    ttft_bucket: int | None
    runtime_id: str
    device: str | None


@dataclass
class TailSnapshot:
    """Events that started in ``[start, end)`` and were received after ``since`` (all of them when
    ``since`` is None: nothing was rolled up yet)."""

    start: dt.datetime
    end: dt.datetime
    since: dt.datetime | None
    events: tuple[TailEvent, ...]
    last_watermark: dt.datetime | None = None  # the latest watermark a selector read in this block

    def covers(self, start: dt.datetime, end: dt.datetime, watermark: dt.datetime | None) -> bool:
        """Whether it holds every event of ``[start, end)`` received after ``watermark``."""
        if not (self.start <= start and end <= self.end):
            return False
        return self.since is None or (watermark is not None and watermark >= self.since)


_active: ContextVar[TailSnapshot | None] = ContextVar("tail_snapshot", default=None)


def rollup_watermark() -> dt.datetime | None:
    """How far the request rollups have counted (by ``received_at``); None before the first run."""
    return FillState.objects.filter(name=ROLLUP_FILL_STATE).values_list("watermark", flat=True).first()


def watermark_before_read() -> dt.datetime | None:
    """The watermark to open a consistent rollup read with (see ``selectors._read_rollups``): inside
    a snapshot, the last one read there — it can only have moved forward since, which the read's
    closing check catches — else the current one."""
    snapshot = _active.get()
    if snapshot is not None and snapshot.last_watermark is not None:
        return snapshot.last_watermark
    return rollup_watermark()


def watermark_after_read() -> dt.datetime | None:
    """The current watermark, remembered as the next read's opening one inside a snapshot."""
    current = rollup_watermark()
    snapshot = _active.get()
    if snapshot is not None:
        snapshot.last_watermark = current
    return current


def read(*, start: dt.datetime, end: dt.datetime, since: dt.datetime | None) -> TailSnapshot:
    """The events that started in ``[start, end)`` and were received after ``since``."""
    events = RequestEvent.objects.filter(started_at__gte=start, started_at__lt=end)
    if since is not None:
        events = events.filter(received_at__gt=since)
    rows = (events.order_by().annotate(model=Coalesce("model_served", Value("")))
            .values_list(*COLUMNS))
    return TailSnapshot(start, end, since, tuple(TailEvent._make(row) for row in rows))


@contextmanager
def tail_snapshot(*, start: dt.datetime, end: dt.datetime) -> Iterator[TailSnapshot]:
    """Read the tail of ``[start, end)`` once for every selector called inside the block."""
    snapshot = read(start=start, end=end, since=rollup_watermark())
    snapshot.last_watermark = snapshot.since
    token = _active.set(snapshot)
    try:
        yield snapshot
    finally:
        _active.reset(token)


def tail_events(*, start: dt.datetime, end: dt.datetime, watermark: dt.datetime | None,
                keep: Callable[[TailEvent], bool] | None = None) -> list[TailEvent]:
    """The events that started in ``[start, end)`` and were received after ``watermark`` (and pass
    ``keep``), from the active snapshot when it covers them, else read now."""
    snapshot = _active.get()
    if snapshot is None or not snapshot.covers(start, end, watermark):
        snapshot = read(start=start, end=end, since=watermark)
    return [event for event in snapshot.events
            if start <= event.started_at < end
            and (watermark is None or event.received_at > watermark)
            and (keep is None or keep(event))]
