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
  - a runtime is topped up when its headroom (granted − reported) falls below half of the headroom
    its last top-up left it; the new headroom is twice what it spent since that chunk (demand doubling), at least a
    *starter* of ``STARTER_FRACTION`` of the limit split among the live runtimes — so runtimes that
    stay idle strand at most that fraction of the limit between them;
  - one top-up never takes more than the unallocated pool divided by (runtimes wanting a top-up
    now + 1): a busy runtime grows quickly, yet part of the pool always stays for the others; once
    the pool is down to a starter's size it is handed out whole, so the tail is not cut into crumbs.

``reported`` is what the control plane has stored from a runtime for the budget and period. It is
computed incrementally: ``Grant.reported`` counts events received up to the budget's
``grants_settled_through`` (a ``received_at`` watermark, one for all of its grants), and each
evaluation adds only the events received since, up to the
database's clock less ``ROLLUP_SETTLE_SECONDS`` (the rollups' guard against an ingest transaction
committing late); the few seconds after the watermark are read fresh, never stored.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal

from django.conf import settings
from django.db.models import F, Max, QuerySet, Sum

from finops.budgets.models import ANY, Budget, Grant, Unit
from finops.budgets.periods import Period
from finops.budgets.spend import ScopeIndex, scope_index, use_aggregates
from finops.lib.bulk import rows_update
from finops.lib.lookups import AnyOf
from finops.runtimes.models import Runtime
from finops.telemetry.models import RequestEvent
from finops.telemetry.rollups import database_now
from finops.telemetry.sources import fetch_rows

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


def _use_by_runtime(*, period: Period, budgets: list[Budget], after: dt.datetime | None = None,
                    until: dt.datetime | None = None) -> ScopeIndex:
    """What each runtime reported in ``period`` for every scope of ``budgets``, counting events
    received after ``after`` and up to ``until`` (either open): one grouped query, narrowed to the
    budgets' tenants or features when none of them spans all."""
    events = RequestEvent.objects.filter(started_at__gte=period.start, started_at__lt=period.end)
    if after is not None:
        events = events.filter(received_at__gt=after)
    if until is not None:
        events = events.filter(received_at__lte=until)
    tenants = {b.tenant for b in budgets}
    features = {b.feature for b in budgets}
    if ANY not in tenants:
        events = events.filter(tenant__in=sorted(tenants))
    if ANY not in features:
        events = events.filter(feature__in=sorted(features))
    rows = fetch_rows(events.order_by().values("tenant", "feature", "runtime_id").annotate(**use_aggregates()))
    return scope_index(rows, key="runtime_id", wanted={(b.tenant, b.feature) for b in budgets})


def _grouped(pairs: Iterable[tuple[Budget, Period]]) -> dict[Period, list[Budget]]:
    groups: dict[Period, list[Budget]] = defaultdict(list)
    for budget, period in pairs:
        groups[period].append(budget)
    return groups


@dataclass(slots=True)
class GrantRow:
    """What evaluation reads and writes of a ``Grant``: a fleet's hard budgets have tens of
    thousands, read every pass, and a model instance each cost more than the rest of the pass."""

    pk: int
    budget_id: int
    runtime_id: int
    granted: Decimal
    reported: Decimal
    last_chunk: Decimal
    reported_at_last_chunk: Decimal
    expires_at: dt.datetime | None
    updated_at: dt.datetime | None = None


_READ = ("pk", "budget_id", "runtime_id", "granted", "reported", "last_chunk",
         "reported_at_last_chunk", "expires_at")


def grants_current(pairs: list[tuple[Budget, Period]]) -> dict[int, dict[int, GrantRow]]:
    """The current period's grants of every budget in ``pairs``, by budget pk then runtime pk."""
    grants: dict[int, dict[int, GrantRow]] = {budget.pk: {} for budget, _ in pairs}
    for period, budgets in _grouped(pairs).items():
        ids = [budget.pk for budget in budgets]
        for row in Grant.objects.filter(AnyOf(F("budget_id"), ids), period_start=period.start).values_list(*_READ):
            grant = GrantRow(*row)
            grants[grant.budget_id][grant.runtime_id] = grant
    return grants


