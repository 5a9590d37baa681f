"""One bad row never stops a rollup run: a raw record whose numbers no hardware produces (stored
before ingest bounded them, or written around ingest) and a rollup row the database refuses are
left out, logged and counted, and the run counts everything else and moves its watermark."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.db import connection
from django.utils import timezone

from finops.telemetry.models import (
    DeviceRollup,
    DeviceSample,
    FillState,
    MarginalRollup,
    RequestEvent,
    Rollup,
    RollupQuarantine,
    RuntimeRollup,
    RuntimeSample,
)
from finops.telemetry.rollups import rollup_run
from finops.telemetry.sample_rollups import sample_rollup_run
from tests.finops.dashboard_factories import logged_in
from tests.finops.test_rollups import T0, assert_rollups_match_raw, event, raw_totals, rollup_totals, store
from tests.finops.test_sample_rollups import assert_rollups_match_raw as assert_sample_rollups_match_raw
from tests.finops.test_sample_rollups import device_sample, runtime_sample

pytestmark = pytest.mark.django_db
SECOND = dt.timedelta(seconds=1)
LATER = T0 + dt.timedelta(minutes=10)


def quarantined(source: str) -> list[RollupQuarantine]:
    return list(RollupQuarantine.objects.filter(source=source))


def test_events_with_costs_no_rollup_can_hold_are_left_out_and_the_run_finishes() -> None:
    good = store(event(), event(started_at=T0 + SECOND, tenant="globex"))
    # Stored before ingest capped costs: two of them overflowed every rollup row they joined.
    bad = store(*(event(started_at=T0 + 2 * SECOND, list_cost=Decimal("999999999999")) for _ in range(2)))

    result = rollup_run(now=LATER)

    assert result.events == 2
    assert FillState.objects.get(name="requests").watermark == LATER - dt.timedelta(seconds=5)
    assert_rollups_match_raw(events=good)
    [left_out] = quarantined("RequestEvent")
    assert (left_out.stat, left_out.count, sorted(left_out.examples)) == ("requests", 2, sorted(e.id for e in bad))
    assert "list_cost" in left_out.reason
    assert rollup_run(now=LATER + dt.timedelta(minutes=1)).events == 0
    assert RollupQuarantine.objects.count() == 1  # left out once, not at every run


def test_samples_with_readings_no_hardware_produces_are_left_out_and_the_gpus_page_works() -> None:
    now = timezone.now().replace(microsecond=0) - dt.timedelta(minutes=5)
    RuntimeSample.objects.bulk_create([runtime_sample(now), runtime_sample(now + SECOND, tokens_per_s=1e308),
                                       runtime_sample(now + 2 * SECOND, tokens_per_s=1e308)])
    DeviceSample.objects.bulk_create([device_sample(now), device_sample(now + SECOND, mem_used=2**63 - 1),
                                      device_sample(now + 2 * SECOND, mem_used=2**63 - 1)])
    pm = logged_in()
    assert pm.get("/gpus/").status_code == 200  # the raw tail holds them before the run

    result = sample_rollup_run(now=now + dt.timedelta(minutes=5))

    assert (result.runtime_samples, result.device_samples) == (1, 1)
    assert {(q.source, q.count) for q in RollupQuarantine.objects.all()} == {("RuntimeSample", 2), ("DeviceSample", 2)}
    assert "tokens_per_s" in quarantined("RuntimeSample")[0].reason
    assert "mem_used" in quarantined("DeviceSample")[0].reason
    assert pm.get("/gpus/").status_code == 200
    RuntimeSample.objects.filter(tokens_per_s__gt=1e9).delete()
    DeviceSample.objects.filter(mem_used__gt=2**50).delete()
    assert_sample_rollups_match_raw()  # exactly the good samples


def test_a_rollup_row_the_database_refuses_is_left_out_and_the_rest_written() -> None:
    good = store(event(), event(started_at=T0 + 61 * SECOND))
    store(event(tenant="globex"))
    refuse_rollup_rows_of("globex")

    result = rollup_run(now=LATER)

    assert result.events == 3
    assert FillState.objects.get(name="requests").watermark == LATER - dt.timedelta(seconds=5)
    assert not Rollup.objects.filter(tenant="globex").exists()
    assert MarginalRollup.objects.filter(dimension="tenant", value="globex").count() == 3  # another table: written
    for granularity in ("minute", "hour", "day"):  # the rest of the detail rows, exactly
        assert rollup_totals(granularity) == raw_totals(granularity, good)
    [left_out] = quarantined("Rollup")
    assert (left_out.stat, left_out.count) == ("requests", 3)  # its minute, hour and day rows
    assert "globex" in str(left_out.examples)


def test_a_rollup_row_whose_total_would_not_fit_its_column_is_left_out() -> None:
    store(event(prompt_tokens=10))
    Rollup.objects.create(granularity="day", bucket=T0.replace(hour=0), tenant="acme", feature="chat",
                          model="smollm2", status_class="ok", requests=1, prompt_tokens=2**63 - 5)

    rollup_run(now=LATER)

    assert Rollup.objects.get(granularity="minute").prompt_tokens == 10
    assert Rollup.objects.get(granularity="day").prompt_tokens == 2**63 - 5  # left as it was
    [left_out] = quarantined("Rollup")
    assert left_out.count == 1
    assert left_out.reason == f"prompt_tokens: {2**63 + 5} does not fit a BigIntegerField"


def test_a_sample_rollup_row_the_database_refuses_is_left_out() -> None:
    now = timezone.now().replace(microsecond=0) - dt.timedelta(minutes=5)
    RuntimeSample.objects.bulk_create([runtime_sample(now, runtime_id="rt-1"), runtime_sample(now, runtime_id="rt-2")])
    refuse_rows_of("telemetry_runtimerollup", "runtime_id", "rt-2")

    result = sample_rollup_run(now=now + dt.timedelta(minutes=5))

    assert result.runtime_samples == 2
    assert set(RuntimeRollup.objects.values_list("runtime_id", flat=True)) == {"rt-1"}
    assert quarantined("RuntimeRollup")[0].count == 3
    assert not DeviceRollup.objects.exists()


def refuse_rollup_rows_of(tenant: str) -> None:
    refuse_rows_of("telemetry_rollup", "tenant", tenant)


def refuse_rows_of(table: str, column: str, value: str) -> None:
    """Make the database refuse to insert rows of ``table`` whose ``column`` is ``value``: a fault
    the rollup writer cannot foresee."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(f"""
                CREATE FUNCTION refuse_{table}() RETURNS trigger AS $$
                BEGIN
                  IF NEW.{column} = '{value}' THEN
                    RAISE EXCEPTION 'refused by a test' USING ERRCODE = 'numeric_value_out_of_range';
                  END IF;
                  RETURN NEW;
                END $$ LANGUAGE plpgsql""")
            cursor.execute(f"CREATE TRIGGER refuse BEFORE INSERT ON {table} FOR EACH ROW "
                           f"EXECUTE FUNCTION refuse_{table}()")
        else:
            cursor.execute(f"CREATE TRIGGER refuse BEFORE INSERT ON {table} WHEN NEW.{column} = '{value}' "
                           "BEGIN SELECT RAISE(ABORT, 'refused by a test'); END")


def test_nothing_is_quarantined_when_nothing_is_wrong() -> None:
    store(event(), event(tenant="globex"))
    RuntimeSample.objects.bulk_create([runtime_sample(T0)])

    rollup_run(now=LATER)
    sample_rollup_run(now=LATER)

    assert not RollupQuarantine.objects.exists()
    assert RequestEvent.objects.count() == 2
