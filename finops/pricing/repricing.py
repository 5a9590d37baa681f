"""An admin's explicit re-price of past events under the price books as they stand now.

Ingest prices an event once, on arrival, under the book in force when it started; a book added
or edited later moves no past cost by itself (DESIGN.md, "Cost model"). ``reprice_range`` is the
one way to change past costs: it prices the raw events again and moves the rollups (and the tasks'
costs, ``client_tasks``) by exactly the difference, so they keep equalling raw sums. Raw events only
live ``RAW_RETENTION_DAYS``, so a range reaching past that is refused rather than half re-priced.
Events the rollups leave out (out of the contract's bounds: ``telemetry.quarantine``) are left as
they are, and a price that would make an event cost more than one request can (``COST_LIMIT``, as
at ingest) refuses the whole re-price.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from django.conf import settings
from django.db import connection, transaction
from django.db.models import BooleanField, ExpressionWrapper, Q, Value
from django.db.models.functions import Coalesce, TruncMinute
from django.utils import timezone

from finops.pricing.services import PriceCatalog, hardware_cost, served_list_cost
from finops.telemetry.client_tasks import client_tasks_reprice, task_key
from finops.telemetry.contracts import COST_LIMIT
from finops.telemetry.models import RequestEvent
from finops.telemetry.quarantine import in_bounds
from finops.telemetry.retention import raw_retention_start
from finops.telemetry.rollups import RollupKey, fill_state_lock, fold, rollup_add
from finops.telemetry.selectors import device_types_for
from finops.telemetry.sums import ZERO, Sums

CHUNK = 2000
# (id, started_at, price book id, list cost, hardware cost, saved cost) of an event whose price changed.
Changed = tuple[int, dt.datetime, int | None, Decimal | None, Decimal | None, Decimal | None]


class RepricingRefused(ValueError):
    """The range cannot be re-priced exactly (it is empty, or its raw events may be gone)."""


def reprice_range(*, start: dt.datetime, end: dt.datetime, now: dt.datetime | None = None) -> int:
    """Price again every event that started in [start, end) and move the rollups by the change;
    return how many events' costs changed."""
    if start >= end:
        raise RepricingRefused("the range is empty: start must be before end")
    kept_from = raw_retention_start(now or timezone.now())
    if start < kept_from:
        raise RepricingRefused(
            f"cannot re-price events that started before {kept_from:%Y-%m-%d %H:%M} UTC: raw events are kept "
            f"{settings.RAW_RETENTION_DAYS} days (RAW_RETENTION_DAYS), so older costs in the rollups can no "
            "longer be rebuilt from them")
    with transaction.atomic():
        # The rollups' lock: no run counts these events while their costs and rollup rows change.
        state = fill_state_lock()
        catalog = PriceCatalog.load()
        in_range = in_bounds(RequestEvent.objects.filter(started_at__gte=start, started_at__lt=end))
        devices = device_types_for(devices=in_range.values_list("runtime_id", "device").distinct().order_by())
        counted = (ExpressionWrapper(Q(received_at__lte=state.watermark), output_field=BooleanField())
                   if state else Value(False))
        events = (in_range.order_by()
                  .annotate(counted=counted, minute=TruncMinute("started_at", tzinfo=dt.UTC),
                            served=Coalesce("model_served", Value("")))
                  .values_list("id", "started_at", "model_served", "prompt_tokens", "completion_tokens",
                               "cache_hit", "gpu_seconds", "energy_joules", "runtime_id", "device", "price_book_id",
                               "list_cost", "hardware_cost", "saved_cost", "counted", "minute", "tenant", "feature",
                               "served", "status_class", "task_id", "request_id", "event_id", "cache_kind"))
        changed: list[Changed] = []
        differences: dict[RollupKey, Sums] = {}
        task_differences: dict[tuple[str, str], tuple[Decimal, Decimal]] = {}
        for (pk, started, model, prompt, completion, cache_hit, gpu, energy, runtime_id, device, old_book, old_list,
             old_hardware, old_saved, was_counted, *group, task_id, request_id, event_id,
             cache_kind) in events.iterator(chunk_size=CHUNK):
            prices = catalog.at(started)
            book = prices.book_id if prices else None
            listed, saved = served_list_cost(prices, model=model, prompt_tokens=prompt, completion_tokens=completion,
                                             cache_hit=cache_hit)
            hardware = hardware_cost(prices, device_type=devices.get((runtime_id, device)),
                                     gpu_seconds=gpu, energy_joules=energy)
            if (book, listed, hardware, saved) == (old_book, old_list, old_hardware, old_saved):
                continue
            if any(cost is not None and cost >= COST_LIMIT for cost in (listed, hardware, saved)):
                raise RepricingRefused(
                    f"under these prices an event that started {started:%Y-%m-%d %H:%M} UTC would cost more than one "
                    f"request can (${COST_LIMIT:,}); check the prices")
            changed.append((pk, started, book, listed, hardware, saved))
            if was_counted:  # already in the rollups at its old cost; the rest are counted later, at the new
                difference = differences.setdefault(("minute", *group), Sums())
                difference.list_cost += (listed or Decimal(0)) - (old_list or Decimal(0))
                difference.hardware_cost += (hardware or Decimal(0)) - (old_hardware or Decimal(0))
                difference.saved_cost += (saved or Decimal(0)) - (old_saved or Decimal(0))
                if cache_hit and cache_kind == "semantic":
                    difference.semantic_saved_cost += (saved or Decimal(0)) - (old_saved or Decimal(0))
                difference.unpriced += (listed is None) - (old_list is None)
                task = (group[1], task_key(task_id=task_id, request_id=request_id, event_id=event_id))
                listed_before, hardware_before = task_differences.get(task, (ZERO, ZERO))
                task_differences[task] = (listed_before + (listed or ZERO) - (old_list or ZERO),
                                          hardware_before + (hardware or ZERO) - (old_hardware or ZERO))
        events_update(changed)
        client_tasks_reprice(task_differences)
        # Only existing rows move: a missing minute row has expired (MINUTE_ROLLUP_RETENTION_DAYS).
        rollup_add(fold(differences), create=False)
    return len(changed)


def events_update(changed: list[Changed]) -> None:
    """Write new prices, one pipelined statement per event: Django's bulk_update builds a CASE
    per column whose cost grows with the square of the batch (90 s for 100k events here)."""
    if not changed:
        return
    table = connection.ops.quote_name(RequestEvent._meta.db_table)
    fields = [RequestEvent._meta.get_field(name)
              for name in ("price_book_id", "list_cost", "hardware_cost", "saved_cost", "id")]
    where = "id = %s"
    if connection.vendor == "postgresql":  # the partition key lets each update go straight to its day
        where += " AND started_at = %s"
    sql = f"UPDATE {table} SET price_book_id = %s, list_cost = %s, hardware_cost = %s, saved_cost = %s WHERE {where}"
    rows = []
    for pk, started, book, listed, hardware, saved in changed:
        values = (book, listed, hardware, saved, pk)
        row = [f.get_db_prep_save(v, connection) for f, v in zip(fields, values, strict=True)]
        rows.append((*row, started) if connection.vendor == "postgresql" else tuple(row))
    with connection.cursor() as cursor:
        cursor.executemany(sql, rows)
        if cursor.rowcount not in (-1, len(rows)):
            raise RuntimeError(f"re-pricing updated {cursor.rowcount} of {len(rows)} events; rolled back")
