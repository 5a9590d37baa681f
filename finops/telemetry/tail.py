"""The raw tail: request events the rollups have not counted yet, and where in time they lie.

Every request read adds the rollups (events received up to the ``requests`` watermark) to the
raw events received after it (see ``sources``), aggregated by the database like the rollups.
Raw events are partitioned by the day they started, and a tail query bounded only by a page's
range plans and probes every partition of it: on PostgreSQL with a month of partitions that was
~13 ms of planning and ~7 ms of execution per query, a dozen queries per page, although the tail
is only the last seconds of traffic when the rollups keep up.

``tail_snapshot`` reads once, for a whole page, *when* the tail's events started (the earliest and
latest ``started_at`` of the events received after the watermark). Reads made inside the
``with`` block narrow their tail queries to that span (``tail_span``), so the database prunes them
to the day or two of partitions that hold recent traffic, and skip them when the tail was empty.
A read's own watermark can only be the snapshot's or a later one (it only moves forward), so
the events it needs are among those the snapshot saw. Events that arrive after the snapshot was
taken wait for the next page load, as they would have with a page rendered a moment earlier. A
read made outside any snapshot queries the whole of its range.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from django.db.models import Count, Max, Min

from finops.telemetry.models import FillState, RequestEvent
from finops.telemetry.rollups import FILL_STATE

_AFTER_LAST = dt.timedelta(microseconds=1)


@dataclass
class TailSnapshot:
    """The span of ``started_at`` of the events received after ``since``: ``[first, last]``, both
    None when there were none. With no watermark yet (``since`` None) everything is tail and no
    span is read."""

    since: dt.datetime | None
    first: dt.datetime | None = None
    last: dt.datetime | None = None
    last_watermark: dt.datetime | None = None  # the latest watermark a read saw in this block

    def span(self, start: dt.datetime, end: dt.datetime,
             watermark: dt.datetime | None) -> tuple[dt.datetime, dt.datetime] | None:
        """The part of ``[start, end)`` where tail events received after ``watermark`` started;
        None when there are none. Unnarrowed where the snapshot does not know (no watermark)."""
        if self.since is None or watermark is None or watermark < self.since:
            return start, end
        if self.first is None or self.last is None:
            return None
        narrowed = max(start, self.first), min(end, self.last + _AFTER_LAST)
        return narrowed if narrowed[0] < narrowed[1] else None


_active: ContextVar[TailSnapshot | None] = ContextVar("tail_snapshot", default=None)


def rollup_watermark() -> dt.datetime | None:
    """How far the request rollups have counted (by ``received_at``); None before the first run."""
    return FillState.objects.filter(name=FILL_STATE).values_list("watermark", flat=True).first()


def watermark_before_read() -> dt.datetime | None:
    """The watermark to open a consistent rollup read with (see ``sources.read_rollups``): inside
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


def read() -> TailSnapshot:
    """The current watermark and the span of the events received after it."""
    since = rollup_watermark()
    snapshot = TailSnapshot(since, last_watermark=since)
    if since is not None:
        # The count is not needed but must stay: with only MIN and MAX, PostgreSQL reads each
        # partition's started_at index from its end until a row passes the received_at filter —
        # millions of rows (3 s on 10M events) where the received_at index finds the tail in 5 ms.
        bounds = RequestEvent.objects.filter(received_at__gt=since).aggregate(
            first=Min("started_at"), last=Max("started_at"), events=Count("id"))
        snapshot.first, snapshot.last = bounds["first"], bounds["last"]
    return snapshot


@contextmanager
def tail_snapshot() -> Iterator[TailSnapshot]:
    """Read the tail's span once for every read made inside the block."""
    snapshot = read()
    token = _active.set(snapshot)
    try:
        yield snapshot
    finally:
        _active.reset(token)


def tail_span(*, start: dt.datetime, end: dt.datetime,
              watermark: dt.datetime | None) -> tuple[dt.datetime, dt.datetime] | None:
    """Where in ``[start, end)`` the events received after ``watermark`` started, as far as the
    active snapshot knows (all of it outside one); None when none did."""
    snapshot = _active.get()
    return (start, end) if snapshot is None else snapshot.span(start, end, watermark)