def grants_settle_many(*, pairs: list[tuple[Budget, Period]], runtimes: list[Runtime], until: dt.datetime
                       ) -> dict[int, dict[int, GrantRow]]:
    """The grant of every runtime for each (budget, its period) in ``pairs`` (created at zero
    where missing), ``reported`` advanced to the settled watermark ``until``; by budget pk, then
    runtime pk. A few grouped queries for all of them, and one write of each budget's watermark.
    Call with the budgets' rows locked."""
    names = {r.pk: r.name for r in runtimes}
    grants = grants_current(pairs)
    created: set[int] = set()  # counted up to ``until`` as they were created
    missing = [(budget, period) for budget, period in pairs if len(grants[budget.pk]) < len(runtimes)]
    if missing:
        before = {grant.pk for mine in grants.values() for grant in mine.values()}
        new: list[Grant] = []
        for period, budgets in _grouped(missing).items():
            used = _use_by_runtime(period=period, budgets=budgets, until=until)
            for budget in budgets:
                new.extend(Grant(budget=budget, runtime=runtime, period_start=period.start,
                                 reported=used.use(budget.tenant, budget.feature, runtime.name).amount(budget.unit))
                           for runtime in runtimes if runtime.pk not in grants[budget.pk])
        Grant.objects.bulk_create(new, ignore_conflicts=True, batch_size=1000)
        grants = grants_current(pairs)
        created = {grant.pk for mine in grants.values() for grant in mine.values()} - before
    # Grants settled before count events up to their budget's watermark: add those received since.
    # Without a watermark for this period (none yet, or the budget's last was another period's),
    # a grant's events are counted again from the start of the period.
    by_watermark: dict[tuple[Period, dt.datetime | None], list[tuple[Budget, GrantRow]]] = defaultdict(list)
    for budget, period in pairs:
        since = settled_through(budget=budget, period=period)
        if since is not None and since >= until:
            continue
        for grant in grants[budget.pk].values():
            if grant.pk not in created and grant.runtime_id in names:
                by_watermark[(period, since)].append((budget, grant))
    grew: list[GrantRow] = []
    for (period, since), group in by_watermark.items():
        counted = _use_by_runtime(period=period, budgets=list({b.pk: b for b, _ in group}.values()), after=since,
                                  until=until)
        for budget, grant in group:
            more = counted.use(budget.tenant, budget.feature, names[grant.runtime_id]).amount(budget.unit)
            total = grant.reported + more if since is not None else more
            if total != grant.reported:
                grant.reported = total
                grew.append(grant)
    rows_update(Grant, grew, ["reported"])
    moved = []
    for budget, period in pairs:
        since = settled_through(budget=budget, period=period)
        if since is None or since < until:
            budget.grants_period_start, budget.grants_settled_through = period.start, until
            moved.append(budget)
    rows_update(Budget, moved, ["grants_period_start", "grants_settled_through"])
    return grants


def settled_through(*, budget: Budget, period: Period) -> dt.datetime | None:
    """The watermark up to which ``budget``'s grants of ``period`` count events (None: not settled)."""
    return budget.grants_settled_through if budget.grants_period_start == period.start else None


def grants_reported_many(*, pairs: list[tuple[Budget, Period]], grants: dict[int, dict[int, GrantRow]],
                         runtimes: list[Runtime]) -> dict[int, dict[int, Decimal]]:
    """Settled ``reported`` plus the events received after each budget's watermark, by budget pk
    then runtime pk. Call after ``grants_settle_many``."""
    names = {r.pk: r.name for r in runtimes}
    reported = {pk: {runtime_pk: g.reported for runtime_pk, g in mine.items()} for pk, mine in grants.items()}
    by_watermark: dict[tuple[Period, dt.datetime | None], list[Budget]] = defaultdict(list)
    for budget, period in pairs:
        by_watermark[(period, settled_through(budget=budget, period=period))].append(budget)
    for (period, since), budgets in by_watermark.items():
        fresh = _use_by_runtime(period=period, budgets=budgets, after=since)
        for budget in budgets:
            for grant in grants[budget.pk].values():
                if grant.runtime_id in names:
                    reported[budget.pk][grant.runtime_id] += fresh.use(budget.tenant, budget.feature,
                                                                       names[grant.runtime_id]).amount(budget.unit)
    return reported


def grants_top_up(*, budget: Budget, period: Period, now: dt.datetime) -> list[GrantRow]:
    """``grants_top_up_many`` of one budget: its grants, by runtime pk."""
    return grants_top_up_many(pairs=[(budget, period)], now=now).get(budget.pk, [])


