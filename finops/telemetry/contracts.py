"""Contract version 1 as the control plane accepts it: the body of ``POST /api/v1/events``.

This is finops's own copy of the runtime's ``inference.contracts`` (the two are tested against each
other: same field names, same required fields, and every record the runtime builds is accepted
here). It is stricter than the runtime's: names fit their database columns and hold no control
characters, numbers are finite, non-negative and no larger than hardware can measure (below), and
nothing is coerced — a count is a JSON integer, a flag a JSON boolean, a timestamp an ISO 8601
string with a time zone (pydantic's strict mode on JSON input). Checks that need more than one
field or know who is sending and when (finished after started, the runtime's name, the retention
window, what the prices make of it) are the ingest service's.

``batch_parse`` turns a body into validated records and per-record refusals. The common case, a
batch the runtime serialized, is parsed and validated in one pass in pydantic's Rust core; only a
body with something wrong in it takes the slower path, which parses it with ``json`` and validates
each list's records apart, so that one bad record never costs the good ones beside it. Both paths
validate JSON text with the same models, so they agree on what is valid.

**Bounds.** Every number is bounded by what one request or one device can physically reach, far
above any honest reading, so that no sum a rollup keeps can overflow its column however many
records a bucket holds. The worst cases per bucket (a day, the largest):

* samples: a runtime's samples are unique by ``(runtime_id, at)`` and ``at`` has microsecond
  resolution, so one runtime (or one of its devices) has at most 86,400 × 10⁶ = 8.64 × 10¹⁰ samples
  in a day. ``queue_depth`` and ``running`` ≤ ``MAX_IN_FLIGHT`` (10⁷) keep their bigint sums below
  8.64 × 10¹⁷ < 9.2 × 10¹⁸. A device's memory cannot be bounded that low (8.64 × 10¹⁰ × 80 GB
  already overflows a bigint), so ``DeviceRollup.mem_used_sum`` is a double (migration 0010): bounded
  readings make every float sum finite (below 10²⁵ here; a double holds 1.8 × 10³⁰⁸).
* events: event ids are the runtime's, so only the rate the control plane can store bounds a
  bucket: ``MAX_EVENTS_PER_DAY`` (10¹¹, over a million a second for a whole day, four times the
  fastest ingest measured in DESIGN.md). ``MAX_TOKENS`` keeps each bigint token sum below
  3.4 × 10¹⁸ < 9.2 × 10¹⁸ then; floats (milliseconds, device seconds, joules) stay far below any
  overflow. A cost is at most ``COST_LIMIT`` (the ingest service refuses a record priced at more)
  and the rollup cost columns are numeric(38, 12) (migration 0010): a day of such events at the
  cap sums to 10¹⁷, nine orders of magnitude inside them.

The rollup runs hold raw rows to the same bounds (``quarantine.py``): a row stored before these
bounds existed, or written around ingest, is left out of the sums and counted instead of stopping
every later run.
"""

from __future__ import annotations

import functools
import json
import math
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, FailFast, Field, TypeAdapter, ValidationError, create_model

CONTRACT_VERSION = 1

EventStatus = Literal["ok", "error", "rejected_rule", "rejected_budget", "shed", "timeout", "cancelled"]
Priority = Literal["low", "normal", "high"]
# How gpu_seconds and energy_joules were obtained: measured by the runtime's engine, or attributed
# from outside an upstream engine (its busy time and device counters split among its requests).
DeviceUseSource = Literal["measured", "attributed"]
BreakerState = Literal["closed", "half_open", "open"]
CacheKind = Literal["exact", "semantic"]

