"""Budget periods start at midnight in the organisation's time zone and reset exactly there."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from decimal import Decimal

import pytest
from django.core import mail

from finops.budgets.alerts import alerts_send
from finops.budgets.evaluation import budget_evaluate
from finops.budgets.models import Budget, BudgetEvent
from finops.budgets.periods import period_at
from tests.finops.budget_factories import budget, spend

UTC = dt.UTC
NEW_YORK = zoneinfo.ZoneInfo("America/New_York")
KOLKATA = zoneinfo.ZoneInfo("Asia/Kolkata")


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


def test_a_day_in_new_york_runs_from_local_midnight_to_local_midnight() -> None:
    period = period_at("daily", utc(2026, 11, 20, 3, 0), NEW_YORK)  # 22:00 on the 19th in New York

    assert period.start == utc(2026, 11, 19, 5, 0)
    assert period.end == utc(2026, 11, 20, 5, 0)


def test_the_day_daylight_saving_ends_has_25_hours() -> None:
    period = period_at("daily", utc(2026, 11, 1, 12, 0), NEW_YORK)

    assert period.start == utc(2026, 11, 1, 4, 0)
    assert period.end == utc(2026, 11, 2, 5, 0)
    assert period.length == dt.timedelta(hours=25)


def test_a_week_starts_on_monday_at_local_midnight() -> None:
    period = period_at("weekly", utc(2026, 11, 22, 12, 0), NEW_YORK)  # a Sunday

    assert period.start == utc(2026, 11, 16, 5, 0)  # Monday 00:00 EST
    assert period.end == utc(2026, 11, 23, 5, 0)


def test_a_month_across_a_daylight_saving_change_starts_and_ends_at_local_midnight() -> None:
    period = period_at("monthly", utc(2026, 3, 20, 12, 0), NEW_YORK)

    assert period.start == utc(2026, 3, 1, 5, 0)  # EST
    assert period.end == utc(2026, 4, 1, 4, 0)  # EDT


def test_a_half_hour_offset_zone_starts_its_month_on_the_half_hour() -> None:
    period = period_at("monthly", utc(2026, 12, 31, 18, 29), KOLKATA)

    assert (period.start, period.end) == (utc(2026, 11, 30, 18, 30), utc(2026, 12, 31, 18, 30))
    assert period_at("monthly", utc(2026, 12, 31, 18, 30), KOLKATA).start == utc(2026, 12, 31, 18, 30)


@pytest.mark.parametrize("instant", [utc(2026, 11, 20, 4, 59, 59, 999999), utc(2026, 11, 20, 5, 0)])
def test_the_boundary_belongs_to_the_new_period_and_the_instant_before_to_the_old(instant: dt.datetime) -> None:
    period = period_at("daily", instant, NEW_YORK)
    assert period.contains(instant)
    assert period.start == (utc(2026, 11, 20, 5, 0) if instant.minute == 0 else utc(2026, 11, 19, 5, 0))


@pytest.mark.django_db
def test_an_exceeded_daily_budget_resets_exactly_at_local_midnight(settings) -> None:
    settings.ORG_TIME_ZONE = "America/New_York"
    midnight = utc(2026, 11, 20, 5, 0)  # 2026-11-20 00:00 in New York
    daily = budget(name="acme daily", period="daily", limit=Decimal("5"), action="block")
    spend("6", at=midnight - dt.timedelta(minutes=1))  # 23:59 local, the old day

    budget_evaluate(budget_id=daily.pk, now=midnight - dt.timedelta(seconds=1))
    assert Budget.objects.get(pk=daily.pk).state == "exceeded"

    budget_evaluate(budget_id=daily.pk, now=midnight)

    daily.refresh_from_db()
    assert daily.state == "ok"
    assert daily.period_start == midnight
    assert daily.spend == 0
    reset = BudgetEvent.objects.filter(kind="state_change").order_by("id").last()
    assert (reset.from_state, reset.to_state, reset.period_start) == ("exceeded", "ok", midnight)
    assert "reset at 2026-11-20 00:00 EST" in reset.note


@pytest.mark.django_db
def test_spend_just_after_the_boundary_counts_in_the_new_period_and_alerts_again(settings) -> None:
    settings.ORG_TIME_ZONE = "America/New_York"
    midnight = utc(2026, 11, 20, 5, 0)
    daily = budget(name="acme daily", period="daily", limit=Decimal("5"), thresholds=[100])
    spend("5", at=midnight - dt.timedelta(minutes=1))
    budget_evaluate(budget_id=daily.pk, now=midnight - dt.timedelta(seconds=1))
    spend("5", at=midnight)

    budget_evaluate(budget_id=daily.pk, now=midnight + dt.timedelta(minutes=1))
    alerts_send()

    daily.refresh_from_db()
    assert daily.spend == Decimal("5")
    assert daily.state == "exceeded"
    assert len(mail.outbox) == 2  # 100% once in each day
    assert sorted(e.period_start for e in BudgetEvent.objects.filter(kind="threshold")) == [
        midnight - dt.timedelta(days=1), midnight]
