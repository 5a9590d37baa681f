"""Allowances for hard budgets: how much of the limit each runtime may spend this period.

A runtime admits a request only when ``granted − max(ledger, reported) − reserved`` covers its worst
case (docs/RULESET.md). Grants only grow and never add up to more than the limit, so everything the
runtimes can spend together is at most the limit, whatever the concurrency or delays.

The policy (``grants_top_up``), run on every evaluation while the budget's row is locked:

* **One registered runtime** gets the whole remaining limit at once: there is nobody to share with,
  and the control plane is then out of the request path entirely. (A runtime registered later in
  the same period gets only what is left, i.e. nothing, until the period resets.)
* **Several runtimes** share the pool in chunks that follow demand:

  - only a *live* runtime (seen by ingest or a ruleset pull within ``LIVE_WINDOW``) is topped up:
    a stopped runtime cannot strand more of the pool than it already holds;
  - a runtime is topped up when its headroom (granted − reported) falls below half of its last
    chunk; the new headroom is twice what it spent since that chunk (demand doubling), at least a
    *starter* of ``STARTER_FRACTION`` of the limit split among the live runtimes — so runtimes that
    stay idle strand at most that fraction of the limit between them;
  - one top-up never takes more than the unallocated pool divided by (runtimes wanting a top-up
    now + 1): a busy runtime grows quickly, yet part of the pool always stays for the others; once
    the pool is down to a starter's size it is handed out whole, so the tail is not cut into crumbs.

``reported`` is what the control plane has stored from a runtime for the budget and period. It is
computed incrementally: ``Grant.reported`` counts events received up to ``reported_through`` (a
``received_at`` watermark), and each evaluation adds only the events received since, up to the
database's clock less ``ROLLUP_SETTLE_SECONDS`` (the rollups' guard against an ingest transaction
committing late); the few seconds after the watermark are read fresh, never stored.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable
from decimal import ROUND_DOWN, Decimal

from django.conf import settings
from django.db.models import F, Max, QuerySet, Sum

from finops.budgets.models import ANY, Budget, Grant, Unit
from finops.budgets.periods import Period
from finops.runtimes.models import Runtime
from finops.telemetry.models import RequestEvent
from finops.telemetry.rollups import database_now
from finops.telemetry.sums import cost_sum, cost_value

LIVE_WINDOW = dt.timedelta(minutes=10)
STARTER_FRACTION = Decimal("0.10")
LOW_WATER = Decimal("0.5")
# The runtime falls back to the budget's on-expiry policy if it hears nothing newer by then;
# renewed once less than half is left, so an idle document changes every few minutes, not every run.
ALLOWANCE_TTL = dt.timedelta(minutes=5)
QUANTA = {Unit.TOKENS: Decimal(1), Unit.USD_LIST: Decimal("0.000001")}


def _quantum(unit: str) -> Decimal:
    return QUANTA.get(unit, Decimal("0.000001"))


def _floor(value: Decimal, unit: str) -> Decimal:
    return value.quantize(_quantum(unit), rounding=ROUND_DOWN)


def scope_events(*, budget: Budget, period: Period) -> QuerySet[RequestEvent]:
    events = RequestEvent.objects.filter(started_at__gte=period.start, started_at__lt=period.end)
    if budget.tenant != ANY:
        events = events.filter(tenant=budget.tenant)
    if budget.feature != ANY:
        events = events.filter(feature=budget.feature)
    return events


def _used_by_runtime(events: QuerySet[RequestEvent], unit: str, names: Iterable[str]) -> dict[str, Decimal]:
    """What each named runtime used of ``events``, in ``unit``."""
    names = list(names)
    if not names:
        return {}
    measure = cost_sum("list_cost") if unit == Unit.USD_LIST else Sum(F("prompt_tokens") + F("completion_tokens"))
    if unit == Unit.TOKENS:  # what the runtime books: a cache hit's tokens were saved, not spent
        events = events.filter(cache_hit=False)
    rows = events.filter(runtime_id__in=names).values("runtime_id").annotate(used=measure).values_list(
        "runtime_id", "used")
    if unit == Unit.USD_LIST:
        return {name: cost_value(used) for name, used in rows}
    return {name: Decimal(used or 0) for name, used in rows}


def grants_settle(*, budget: Budget, period: Period, runtimes: list[Runtime]) -> dict[int, Grant]:
    """The grant of every runtime for ``budget`` in ``period`` (created at zero where missing), its
    ``reported`` advanced to the settled watermark. Call with the budget's row locked."""
    until = database_now() - dt.timedelta(seconds=settings.ROLLUP_SETTLE_SECONDS)
    grants = {g.runtime_id: g for g in Grant.objects.filter(budget=budget, period_start=period.start)}
    events = scope_events(budget=budget, period=period)
    missing = [r for r in runtimes if r.pk not in grants]
    if missing:
        used = _used_by_runtime(events.filter(received_at__lte=until), budget.unit, (r.name for r in missing))
        Grant.objects.bulk_create(
            [Grant(budget=budget, runtime=r, period_start=period.start, reported=used.get(r.name, Decimal(0)),
                   reported_through=until) for r in missing],
            ignore_conflicts=True)
        grants = {g.runtime_id: g for g in Grant.objects.filter(budget=budget, period_start=period.start)}
    names = {r.pk: r.name for r in runtimes}
    by_watermark: dict[dt.datetime, list[Grant]] = defaultdict(list)
    for grant in grants.values():
        if grant.reported_through < until and grant.runtime_id in names:
            by_watermark[grant.reported_through].append(grant)
    for since, group in by_watermark.items():
        new = _used_by_runtime(events.filter(received_at__gt=since, received_at__lte=until), budget.unit,
                               (names[g.runtime_id] for g in group))
        for grant in group:
            grant.reported += new.get(names[grant.runtime_id], Decimal(0))
            grant.reported_through = until
        Grant.objects.bulk_update(group, ["reported", "reported_through"])
    return grants