INT4_MAX = 2**31 - 1  # PositiveIntegerField / integer
INT8_MAX = 2**63 - 1  # BigIntegerField / bigint
# Physical bounds: no honest measurement comes near them (see the module's docstring).
MAX_MS = 1e10  # about 115 days
MAX_GPU_SECONDS = 1e7  # device time attributed to one request: 115 days
MAX_JOULES = 1e13  # ten kilowatts for 30 years: one request's energy, or a device's lifetime counter
MAX_DEVICES = 64
MAX_BREAKERS = 256  # one per served model
MAX_TENANTS_PER_SAMPLE = 1000  # tenants with work on one runtime at once: its API keys' tenants
MAX_TOKENS = 2**25  # 33.5 million tokens in one request: three times the longest context offered today (10M)
MAX_IN_FLIGHT = 10**7  # requests queued or running on one runtime at once
MAX_TOKENS_PER_S = 1e9  # a runtime's throughput: thousands of times a whole GPU server's
MAX_DEVICE_MEMORY_BYTES = 2**44  # 16 TiB on one device: sixty times the largest accelerator's memory
MAX_KV_CACHE = MAX_DEVICE_MEMORY_BYTES * MAX_DEVICES  # whether counted in tokens or bytes
MAX_POWER_W = 10_000.0  # one board: several times the hungriest accelerator module (about 2.7 kW)
MAX_EVENTS_PER_DAY = 10**11  # more than one control plane stores in a day (module docstring)
# The most one request may cost, in USD: refused above it by ingest, since a request that costs a
# million dollars is a price typed wrong. Far below the rollup cost columns' numeric(38, 12).
COST_LIMIT = Decimal(10) ** 6
_MAX_FIELDS = 64  # a record with more keys than this is refused before it is validated
_MAX_ERRORS_PER_RECORD = 8
_MAX_SHOWN_CHARS = 80
# No C0 or C1 control character (newline, tab, escape, DEL, ...) and no Unicode line or paragraph
# separator in a name: names end up in pages, URLs, CSV cells, chart legends and log lines.
NO_CONTROL_CHARACTERS = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*$"
CONTROL_CHARACTERS_REFUSED = "must not contain control characters (a newline, a tab, an escape, …)"


def Name(max_length: int) -> Any:  # reads as a type in the field declarations
    """A name as a page, a URL, a CSV cell or a metric label shows it: no control characters."""
    return Annotated[str, Field(max_length=max_length, pattern=NO_CONTROL_CHARACTERS)]


Milliseconds = Annotated[float, Field(ge=0, le=MAX_MS)]
Tokens = Annotated[int, Field(ge=0, le=MAX_TOKENS)]
InFlight = Annotated[int, Field(ge=0, le=MAX_IN_FLIGHT)]
Bytes = Annotated[int, Field(ge=0, le=MAX_DEVICE_MEMORY_BYTES)]
BigCount = Annotated[int, Field(ge=0, le=INT8_MAX)]
# Strict on JSON input: timestamps and UUIDs must be strings, numbers and booleans must be JSON
# numbers and booleans (an integer where a float is due is fine; 200.0 where an integer is due is
# not). Unknown keys are refused, but by ``batch_parse`` from ``model_extra``: pydantic's own
# refusal costs microseconds a key, which a hostile record with a million keys would turn into
# minutes; collecting them costs a dict insert.
_STRICT = ConfigDict(extra="allow", strict=True, allow_inf_nan=False,
                     json_schema_extra={"additionalProperties": False})


class RequestEventRecord(BaseModel):
    """One served, refused or failed request, as measured by a runtime."""

    model_config = _STRICT

    event_id: uuid.UUID
    runtime_id: Name(100)
    started_at: AwareDatetime
    finished_at: AwareDatetime
    tenant: Name(100)
    feature: Name(100)
    end_user: Name(256) | None = None
    api_key_id: Name(200)
    model_requested: Name(200)
    model_served: Name(200) | None
    route_reason: Name(100)
    rule_id: Name(200) | None = None
    priority: Priority
    status: EventStatus
    http_status: int = Field(ge=100, le=599)
    error_type: Name(100) | None = None
    prompt_tokens: Tokens
    completion_tokens: Tokens
    cache_hit: bool = False
    queue_wait_ms: Milliseconds | None = None
    ttft_ms: Milliseconds | None = None
    e2e_ms: Milliseconds
    tpot_ms: Milliseconds | None = None
    queue_depth_at_admit: InFlight | None = None
    mean_batch_size: float | None = Field(default=None, ge=0, le=1e6)
    gpu_seconds: float | None = Field(default=None, ge=0, le=MAX_GPU_SECONDS)
    energy_joules: float | None = Field(default=None, ge=0, le=MAX_JOULES)
    device: Name(100) | None = None
    seq: BigCount | None = None  # the runtime's count of events recorded, this one included
    # The client request this event is one attempt of: its retries, fallbacks and a job's attempts
    # share the id (a job's is the job id) and are numbered 1, 2, 3... (the highest is the one whose
    # answer or error the client got). Null from older runtimes.
    request_id: Name(100) | None = None
    attempt: int | None = Field(default=None, ge=1, le=INT4_MAX)
    # The task this attempt belongs to (the client's X-Wattson-Task or metadata.task_id, else the
    # request's request_id): every attempt of every request under one task id counts toward one task,
    # per tenant. Null from older runtimes: such an event is a task of one attempt.
    task_id: Name(100) | None = None
    cache_stale: bool = False  # a cached answer served past its freshness: no model of the chain could answer
    device_use_source: DeviceUseSource | None = None  # null when gpu_seconds is, and from older runtimes
    # Which cache answered a hit: the exact one or the semantic one (a similar question, with its
    # cosine similarity); and the time the request's cache lookups took. Null from older runtimes.
    cache_kind: CacheKind | None = None
    cache_similarity: float | None = Field(default=None, ge=-1, le=1)
    cache_lookup_ms: Milliseconds | None = None


