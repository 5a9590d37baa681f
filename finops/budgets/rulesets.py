"""Budget state compiled into one ruleset document per runtime (docs/RULESET.md).

Rules come from exceeded budgets whose action limits requests (the same for every runtime;
narrower scopes come first, because the runtime applies the first matching downgrade), from the
concurrency caps set in the runtimes app (``concurrency`` rules, the same for every runtime) and from
the power caps in force for the runtime (``PowerCap``: a cap scheduled to start is put in by the first
evaluation pass after its start; its end is the rule's ``expires_at``, which the runtime keeps). Allowances
(per runtime) come from hard budgets' grants. The document changes only when budget state,
grants, prices or an allowance's renewed expiry change; ``ruleset_store`` gives it a new version
only then. Reasons name the limit, not the live spend, so a throttled budget whose spend keeps
moving does not issue a new version every few seconds.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

from django.db.models import Q
from django.utils import timezone

from finops.budgets.grants import ALLOWANCE_TTL, GrantRow, grants_current
from finops.budgets.models import Action, Budget, Enforcement, State, Unit
from finops.budgets.periods import Period, period_at
from finops.budgets.selectors import amount_label
from finops.caching.selectors import semantic_cache_document
from finops.lib.timezones import org_time_zone
from finops.pricing.services import PriceCatalog
from finops.runtimes.models import ConcurrencyCap, PowerCap, Runtime
from finops.runtimes.selectors import concurrency_caps, power_caps_in_force
from finops.runtimes.services import ruleset_store

UNIT_WORDS = {Unit.USD_LIST: "list price", Unit.USD_HARDWARE: "hardware cost"}


def iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def rulesets_compile(*, now: dt.datetime | None = None, grants: Mapping[int, Iterable[GrantRow]] | None = None
                     ) -> list[int]:
    """Compile and store every runtime's document; return the pks of runtimes given a new version.
    ``grants``: the hard budgets' current grants, as the evaluation pass just left them (read here
    for any budget they do not cover)."""
    now = now or timezone.now()
    # Only budgets that put something in a document: exceeded ones (rules) and hard ones (allowances).
    active = (Budget.objects.filter(paused=False).filter(Q(state=State.EXCEEDED) | Q(enforcement=Enforcement.HARD))
              .defer("created_at", "updated_at", "evaluated_at", "recipients", "thresholds"))
    budgets = [(budget, period_at(budget.period, now)) for budget in active]
    rules: list[dict[str, Any]] = []
    for budget, period in sorted(budgets, key=lambda item: (-item[0].specificity, item[0].pk)):
        if budget.state == State.EXCEEDED and budget.period_start == period.start:
            rules.extend(budget_rules(budget=budget, period=period))
    rules.extend(cap_rule(cap=cap) for cap in concurrency_caps())
    hard = [(budget, period) for budget, period in sorted(budgets, key=lambda item: item[0].pk) if budget.is_hard]
    known = {pk: {grant.runtime_id: grant for grant in rows} for pk, rows in (grants or {}).items()}
    missing = [(budget, period) for budget, period in hard if budget.pk not in known]
    current = {**known, **grants_current(missing)} if missing else known
    prices = prices_document(now=now)
    caps = power_caps_in_force(now=now)
    semantic_cache = semantic_cache_document()
    # What an allowance says of its budget is the same in every runtime's document: built once.
    shared = [(budget, allowance_scope(budget=budget, period=period)) for budget, period in hard]
    changed = []
    for runtime in Runtime.objects.order_by("name"):
        allowances = [{**scope, **allowance_grant(budget=budget, grant=current[budget.pk].get(runtime.pk), now=now)}
                      for budget, scope in shared]
        power_rules = [power_cap_rule(cap=cap) for cap in caps if cap.runtime_id in (None, runtime.pk)]
        content = {"runtime_id": runtime.name, "prices": prices, "rules": [*rules, *power_rules],
                   "allowances": allowances, "semantic_cache": semantic_cache}
        _, is_new = ruleset_store(runtime=runtime, content=content, now=now)
        if is_new:
            changed.append(runtime.pk)
    return changed


def _reason(budget: Budget, period: Period) -> str:
    unit = f" ({UNIT_WORDS[budget.unit]})" if budget.unit in UNIT_WORDS else ""
    reset = timezone.localtime(period.end, org_time_zone())
    return (f"Budget '{budget.name}' reached its limit of {amount_label(budget.unit, budget.limit)}{unit} "
            f"for this {budget.period_noun}; it resets at {reset:%Y-%m-%d %H:%M %Z}.")


def _scope(budget: Budget) -> dict[str, str]:
    return {"tenant": budget.tenant, "feature": budget.feature, "model": "*"}


def budget_rules(*, budget: Budget, period: Period) -> list[dict[str, Any]]:
    """The rules an exceeded budget puts in force until its period resets."""
    actions: list[dict[str, Any]] = []
    if budget.action == Action.BLOCK:
        actions.append({"type": "block"})
    elif budget.action == Action.THROTTLE:
        throttle: dict[str, Any] = {"type": "throttle"}
        if budget.throttle_tokens_per_minute:
            throttle["tokens_per_minute"] = budget.throttle_tokens_per_minute
        if budget.throttle_requests_per_minute:
            throttle["requests_per_minute"] = budget.throttle_requests_per_minute
        actions.append(throttle)
    elif budget.action == Action.DOWNGRADE:
        actions.append({"type": "downgrade", "model": budget.downgrade_model})
    if budget.cap_max_tokens and budget.action in (Action.THROTTLE, Action.DOWNGRADE):
        actions.append({"type": "cap_max_tokens", "max_tokens": budget.cap_max_tokens})
    names = {"block": "block", "throttle": "throttle", "downgrade": "downgrade", "cap_max_tokens": "cap"}
    return [{"id": f"b{budget.pk}-{names[action['type']]}", "budget_id": str(budget.pk), "budget_name": budget.name,
             "scope": _scope(budget), "action": action, "reason": _reason(budget, period),
             "expires_at": iso(period.end)} for action in actions]


def cap_rule(*, cap: ConcurrencyCap) -> dict[str, Any]:
    """A concurrency cap as the runtime's ``concurrency`` rule; it does not expire."""
    action: dict[str, Any] = {"type": "concurrency"}
    if cap.max_running is not None:
        action["max_running"] = cap.max_running
    if cap.max_queued is not None:
        action["max_queued"] = cap.max_queued
    return {"id": f"cap{cap.pk}-concurrency", "budget_id": None, "budget_name": None,
            "scope": {"tenant": cap.tenant, "feature": cap.feature, "model": cap.model}, "action": action,
            "reason": cap.reason, "expires_at": None}


