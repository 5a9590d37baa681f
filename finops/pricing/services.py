"""Pricing: which book is in force at a moment, and what one request cost under it.

List price = tokens x the model's price per 1M (what an API provider would charge, the
counterfactual). Hardware cost = attributed GPU-seconds x the device type's $/GPU-hour + attributed
energy x its $/kWh. A request no price row applies to has no cost (None) rather than $0, so an
unpriced model is visible instead of looking free.
"""

from __future__ import annotations

import bisect
import datetime as dt
from dataclasses import dataclass, field
from decimal import Decimal

from finops.pricing.models import ANY, DevicePrice, ModelPrice, PriceBook

MILLION = Decimal(1_000_000)
SECONDS_PER_HOUR = Decimal(3600)
JOULES_PER_KWH = Decimal(3_600_000)
QUANTUM = Decimal("0.000000000001")  # the cost columns' 12 decimal places


@dataclass(frozen=True)
class Prices:
    """One book's prices, loaded once and looked up without queries."""

    book_id: int
    effective_from: dt.datetime
    models: dict[str, tuple[Decimal, Decimal]]
    devices: dict[str, tuple[Decimal, Decimal]]

    def for_model(self, model: str | None) -> tuple[Decimal, Decimal] | None:
        return self.models.get(model or "", self.models.get(ANY))

    def for_device(self, device_type: str | None) -> tuple[Decimal, Decimal] | None:
        return self.devices.get(device_type or "", self.devices.get(ANY))


@dataclass
class PriceCatalog:
    """Every price book, ordered by effective date, for pricing a batch of events."""

    books: list[Prices] = field(default_factory=list)

    @classmethod
    def load(cls) -> PriceCatalog:
        model_rows: dict[int, dict[str, tuple[Decimal, Decimal]]] = {}
        for row in ModelPrice.objects.values_list("book_id", "model", "prompt_per_1m", "completion_per_1m"):
            model_rows.setdefault(row[0], {})[row[1]] = (row[2], row[3])
        device_rows: dict[int, dict[str, tuple[Decimal, Decimal]]] = {}
        for row in DevicePrice.objects.values_list("book_id", "device_type", "per_gpu_hour", "per_kwh"):
            device_rows.setdefault(row[0], {})[row[1]] = (row[2], row[3])
        books = [
            Prices(book.id, book.effective_from, model_rows.get(book.id, {}), device_rows.get(book.id, {}))
            for book in PriceBook.objects.order_by("effective_from")
        ]
        return cls(books)

    def at(self, moment: dt.datetime) -> Prices | None:
        """The book in force at ``moment``: the latest that took effect at or before it."""
        position = bisect.bisect_right([b.effective_from for b in self.books], moment)
        return self.books[position - 1] if position else None


def list_cost(prices: Prices | None, *, model: str | None, prompt_tokens: int, completion_tokens: int
              ) -> Decimal | None:
    row = prices.for_model(model) if prices else None
    if row is None:
        return None
    prompt, completion = row
    return ((prompt * prompt_tokens + completion * completion_tokens) / MILLION).quantize(QUANTUM)


def served_list_cost(prices: Prices | None, *, model: str | None, prompt_tokens: int, completion_tokens: int,
                     cache_hit: bool) -> tuple[Decimal | None, Decimal | None]:
    """What a request cost at list price, and what it saved: a cache hit costs nothing and saves
    what its tokens would have cost (DESIGN.md, "Cost model"). Both None where no list price
    applies; ``saved`` is None for a request the engine served."""
    listed = list_cost(prices, model=model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
    if cache_hit and listed is not None:
        return Decimal(0), listed
    return listed, None


def hardware_cost(prices: Prices | None, *, device_type: str | None, gpu_seconds: float | None,
                  energy_joules: float | None) -> Decimal | None:
    """Attributed device time and energy at the device type's rates; None where nothing was
    measured (an upstream-served request) or no rate applies."""
    if gpu_seconds is None and energy_joules is None:
        return None
    row = prices.for_device(device_type) if prices else None
    if row is None:
        return None
    per_hour, per_kwh = row
    cost = Decimal(0)
    if gpu_seconds is not None:
        cost += Decimal(str(gpu_seconds)) * per_hour / SECONDS_PER_HOUR
    if energy_joules is not None:
        cost += Decimal(str(energy_joules)) * per_kwh / JOULES_PER_KWH
    return cost.quantize(QUANTUM)