class DeviceSampleRecord(BaseModel):
    """One accelerator's readings; every field is null where it cannot be measured."""

    model_config = _STRICT

    device: Name(100)
    name: Name(200) | None = None
    gpu_util: float | None = Field(default=None, ge=0, le=100)
    mem_used: Bytes | None = None
    mem_total: Bytes | None = None
    power_w: float | None = Field(default=None, ge=0, le=MAX_POWER_W)
    energy_joules_total: float | None = Field(default=None, ge=0, le=MAX_JOULES)
    temperature_c: float | None = Field(default=None, ge=-273.15, le=1000)
    power_limit_w: float | None = Field(default=None, ge=0, le=MAX_POWER_W)  # null from older runtimes


class TenantSampleRecord(BaseModel):
    """One tenant's service since the runtime's previous sample (fair share) and its requests now."""

    model_config = _STRICT

    tenant: Name(100)
    tokens_per_s: float = Field(ge=0, le=MAX_TOKENS_PER_S)
    queue_wait_ms: Milliseconds | None = None  # mean wait of the requests given a slot; null when none was
    waiting: InFlight
    running: InFlight


class RuntimeSampleRecord(BaseModel):
    """A runtime's state every few seconds."""

    model_config = _STRICT

    runtime_id: Name(100)
    at: AwareDatetime
    queue_depth: InFlight
    running: InFlight
    tokens_per_s: float = Field(ge=0, le=MAX_TOKENS_PER_S)
    kv_cache_used: int | None = Field(default=None, ge=0, le=MAX_KV_CACHE)
    devices: list[DeviceSampleRecord] = Field(default_factory=list, max_length=MAX_DEVICES)
    # Each served model's circuit breaker (model -> state); absent from runtimes older than this field.
    breakers: dict[Name(200), BreakerState] | None = Field(default=None, max_length=MAX_BREAKERS)
    events_recorded: BigCount | None = None  # the highest seq the runtime has given an event so far
    # Each tenant's service and wait since the previous sample; absent from runtimes older than this field.
    tenants: list[TenantSampleRecord] | None = Field(default=None, max_length=MAX_TENANTS_PER_SAMPLE)


class TelemetryBatch(BaseModel):
    """The body of ``POST /api/v1/events``. Unknown top-level keys are ignored, as the runtime's
    model ignores them; unknown keys inside a record are refused. Validate bodies with
    ``batch_parse``, which does that refusing (the models here collect unknown keys in
    ``model_extra`` rather than refusing them themselves)."""

    model_config = ConfigDict(strict=True)

    events: list[RequestEventRecord] = Field(default_factory=list)
    samples: list[RuntimeSampleRecord] = Field(default_factory=list)


@dataclass(frozen=True)
class Refusal:
    """A record the control plane did not store, and why (``"field: message"`` lines)."""

    kind: Literal["event", "sample"]
    index: int
    event_id: str | None
    errors: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "index": self.index, "event_id": self.event_id, "errors": self.errors}


@dataclass
class ParsedBatch:
    """Valid records with their positions in the body, and the refused ones."""

    events: list[tuple[int, RequestEventRecord]] = field(default_factory=list)
    samples: list[tuple[int, RuntimeSampleRecord]] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)

    @property
    def received(self) -> int:
        return len(self.events) + len(self.samples) + len(self.refused)


class BatchMalformed(ValueError):
    """The body as a whole is not a batch (not JSON, not an object, no lists): HTTP 400."""


class BatchTooLarge(ValueError):
    """More records than one request may carry: HTTP 413, so the runtime sends smaller batches."""


