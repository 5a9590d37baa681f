"""Ingest bounds every number to what hardware can measure and refuses names with control
characters, record by record: what it stores can always be summed by the rollups and shown on a
page, and a bad record never costs the good ones beside it (issue 15, items 4 and 6)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest
from django.db.models import FloatField
from django.utils import timezone

from finops.telemetry.contracts import (
    COST_LIMIT,
    MAX_DEVICE_MEMORY_BYTES,
    MAX_EVENTS_PER_DAY,
    MAX_IN_FLIGHT,
    MAX_TOKENS,
)
from finops.telemetry.models import DeviceRollup, DeviceSample, RequestEvent, Rollup, RuntimeSample
from finops.telemetry.ranges import Filters
from finops.telemetry.rollups import rollup_run
from finops.telemetry.sample_rollups import sample_rollup_run
from finops.telemetry.usage import usage_totals
from tests.finops.dashboard_factories import logged_in
from tests.finops.factories import batch_body, device_dict, event_dict, price_book, sample_dict
from tests.finops.test_rollups import assert_rollups_match_raw

pytestmark = pytest.mark.django_db


def minutes_ago(minutes: float) -> dt.datetime:
    return timezone.now() - dt.timedelta(minutes=minutes)


def refusal_of(result: dict[str, Any], kind: str, index: int) -> list[str]:
    [errors] = [r["errors"] for r in result["refused"] if (r["kind"], r["index"]) == (kind, index)]
    return errors


def run_rollups_later() -> None:
    """Both rollup runs, as beat would run them once the records have settled."""
    later = timezone.now() + dt.timedelta(minutes=5)
    rollup_run(now=later)
    sample_rollup_run(now=later)


# -- item 4: numbers no hardware produces --------------------------------------------------------


SAMPLES_OUT_OF_BOUNDS: list[tuple[str, dict[str, Any], str]] = [
    ("the issue's tokens per second", {"tokens_per_s": 1e308}, "tokens_per_s: "),
    ("the issue's memory", {"devices": [device_dict(mem_used=2**63 - 1)]}, "devices.0.mem_used: "),
    ("more memory than any device", {"devices": [device_dict(mem_total=MAX_DEVICE_MEMORY_BYTES + 1)]},
     "devices.0.mem_total: "),
    ("a power station on one board", {"devices": [device_dict(power_w=50_000.0)]}, "devices.0.power_w: "),
    ("an energy counter past a lifetime", {"devices": [device_dict(energy_joules_total=1e300)]},
     "devices.0.energy_joules_total: "),
    ("two billion queued", {"queue_depth": 2**31 - 1}, "queue_depth: "),
    ("two billion running", {"running": 2**31 - 1}, "running: "),
    ("a KV cache larger than every device", {"kv_cache_used": 2**63 - 1}, "kv_cache_used: "),
    ("a tenant served faster than any runtime",
     {"tenants": [{"tenant": "acme", "tokens_per_s": 1e12, "queue_wait_ms": 1.0, "waiting": 0, "running": 1}]},
     "tenants.0.tokens_per_s: "),
    ("a tenant waiting for centuries",
     {"tenants": [{"tenant": "acme", "tokens_per_s": 1.0, "queue_wait_ms": 1e15, "waiting": 0, "running": 1}]},
     "tenants.0.queue_wait_ms: "),
    ("a tenant with two billion waiting",
     {"tenants": [{"tenant": "acme", "tokens_per_s": 1.0, "queue_wait_ms": None, "waiting": 2**31, "running": 1}]},
     "tenants.0.waiting: "),
    ("a negative tenant rate",
     {"tenants": [{"tenant": "acme", "tokens_per_s": -1.0, "queue_wait_ms": None, "waiting": 0, "running": 0}]},
     "tenants.0.tokens_per_s: "),
]


@pytest.mark.parametrize(("overrides", "reason"), [s[1:] for s in SAMPLES_OUT_OF_BOUNDS],
                         ids=[s[0] for s in SAMPLES_OUT_OF_BOUNDS])
def test_a_sample_with_a_number_no_hardware_reaches_is_refused_with_its_reason(
        post_batch: Any, overrides: dict[str, Any], reason: str) -> None:
    good = sample_dict(at=minutes_ago(3), devices=[device_dict()])
    bad = sample_dict(at=minutes_ago(2), **overrides)

    response = post_batch(batch_body(samples=[good, bad]))

    assert response.status_code == 202
    assert response.json()["accepted"] == 1
    assert any(error.startswith(reason) for error in refusal_of(response.json(), "sample", 1))
    assert RuntimeSample.objects.count() == 1


EVENTS_OUT_OF_BOUNDS: list[tuple[str, dict[str, Any], str]] = [
    ("two billion prompt tokens", {"prompt_tokens": 2**31 - 1}, "prompt_tokens: "),
    ("more completion tokens than any context", {"completion_tokens": MAX_TOKENS + 1}, "completion_tokens: "),
    ("two billion queued at admission", {"queue_depth_at_admit": 2**31 - 1}, "queue_depth_at_admit: "),
]


@pytest.mark.parametrize(("overrides", "reason"), [e[1:] for e in EVENTS_OUT_OF_BOUNDS],
                         ids=[e[0] for e in EVENTS_OUT_OF_BOUNDS])
def test_an_event_with_a_number_no_request_reaches_is_refused_with_its_reason(
        post_batch: Any, overrides: dict[str, Any], reason: str) -> None:
    response = post_batch(batch_body(events=[event_dict(), event_dict(**overrides)]))

    assert response.json()["accepted"] == 1
    assert any(error.startswith(reason) for error in refusal_of(response.json(), "event", 1))


def test_the_issues_records_are_refused_and_the_rollups_and_the_gpus_page_keep_working(post_batch: Any) -> None:
    price_book(effective_from=minutes_ago(24 * 60), models={"smollm2": ("0.10", "0.40"), "gold": ("999999999999", "0")})
    at_the_old_cap = [event_dict(model_served="gold", prompt_tokens=1_000_000) for _ in range(2)]  # $999,999,999,999
    honest = event_dict()
    samples = [sample_dict(at=minutes_ago(4), tokens_per_s=1e308),
               sample_dict(at=minutes_ago(3), devices=[device_dict(mem_used=2**63 - 1)]),
               sample_dict(at=minutes_ago(2), devices=[device_dict(mem_used=2**63 - 1)]),
               sample_dict(at=minutes_ago(1), devices=[device_dict()])]

    result = post_batch(batch_body(events=[*at_the_old_cap, honest], samples=samples)).json()

    assert result["accepted"] == 2
    for index in (0, 1):
        assert any(e.startswith("cost: ") and "check the prices" in e for e in refusal_of(result, "event", index))
    assert [(r["kind"], r["index"]) for r in result["refused"]] == [
        ("event", 0), ("event", 1), ("sample", 0), ("sample", 1), ("sample", 2)]
    run_rollups_later()
    assert usage_totals(filters=_last_hour()).list_cost == Decimal("0.0003")
    page = logged_in().get("/gpus/")
    assert page.status_code == 200
    assert DeviceSample.objects.count() == 1


def test_events_just_under_the_cost_cap_are_summed_exactly(post_batch: Any) -> None:
    """The cap sits far below what a rollup row holds: ten of the costliest events one minute can
    take add up exactly, on SQLite as on PostgreSQL."""
    started = minutes_ago(2).replace(second=0, microsecond=0)
    price_book(effective_from=minutes_ago(24 * 60), models={"gold": ("999999.999999", "0")})
    costly = [event_dict(started_at=started + dt.timedelta(seconds=i), model_served="gold", prompt_tokens=1_000_000)
              for i in range(10)]

    assert post_batch(batch_body(events=costly)).json()["accepted"] == 10

    run_rollups_later()
    assert_rollups_match_raw()
    assert Rollup.objects.get(granularity="day").list_cost == Decimal("9999999.99999")
    assert usage_totals(filters=_last_hour()).list_cost == Decimal("9999999.99999")


def test_no_rollup_sum_of_bounded_records_can_overflow_its_column() -> None:
    samples_per_day = 86_400 * 10**6  # a runtime's samples are unique by (runtime_id, at), in microseconds
    bigint = 2**63 - 1
    cost = Rollup._meta.get_field("list_cost")
    cost_capacity = Decimal(10) ** (cost.max_digits - cost.decimal_places)

    assert MAX_IN_FLIGHT * samples_per_day < bigint  # RuntimeRollup.queue_depth_sum, running_sum
    assert bigint > MAX_TOKENS * MAX_EVENTS_PER_DAY  # Rollup.prompt_tokens, completion_tokens
    assert cost_capacity > COST_LIMIT * MAX_EVENTS_PER_DAY * 10**6  # costs: far below, not just below
    assert isinstance(DeviceRollup._meta.get_field("mem_used_sum"), FloatField)  # no bigint holds a day of them
    assert MAX_DEVICE_MEMORY_BYTES * samples_per_day < 1e300


def _last_hour() -> Filters:
    now = timezone.now().replace(second=0, microsecond=0)
    return Filters(start=now - dt.timedelta(hours=1), end=now + dt.timedelta(minutes=1))


# -- item 6: control characters in names -------------------------------------------------------


CONTROL_CHARACTERS = {"newline": "\n", "carriage return": "\r", "tab": "\t", "escape": "\x1b", "delete": "\x7f",
                      "next line (C1)": "\x85", "line separator": "\u2028"}
EVENT_NAMES = ["tenant", "feature", "end_user", "api_key_id", "model_requested", "model_served", "route_reason",
               "rule_id", "error_type", "device"]


@pytest.mark.parametrize("character", CONTROL_CHARACTERS.values(), ids=CONTROL_CHARACTERS.keys())
@pytest.mark.parametrize("name", EVENT_NAMES)
def test_an_event_naming_anything_with_a_control_character_is_refused(post_batch: Any, name: str,
                                                                       character: str) -> None:
    hostile = event_dict(**{name: f"chat{character}=HYPERLINK(1)"})

    response = post_batch(batch_body(events=[event_dict(), hostile]))

    assert response.status_code == 202
    assert response.json()["accepted"] == 1
    [error] = refusal_of(response.json(), "event", 1)
    assert error == f"{name}: must not contain control characters (a newline, a tab, an escape, …)"
    assert RequestEvent.objects.count() == 1


SAMPLE_NAMES: list[tuple[str, dict[str, Any], str]] = [
    ("device", {"devices": [device_dict(device="GPU-1\n")]}, "devices.0.device: "),
    ("device name", {"devices": [device_dict(name="NVIDIA\tH100")]}, "devices.0.name: "),
    ("breaker model", {"breakers": {"small\r\nmodel": "open"}}, "breakers.small\r\nmodel.[key]: "),
]


@pytest.mark.parametrize(("overrides", "reason"), [s[1:] for s in SAMPLE_NAMES], ids=[s[0] for s in SAMPLE_NAMES])
def test_a_sample_naming_anything_with_a_control_character_is_refused(post_batch: Any, overrides: dict[str, Any],
                                                                       reason: str) -> None:
    response = post_batch(batch_body(samples=[sample_dict(at=minutes_ago(3)), sample_dict(**overrides)]))

    assert response.json()["accepted"] == 1
    assert refusal_of(response.json(), "sample", 1) == [
        f"{reason}must not contain control characters (a newline, a tab, an escape, …)"]


def test_a_runtime_id_with_a_control_character_is_refused_as_such(post_batch: Any) -> None:
    response = post_batch(batch_body(events=[event_dict(), event_dict(runtime_id="rt-1\n")]))

    assert refusal_of(response.json(), "event", 1) == [
        "runtime_id: must not contain control characters (a newline, a tab, an escape, …)"]


def test_names_in_any_script_and_with_symbols_are_stored(post_batch: Any) -> None:
    names = {"tenant": "Zürich 東京 ☕", "feature": "search/v2 (beta) = \"x\"", "end_user": "user@example.com",
             "model_served": "org/model:Q4_K_M", "error_type": "upstream-5xx"}

    response = post_batch(batch_body(events=[event_dict(**names)]))

    assert response.json() == {"accepted": 1, "duplicates": 0, "refused": []}
    assert RequestEvent.objects.get().tenant == "Zürich 東京 ☕"
