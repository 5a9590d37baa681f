"""A validated ruleset turned into what admission reads: flat records with their times as epoch
seconds, indexed by scope. Built once per accepted document (off the event loop), read per request."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC
from decimal import Decimal
from typing import Literal

from inference.rules.contract import Allowance, PowerCapAction, Rule, RulesetDocument, as_epoch
from inference.rules.matching import ScopeIndex

ActionType = Literal["block", "throttle", "downgrade", "cap_max_tokens", "concurrency"]
Unit = Literal["tokens", "usd_list", "gpu_seconds"]
PeriodKey = tuple[str, str]  # (budget_id, period_start as ISO 8601 UTC)
TokenPrice = tuple[Decimal, Decimal]
MILLION = Decimal(1_000_000)


@dataclass(frozen=True, slots=True)
class CompiledRule:
    id: str
    type: ActionType
    reason: str
    budget_name: str | None
    expires_at: float | None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    model: str | None = None
    max_tokens: int | None = None
    max_running: int | None = None
    max_queued: int | None = None

    def live(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at

    @property
    def limits(self) -> tuple[int | None, int | None]:
        return self.requests_per_minute, self.tokens_per_minute


@dataclass(frozen=True, slots=True)
class CompiledPowerCap:
    """A ``power_cap`` rule: applied to GPUs by ``inference.power_caps``, never matched to requests."""

    id: str
    action: PowerCapAction
    reason: str
    expires_at: float | None

    def live(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at


@dataclass(frozen=True, slots=True)
class CompiledAllowance:
    budget_id: str
    budget_name: str | None
    unit: Unit
    period: PeriodKey
    granted: Decimal
    reported: Decimal
    resets_at: float | None
    expires_at: float | None
    on_expiry: Literal["closed", "open"]

    @property
    def rule_id(self) -> str:
        return f"allowance:{self.budget_id}"

    @property
    def label(self) -> str:
        return self.budget_name or self.budget_id


@dataclass(frozen=True)
class CompiledRuleset:
    document: RulesetDocument
    rules: ScopeIndex[CompiledRule]
    allowances: ScopeIndex[CompiledAllowance]
    throttles: dict[str, CompiledRule]
    concurrency: dict[str, CompiledRule]
    periods: dict[str, PeriodKey]  # budget_id -> its current period
    token_prices: dict[str, TokenPrice]  # model -> list-price dollars per prompt / completion token
    earliest_expiry: float  # of any allowance; inf when none expires
    power_caps: tuple[CompiledPowerCap, ...] = ()

    @property
    def version(self) -> int:
        return self.document.version


def ruleset_compile(document: RulesetDocument) -> CompiledRuleset:
    rules = [(r.scope.key(), _rule(r)) for r in document.rules if r.action.type != "power_cap"]
    allowances = [(a.scope.key(), _allowance(a)) for a in document.allowances]
    expiries = [a.expires_at for _, a in allowances if a.expires_at is not None]
    return CompiledRuleset(
        document=document,
        rules=ScopeIndex(rules),
        allowances=ScopeIndex(allowances),
        throttles={r.id: r for _, r in rules if r.type == "throttle"},
        concurrency={r.id: r for _, r in rules if r.type == "concurrency"},
        periods={a.budget_id: a.period for _, a in allowances},
        token_prices={model: (p.prompt_per_1m / MILLION, p.completion_per_1m / MILLION)
                      for model, p in document.prices.items()},
        earliest_expiry=min(expiries, default=math.inf),
        power_caps=tuple(CompiledPowerCap(id=r.id, action=r.action, reason=r.reason, expires_at=as_epoch(r.expires_at))
                         for r in document.rules if isinstance(r.action, PowerCapAction)),
    )


def _rule(rule: Rule) -> CompiledRule:
    action = rule.action
    common = {"id": rule.id, "type": action.type, "reason": rule.reason, "budget_name": rule.budget_name,
              "expires_at": as_epoch(rule.expires_at)}
    if action.type == "throttle":
        return CompiledRule(**common, requests_per_minute=action.requests_per_minute,
                            tokens_per_minute=action.tokens_per_minute)
    if action.type == "downgrade":
        return CompiledRule(**common, model=action.model)
    if action.type == "cap_max_tokens":
        return CompiledRule(**common, max_tokens=action.max_tokens)
    if action.type == "concurrency":
        return CompiledRule(**common, max_running=action.max_running, max_queued=action.max_queued)
    return CompiledRule(**common)


def _allowance(allowance: Allowance) -> CompiledAllowance:
    return CompiledAllowance(
        budget_id=allowance.budget_id,
        budget_name=allowance.budget_name,
        unit=allowance.unit,
        period=(allowance.budget_id, period_label(allowance)),
        granted=allowance.granted,
        reported=allowance.reported,
        resets_at=as_epoch(allowance.resets_at),
        expires_at=as_epoch(allowance.expires_at),
        on_expiry=allowance.on_expiry,
    )


def period_label(allowance: Allowance) -> str:
    """The period's start as one canonical string, whatever offset the document wrote it in."""
    return allowance.period_start.astimezone(UTC).isoformat().replace("+00:00", "Z")
