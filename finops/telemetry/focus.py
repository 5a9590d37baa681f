"""Cost and usage in the FinOps Foundation's FOCUS columns (version 1.2), for a FinOps team's tools.

One row per UTC day × runtime × served model × tenant × feature (the charge period is the day), from
the raw events (the one source that keeps the runtime), left out as the rollups leave them out
(``quarantine.in_bounds``), so the rows' ``BilledCost`` adds up to the dashboards' spend over the same
days. Requests no model served (refused by a rule, a budget or the queue) are rows of the model
``NO_MODEL``: they use no tokens, and whatever they cost is counted there as on the dashboards.

**Which cost is which.** Wattson keeps two costs per request (DESIGN.md, "Cost model"):

* the **list price** — what an API provider would charge for the tokens (per 1M prompt and completion
  tokens, from the price book in force when the request started). It is what the dashboards and
  budgets call spend, and what a platform team shows back or charges back to its tenants, so it is
  ``BilledCost``, ``EffectiveCost`` (no commitments or amortisation here), ``ListCost`` and
  ``ContractedCost`` (no negotiated discount);
* the **hardware cost** — attributed device time × $/GPU-hour plus energy × $/kWh: what serving it
  cost the organisation. FOCUS has no column for it; it is the custom column ``x_HardwareCost``.

Every column the spec marks Mandatory is present, with the nullability it allows; of the Conditional
and Recommended ones, those that apply (consumed tokens, resource, SKU, sub-account, tags). Column
types follow the spec: decimals as plain numbers, date-times as ``YYYY-MM-DDTHH:mm:ssZ`` (UTC), tags
as a JSON object.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db.models import Count, F, Q, Sum, Value
from django.db.models.functions import Coalesce, TruncDay
from django.utils import timezone

from finops.lib.tables import Table
from finops.telemetry.models import RequestEvent
from finops.telemetry.quarantine import in_bounds
from finops.telemetry.retention import raw_retention_start
from finops.telemetry.sums import cost_sum, cost_value

FOCUS_VERSION = "1.2"
MILLION = Decimal(1_000_000)
NO_MODEL = "(no model served)"  # requests refused before any model took them

# Column -> (FOCUS data type, nulls allowed in this export). Mandatory columns of FOCUS 1.2 first,
# then the Conditional and Recommended ones that apply, then Wattson's own (``x_``).
COLUMNS: dict[str, tuple[str, bool]] = {
    "BilledCost": ("Decimal", False),
    "BillingAccountId": ("String", False),
    "BillingAccountName": ("String", False),
    "BillingCurrency": ("String", False),
    "BillingPeriodEnd": ("DateTime", False),
    "BillingPeriodStart": ("DateTime", False),
    "ChargeCategory": ("String", False),
    "ChargeClass": ("String", True),  # null: no row corrects an earlier billing period
    "ChargeDescription": ("String", False),
    "ChargePeriodEnd": ("DateTime", False),
    "ChargePeriodStart": ("DateTime", False),
    "ContractedCost": ("Decimal", False),
    "EffectiveCost": ("Decimal", False),
    "InvoiceIssuerName": ("String", False),
    "ListCost": ("Decimal", False),
    "PricingQuantity": ("Decimal", False),
    "PricingUnit": ("String", False),
    "ProviderName": ("String", False),
    "PublisherName": ("String", False),
    "ServiceCategory": ("String", False),
    "ServiceName": ("String", False),
    "ServiceSubcategory": ("String", False),
    "ChargeFrequency": ("String", False),
    "ConsumedQuantity": ("Decimal", False),
    "ConsumedUnit": ("String", False),
    "PricingCategory": ("String", False),
    "ResourceId": ("String", False),
    "ResourceName": ("String", False),
    "ResourceType": ("String", False),
    "SkuId": ("String", False),
    "SubAccountId": ("String", False),
    "SubAccountName": ("String", False),
    "Tags": ("JSON", False),
    "x_HardwareCost": ("Decimal", False),
    "x_Requests": ("Integer", False),
    "x_Attempts": ("Integer", False),
    "x_UnpricedAttempts": ("Integer", False),
}


class FocusRangeRefused(ValueError):
    """The days cannot be exported: an empty range, or days whose raw events retention has dropped."""


def _timestamp(moment: dt.datetime) -> str:
    """FOCUS's DateTimeFormat: ISO 8601 in UTC with a Z."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _month(day: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    start = day.replace(day=1)
    return start, (start + dt.timedelta(days=32)).replace(day=1)