def grants_reported(*, budget: Budget, period: Period, grants: dict[int, Grant], runtimes: list[Runtime]
                    ) -> dict[int, Decimal]:
    """Settled ``reported`` plus the events received after each grant's watermark, per runtime pk."""
    names = {r.pk: r.name for r in runtimes}
    events = scope_events(budget=budget, period=period)
    by_watermark: dict[dt.datetime, list[Grant]] = defaultdict(list)
    for grant in grants.values():
        if grant.runtime_id in names:
            by_watermark[grant.reported_through].append(grant)
    reported = {pk: g.reported for pk, g in grants.items()}
    for since, group in by_watermark.items():
        fresh = _used_by_runtime(events.filter(received_at__gt=since), budget.unit,
                                 (names[g.runtime_id] for g in group))
        for grant in group:
            reported[grant.runtime_id] += fresh.get(names[grant.runtime_id], Decimal(0))
    return reported


def grants_top_up(*, budget: Budget, period: Period, now: dt.datetime) -> list[Grant]:
    """Settle and top up every runtime's grant for ``budget`` in ``period`` (see the module's policy);
    renew their expiry. Call inside a transaction with the budget's row locked."""
    runtimes = list(Runtime.objects.order_by("name"))
    grants = grants_settle(budget=budget, period=period, runtimes=runtimes)
    reported = grants_reported(budget=budget, period=period, grants=grants, runtimes=runtimes)
    limit = budget.limit
    free = limit - sum((g.granted for g in grants.values()), Decimal(0))
    increases = _top_ups(budget=budget, runtimes=runtimes, grants=grants, reported=reported, free=free, now=now)
    changed: list[Grant] = []
    for grant in grants.values():
        increase = increases.get(grant.runtime_id, Decimal(0))
        if increase > 0:
            grant.granted += increase
            grant.last_chunk = increase
            grant.reported_at_last_chunk = reported.get(grant.runtime_id, grant.reported)
        renew = grant.expires_at is None or grant.expires_at - now < ALLOWANCE_TTL / 2
        if renew:
            grant.expires_at = (now + ALLOWANCE_TTL).replace(microsecond=0)
        if increase > 0 or renew:
            changed.append(grant)
    if changed:
        Grant.objects.bulk_update(changed, ["granted", "last_chunk", "reported_at_last_chunk", "expires_at",
                                            "updated_at"])
    return sorted(grants.values(), key=lambda g: g.runtime_id)


def _top_ups(*, budget: Budget, runtimes: list[Runtime], grants: dict[int, Grant], reported: dict[int, Decimal],
             free: Decimal, now: dt.datetime) -> dict[int, Decimal]:
    """How much to add to each runtime's grant; the increases never add up to more than ``free``."""
    unit = budget.unit
    if free <= 0 or not runtimes:
        return {}
    if len(runtimes) == 1:
        return {runtimes[0].pk: _floor(free, unit)}
    live = [r for r in runtimes if r.last_seen_at is not None and now - r.last_seen_at <= LIVE_WINDOW]
    if not live:
        return {}
    starter = budget.limit * STARTER_FRACTION / len(live)
    wanting: list[tuple[Decimal, Runtime, Decimal]] = []  # (headroom, runtime, increase wanted)
    for runtime in live:
        grant = grants[runtime.pk]
        used = reported.get(runtime.pk, grant.reported)
        headroom = grant.granted - used
        if grant.last_chunk > 0 and headroom >= grant.last_chunk * LOW_WATER:
            continue
        spent_since = max(Decimal(0), used - grant.reported_at_last_chunk) if grant.last_chunk > 0 else Decimal(0)
        target = used + max(starter, 2 * spent_since)
        if target > grant.granted:
            wanting.append((headroom, runtime, target - grant.granted))
    wanting.sort(key=lambda item: (item[0], item[1].name))
    increases: dict[int, Decimal] = {}
    for position, (_, runtime, wanted) in enumerate(wanting):
        share = free if free <= starter else free / (len(wanting) - position + 1)
        increase = _floor(min(wanted, share), unit)
        if increase > 0:
            increases[runtime.pk] = increase
            free -= increase
    return increases


def hard_budget_exhausted(*, budget: Budget, period: Period, used: Decimal) -> bool:
    """Whether a hard budget below its limit is used up all the same: runtimes reserve a request's
    worst case, so spend stops short of the limit once what is left cannot fit a request. Said so
    when the whole limit is granted out, a runtime has refused a request on this allowance this
    period, and what is left is less than the largest request served so far."""
    if used >= budget.limit:
        return True
    granted = Grant.objects.filter(budget=budget, period_start=period.start).aggregate(total=Sum("granted"))["total"]
    if granted is None or granted < budget.limit:
        return False
    events = scope_events(budget=budget, period=period)
    if not events.filter(status="rejected_budget", rule_id=f"allowance:{budget.pk}").exists():
        return False
    measure = Max("list_cost") if budget.unit == Unit.USD_LIST else Max(F("prompt_tokens") + F("completion_tokens"))
    # A cache hit reserves nothing, so only a generated answer tells how large a reservation gets.
    largest = events.filter(status="ok", cache_hit=False).aggregate(largest=measure)["largest"]
    return largest is not None and budget.limit - used < Decimal(largest)