def batch_parse(body: bytes, *, max_records: int) -> ParsedBatch:
    """Validate a request body; raise ``BatchMalformed`` or ``BatchTooLarge`` for the whole body."""
    if b"\\u0000" in body:  # NUL is valid JSON but not storable text: find the records that hold it
        return _parse_record_by_record(body, max_records=max_records)
    try:
        batch = _one_pass_batch(max_records).model_validate_json(body)
    except ValidationError as exc:
        # Fail-fast lists stop at the first bad record or the first record too many.
        for error in exc.errors(include_url=False, include_input=False, include_context=False):
            if error["type"] == "too_long" and len(error["loc"]) == 1:
                raise BatchTooLarge(f"more than {max_records} {error['loc'][0]} in one request") from None
        return _parse_record_by_record(body, max_records=max_records)
    events, samples = batch.events, batch.samples  # type: ignore[attr-defined]
    if len(events) + len(samples) > max_records:
        raise BatchTooLarge(f"{len(events) + len(samples)} records in one request; at most {max_records}")
    if not (_complete(events, _EventOnePass) and _complete(samples, _SampleOnePass)):
        return _parse_record_by_record(body, max_records=max_records)
    return ParsedBatch(list(enumerate(events)), list(enumerate(samples)))


# Records are validated against copies of the models whose required fields have defaults, and
# missing and unknown keys are found apart: from ``model_fields_set`` and ``model_extra`` in the
# one pass, from the parsed dict record by record. Pydantic's own missing-field error carries the
# whole record, so a record with a huge value and thirty fields missing would cost thirty copies of
# it; this way every check costs at most the size of the body.
def _required(model: type[BaseModel]) -> frozenset[str]:
    return frozenset(name for name, info in model.model_fields.items() if info.is_required())


def _with_defaults(model: type[BaseModel], **overrides: Any) -> type[BaseModel]:
    fields: dict[str, Any] = {name: (info.rebuild_annotation(), None)
                              for name, info in model.model_fields.items() if info.is_required()}
    return create_model(f"{model.__name__}OnePass", __base__=model, **fields, **overrides)


_DeviceOnePass = _with_defaults(DeviceSampleRecord)
_EventOnePass = _with_defaults(RequestEventRecord)
_SampleOnePass = _with_defaults(RuntimeSampleRecord, devices=(
    Annotated[list[_DeviceOnePass], Field(max_length=MAX_DEVICES)], []))  # type: ignore[valid-type]
_REQUIRED = {_DeviceOnePass: _required(DeviceSampleRecord), _EventOnePass: _required(RequestEventRecord),
             _SampleOnePass: _required(RuntimeSampleRecord)}
_EVENTS = TypeAdapter(list[_EventOnePass])  # type: ignore[valid-type]
_SAMPLES = TypeAdapter(list[_SampleOnePass])  # type: ignore[valid-type]


def _complete(records: list[Any], model: type[BaseModel]) -> bool:
    """Every required field given and no unknown one, in each record and its devices (the slots
    behind ``model_extra`` and ``model_fields_set``: this runs for every record)."""
    required = _REQUIRED[model]
    for record in records:
        if record.__pydantic_extra__ or not required <= record.__pydantic_fields_set__:
            return False
        if model is _SampleOnePass and not _complete(record.devices, _DeviceOnePass):
            return False
    return True


@functools.lru_cache(maxsize=4)
def _one_pass_batch(max_records: int) -> type[BaseModel]:
    """The batch for the one pass: its lists stop at the first bad record (the record-by-record
    path finds them all) and at the first record past ``max_records``."""
    def records(model: type[BaseModel]) -> Any:
        return Annotated[list[model], FailFast(), Field(max_length=max_records)]  # type: ignore[valid-type]

    return create_model("TelemetryBatchOnePass", __config__=ConfigDict(strict=True),
                        events=(records(_EventOnePass), []), samples=(records(_SampleOnePass), []))


def _shape_problems(item: Any, model: type[BaseModel], prefix: str = "") -> list[str]:
    """Missing and unknown keys of a parsed record (and of its devices)."""
    if not isinstance(item, dict):
        return []  # validation says what it should be
    problems = [f"{prefix}{name}: Field required" for name in model.model_fields
                if name in _REQUIRED[model] and name not in item]
    problems += [f"{prefix}{_shorten(str(name))}: Extra inputs are not permitted"
                 for name in item if name not in model.model_fields]
    devices = item.get("devices") if model is _SampleOnePass else None
    if isinstance(devices, list):
        for position, device in enumerate(devices[:MAX_DEVICES]):
            problems += _shape_problems(device, _DeviceOnePass, f"{prefix}devices.{position}.")
    return problems


def _capped(errors: list[str]) -> list[str]:
    if len(errors) <= _MAX_ERRORS_PER_RECORD:
        return errors
    return [*errors[:_MAX_ERRORS_PER_RECORD], f"… and {len(errors) - _MAX_ERRORS_PER_RECORD} more"]


def _bounded_int(text: str) -> int | float:
    # Python refuses integers of more than 4300 digits outright, which would fail the whole body;
    # as infinity the one field is refused instead (no count or amount needs 30 digits).
    return int(text) if len(text) <= 30 else math.inf


