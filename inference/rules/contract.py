"""The ruleset document (finops → runtime, contract version 1), validated strictly.

``docs/RULESET.md`` is the prose form. Everything here is external input: unknown fields are
refused (a typo in an action must not silently drop a limit), numbers must be finite and
non-negative, strings have bounds, timestamps must carry a time zone, and ids are unique. A
document that fails any check is refused whole; nothing of it is applied.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

WILDCARD = "*"
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
MAX_RULES = 100_000
MAX_ALLOWANCES = 100_000
MAX_SEMANTIC_POLICIES = 10_000
MAX_VERSION = 2**63 - 1

# No control characters (C0, C1, Unicode line separators): ids travel on in request events, whose
# names the control plane refuses with them, and PostgreSQL refuses NUL in text.
Name = Annotated[StrictStr, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]+$")]
# A budget id becomes the event's rule_id as "allowance:<budget_id>", which must fit 200 characters.
BudgetId = Annotated[StrictStr, Field(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]+$")]
Text = Annotated[StrictStr, Field(max_length=2000, pattern=r"^[^\x00]*$")]
# Decimal keeps the grant and the prices exact (money is never summed as floats); bounded so a
# hostile number cannot make arithmetic slow or overflow what the ledger stores.
# (Its JSON schema is said outright: pydantic's for a Decimal behind a validator is number-or-string.)
Amount = Annotated[Decimal, BeforeValidator(lambda v: _number(v)), Field(ge=0, le=Decimal("1e15"),
                                                                         allow_inf_nan=False),
                   WithJsonSchema({"type": "number", "minimum": 0, "maximum": 1e15})]
PositiveCount = Annotated[StrictInt, Field(ge=1, le=10**12)]


def _number(value: Any) -> Any:
    # A JSON number only: "4.5" or true is a mistake in the document, not an amount.
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise ValueError("must be a JSON number")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Scope(_Strict):
    """Who a rule or allowance applies to: each field a literal value or ``*``."""

    tenant: Name
    feature: Name
    model: Name

    def key(self) -> tuple[str, str, str]:
        return self.tenant, self.feature, self.model


class BlockAction(_Strict):
    type: Literal["block"]


class ThrottleAction(_Strict):
    type: Literal["throttle"]
    requests_per_minute: PositiveCount | None = None
    tokens_per_minute: PositiveCount | None = None

    @model_validator(mode="after")
    def _some_limit(self) -> ThrottleAction:
        if self.requests_per_minute is None and self.tokens_per_minute is None:
            raise ValueError("a throttle needs requests_per_minute, tokens_per_minute or both")
        return self


class DowngradeAction(_Strict):
    type: Literal["downgrade"]
    model: Name


class CapMaxTokensAction(_Strict):
    type: Literal["cap_max_tokens"]
    max_tokens: PositiveCount


class PowerCapAction(_Strict):
    """A power limit on this runtime's GPUs: every GPU whose UUID matches ``device`` and whose NVML
    name matches ``device_type`` (each ``*`` for any) is held at ``watts`` while the rule lives."""

    type: Literal["power_cap"]
    watts: Annotated[StrictInt, Field(ge=1, le=100_000)]
    device: Name = WILDCARD
    device_type: Name = WILDCARD

    def covers(self, uuid: str, name: str | None) -> bool:
        return self.device in (WILDCARD, uuid) and self.device_type in (WILDCARD, name)



class ConcurrencyAction(_Strict):
    """At most ``max_running`` of the scope's requests hold a running slot of a model at once (the
    others wait while other work runs), and at most ``max_queued`` wait (more are refused)."""

    type: Literal["concurrency"]
    max_running: PositiveCount | None = None
    max_queued: Annotated[StrictInt, Field(ge=0, le=10**12)] | None = None

    @model_validator(mode="after")
    def _some_limit(self) -> ConcurrencyAction:
        if self.max_running is None and self.max_queued is None:
            raise ValueError("a concurrency cap needs max_running, max_queued or both")
        return self


Action = Annotated[BlockAction | ThrottleAction | DowngradeAction | CapMaxTokensAction | PowerCapAction
                   | ConcurrencyAction,
                   Field(discriminator="type")]


class Rule(_Strict):
    id: Name
    budget_id: BudgetId | None = None
    budget_name: Text | None = None
    scope: Scope
    action: Action
    reason: Text = ""
    expires_at: AwareDatetime | None = None

    @model_validator(mode="after")
    def _power_caps_apply_to_devices(self) -> Rule:
        # A power cap limits a device, not some requests: a narrower scope would promise what it cannot do.
        if self.action.type == "power_cap" and self.scope.key() != (WILDCARD, WILDCARD, WILDCARD):
            raise ValueError("a power_cap rule's scope must be * for tenant, feature and model")
        return self


class Allowance(_Strict):
    """A hard budget's cumulative grant to this runtime for one period."""

    budget_id: BudgetId
    budget_name: Text | None = None
    scope: Scope
    unit: Literal["tokens", "usd_list", "gpu_seconds"]
    period_start: AwareDatetime
    resets_at: AwareDatetime | None = None
    granted: Amount
    reported: Amount = Field(default=Decimal(0), json_schema_extra={"default": 0})
    expires_at: AwareDatetime | None = None
    on_expiry: Literal["closed", "open"] = "closed"

    @model_validator(mode="after")
    def _period_in_order(self) -> Allowance:
        if self.resets_at is not None and self.resets_at <= self.period_start:
            raise ValueError("resets_at must be after period_start")
        return self