def power_cap_rule(*, cap: PowerCap) -> dict[str, Any]:
    """A power cap as the runtime's ``power_cap`` rule: its schedule's end is the rule's expiry."""
    which = " and ".join(part for part in (cap.device_type if cap.device_type != "*" else "",
                                           cap.device if cap.device != "*" else "") if part) or "every GPU"
    return {"id": f"pc{cap.pk}-power_cap", "budget_id": None, "budget_name": None,
            "scope": {"tenant": "*", "feature": "*", "model": "*"},
            "action": {"type": "power_cap", "watts": cap.watts, "device": cap.device, "device_type": cap.device_type},
            "reason": f"Power cap '{cap.name}': {cap.watts} W on {which}.",
            "expires_at": iso(cap.ends_at) if cap.ends_at else None}


def allowance_scope(*, budget: Budget, period: Period) -> dict[str, Any]:
    """What a hard budget's allowance says of the budget, the same for every runtime."""
    return {"budget_id": str(budget.pk), "budget_name": budget.name, "scope": _scope(budget), "unit": budget.unit,
            "period_start": iso(period.start), "resets_at": iso(period.end), "on_expiry": budget.on_expiry}


def allowance_grant(*, budget: Budget, grant: GrantRow | None, now: dt.datetime) -> dict[str, Any]:
    """What one runtime's grant puts in its allowance. ``reported`` is the grant's settled count
    (events received up to the budget's watermark, a few seconds behind): a floor for a runtime
    that lost its ledger, which changes the document only as often as the watermark moves. A
    runtime without a grant row yet (registered during this evaluation) gets an allowance of
    nothing rather than none at all: no allowance would mean no limit."""
    granted = grant.granted if grant else Decimal(0)
    reported = grant.reported if grant else Decimal(0)
    expires_at = grant.expires_at if grant and grant.expires_at else (now + ALLOWANCE_TTL).replace(microsecond=0)
    return {"granted": json_number(granted, budget.unit, down=True),
            "reported": json_number(reported, budget.unit, down=False), "expires_at": iso(expires_at)}


def json_number(value: Decimal, unit: str, *, down: bool) -> int | float:
    """A JSON number for ``value`` that errs on the safe side: a grant never rounds up, a reported
    spend never rounds down. The runtime reads a number's text as a decimal, so the text (a float's
    shortest repr, exact for the micro-dollar amounts granted here) is what is compared."""
    if unit == Unit.TOKENS:
        return math.floor(value) if down else math.ceil(value)
    number = float(value)
    while down and Decimal(repr(number)) > value:
        number = math.nextafter(number, -math.inf)
    while not down and Decimal(repr(number)) < value:
        number = math.nextafter(number, math.inf)
    return number


def prices_document(*, now: dt.datetime) -> dict[str, dict[str, float]]:
    """List prices per model (USD per 1M tokens) of the book in force at ``now``; ``*`` is the
    book's price for any model it does not name."""
    book = PriceCatalog.load().at(now)
    if book is None:
        return {}
    return {model: {"prompt_per_1m": float(prompt), "completion_per_1m": float(completion)}
            for model, (prompt, completion) in sorted(book.models.items())}