def _parse_record_by_record(body: bytes, *, max_records: int) -> ParsedBatch:
    try:
        document = json.loads(body, parse_int=_bounded_int)
    except RecursionError:
        raise BatchMalformed("the body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BatchMalformed(f"the body is not valid JSON: {_shorten(str(exc))}") from None
    if not isinstance(document, dict):
        raise BatchMalformed('the body must be a JSON object: {"events": [...], "samples": [...]}')
    events, samples = document.get("events", []), document.get("samples", [])
    for name, value in (("events", events), ("samples", samples)):
        if not isinstance(value, list):
            raise BatchMalformed(f"'{name}' must be a list of records")
    if len(events) + len(samples) > max_records:
        raise BatchTooLarge(f"{len(events) + len(samples)} records in one request; at most {max_records}")
    escapes = b"\\u" in body  # only escapes make NUL characters or lone surrogates
    parsed = ParsedBatch()
    parsed.events = _validate_list(_EVENTS, _EventOnePass, events, "event", parsed.refused, check_text=escapes)
    parsed.samples = _validate_list(_SAMPLES, _SampleOnePass, samples, "sample", parsed.refused,
                                    check_text=escapes)
    return parsed


def _validate_list(adapter: TypeAdapter, model: type[BaseModel], items: list[Any], kind: Literal["event", "sample"],
                   refused: list[Refusal], *, check_text: bool) -> list[tuple[int, Any]]:
    """Validate each record as the JSON text it was (re-serialized: the same numbers and strings),
    so this path and the one-pass path agree; return the valid ones with their indexes."""
    problems: dict[int, list[str]] = defaultdict(list)
    candidates = []
    for index, item in enumerate(items):
        if isinstance(item, dict) and len(item) > _MAX_FIELDS:
            problems[index].append(f"record: {len(item)} fields; a record has at most {_MAX_FIELDS}")
        elif check_text and (problem := _unstorable_text(item)):
            problems[index].append(problem)  # and not validated: JSON cannot carry it to the validator
        else:
            problems[index] += _shape_problems(item, model)
            candidates.append(index)
    try:
        records = adapter.validate_json(json.dumps([items[i] for i in candidates]))
    except ValidationError as exc:
        for error in exc.errors(include_url=False, include_input=False, include_context=False):
            position, *where = error["loc"]
            message = CONTROL_CHARACTERS_REFUSED if error["type"] == "string_pattern_mismatch" else error["msg"]
            problems[candidates[int(position)]].append(_describe(where, message))
        # Records validate independently, so the rest are valid: one more pass in the Rust core.
        candidates = [i for i in candidates if not problems.get(i)]
        records = adapter.validate_json(json.dumps([items[i] for i in candidates]))
    kept = [(index, record) for index, record in zip(candidates, records, strict=True) if not problems.get(index)]
    for index in sorted(i for i, errors in problems.items() if errors):
        event_id = raw_event_id(items[index]) if kind == "event" else None
        refused.append(Refusal(kind, index, event_id, _capped(problems[index])))
    return kept


def _describe(where: list[int | str], message: str) -> str:
    name = ".".join(str(part) for part in where) or "record"
    return f"{_shorten(name)}: {message}"


def _shorten(text: str) -> str:
    return text if len(text) <= _MAX_SHOWN_CHARS else text[:_MAX_SHOWN_CHARS] + "…"


def raw_event_id(record: Any) -> str | None:
    """The event_id a record claimed, for naming it in a refusal (never echoed at length)."""
    value = record.get("event_id") if isinstance(record, dict) else None
    return _shorten(value) if isinstance(value, str) and not _bad_text(value) else None


def _bad_text(text: str) -> str | None:
    if "\x00" in text:
        return "must not contain NUL characters"
    try:
        text.encode()
    except UnicodeEncodeError:
        return "must be valid Unicode, not a lone surrogate escape"
    return None


def _unstorable_text(record: Any) -> str | None:
    """The first key or string anywhere in a parsed record that PostgreSQL cannot store as text
    (walked with a stack: a hostile record may nest deeply)."""
    stack: list[tuple[tuple[Any, ...], Any]] = [((), record)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if problem := _bad_text(value):
                return _describe(list(path), problem)
        elif isinstance(value, dict):
            for key, item in value.items():
                if problem := _bad_text(key):
                    return _describe([*path, "(a key)"], problem)
                stack.append(((*path, key), item))
        elif isinstance(value, list):
            stack.extend(((*path, position), item) for position, item in enumerate(value))
    return None