Similarity = Annotated[Decimal, BeforeValidator(lambda v: _number(v)), Field(gt=0, le=1, allow_inf_nan=False),
                      WithJsonSchema({"type": "number", "exclusiveMinimum": 0, "maximum": 1})]


class SemanticCachePolicy(_Strict):
    """The semantic cache on for a feature (of one tenant, or of every tenant: ``*``)."""

    feature: Name
    tenant: Name = WILDCARD
    threshold: Similarity
    ttl_s: Annotated[StrictInt, Field(ge=1, le=366 * 24 * 3600)]
    flushed_at: AwareDatetime | None = None


class Price(_Strict):
    prompt_per_1m: Amount
    completion_per_1m: Amount


class RulesetDocument(_Strict):
    version: Annotated[StrictInt, Field(ge=1, le=MAX_VERSION)]
    issued_at: AwareDatetime
    runtime_id: Name | None = None
    prices: dict[Name, Price] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list, max_length=MAX_RULES)
    allowances: list[Allowance] = Field(default_factory=list, max_length=MAX_ALLOWANCES)
    semantic_cache: list[SemanticCachePolicy] = Field(default_factory=list, max_length=MAX_SEMANTIC_POLICIES)

    @model_validator(mode="after")
    def _ids_unique(self) -> RulesetDocument:
        if len({r.id for r in self.rules}) != len(self.rules):
            raise ValueError("rule ids must be unique")
        # The ledger is kept per budget and period: two grants of one budget would share it.
        if len({a.budget_id for a in self.allowances}) != len(self.allowances):
            raise ValueError("allowance budget_ids must be unique")
        if len({(p.feature, p.tenant) for p in self.semantic_cache}) != len(self.semantic_cache):
            raise ValueError("semantic_cache policies must be unique per (feature, tenant)")
        return self


class RulesetInvalid(ValueError):
    """The document is not a valid ruleset; ``param`` names the first offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def ruleset_parse(raw: bytes) -> RulesetDocument:
    """Validate a ruleset document's JSON text; raise ``RulesetInvalid`` on anything wrong."""
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise RulesetInvalid(f"The ruleset is larger than {MAX_DOCUMENT_BYTES} bytes.")
    try:
        # Floats as Decimal from their text: a price of 0.1 stays 0.1, not 0.1000000000000000055.
        data = json.loads(raw, parse_float=Decimal)
    except (ValueError, UnicodeError, RecursionError):
        raise RulesetInvalid("The ruleset is not valid JSON.") from None
    if not isinstance(data, dict):
        raise RulesetInvalid("The ruleset must be a JSON object.")
    try:
        # Strict types still refuse "12" for 12 and true for 1.
        return RulesetDocument.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc) from None
    except (ValueError, TypeError, RecursionError) as exc:  # e.g. a number too large for Decimal's context
        raise RulesetInvalid(f"The ruleset is not valid: {exc}") from None


def _invalid(exc: ValidationError) -> RulesetInvalid:
    first = exc.errors(include_url=False)[0]
    loc = [str(p) for p in first.get("loc", ()) if not _is_tag(p)]
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid value"))
    if param is None:
        return RulesetInvalid(f"The ruleset is not valid: {message}.")
    return RulesetInvalid(f"Invalid value for '{param}': {message}.", param=param)


def _is_tag(part: Any) -> bool:
    # Pydantic names the union branch it tried (``throttle``, ``function-after[...]``): not a field.
    return isinstance(part, str) and (part in {"block", "throttle", "downgrade", "cap_max_tokens", "power_cap",
                                               "concurrency"}
                                      or "[" in part)


def as_epoch(moment: datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()
