"""Admission under a ruleset: which rules act on a request, and the reservations it holds.

Two steps, because a request's size is only known once it is tokenized, and a downgrade decides
which model tokenizes it:

1. ``match`` (before tokenizing): a ``block`` refuses at once, an expired ``closed`` allowance
   refuses with 503, and the result says which model to serve, the max_tokens cap, and which
   throttles and allowances meter the request.
2. ``reserve`` (once the prompt's tokens and max_tokens are known): every throttle must have room
   and every allowance must cover the worst case; only when all do is anything taken. Nothing in
   it awaits, so on the event loop the check and the reservation are one atomic step.

``settle`` releases a reservation and books the true amount; it is idempotent.

A ``concurrency`` rule is not checked here but handed to admission with the match (``Match.caps``):
its counts of the scope's requests queued and running are kept by the enforcer per rule id, so a
newer document with the same rule keeps them, and admission refuses (``cap_rejection``) a request
past ``max_queued`` or holds it back while ``max_running`` run.

A client request is one request to a throttle however many attempts it takes: its first attempt
takes a request from every matching ``requests_per_minute`` bucket, a retry's or a fallback's
(``count_request=False``) only its tokens; every attempt reserves its own worst case against the
allowances, since every attempt may spend. A cache hit (``reserve_cache_hit``) is a request like
any other to the throttles' request rates, but generates nothing: it takes no tokens from a
throttle and reserves nothing from an allowance, whose ledger only counts what was generated.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from inference.fair_share import ConcurrencyCap
from inference.rules.accounting import ZERO, Ledger, Throttle, seconds_until
from inference.rules.compiled import CompiledAllowance, CompiledRule, CompiledRuleset, PeriodKey, TokenPrice
from inference.rules.contract import WILDCARD

STALE_RETRY_AFTER_S = 5
NO_EXPIRY_RETRY_AFTER_S = 60
REJECTION_REASONS = ("block", "throttle", "allowance", "stale", "unpriced", "concurrency")


class RuleRejection(Exception):
    """A request the rules refuse: what the client is told and how the event records it."""

    def __init__(self, *, reason: str, status: int, code: str, message: str, retry_after_s: int,
                 rule_id: str, event_status: str, error_type: str | None = None) -> None:
        super().__init__(message)
        self.reason, self.status, self.code, self.message = reason, status, code, message
        self.retry_after_s, self.rule_id, self.event_status, self.error_type = (
            retry_after_s, rule_id, event_status, error_type)


class RulesetNotNewer(Exception):
    def __init__(self, held: int, offered: int) -> None:
        super().__init__(f"This runtime holds ruleset version {held}; version {offered} is not newer.")
        self.held = held
        self.offered = offered


@dataclass(slots=True)
class Match:
    """The rules acting on one request, found before it is tokenized."""

    version: int
    request: tuple[str, str, str, Container[str]]  # tenant, feature, model, the models served
    downgrade: CompiledRule | None = None
    cap: CompiledRule | None = None
    throttles: list[CompiledRule] = field(default_factory=list)
    allowances: list[CompiledAllowance] = field(default_factory=list)
    caps: list[ConcurrencyCap] = field(default_factory=list)
    prices: dict[str, TokenPrice] = field(default_factory=dict)

    @property
    def metered(self) -> bool:
        """Whether admission needs the request's worst case in tokens."""
        return bool(self.allowances) or any(r.tokens_per_minute is not None for r in self.throttles)

    @property
    def max_tokens_cap(self) -> int | None:
        return self.cap.max_tokens if self.cap is not None else None


@dataclass(slots=True)
class Reservation:
    """What one admitted request holds until it settles."""

    model: str
    price: TokenPrice | None
    throttles: list[tuple[Throttle, int]]
    allowances: list[tuple[CompiledAllowance, PeriodKey, Decimal]]
    settled: bool = False


@dataclass
class RuleCounters:
    rejections: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REJECTION_REASONS, 0))
    fail_open: int = 0
    fail_closed: int = 0
    downgrades: int = 0
    downgrades_ignored: int = 0
    capped: int = 0


