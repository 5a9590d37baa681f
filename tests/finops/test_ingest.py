"""POST /api/v1/events: telemetry from runtimes is stored once, priced on arrival, and a bad record
never costs the good ones beside it."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from django.test import override_settings
from django.utils import timezone

from finops.runtimes.models import Runtime, RuntimeToken
from finops.telemetry import contracts
from finops.telemetry.models import Device, DeviceSample, RequestEvent, RuntimeSample
from finops.telemetry.partitioning import existing_partition_days, partition_name
from finops.telemetry.sketch import bucket_index
from inference import contracts as runtime_contracts
from inference.telemetry.sender import batch_body as exported_batch_body
from inference.telemetry.spool import SpoolRecord
from tests.finops.conftest import EVENTS_URL
from tests.finops.factories import (
    RUNTIME,
    batch_body,
    device_dict,
    event_dict,
    iso,
    price_book,
    runtime_with_token,
    sample_dict,
)

pytestmark = pytest.mark.django_db

H100 = "NVIDIA H100 80GB HBM3"
GPU = "GPU-00000000-0000-0000-0000-000000000001"
RAW = "__raw__"  # a marker swapped for raw JSON text the json module will not write


def hours_ago(hours: float) -> dt.datetime:
    return timezone.now() - dt.timedelta(hours=hours)


def stored(event: dict[str, Any]) -> RequestEvent:
    return RequestEvent.objects.get(event_id=event["event_id"])


def error_of(response: Any) -> dict[str, Any]:
    body = response.json()
    assert set(body["error"]) == {"type", "message", "code", "param"}
    return body["error"]


# -- storing and pricing ----------------------------------------------------------------------


def test_a_valid_batch_is_stored_with_its_costs(post_batch: Any) -> None:
    book = price_book(effective_from=hours_ago(24))
    ok = event_dict()
    shed = event_dict(status="shed", http_status=429, completion_tokens=0, gpu_seconds=None, energy_joules=None,
                      ttft_ms=None, model_served=None, error_type="rate_limited")

    response = post_batch(batch_body(events=[ok, shed]))

    assert response.status_code == 202
    assert response.json() == {"accepted": 2, "duplicates": 0, "refused": []}
    row = stored(ok)
    assert (row.runtime_id, row.tenant, row.feature, row.status_class) == (RUNTIME, "acme", "chat", "ok")
    assert row.started_at.isoformat().replace("+00:00", "Z") == ok["started_at"]
    assert row.price_book_id == book.id
    # 1000 prompt tokens at $0.10/1M + 500 completion tokens at $0.40/1M
    assert row.list_cost == Decimal("0.0003")
    # 2 GPU-seconds at $0.36/hour + 1000 J at $0.36/kWh
    assert row.hardware_cost == Decimal("0.0003")
    assert (row.e2e_bucket, row.ttft_bucket) == (bucket_index(250.0), bucket_index(40.0))
    assert row.received_at is not None
    refused = stored(shed)
    assert (refused.status_class, refused.error_type, refused.list_cost, refused.hardware_cost,
            refused.ttft_bucket) == ("rejected", "rate_limited", None, None, None)


def test_a_batch_serialized_by_the_runtimes_exporter_is_accepted(post_batch: Any) -> None:
    price_book(effective_from=hours_ago(24))
    now = dt.datetime.now(dt.UTC)
    events = [
        runtime_contracts.RequestEvent(
            event_id=uuid.uuid4(), runtime_id=RUNTIME, started_at=now - dt.timedelta(seconds=i + 1),
            finished_at=now - dt.timedelta(seconds=i), tenant="acme", feature="search", end_user="u-7",
            api_key_id="key-1", model_requested="auto", model_served="smollm2", route_reason="auto_small",
            priority="high", status="ok", http_status=200, prompt_tokens=12, completion_tokens=34,
            queue_wait_ms=0.25, ttft_ms=15.0, e2e_ms=1000.0, tpot_ms=9.5, queue_depth_at_admit=1,
            mean_batch_size=2.5, gpu_seconds=0.4, energy_joules=None, device="cpu",
        )
        for i in range(3)
    ]
    sample = runtime_contracts.RuntimeSample(
        runtime_id=RUNTIME, at=now, queue_depth=0, running=1, tokens_per_s=12.5,
        devices=[runtime_contracts.DeviceSample(device=GPU, name=H100, gpu_util=50.0, mem_used=1, mem_total=2)],
    )
    records = [SpoolRecord("E", e.model_dump_json().encode()) for e in events]
    records.append(SpoolRecord("S", sample.model_dump_json().encode()))

    response = post_batch(exported_batch_body(records))

    assert response.status_code == 202, response.content
    assert response.json() == {"accepted": 4, "duplicates": 0, "refused": []}
    assert RequestEvent.objects.filter(route_reason="auto_small", list_cost__isnull=False).count() == 3
    assert Device.objects.get(uuid=GPU).name == H100


def test_a_samples_breaker_states_are_stored_as_the_runtime_sent_them(post_batch: Any) -> None:
    now = dt.datetime.now(dt.UTC)
    with_breakers = runtime_contracts.RuntimeSample(
        runtime_id=RUNTIME, at=now, queue_depth=0, running=0, tokens_per_s=0.0,
        breakers={"big": "open", "small": "half_open", "tiny": "closed"})
    from_an_older_runtime = sample_dict(at=now - dt.timedelta(seconds=5))  # no breakers key at all
    records = [SpoolRecord("S", with_breakers.model_dump_json().encode())]

    assert post_batch(exported_batch_body(records)).json()["accepted"] == 1
    assert post_batch(batch_body(samples=[from_an_older_runtime])).json()["accepted"] == 1

    assert RuntimeSample.objects.get(at=now).breakers == {"big": "open", "small": "half_open", "tiny": "closed"}
    assert RuntimeSample.objects.get(at=now - dt.timedelta(seconds=5)).breakers is None


def test_a_samples_tenants_are_stored_as_the_runtime_sent_them(post_batch: Any) -> None:
    now = dt.datetime.now(dt.UTC)
    with_tenants = runtime_contracts.RuntimeSample(
        runtime_id=RUNTIME, at=now, queue_depth=40, running=4, tokens_per_s=90.0,
        tenants=[runtime_contracts.TenantSample(tenant="flood", tokens_per_s=60.0, queue_wait_ms=2500.0,
                                                waiting=40, running=2),
                 runtime_contracts.TenantSample(tenant="light", tokens_per_s=30.0, queue_wait_ms=None,
                                                waiting=0, running=2)])
    records = [SpoolRecord("S", with_tenants.model_dump_json().encode())]

    assert post_batch(exported_batch_body(records)).json()["accepted"] == 1
    assert post_batch(batch_body(samples=[sample_dict(at=now - dt.timedelta(seconds=5))])).json()["accepted"] == 1

    assert RuntimeSample.objects.get(at=now).tenants == [
        {"tenant": "flood", "tokens_per_s": 60.0, "queue_wait_ms": 2500.0, "waiting": 40, "running": 2},
        {"tenant": "light", "tokens_per_s": 30.0, "queue_wait_ms": None, "waiting": 0, "running": 2}]
    assert RuntimeSample.objects.get(at=now - dt.timedelta(seconds=5)).tenants is None


def test_each_attempt_of_a_request_is_stored_with_its_request_id_number_and_staleness(post_batch: Any) -> None:
    failed = event_dict(request_id="5f0c1d", attempt=1, status="error", http_status=503,
                        error_type="upstream_overloaded", model_served="big", prompt_tokens=0, completion_tokens=0)
    stale = event_dict(request_id="5f0c1d", attempt=2, route_reason="fallback", cache_hit=True, cache_stale=True)
    from_an_older_runtime = event_dict()  # no request_id, attempt or cache_stale keys at all

    response = post_batch(batch_body(events=[failed, stale, from_an_older_runtime]))

    assert response.json()["accepted"] == 3
    rows = {str(e.event_id): e for e in RequestEvent.objects.all()}
    assert [(rows[e["event_id"]].request_id, rows[e["event_id"]].attempt, rows[e["event_id"]].cache_stale)
            for e in (failed, stale, from_an_older_runtime)] == [("5f0c1d", 1, False), ("5f0c1d", 2, True),
                                                                 (None, None, False)]


def test_each_event_is_stored_with_how_its_device_use_was_obtained(post_batch: Any) -> None:
    engine = event_dict(gpu_seconds=0.5, device_use_source="measured")
    upstream = event_dict(gpu_seconds=0.2, energy_joules=30.0, device_use_source="attributed")
    from_an_older_runtime = event_dict(gpu_seconds=0.1)  # no device_use_source key at all

    assert post_batch(batch_body(events=[engine, upstream, from_an_older_runtime])).json()["accepted"] == 3

    rows = {str(e.event_id): e.device_use_source for e in RequestEvent.objects.all()}
    assert [rows[e["event_id"]] for e in (engine, upstream, from_an_older_runtime)] == ["measured", "attributed",
                                                                                       None]


@pytest.mark.parametrize(("field", "value"), [("attempt", 0), ("attempt", 1.0), ("request_id", "x" * 101),
                                              ("device_use_source", "guessed"),
                                              ("request_id", "a\nb"), ("cache_stale", "yes")])
def test_an_attempt_number_or_request_id_outside_the_contract_is_refused(post_batch: Any, field: str,
                                                                         value: Any) -> None:
    response = post_batch(batch_body(events=[event_dict(**{field: value})]))

    assert response.status_code == 422
    assert response.json()["refused"][0]["errors"][0].startswith(f"{field}: ")


def test_a_sample_with_a_breaker_state_the_contract_does_not_name_is_refused(post_batch: Any) -> None:
    good = sample_dict(at=hours_ago(1), breakers={"big": "closed"})
    bad = sample_dict(at=hours_ago(2), breakers={"big": "tripped"})

    response = post_batch(batch_body(samples=[good, bad]))

    assert response.status_code == 202
    (refusal,) = response.json()["refused"]
    assert (refusal["kind"], refusal["index"]) == ("sample", 1)
    assert any(error.startswith("breakers.big") for error in refusal["errors"]), refusal
    assert list(RuntimeSample.objects.values_list("breakers", flat=True)) == [{"big": "closed"}]


def test_duplicate_delivery_of_a_batch_stores_nothing_twice(post_batch: Any) -> None:
    body = batch_body(events=[event_dict(), event_dict(), event_dict()], samples=[sample_dict()])
    assert post_batch(body).json() == {"accepted": 4, "duplicates": 0, "refused": []}

    again = post_batch(body)

    assert again.status_code == 202
    assert again.json() == {"accepted": 0, "duplicates": 4, "refused": []}
    assert RequestEvent.objects.count() == 3
    assert RuntimeSample.objects.count() == 1


def test_duplicates_within_one_batch_are_stored_once(post_batch: Any) -> None:
    event, sample = event_dict(), sample_dict()
    same_instant_other_offset = dict(event, started_at=dt.datetime.fromisoformat(event["started_at"]).astimezone(
        dt.timezone(dt.timedelta(hours=2))).isoformat())

    response = post_batch(batch_body(events=[event, event, same_instant_other_offset], samples=[sample, sample]))

    assert response.json() == {"accepted": 2, "duplicates": 3, "refused": []}
    assert RequestEvent.objects.count() == 1
    assert RuntimeSample.objects.count() == 1


def test_pricing_uses_the_book_in_force_when_the_request_started(post_batch: Any) -> None:
    old = price_book(effective_from=hours_ago(72), models={"smollm2": ("1.00", "1.00")})
    new = price_book(effective_from=hours_ago(24), models={"smollm2": ("2.00", "2.00")})
    before_change = event_dict(started_at=hours_ago(48))
    after_change = event_dict(started_at=hours_ago(1))
    before_any_book = event_dict(started_at=hours_ago(96))

    post_batch(batch_body(events=[before_change, after_change, before_any_book]))

    assert (stored(before_change).price_book_id, stored(before_change).list_cost) == (old.id, Decimal("0.0015"))
    assert (stored(after_change).price_book_id, stored(after_change).list_cost) == (new.id, Decimal("0.003"))
    unpriced = stored(before_any_book)
    assert (unpriced.price_book_id, unpriced.list_cost, unpriced.hardware_cost) == (None, None, None)


def test_an_event_no_model_price_applies_to_has_a_null_list_cost(post_batch: Any) -> None:
    price_book(effective_from=hours_ago(24), models={"smollm2": ("0.10", "0.40")})
    unknown_model = event_dict(model_served="mystery-7b")
    nothing_served = event_dict(model_served=None, status="rejected_budget", http_status=429)

    post_batch(batch_body(events=[unknown_model, nothing_served]))

    assert stored(unknown_model).list_cost is None
    assert stored(unknown_model).hardware_cost == Decimal("0.0003")  # the hardware was still used
    assert stored(nothing_served).list_cost is None


def test_samples_are_stored_and_later_events_price_at_their_gpus_type(post_batch: Any) -> None:
    price_book(effective_from=hours_ago(24), devices={H100: ("3.60", "0"), "*": ("0.36", "0")})
    sample = sample_dict(devices=[device_dict(device=GPU, name=H100), device_dict(device="GPU-x", name=None)])
    same_batch = event_dict(device=GPU, energy_joules=None)

    first = post_batch(batch_body(events=[same_batch], samples=[sample]))
    on_known_gpu = event_dict(device=GPU, energy_joules=None)
    on_unknown_gpu = event_dict(device="GPU-never-sampled", energy_joules=None)
    post_batch(batch_body(events=[on_known_gpu, on_unknown_gpu]))

    assert first.json() == {"accepted": 2, "duplicates": 0, "refused": []}
    assert RuntimeSample.objects.get().kv_cache_used == 12_000
    assert DeviceSample.objects.filter(runtime_id=RUNTIME).count() == 2
    assert DeviceSample.objects.get(device=GPU).power_w == 550.0
    device = Device.objects.get()
    assert (device.uuid, device.name, device.runtime_id) == (GPU, H100, RUNTIME)
    # 2 GPU-seconds at the H100's $3.60/hour, and at the '*' row's $0.36/hour for an unknown GPU
    assert stored(same_batch).hardware_cost == Decimal("0.002")
    assert stored(on_known_gpu).hardware_cost == Decimal("0.002")
    assert stored(on_unknown_gpu).hardware_cost == Decimal("0.0002")


@pytest.mark.skipif(connection.vendor != "postgresql", reason="daily partitions exist on PostgreSQL only")
def test_on_postgresql_events_land_in_their_days_partition(post_batch: Any) -> None:
    today, three_days_ago = event_dict(started_at=hours_ago(0.1)), event_dict(started_at=hours_ago(72))

    post_batch(batch_body(events=[today, three_days_ago]))

    days = {stored(e).started_at.astimezone(dt.UTC).date() for e in (today, three_days_ago)}
    assert days <= set(existing_partition_days())
    with connection.cursor() as cursor:
        cursor.execute("SELECT tableoid::regclass::text, count(*) FROM telemetry_requestevent GROUP BY 1")
        per_partition = dict(cursor.fetchall())
    assert per_partition == {partition_name(day): 1 for day in days}


# -- refusing records, one at a time ----------------------------------------------------------


def test_a_malformed_record_never_loses_the_good_records_beside_it(post_batch: Any) -> None:
    good = [event_dict(), event_dict()]
    bad = event_dict(status="exploded")

    response = post_batch(batch_body(events=[good[0], bad, good[1]], samples=[sample_dict(), {"at": 5}]))

    assert response.status_code == 202
    body = response.json()
    assert (body["accepted"], body["duplicates"]) == (3, 0)
    assert [(r["kind"], r["index"], r["event_id"]) for r in body["refused"]] == [
        ("event", 1, bad["event_id"]), ("sample", 1, None)]
    assert body["refused"][0]["errors"][0].startswith("status: ")
    assert "runtime_id: Field required" in body["refused"][1]["errors"]
    assert set(RequestEvent.objects.values_list("event_id", flat=True)) == {uuid.UUID(e["event_id"]) for e in good}


def test_a_batch_whose_every_record_is_refused_is_422(post_batch: Any) -> None:
    response = post_batch(batch_body(events=[event_dict(prompt_tokens=-1), {"nonsense": True}]))

    assert response.status_code == 422
    body = response.json()
    assert error_of(response)["code"] == "all_records_refused"
    assert (body["accepted"], body["duplicates"], [r["index"] for r in body["refused"]]) == (0, 0, [0, 1])
    assert RequestEvent.objects.count() == 0


def test_an_empty_batch_is_accepted_as_nothing(post_batch: Any) -> None:
    for body in (b"{}", batch_body()):
        response = post_batch(body)
        assert (response.status_code, response.json()) == (202, {"accepted": 0, "duplicates": 0, "refused": []})


def _now_minus(minutes: float) -> str:
    return iso(timezone.now() - dt.timedelta(minutes=minutes))


HOSTILE_EVENTS: list[tuple[str, dict[str, Any], str | None, str]] = [
    ("tokens as text", {"prompt_tokens": "12"}, None, "prompt_tokens: "),
    ("boolean as a count", {"prompt_tokens": True}, None, "prompt_tokens: "),
    ("fraction as a status", {"http_status": 200.5}, None, "http_status: "),
    ("float as an integer", {"http_status": 200.0}, None, "http_status: "),
    ("text as a boolean", {"cache_hit": "true"}, None, "cache_hit: "),
    ("number as a timestamp", {"started_at": 1_700_000_000}, None, "started_at: "),
    ("date without a time", {"started_at": "__date__"}, None, "started_at: "),
    ("number as a UUID", {"event_id": 12345}, None, "event_id: "),
    ("timestamp without a time zone", {"started_at": "__naive__"}, None, "started_at: "),
    ("not a UUID", {"event_id": "not-a-uuid"}, None, "event_id: "),
    ("list as text", {"feature": ["chat"]}, None, "feature: "),
    ("null where required", {"e2e_ms": None}, None, "e2e_ms: "),
    ("missing field", {"tenant": ...}, None, "tenant: "),
    ("unknown field", {"surprise": 1}, None, "surprise: "),
    ("a thousand unknown fields", {f"k{i}": i for i in range(1000)}, None, "record: 1028 fields"),
    ("NaN literal", {"e2e_ms": float("nan")}, None, "e2e_ms: "),
    ("Infinity literal", {"gpu_seconds": float("inf")}, None, "gpu_seconds: "),
    ("number that overflows a float", {"ttft_ms": RAW}, "1e400", "ttft_ms: "),
    ("integer of 5000 digits", {"prompt_tokens": RAW}, "9" * 5000, "prompt_tokens: "),
    ("tokens past the column", {"completion_tokens": 2**31}, None, "completion_tokens: "),
    ("absurd GPU time", {"gpu_seconds": 1e300}, None, "gpu_seconds: "),
    ("tenant longer than its column", {"tenant": "x" * 101}, None, "tenant: "),
    ("a megabyte of end user", {"end_user": "x" * 1_000_000}, None, "end_user: "),
    ("a huge nested value and fields missing", {"tenant": RAW, "feature": ..., "status": ...},
     "[" + "[1, 2, 3], " * 100_000 + "[]]", "tenant: "),
    ("NUL in text", {"tenant": "ac\x00me"}, None, "tenant: "),
    ("NUL in an unknown key", {"x\x00": 1}, None, "(a key): "),
    ("lone surrogate deep in a wrong type", {"feature": RAW}, '[[{"a": ["\\udfff"]}]]', "feature.0.0.a.0: "),
    ("lone surrogate", {"feature": RAW}, '"\\ud800"', "feature: "),
    ("unknown status", {"status": "exploded"}, None, "status: "),
    ("unknown priority", {"priority": "urgent"}, None, "priority: "),
    ("negative tokens", {"completion_tokens": -3}, None, "completion_tokens: "),
    ("negative latency", {"e2e_ms": -1.0}, None, "e2e_ms: "),
    ("HTTP status out of range", {"http_status": 1000}, None, "http_status: "),
    ("started after it finished", {"started_at": "__late_start__"}, None, "finished_at: "),
    ("started long ago", {"started_at": "__old__", "finished_at": "__old__"}, None, "started_at: "),
    ("starts tomorrow and then some", {"started_at": "__future__", "finished_at": "__future__"}, None,
     "started_at: "),
    ("year 1", {"started_at": "0001-01-01T00:00:00+05:00"}, None, "started_at: "),
    ("year 9999", {"started_at": "9999-12-31T23:00:00-14:00", "finished_at": "9999-12-31T23:00:00-14:00"}, None,
     "started_at: "),
    ("another runtime's id", {"runtime_id": "rt-2"}, None, "runtime_id: "),
]
_TIMES = {
    "__naive__": lambda: _now_minus(1).removesuffix("Z"),
    "__date__": lambda: _now_minus(1)[:10],
    "__late_start__": lambda: _now_minus(-0.5),
    "__old__": lambda: _now_minus(31 * 24 * 60),
    "__future__": lambda: _now_minus(-25 * 60),
}


@pytest.mark.parametrize(("overrides", "raw", "reason"), [h[1:] for h in HOSTILE_EVENTS],
                         ids=[h[0] for h in HOSTILE_EVENTS])
def test_a_hostile_event_is_refused_with_its_reason_and_the_rest_stored(
    post_batch: Any, overrides: dict[str, Any], raw: str | None, reason: str
) -> None:
    hostile = event_dict(**{k: _TIMES[v]() if isinstance(v, str) and v in _TIMES else v
                            for k, v in overrides.items()})
    body = batch_body(events=[event_dict(), hostile, event_dict()])
    if raw is not None:
        body = body.replace(json.dumps(RAW).encode(), raw.encode())

    response = post_batch(body)

    assert response.status_code == 202, response.content
    assert len(response.content) < 10_000  # nothing hostile is echoed at length
    result = response.json()
    assert result["accepted"] == 2
    [refusal] = result["refused"]
    assert (refusal["kind"], refusal["index"]) == ("event", 1)
    assert any(error.startswith(reason) for error in refusal["errors"]), refusal["errors"]
    assert RequestEvent.objects.count() == 2


HOSTILE_SAMPLES: list[tuple[str, dict[str, Any], str]] = [
    ("another runtime's id", {"runtime_id": "rt-2"}, "runtime_id: "),
    ("negative queue depth", {"queue_depth": -1}, "queue_depth: "),
    ("GPU busier than 100%", {"devices": [device_dict(gpu_util=150.0)]}, "devices.0.gpu_util: "),
    ("NUL in a device name", {"devices": [device_dict(name="H\x00100")]}, "devices.0.name: "),
    ("unknown field in a device", {"devices": [device_dict(fan_rpm=1200)]}, "devices.0.fan_rpm: "),
    ("device without its id", {"devices": [device_dict(device=...)]}, "devices.0.device: "),
    ("older than samples are kept", {"at": "__old__"}, "at: "),
    ("a hundred GPUs", {"devices": [device_dict(device=f"GPU-{i}") for i in range(100)]}, "devices: "),
]


@pytest.mark.parametrize(("overrides", "reason"), [h[1:] for h in HOSTILE_SAMPLES], ids=[h[0] for h in HOSTILE_SAMPLES])
def test_a_hostile_sample_is_refused_with_its_reason(post_batch: Any, overrides: dict[str, Any], reason: str) -> None:
    if overrides.get("at") == "__old__":
        overrides = {"at": timezone.now() - dt.timedelta(days=8)}
    body = batch_body(events=[event_dict()], samples=[sample_dict(**overrides)])

    result = post_batch(body).json()

    assert result["accepted"] == 1
    [refusal] = result["refused"]
    assert (refusal["kind"], refusal["index"], refusal["event_id"]) == ("sample", 0, None)
    assert any(error.startswith(reason) for error in refusal["errors"]), refusal["errors"]
    assert (RuntimeSample.objects.count(), DeviceSample.objects.count(), Device.objects.count()) == (0, 0, 0)


def test_a_record_valid_alone_is_valid_beside_a_bad_one(post_batch: Any) -> None:
    """Good batches are validated in one pass, batches with a bad record one record at a time:
    both must agree on what is valid."""
    started = timezone.now() - dt.timedelta(minutes=5)
    unusual = {
        "started_at": started.astimezone(dt.timezone(dt.timedelta(hours=-7))).isoformat(),
        "e2e_ms": 0, "ttft_ms": 3, "tenant": "café ☕", "feature": "x" * 100, "cache_hit": True,
        "queue_depth_at_admit": None, "end_user": ..., "rule_id": ..., "device": ...,
    }
    alone = post_batch(batch_body(events=[event_dict(**unusual)]))
    beside_bad = post_batch(batch_body(events=[event_dict(**unusual), event_dict(status="?")]))

    assert alone.json() == {"accepted": 1, "duplicates": 0, "refused": []}
    assert (beside_bad.json()["accepted"], len(beside_bad.json()["refused"])) == (1, 1)
    assert set(RequestEvent.objects.values_list("tenant", "e2e_ms", "cache_hit")) == {("café ☕", 0.0, True)}


# -- refusing the whole request ---------------------------------------------------------------


@pytest.mark.parametrize("token", ["missing", "wrong", "revoked", "not bearer"])
def test_a_request_without_a_valid_token_is_401_and_stores_nothing(post_batch: Any, token: str) -> None:
    runtime, plain = runtime_with_token("rt-9")
    if token == "revoked":
        RuntimeToken.objects.filter(runtime=runtime).update(revoked_at=timezone.now())
    headers = {"missing": {"token": None}, "wrong": {"token": plain[:-2] + "xx"}, "revoked": {"token": plain},
               "not bearer": {"token": None, "HTTP_AUTHORIZATION": f"Basic {plain}"}}[token]
    body = batch_body(events=[event_dict(runtime_id="rt-9")], samples=[sample_dict(runtime_id="rt-9")])

    response = post_batch(body, **headers)

    assert response.status_code == 401
    assert error_of(response)["type"] == "authentication_error"
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert (RequestEvent.objects.count(), RuntimeSample.objects.count()) == (0, 0)
    assert RuntimeToken.objects.get(runtime=runtime).last_used_at is None


def test_a_token_is_stamped_when_used_and_its_runtime_seen(post_batch: Any, runtime_token: tuple[Runtime, str]
                                                           ) -> None:
    before = timezone.now()
    post_batch(batch_body(events=[event_dict()]))

    runtime = Runtime.objects.get(pk=runtime_token[0].pk)
    assert runtime.last_seen_at is not None and runtime.last_seen_at >= before
    assert runtime.tokens.get().last_used_at == runtime.last_seen_at


def test_a_token_for_one_runtime_cannot_send_another_runtimes_records(post_batch: Any) -> None:
    _, other_token = runtime_with_token("rt-2")

    response = post_batch(batch_body(events=[event_dict()], samples=[sample_dict()]), token=other_token)

    assert response.status_code == 422
    assert all(r["errors"][0].startswith("runtime_id: ") for r in response.json()["refused"])
    assert RequestEvent.objects.count() == 0


@override_settings(INGEST_MAX_BODY_BYTES=2_000)
def test_a_body_over_the_size_limit_is_413_before_it_is_read(post_batch: Any) -> None:
    body = batch_body(events=[event_dict() for _ in range(5)])
    assert len(body) > 2_000

    response = post_batch(body)

    assert response.status_code == 413
    assert error_of(response)["code"] == "body_too_large"
    assert RequestEvent.objects.count() == 0


@override_settings(INGEST_MAX_RECORDS=3)
@pytest.mark.parametrize(("events", "samples"), [
    ([event_dict(), event_dict(), event_dict()], [sample_dict()]),
    ([event_dict(), event_dict(), event_dict(status="?")], [sample_dict()]),
    ([event_dict() for _ in range(5)], []),
    ([1, 2, 3, 4, 5], []),
], ids=["valid records", "with a bad record", "one list too long", "not even records"])
def test_more_records_than_one_request_may_carry_is_413(post_batch: Any, events: list[Any], samples: list[Any]
                                                        ) -> None:
    response = post_batch(batch_body(events=events, samples=samples))

    assert response.status_code == 413
    assert error_of(response)["code"] == "too_many_records"
    assert (RequestEvent.objects.count(), RuntimeSample.objects.count()) == (0, 0)


@pytest.mark.parametrize("body", [
    b"", b"not json", b"[]", b'"events"', b"null", b'{"events": {}}', b'{"samples": "many"}',
    b'{"events": [], "samples": null}', b"\xff\xfe\x00garbage", b"[" * 100_000, b'{"events": [' * 50_000,
    b'{"events": [{"event_id": "x"', b'{"events": [] ,}',
], ids=lambda b: repr(b[:20]))
def test_a_body_that_is_not_a_batch_is_400(post_batch: Any, body: bytes) -> None:
    response = post_batch(body)

    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_batch"


@pytest.mark.parametrize("length", ["twelve", "-5", "²", "1e3"])
def test_a_bad_content_length_is_400(post_batch: Any, length: str) -> None:
    response = post_batch(batch_body(), CONTENT_LENGTH=length)

    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_length"


def test_an_absurd_content_length_is_413(post_batch: Any) -> None:
    response = post_batch(batch_body(), CONTENT_LENGTH="9" * 5000)

    assert response.status_code == 413


def test_only_post_is_allowed(client: Any) -> None:
    response = client.get(EVENTS_URL)

    assert response.status_code == 405
    assert response["Allow"] == "POST"
    assert error_of(response)["code"] == "method_not_allowed"


# -- the contract, against the runtime's ------------------------------------------------------


@pytest.mark.parametrize(("name", "runtime_name"), [
    ("RequestEventRecord", "RequestEvent"), ("RuntimeSampleRecord", "RuntimeSample"),
    ("DeviceSampleRecord", "DeviceSample"), ("TenantSampleRecord", "TenantSample"),
    ("TelemetryBatch", "TelemetryBatch")])
def test_the_contract_has_the_runtimes_fields_and_required_fields(name: str, runtime_name: str) -> None:
    ours = getattr(contracts, name).model_json_schema()
    theirs = getattr(runtime_contracts, runtime_name).model_json_schema()

    assert ours["properties"].keys() == theirs["properties"].keys()
    assert set(ours.get("required", [])) == set(theirs.get("required", []))
    assert contracts.CONTRACT_VERSION == runtime_contracts.CONTRACT_VERSION


def test_the_contract_names_the_runtimes_breaker_states() -> None:
    def states(model: Any) -> set[str]:
        (mapping,) = [s for s in model.model_json_schema()["properties"]["breakers"]["anyOf"] if s["type"] == "object"]
        # finops bounds the model names (a key pattern), the runtime does not
        (values,) = mapping["patternProperties"].values() if "patternProperties" in mapping else [
            mapping["additionalProperties"]]
        return set(values["enum"])

    assert states(contracts.RuntimeSampleRecord) == states(runtime_contracts.RuntimeSample) == {
        "closed", "half_open", "open"}


def test_the_contract_enumerates_the_runtimes_statuses_and_priorities() -> None:
    ours, theirs = contracts.RequestEventRecord.model_json_schema(), runtime_contracts.RequestEvent.model_json_schema()

    for field in ("status", "priority"):
        assert set(ours["properties"][field]["enum"]) == set(theirs["properties"][field]["enum"])
    (ours_sources,) = [s for s in ours["properties"]["device_use_source"]["anyOf"] if "enum" in s]
    (theirs_sources,) = [s for s in theirs["properties"]["device_use_source"]["anyOf"] if "enum" in s]
    assert set(ours_sources["enum"]) == set(theirs_sources["enum"]) == {"measured", "attributed"}