def focus_days(*, first: dt.date, last: dt.date, now: dt.datetime | None = None) -> tuple[dt.datetime, dt.datetime]:
    """``[first, last]`` (whole UTC days) as a range, refused if empty or past the raw retention."""
    start = dt.datetime.combine(first, dt.time(), tzinfo=dt.UTC)
    end = dt.datetime.combine(last, dt.time(), tzinfo=dt.UTC) + dt.timedelta(days=1)
    if end <= start:
        raise FocusRangeRefused("the last day must not be before the first")
    kept_from = raw_retention_start(now or timezone.now())
    if start < kept_from:
        raise FocusRangeRefused(f"per-runtime detail is read from raw events, kept for {settings.RAW_RETENTION_DAYS} "
                                f"days: the earliest day that can be exported is {kept_from:%Y-%m-%d}")
    return start, end


def focus_rows(*, start: dt.datetime, end: dt.datetime) -> Iterator[list[Any]]:
    """The FOCUS rows of ``[start, end)`` (whole UTC days), in ``COLUMNS`` order, ordered by day,
    runtime, model, tenant and feature."""
    events = in_bounds(RequestEvent.objects.filter(started_at__gte=start, started_at__lt=end))
    grouped = (events.order_by().annotate(day=TruncDay("started_at", tzinfo=dt.UTC),
                                          served=Coalesce("model_served", Value("")))
               .values("day", "runtime_id", "served", "tenant", "feature")
               # Named apart from the columns: an aggregate named "list_cost" would hide the column from
               # the unpriced count's filter.
               .annotate(unpriced=Count("id", filter=Q(list_cost__isnull=True)), n_list_cost=cost_sum("list_cost"),
                         n_hardware_cost=cost_sum("hardware_cost"),
                         tokens=Sum(F("prompt_tokens") + F("completion_tokens")),
                         saved=Sum(F("prompt_tokens") + F("completion_tokens"), filter=Q(cache_hit=True)),
                         requests=Count("id", filter=Q(attempt__isnull=True) | Q(attempt=1)),
                         attempts=Count("id"))
               .order_by("day", "runtime_id", "served", "tenant", "feature"))
    account = settings.FOCUS_BILLING_ACCOUNT
    for row in grouped:
        day = row["day"]
        billing_start, billing_end = _month(day)
        list_cost = cost_value(row["n_list_cost"])
        # Cache hits' tokens were answered again, not processed: they are not consumed or priced.
        tokens = int(row["tokens"] or 0) - int(row["saved"] or 0)
        model, runtime, tenant, feature = row["served"] or NO_MODEL, row["runtime_id"], row["tenant"], row["feature"]
        yield [
            list_cost, account, account, "USD", _timestamp(billing_end), _timestamp(billing_start), "Usage", None,
            f"LLM inference on {model} for {tenant}/{feature} (runtime {runtime}), priced at list price",
            _timestamp(day + dt.timedelta(days=1)), _timestamp(day), list_cost, list_cost, settings.FOCUS_PROVIDER,
            list_cost, Decimal(tokens) / MILLION, "1M Tokens", settings.FOCUS_PROVIDER, settings.FOCUS_PROVIDER,
            "AI and Machine Learning", "Wattson LLM inference", "Generative AI", "Usage-Based", tokens, "Tokens",
            "Standard", f"{runtime}/{model}", model, "LLM model deployment", model, tenant, tenant,
            json.dumps({"tenant": tenant, "feature": feature}, ensure_ascii=False, separators=(",", ":")),
            cost_value(row["n_hardware_cost"]), row["requests"], row["attempts"], row["unpriced"],
        ]


def focus_table(*, start: dt.datetime, end: dt.datetime) -> Table:
    """The FOCUS rows of ``[start, end)`` as a table (CSV download, ``manage.py export_focus``)."""
    return Table(f"focus-{FOCUS_VERSION}-{start:%Y%m%d}-{end - dt.timedelta(days=1):%Y%m%d}", list(COLUMNS),
                 focus_rows(start=start, end=end))
