"""Prices: the book in force prices a request; past costs move only when an admin re-prices a range,
and then raw events and rollups move together."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest
from django.test import override_settings
from django.utils import timezone

from finops.pricing.models import ModelPrice
from finops.pricing.repricing import RepricingRefused, reprice_range
from finops.pricing.services import PriceCatalog, hardware_cost, list_cost, served_list_cost
from finops.telemetry.models import (
    ClientTask,
    Device,
    Granularity,
    RequestEvent,
    Rollup,
    RollupQuarantine,
    RuntimeEventCount,
)
from finops.telemetry.retention import retention_run
from finops.telemetry.rollups import rollup_run
from finops.telemetry.sample_rollups import sample_rollup_run
from tests.finops.factories import batch_body, event_dict, price_book
from tests.finops.test_rollups import SECOND, T0, assert_rollups_match_raw, event, snapshot, store

pytestmark = pytest.mark.django_db
H100, GPU, UNKNOWN_GPU = "NVIDIA H100 80GB HBM3", "GPU-1", "GPU-never-sampled"
HOUR = dt.timedelta(hours=1)


def costs() -> list[tuple[Any, ...]]:
    return sorted(RequestEvent.objects.values_list("event_id", "price_book_id", "list_cost", "hardware_cost"))


def priced(e: RequestEvent, catalog: PriceCatalog) -> RequestEvent:
    """Price an event as ingest does (for events stored directly, not through the API)."""
    prices = catalog.at(e.started_at)
    device_type = "cpu" if e.device == "cpu" else dict(Device.objects.values_list("uuid", "name")).get(e.device)
    e.price_book_id = prices.book_id if prices else None
    e.list_cost, e.saved_cost = served_list_cost(prices, model=e.model_served, prompt_tokens=e.prompt_tokens,
                                                 completion_tokens=e.completion_tokens, cache_hit=e.cache_hit)
    e.hardware_cost = hardware_cost(prices, device_type=device_type, gpu_seconds=e.gpu_seconds,
                                    energy_joules=e.energy_joules)
    return e


# -- the pricing services -------------------------------------------------------------------------


def test_the_book_in_force_is_the_latest_that_took_effect_at_or_before_the_moment() -> None:
    first = price_book(effective_from=T0)
    second = price_book(effective_from=T0 + HOUR)
    catalog = PriceCatalog.load()
    assert catalog.at(T0 - dt.timedelta(microseconds=1)) is None
    assert catalog.at(T0).book_id == first.id
    assert catalog.at(T0 + HOUR - dt.timedelta(microseconds=1)).book_id == first.id
    assert catalog.at(T0 + HOUR).book_id == second.id


def test_costs_use_the_named_row_then_the_any_row_and_are_none_where_nothing_applies() -> None:
    price_book(effective_from=T0, models={"smollm2": ("0.10", "0.40"), "*": ("1", "2")},
               devices={"cpu": ("0.36", "0.36"), H100: ("3.60", "0.18")})
    prices = PriceCatalog.load().at(T0)
    assert list_cost(prices, model="smollm2", prompt_tokens=1000, completion_tokens=500) == Decimal("0.0003")
    assert list_cost(prices, model="other", prompt_tokens=1_000_000, completion_tokens=0) == Decimal(1)
    assert list_cost(None, model="smollm2", prompt_tokens=1, completion_tokens=1) is None
    # 1 GPU-second at $3.60/h + 3600 J (1 Wh) at $0.18/kWh
    assert hardware_cost(prices, device_type=H100, gpu_seconds=1.0, energy_joules=3600.0) == Decimal("0.00118")
    assert hardware_cost(prices, device_type="unknown", gpu_seconds=1.0, energy_joules=None) is None
    assert hardware_cost(prices, device_type="cpu", gpu_seconds=None, energy_joules=None) is None


def test_a_cache_hit_costs_nothing_at_list_price_and_records_what_it_saved() -> None:
    price_book(effective_from=T0, models={"smollm2": ("0.10", "0.40")})
    prices = PriceCatalog.load().at(T0)
    served = {"model": "smollm2", "prompt_tokens": 1000, "completion_tokens": 500}
    assert served_list_cost(prices, **served, cache_hit=False) == (Decimal("0.0003"), None)
    assert served_list_cost(prices, **served, cache_hit=True) == (Decimal(0), Decimal("0.0003"))
    assert served_list_cost(prices, **{**served, "model": "unpriced"}, cache_hit=True) == (None, None)


def test_ingest_prices_cache_hits_at_zero_and_the_rollups_add_up_what_they_saved(post_batch: Any) -> None:
    now = timezone.now()
    price_book(effective_from=now - 24 * HOUR, models={"smollm2": ("0.10", "0.40")})
    sent = [event_dict(started_at=now - HOUR, prompt_tokens=1000, completion_tokens=500, cache_hit=hit,
                       gpu_seconds=0.0 if hit else 0.5)
            for hit in (True, True, False)]
    assert post_batch(batch_body(events=sent)).status_code == 202
    rollup_run(now=now + dt.timedelta(minutes=1))

    stored = sorted(RequestEvent.objects.values_list("cache_hit", "list_cost", "saved_cost"))
    assert stored == [(False, Decimal("0.0003"), None), (True, Decimal(0), Decimal("0.0003")),
                      (True, Decimal(0), Decimal("0.0003"))]
    day = Rollup.objects.get(granularity=Granularity.DAY)
    assert (day.cache_hits, day.list_cost, day.saved_cost) == (2, Decimal("0.0003"), Decimal("0.0006"))
    assert_rollups_match_raw()


def test_repricing_a_cache_hit_moves_what_it_saved() -> None:
    price_book(effective_from=T0 - 24 * HOUR, models={"smollm2": ("0.10", "0.40")})
    hit = event(started_at=T0, cache_hit=True, prompt_tokens=1000, completion_tokens=500)
    store(priced(hit, PriceCatalog.load()))
    rollup_run(now=T0 + HOUR)

    price_book(effective_from=T0 - HOUR, models={"smollm2": ("1.00", "4.00")})
    assert reprice_range(start=T0, end=T0 + HOUR, now=T0 + 2 * HOUR) == 1

    stored = RequestEvent.objects.get()
    assert (stored.list_cost, stored.saved_cost) == (Decimal(0), Decimal("0.003"))
    assert Rollup.objects.get(granularity=Granularity.DAY).saved_cost == Decimal("0.003")
    assert_rollups_match_raw()


# -- re-pricing -----------------------------------------------------------------------------------


def test_a_later_price_change_moves_no_past_cost_until_a_range_is_repriced(post_batch: Any) -> None:
    now = timezone.now()
    first = price_book(effective_from=now - 10 * 24 * HOUR)
    sent = [event_dict(started_at=now - n * HOUR) for n in (1, 2, 30)]
    assert post_batch(batch_body(events=sent)).status_code == 202
    rollup_run(now=now + dt.timedelta(minutes=1))
    raw_before, rollups_before = costs(), snapshot()
    assert {book for _, book, _, _ in raw_before} == {first.id}

    # Prices change twice: a book backdated over the events, and an edit to the book they used.
    second = price_book(effective_from=now - 5 * HOUR, models={"smollm2": ("1.00", "4.00")},
                        devices={"cpu": ("3.60", "3.60")})
    ModelPrice.objects.filter(book=first).update(prompt_per_1m=Decimal("9"))
    rollup_run(now=now + dt.timedelta(minutes=2))
    assert (costs(), snapshot()) == (raw_before, rollups_before)

    assert reprice_range(start=now - 3 * HOUR, end=now) == 2  # the day-old event is outside the range

    by_age = {e.started_at: e for e in RequestEvent.objects.all()}
    recent = by_age[now - HOUR]
    assert (recent.price_book_id, recent.list_cost, recent.hardware_cost) == (
        second.id, Decimal("0.003"), Decimal("0.003"))  # ten times the first book's prices
    day_old = by_age[now - 30 * HOUR]
    assert (day_old.price_book_id, day_old.list_cost) == (first.id, Decimal("0.0003"))
    assert_rollups_match_raw()


def test_repricing_moves_rollups_by_exactly_the_change() -> None:
    Device.objects.create(uuid=GPU, name=H100, runtime_id="rt-1", last_seen_at=T0)
    price_book(effective_from=T0 - 24 * HOUR, models={"smollm2": ("0.10", "0.40")},
               devices={"cpu": ("0.36", "0.36"), H100: ("2.00", "0.20")})
    catalog = PriceCatalog.load()
    events = [
        event(started_at=T0 + dt.timedelta(minutes=m), model_served=model, device=device, energy_joules=energy,
              gpu_seconds=gpu, tenant=tenant)
        for m, model, device, energy, gpu, tenant in [
            (0, "smollm2", "cpu", None, 0.5, "acme"),
            (1, "llama", "cpu", 10.0, 0.5, "acme"),  # no price for llama yet: unpriced
            (2, "smollm2", GPU, 200.0, 1.5, "globex"),  # a known GPU: its H100 rates
            (3, "smollm2", UNKNOWN_GPU, None, 1.0, "globex"),  # an unknown GPU: the '*' row (none yet)
            (4, None, None, None, None, "acme"),  # never served: no list price until a book has a '*' row
            (90, "smollm2", "cpu", None, 0.5, "acme"),  # outside the re-priced range
        ]
    ]
    store(*(priced(e, catalog) for e in events))
    late = store(priced(event(started_at=T0 + dt.timedelta(minutes=5), received_at=T0 + 2.5 * HOUR),
                        catalog))
    rollup_run(now=T0 + 2 * HOUR)  # counts all but the late event
    assert Rollup.objects.get(granularity="day", tenant="acme", model="llama").unpriced == 1

    new = price_book(effective_from=T0 - 2 * HOUR, models={"smollm2": ("0.20", "0.80"), "*": ("1", "1")},
                     devices={"cpu": ("0.72", "0.72"), H100: ("4.00", "0.40"), "*": ("1.00", "1.00")})
    changed = reprice_range(start=T0, end=T0 + HOUR, now=T0 + 3 * HOUR)

    assert changed == 6  # every event in the range
    catalog = PriceCatalog.load()
    for stored in RequestEvent.objects.all():
        expected = priced(RequestEvent(**{f.attname: getattr(stored, f.attname) for f in stored._meta.fields}),
                          catalog if stored.started_at < T0 + HOUR else PriceCatalog(catalog.books[:1]))
        assert (stored.price_book_id, stored.list_cost, stored.hardware_cost) == (
            expected.price_book_id, expected.list_cost, expected.hardware_cost), stored.started_at
    unknown = RequestEvent.objects.get(device=UNKNOWN_GPU)
    assert (unknown.price_book_id, unknown.hardware_cost) == (new.id, Decimal("0.000277777778"))  # 1 s at $1/h
    assert Rollup.objects.get(granularity="day", tenant="acme", model="llama").unpriced == 0
    # Everything counted moved by its change; the late event is counted, at its new cost, next run.
    assert_rollups_match_raw([e for e in RequestEvent.objects.all() if e.id != late[0].id])
    rollup_run(now=T0 + 3 * HOUR)
    assert_rollups_match_raw()
    # Each task (here each event is its own) costs what its events cost now.
    for task in ClientTask.objects.all():
        raw = RequestEvent.objects.get(event_id=task.task_id)
        assert (task.list_cost, task.hardware_cost) == (raw.list_cost or 0, raw.hardware_cost or 0), task


def test_repricing_twice_changes_nothing_the_second_time() -> None:
    price_book(effective_from=T0 - HOUR)
    catalog = PriceCatalog.load()
    store(*(priced(event(started_at=T0 + dt.timedelta(minutes=m)), catalog) for m in range(3)))
    rollup_run(now=T0 + HOUR)
    price_book(effective_from=T0 - dt.timedelta(minutes=30), models={"smollm2": ("1", "1")})
    assert reprice_range(start=T0, end=T0 + HOUR, now=T0 + HOUR) == 3
    raw, rollups = costs(), snapshot()

    assert reprice_range(start=T0, end=T0 + HOUR, now=T0 + HOUR) == 0
    assert (costs(), snapshot()) == (raw, rollups)
    assert_rollups_match_raw()


def test_repricing_leaves_events_the_rollups_left_out_as_they_are() -> None:
    price_book(effective_from=T0 - HOUR)
    catalog = PriceCatalog.load()
    counted = store(priced(event(), catalog))
    # stored before ingest capped costs: the rollup run leaves it out
    left_out = store(event(started_at=T0 + SECOND, list_cost=Decimal("999999999999")))[0]
    rollup_run(now=T0 + HOUR)
    price_book(effective_from=T0 - dt.timedelta(minutes=30), models={"smollm2": ("1", "1")})

    assert reprice_range(start=T0, end=T0 + HOUR, now=T0 + HOUR) == 1

    assert RequestEvent.objects.get(id=left_out.id).list_cost == Decimal("999999999999")
    assert_rollups_match_raw(list(RequestEvent.objects.filter(id=counted[0].id)))


def test_a_price_that_makes_one_request_cost_more_than_the_cap_refuses_the_re_price() -> None:
    price_book(effective_from=T0 - HOUR)
    catalog = PriceCatalog.load()
    store(*(priced(event(started_at=T0 + dt.timedelta(minutes=m), prompt_tokens=10**6), catalog) for m in range(2)))
    rollup_run(now=T0 + HOUR)
    raw, rollups = costs(), snapshot()
    price_book(effective_from=T0 - dt.timedelta(minutes=30), models={"smollm2": ("999999999", "0")})

    with pytest.raises(RepricingRefused, match="more than one request can"):
        reprice_range(start=T0, end=T0 + HOUR, now=T0 + HOUR)

    assert (costs(), snapshot()) == (raw, rollups)


def test_repricing_past_expired_minute_rollups_moves_hours_and_days_only() -> None:
    price_book(effective_from=T0 - HOUR)
    catalog = PriceCatalog.load()
    store(priced(event(), catalog))
    now = T0 + 10 * 24 * HOUR
    rollup_run(now=now)
    with override_settings(MINUTE_ROLLUP_RETENTION_DAYS=7):
        retention_run(now=now)
    assert not Rollup.objects.filter(granularity=Granularity.MINUTE).exists()
    price_book(effective_from=T0 - dt.timedelta(minutes=30), models={"smollm2": ("1", "1")})

    assert reprice_range(start=T0, end=T0 + HOUR, now=now) == 1

    assert not Rollup.objects.filter(granularity=Granularity.MINUTE).exists()  # not brought back
    assert_rollups_match_raw(granularities=(Granularity.HOUR, Granularity.DAY))


@override_settings(RAW_RETENTION_DAYS=30)
def test_a_range_reaching_past_raw_retention_is_refused() -> None:
    now = T0 + 40 * 24 * HOUR
    with pytest.raises(RepricingRefused, match="RAW_RETENTION_DAYS"):
        reprice_range(start=T0, end=now, now=now)
    with pytest.raises(RepricingRefused, match="empty"):
        reprice_range(start=now, end=now, now=now)
    assert reprice_range(start=now - 29 * 24 * HOUR, end=now, now=now) == 0


# -- the admin ------------------------------------------------------------------------------------


@pytest.fixture
def admin_client_logged_in(client: Any) -> Any:
    from django.contrib.auth import get_user_model

    client.force_login(get_user_model().objects.create_superuser("root", "root@example.com", "unused-password"))
    return client


def one_of_each(now: dt.datetime) -> None:
    from finops.telemetry.models import DeviceSample, RuntimeSample

    price_book(effective_from=now - 24 * HOUR, devices={"cpu": ("0.36", "0.36"), H100: ("2", "0.2")})
    Device.objects.create(uuid=GPU, name=H100, runtime_id="rt-1", last_seen_at=now)
    RuntimeSample.objects.create(runtime_id="rt-1", at=now, queue_depth=1, running=2, tokens_per_s=50.0)
    DeviceSample.objects.create(runtime_id="rt-1", at=now, device=GPU, name=H100, gpu_util=0.5)
    store(event(started_at=now - HOUR, received_at=now - HOUR), event(started_at=now - HOUR, model_served=None,
                                                                     e2e_ms=5.0, status="shed"))
    rollup_run(now=now)
    sample_rollup_run(now=now + dt.timedelta(minutes=1))  # past the samples' received_at (the database's clock)
    RuntimeEventCount.objects.create(runtime_id="rt-1", recorded=3, stored=2, highest_stored=3)
    RollupQuarantine.objects.create(stat="requests", source="RequestEvent", count=1, examples=[7], reason="e2e_ms")


def test_every_telemetry_and_pricing_model_has_an_admin_that_opens(admin_client_logged_in: Any) -> None:
    from django.apps import apps
    from django.contrib import admin
    from django.urls import reverse

    one_of_each(timezone.now())
    for app_label in ("telemetry", "pricing"):
        for model in apps.get_app_config(app_label).get_models():
            assert model in admin.site._registry, model
            name = f"admin:{app_label}_{model._meta.model_name}"
            changelist = admin_client_logged_in.get(reverse(f"{name}_changelist"))
            assert changelist.status_code == 200, model
            obj = model.objects.first()
            assert obj is not None, model
            assert admin_client_logged_in.get(reverse(f"{name}_change", args=[obj.pk])).status_code == 200, model
    filtered = admin_client_logged_in.get(reverse("admin:telemetry_requestevent_changelist"),
                                          {"tenant": "acme", "status": "shed", "started_at__year": "2026"})
    assert filtered.status_code == 200


def test_raw_telemetry_cannot_be_edited_in_the_admin(admin_client_logged_in: Any) -> None:
    from django.urls import reverse

    one_of_each(timezone.now())
    row = RequestEvent.objects.first()
    assert admin_client_logged_in.get(reverse("admin:telemetry_requestevent_add")).status_code == 403
    page = admin_client_logged_in.get(reverse("admin:telemetry_requestevent_change", args=[row.pk]))
    assert b'name="_save"' not in page.content


def test_the_reprice_action_reprices_a_books_period(admin_client_logged_in: Any) -> None:
    from django.urls import reverse

    now = timezone.now()
    one_of_each(now)
    book = price_book(effective_from=now - 2 * HOUR, models={"smollm2": ("1", "1")})

    response = admin_client_logged_in.post(reverse("admin:pricing_pricebook_changelist"),
                                           {"action": "reprice_period", "_selected_action": [book.pk]}, follow=True)

    assert response.status_code == 200
    assert "2 events re-priced" in response.content.decode()
    assert RequestEvent.objects.filter(price_book_id=book.pk).count() == 2
    assert_rollups_match_raw()
