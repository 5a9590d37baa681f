"""The runtime's own counts behind rules: token buckets for throttles, and the ledger of settled
spend with the reservations of requests still running, per budget and period.

Plain objects with no clock and no I/O of their own (the caller passes ``now``), so that the
invariants — a bucket never lends more than a minute's worth, reservations never let the ledger
pass a grant — can be tested alone and under random interleavings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from decimal import Decimal

from inference.rules.compiled import PeriodKey

ZERO = Decimal(0)


class TokenBucket:
    """``per_minute`` units refilled evenly over a minute, holding at most a minute's worth.

    A request larger than the whole bucket is let through when the bucket is full and leaves it in
    debt, so an oversized request waits for a full minute instead of being refused forever.
    """

    __slots__ = ("capacity", "level", "rate", "updated")

    def __init__(self, per_minute: int, now: float, level: float | None = None) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity if level is None else min(level, self.capacity)
        self.updated = now

    def _refill(self, now: float) -> float:
        level = self.level
        if now > self.updated:
            level += (now - self.updated) * self.rate
            if level > self.capacity:
                level = self.capacity
            self.level, self.updated = level, now
        return level

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` can be taken (0 when it can be now)."""
        level = self._refill(now)
        need = amount if amount < self.capacity else self.capacity
        return 0.0 if level >= need else (need - level) / self.rate

    def take(self, amount: float) -> None:
        self.level -= amount

    def give_back(self, amount: float, now: float) -> None:
        self.level = min(self.capacity, self._refill(now) + amount)


class Throttle:
    """A throttle rule's buckets: requests and/or tokens per minute."""

    __slots__ = ("limits", "requests", "rule_id", "tokens")

    def __init__(self, rule_id: str, limits: tuple[int | None, int | None], now: float,
                 previous: Throttle | None = None) -> None:
        self.rule_id = rule_id
        self.limits = limits
        rpm, tpm = limits
        # A rule re-sent with new limits keeps what it had used: tightening never grants a fresh burst.
        self.requests = None if rpm is None else TokenBucket(
            rpm, now, previous.requests.level if previous and previous.requests else None)
        self.tokens = None if tpm is None else TokenBucket(
            tpm, now, previous.tokens.level if previous and previous.tokens else None)

    def wait_s(self, tokens: int, now: float, *, request: bool = True) -> float:
        """Seconds until ``tokens`` (and with ``request``, one request) can be taken. A cache hit
        asks for a request and no tokens; a request's later attempt asks for tokens only."""
        wait = 0.0 if self.requests is None or not request else self.requests.wait_s(1, now)
        if self.tokens is not None and tokens > 0:
            token_wait = self.tokens.wait_s(tokens, now)
            if token_wait > wait:
                wait = token_wait
        return wait

    def take(self, tokens: int, *, request: bool = True) -> None:
        if self.requests is not None and request:
            self.requests.take(1)
        if self.tokens is not None and tokens > 0:
            self.tokens.take(tokens)

    def give_back_tokens(self, tokens: int, now: float) -> None:
        if self.tokens is not None and tokens > 0:
            self.tokens.give_back(tokens, now)


class Ledger:
    """Settled spend and open reservations per (budget_id, period_start).

    ``available`` = granted − max(settled, reported) − reserved. Reservations are counted so that a
    period's reserved total returns to exactly zero when its last request settles.
    """

    def __init__(self, settled: dict[PeriodKey, Decimal] | None = None) -> None:
        self.settled: dict[PeriodKey, Decimal] = dict(settled or {})
        self._reserved: dict[PeriodKey, tuple[Decimal, int]] = {}
        self._current: set[PeriodKey] = set()

    def available(self, period: PeriodKey, granted: Decimal, reported: Decimal) -> Decimal:
        spent = self.settled.get(period, ZERO)
        reserved = self._reserved.get(period)
        return granted - max(spent, reported) - (reserved[0] if reserved else ZERO)

    def reserved(self, period: PeriodKey) -> Decimal:
        found = self._reserved.get(period)
        return found[0] if found else ZERO

    def reserve(self, period: PeriodKey, amount: Decimal) -> None:
        total, count = self._reserved.get(period, (ZERO, 0))
        self._reserved[period] = (total + amount, count + 1)

    def settle(self, period: PeriodKey, reserved: Decimal, spent: Decimal) -> bool:
        """Release a reservation and add what was spent; False when the period is over (the spend
        belongs to a period this runtime no longer counts, so it is not added)."""
        total, count = self._reserved.get(period, (reserved, 1))
        if count <= 1:
            self._reserved.pop(period, None)
        else:
            self._reserved[period] = (total - reserved, count - 1)
        if period not in self._current:
            return False
        if spent > 0:
            self.settled[period] = self.settled.get(period, ZERO) + spent
        return True

    def follow(self, periods: Iterable[PeriodKey]) -> bool:
        """Track the ruleset's current periods; drop settled spend of older periods and of budgets
        the ruleset no longer has (a returning budget starts from its ``reported``). True when
        anything was dropped."""
        current = set(periods)
        self._current = current
        stale = [key for key in self.settled if key not in current]
        for key in stale:
            del self.settled[key]
        return bool(stale)

    def rows(self) -> list[dict[str, str]]:
        return [{"budget_id": b, "period_start": p, "settled": str(v)} for (b, p), v in sorted(self.settled.items())]


def seconds_until(moment: float | None, now: float, *, default: int) -> int:
    """Whole seconds to ``moment`` for Retry-After, at least 1; ``default`` when there is none."""
    if moment is None:
        return default
    return max(1, math.ceil(moment - now))