class RuleEnforcer:
    def __init__(self, *, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._monotonic = monotonic
        self.compiled: CompiledRuleset | None = None
        self.ledger = Ledger()
        self.counters = RuleCounters()
        self._throttles: dict[str, Throttle] = {}
        self._caps: dict[str, ConcurrencyCap] = {}
        self.on_ledger_change: Callable[[], None] | None = None

    @property
    def version(self) -> int:
        return self.compiled.version if self.compiled is not None else 0

    # -- the ruleset ---------------------------------------------------------------------------

    def apply(self, compiled: CompiledRuleset, *, settled: dict[PeriodKey, Decimal] | None = None) -> None:
        """Hold ``compiled`` from now on (``settled`` replaces the ledger: used when loading state).
        Throttles keep their buckets across documents; a period that moved on drops its ledger."""
        if compiled.version <= self.version:
            raise RulesetNotNewer(self.version, compiled.version)
        now = self._monotonic()
        throttles: dict[str, Throttle] = {}
        for rule_id, rule in compiled.throttles.items():
            previous = self._throttles.get(rule_id)
            if previous is not None and previous.limits == rule.limits:
                throttles[rule_id] = previous
            else:
                throttles[rule_id] = Throttle(rule_id, rule.limits, now, previous)
        caps: dict[str, ConcurrencyCap] = {}
        for rule_id, rule in compiled.concurrency.items():
            cap = self._caps.get(rule_id) or ConcurrencyCap(rule_id, rule.reason, rule.max_running, rule.max_queued)
            cap.reason, cap.max_running, cap.max_queued = rule.reason, rule.max_running, rule.max_queued
            caps[rule_id] = cap
        self._caps = caps
        if settled is not None:
            self.ledger.settled = dict(settled)
        dropped = self.ledger.follow(compiled.periods.values())
        self._throttles = throttles
        self.compiled = compiled
        if dropped and self.on_ledger_change is not None:
            self.on_ledger_change()

    def stale(self) -> bool:
        """Whether any allowance is past its expiry without a newer document."""
        return self.compiled is not None and self._clock() >= self.compiled.earliest_expiry

    # -- admission -----------------------------------------------------------------------------

    def match(self, tenant: str, feature: str, model: str, served: Container[str]) -> Match | None:
        """The rules acting on a request, or None when none does. Raises ``RuleRejection`` for a
        block or a closed, expired allowance."""
        compiled = self.compiled
        if compiled is None:
            return None
        rules = compiled.rules.match(tenant, feature, model) if compiled.rules.size else ()
        allowances = compiled.allowances.match(tenant, feature, model) if compiled.allowances.size else ()
        if not rules and not allowances:
            return None
        now = self._clock()
        match = Match(version=compiled.version, request=(tenant, feature, model, served), prices=compiled.token_prices)
        block: CompiledRule | None = None
        for rule in rules:
            if rule.expires_at is not None and now >= rule.expires_at:
                continue
            kind = rule.type
            if kind == "block":
                block = block or rule
            elif kind == "throttle":
                match.throttles.append(rule)
            elif kind == "downgrade":
                if match.downgrade is None and rule.model != model:
                    if rule.model in served:
                        match.downgrade = rule
                    else:
                        self.counters.downgrades_ignored += 1
            elif kind == "concurrency":
                match.caps.append(self._caps[rule.id])
            elif kind == "cap_max_tokens" and (match.cap is None or rule.max_tokens < match.cap.max_tokens):  # type: ignore[operator]
                match.cap = rule
        if block is not None:
            self._count("block")
            raise RuleRejection(
                reason="block", status=429, code="rejected_budget", error_type="budget_exceeded",
                message=_naming(block.budget_name, block.reason, f"Blocked by rule '{block.id}'."),
                retry_after_s=seconds_until(block.expires_at, now, default=NO_EXPIRY_RETRY_AFTER_S),
                rule_id=block.id, event_status="rejected_budget")
        for allowance in allowances:
            if allowance.expires_at is not None and now >= allowance.expires_at:
                if allowance.on_expiry == "closed":
                    self.counters.fail_closed += 1
                    self._count("stale")
                    raise RuleRejection(
                        reason="stale", status=503, code="ruleset_stale", retry_after_s=STALE_RETRY_AFTER_S,
                        message=f"Budget '{allowance.label}' could not be renewed from the control plane in "
                                "time; its traffic is refused until it is. Try again shortly.",
                        rule_id=allowance.rule_id, event_status="rejected_budget")
                self.counters.fail_open += 1  # the allowance is ignored while it is stale
                continue
            match.allowances.append(allowance)
        if (match.downgrade is None and match.cap is None and not match.throttles and not match.allowances
                and not match.caps):
            return None
        return match

    def cap_rejection(self, cap: ConcurrencyCap, *, retry_after_s: int) -> RuleRejection:
        """The refusal of a request past ``cap``'s ``max_queued``: 429, like a throttle."""
        self._count("concurrency")
        return RuleRejection(
            reason="concurrency", status=429, code="rejected_rule", retry_after_s=retry_after_s,
            message=_naming(None, cap.reason, f"Too many requests waiting under rule '{cap.rule_id}'.")
            + f" At most {cap.max_queued} may wait; try again in {retry_after_s} s.",
            rule_id=cap.rule_id, event_status="rejected_rule")

    def reserve_cache_hit(self, match: Match, *, model: str, count_request: bool = True) -> Reservation:
        """A request answered from the cache: one request from every matching throttle (refused as
        any request when one has no room), no tokens, nothing from an allowance."""
        return self.reserve(match, prompt_tokens=0, max_tokens=0, model=model, count_request=count_request,
                            cache_hit=True)

    def reserve(self, match: Match, *, prompt_tokens: int, max_tokens: int, model: str,
                count_request: bool = True, cache_hit: bool = False) -> Reservation:
        """Take the request's worst case from every throttle and allowance in ``match``, or nothing
        and raise ``RuleRejection`` if any has no room. ``count_request`` False: a later attempt of a
        request already counted in the throttles' request rates."""
        if self.compiled is None or match.version != self.compiled.version:
            # A newer ruleset arrived while the request was tokenized: its throttles and grants
            # count, not those it was matched against (the model and cap already chosen stay).
            tenant, feature, model_requested, served = match.request
            fresh = self.match(tenant, feature, model_requested, served)
            if fresh is None:
                return Reservation(model=model, price=None, throttles=[], allowances=[])
            match = fresh
        worst_tokens = prompt_tokens + max_tokens
        taken: list[tuple[Throttle, int]] = []
        if match.throttles:
            now_m = self._monotonic()
            for rule in match.throttles:
                throttle = self._throttles.get(rule.id)
                if throttle is None:  # the rule left the ruleset between match and reserve
                    continue
                wait = throttle.wait_s(worst_tokens, now_m, request=count_request)
                if wait > 0:
                    self._count("throttle")
                    retry = max(1, math.ceil(wait))
                    raise RuleRejection(
                        reason="throttle", status=429, code="rejected_rule", retry_after_s=retry,
                        message=_naming(rule.budget_name, rule.reason, f"Rate limited by rule '{rule.id}'.")
                        + f" Try again in {retry} s.",
                        rule_id=rule.id, event_status="rejected_rule")
                taken.append((throttle, worst_tokens if throttle.tokens is not None else 0))
        # A "*" price is the book's price for any model it does not name (ingest prices events so too).
        price = match.prices.get(model) or match.prices.get(WILDCARD)
        held: list[tuple[CompiledAllowance, PeriodKey, Decimal]] = []
        if match.allowances and not cache_hit:
            for allowance in match.allowances:
                worst = self._worst_case(allowance, price, model, prompt_tokens, max_tokens)
                available = self.ledger.available(allowance.period, allowance.granted, allowance.reported)
                fits = available > 0 if allowance.unit == "gpu_seconds" else worst <= available
                if not fits:
                    self._count("allowance")
                    raise RuleRejection(
                        reason="allowance", status=429, code="rejected_budget", error_type="budget_exceeded",
                        retry_after_s=seconds_until(allowance.resets_at, self._clock(),
                                                    default=NO_EXPIRY_RETRY_AFTER_S),
                        message=f"Budget '{allowance.label}' is exhausted on this runtime: this request may "
                                f"cost up to {_amount(worst, allowance.unit)} and "
                                f"{_amount(max(available, ZERO), allowance.unit)} remain(s) this period.",
                        rule_id=allowance.rule_id, event_status="rejected_budget")
                held.append((allowance, allowance.period, worst))
        # Everything fits: take it all (no await between the checks above and here).
        for throttle, tokens in taken:
            throttle.take(tokens, request=count_request)
        for _, period, worst in held:
            self.ledger.reserve(period, worst)
        if match.cap is not None:
            self.counters.capped += 1
        if match.downgrade is not None:
            self.counters.downgrades += 1
        return Reservation(model=model, price=price, throttles=taken, allowances=held)

    def settle(self, reservation: Reservation, *, prompt_tokens: int, completion_tokens: int,
               gpu_seconds: float | None) -> None:
        """Release ``reservation`` and book what the request really used (once; later calls do nothing)."""
        if reservation.settled:
            return
        reservation.settled = True
        used_tokens = max(0, prompt_tokens) + max(0, completion_tokens)
        if reservation.throttles:
            now_m = self._monotonic()
            for throttle, reserved_tokens in reservation.throttles:
                throttle.give_back_tokens(reserved_tokens - used_tokens, now_m)
        booked = False
        for allowance, period, worst in reservation.allowances:
            spent = self._spent(allowance, reservation.price, prompt_tokens, completion_tokens, gpu_seconds)
            if self.ledger.settle(period, worst, spent) and spent > 0:
                booked = True
        if booked and self.on_ledger_change is not None:
            self.on_ledger_change()

    # -- amounts -------------------------------------------------------------------------------

    def _worst_case(self, allowance: CompiledAllowance, price: TokenPrice | None, model: str, prompt_tokens: int,
                    max_tokens: int) -> Decimal:
        if allowance.unit == "tokens":
            return Decimal(prompt_tokens + max_tokens)
        if allowance.unit == "gpu_seconds":
            return ZERO  # unknown before it runs: a soft cap that only needs something left
        if price is None:
            self._count("unpriced")
            raise RuleRejection(
                reason="unpriced", status=503, code="budget_unpriced", retry_after_s=NO_EXPIRY_RETRY_AFTER_S,
                message=f"Budget '{allowance.label}' is kept in list-price dollars, but the ruleset has no "
                        f"price for model '{model}', so this request cannot be metered.",
                rule_id=allowance.rule_id, event_status="rejected_budget")
        return prompt_tokens * price[0] + max_tokens * price[1]

    @staticmethod
    def _spent(allowance: CompiledAllowance, price: TokenPrice | None, prompt_tokens: int, completion_tokens: int,
               gpu_seconds: float | None) -> Decimal:
        prompt_tokens, completion_tokens = max(0, prompt_tokens), max(0, completion_tokens)
        if allowance.unit == "tokens":
            return Decimal(prompt_tokens + completion_tokens)
        if allowance.unit == "gpu_seconds":
            if gpu_seconds is None or not math.isfinite(gpu_seconds) or gpu_seconds <= 0:
                return ZERO
            return Decimal(repr(gpu_seconds))
        if price is None:
            return ZERO
        return prompt_tokens * price[0] + completion_tokens * price[1]

    def _count(self, reason: str) -> None:
        self.counters.rejections[reason] += 1

    # -- for operators -------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        compiled = self.compiled
        allowances = []
        if compiled is not None:
            for a in compiled.document.allowances:
                period = compiled.periods[a.budget_id]
                allowances.append({
                    "budget_id": a.budget_id, "unit": a.unit, "period_start": period[1],
                    "granted": str(a.granted), "reported": str(a.reported),
                    "settled": str(self.ledger.settled.get(period, ZERO)),
                    "reserved": str(self.ledger.reserved(period)),
                    "available": str(self.ledger.available(period, a.granted, a.reported)),
                })
        return {"version": self.version, "stale": self.stale(), "ledger": self.ledger.rows(),
                "allowances": allowances}


def _naming(budget_name: str | None, reason: str, fallback: str) -> str:
    """The client's message: the rule's reason, always naming the budget when there is one."""
    reason = reason.strip()
    if budget_name and budget_name not in reason:
        return f"Budget '{budget_name}': {reason}" if reason else f"Budget '{budget_name}' exceeded."
    return reason or fallback


def _amount(value: Decimal, unit: str) -> str:
    if unit == "usd_list":
        return f"${value:.6f} (list price)"
    if unit == "tokens":
        return f"{value:,.0f} tokens"
    return f"{value:.3f} GPU-seconds"
