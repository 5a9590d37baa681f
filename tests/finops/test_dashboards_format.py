"""Numbers for people: currency, SI units, percentages, durations; "n/a" for what was not measured."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from finops.dashboards.templatetags import dashboard_format as f


@pytest.mark.parametrize(("value", "shown"), [
    (Decimal("1234.5"), "$1,234.50"), (Decimal("0.0123"), "$0.0123"), (Decimal("0.5"), "$0.50"),
    (Decimal("0.00000123"), "$1.2e-06"),
    (Decimal(0), "$0.00"), (None, "n/a"),
])
def test_money(value: Decimal | None, shown: str) -> None:
    assert f.money(value) == shown


def test_si_units_counts_and_percentages() -> None:
    assert f.si(1_234_567) == "1.23M"
    assert f.si(500.0, "W") == "500 W"
    assert f.si(2500.0, "W") == "2.5 kW"
    assert f.count(12345) == "12,345"
    assert f.percent(0.1234) == "12.3%"
    assert f.percent_of_100(80.4) == "80%"
    assert f.duration_ms(250.0) == "250 ms" and f.duration_ms(1500.0) == "1.50 s"
    assert f.bytes_(80 * 2**30) == "80.0 GiB"
    assert f.energy(7.2e6) == "7.2 MJ (2.00 kWh)"


@pytest.mark.parametrize("name", ["money", "si", "count", "percent", "percent_of_100", "duration_ms", "energy",
                                  "bytes_", "local_time"])
def test_unmeasured_is_na_never_zero(name: str) -> None:
    assert getattr(f, name)(None) == "n/a"


def test_local_time_is_in_the_org_time_zone(settings) -> None:
    settings.ORG_TIME_ZONE = "Europe/Paris"
    assert f.local_time(dt.datetime(2026, 7, 1, 12, 0, tzinfo=dt.UTC)) == "2026-07-01 14:00 CEST"