def grants_top_up_many(*, pairs: list[tuple[Budget, Period]], now: dt.datetime) -> dict[int, list[GrantRow]]:
    """Settle and top up every runtime's grant for each hard (budget, its current period) in
    ``pairs`` (see the module's policy) and renew their expiry, in a few grouped queries and bulk
    writes. Call inside a transaction with the budgets' rows locked. Returns each budget's grants."""
    if not pairs:
        return {}
    runtimes = list(Runtime.objects.order_by("name"))
    until = database_now() - dt.timedelta(seconds=settings.ROLLUP_SETTLE_SECONDS)
    grants = grants_settle_many(pairs=pairs, runtimes=runtimes, until=until)
    reported = grants_reported_many(pairs=pairs, grants=grants, runtimes=runtimes)
    changed: list[GrantRow] = []
    for budget, _ in pairs:
        mine = grants[budget.pk]
        free = budget.limit - sum((g.granted for g in mine.values()), Decimal(0))
        increases = _top_ups(budget=budget, runtimes=runtimes, grants=mine, reported=reported[budget.pk],
                             free=free, now=now)
        for grant in mine.values():
            increase = increases.get(grant.runtime_id, Decimal(0))
            if increase > 0:
                grant.granted += increase
                grant.last_chunk = increase
                grant.reported_at_last_chunk = reported[budget.pk].get(grant.runtime_id, grant.reported)
            renew = grant.expires_at is None or grant.expires_at - now < ALLOWANCE_TTL / 2
            if renew:
                grant.expires_at = (now + ALLOWANCE_TTL).replace(microsecond=0)
            if renew or increase > 0:
                grant.updated_at = now
                changed.append(grant)
    rows_update(Grant, changed, ["granted", "last_chunk", "reported_at_last_chunk", "expires_at", "updated_at"])
    return {pk: sorted(mine.values(), key=lambda g: g.runtime_id) for pk, mine in grants.items()}


def _top_ups(*, budget: Budget, runtimes: list[Runtime], grants: dict[int, GrantRow], reported: dict[int, Decimal],
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
        # Low water is half the headroom the last top-up left (granted then minus reported then;
        # granted grows only at top-ups): half the last *increase* was a tiny mark after a small
        # top-up, so a busy runtime ran dry before its next one (the fleet test saw 6% of a shared
        # limit served before the first refusal).
        if grant.last_chunk > 0 and headroom >= (grant.granted - grant.reported_at_last_chunk) * LOW_WATER:
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


def granted_totals(*, pairs: list[tuple[Budget, Period]]) -> dict[int, Decimal]:
    """How much of each hard budget's limit is granted out in its current period, by pk."""
    current = {budget.pk: period.start for budget, period in pairs}
    rows = (Grant.objects.filter(budget_id__in=list(current), period_start__in=set(current.values())).order_by()
            .values_list("budget_id", "period_start").annotate(total=Sum("granted")))
    return {pk: total for pk, start, total in rows if current[pk] == start}


def hard_budgets_exhausted(*, pairs: list[tuple[Budget, Period]], used: dict[int, Decimal]) -> set[int]:
    """The hard budgets (of ``pairs``, with what they ``used``) that are used up although below
    their limit: runtimes reserve a request's worst case, so spend stops short of the limit once
    what is left cannot fit a request. Said so when the whole limit is granted out, a runtime has
    refused a request on this allowance this period, and what is left is less than the largest
    request served so far. A query for all of them, and one per budget that qualifies so far."""
    exhausted = {budget.pk for budget, _ in pairs if used[budget.pk] >= budget.limit}
    granted = granted_totals(pairs=[(b, p) for b, p in pairs if b.pk not in exhausted])
    candidates = [(b, p) for b, p in pairs if b.pk not in exhausted and granted.get(b.pk, 0) >= b.limit]
    refused: set[str] = set()
    for period, budgets in _grouped(candidates).items():
        refused |= set(RequestEvent.objects.filter(
            started_at__gte=period.start, started_at__lt=period.end, status="rejected_budget",
            rule_id__in=[f"allowance:{b.pk}" for b in budgets]).order_by().values_list("rule_id", flat=True).distinct())
    for budget, period in candidates:
        if f"allowance:{budget.pk}" not in refused:
            continue
        events = scope_events(budget=budget, period=period)
        measure = Max("list_cost") if budget.unit == Unit.USD_LIST else Max(F("prompt_tokens") + F("completion_tokens"))
        largest = events.filter(status="ok").aggregate(largest=measure)["largest"]
        if largest is not None and budget.limit - used[budget.pk] < Decimal(largest):
            exhausted.add(budget.pk)
    return exhausted
