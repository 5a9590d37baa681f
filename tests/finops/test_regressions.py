"""Cost regressions: 30 days of noisy, mixed traffic whose prompt grows by two paragraphs at a known
hour is flagged with that start hour (±1 h) within 6 hours, by the hourly check the control plane
runs; 30 days without a change raise nothing; one email goes out per regression; an admin
acknowledges it; a shift in the mix, one outlier hour or a fall is not a regression."""

from __future__ import annotations

import datetime as dt
import random
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.core import mail
from django.test import Client, override_settings

from bench.regression_detection import START, hourly_traffic
from finops.regressions.alerts import regression_alerts_send
from finops.regressions.detection import BASELINE, WATCH, changepoint_find
from finops.regressions.models import AlertStatus, CostRegression, Metric
from finops.regressions.services import regressions_detect
from finops.telemetry.models import ClientTask, Granularity, Rollup

pytestmark = pytest.mark.django_db

HOUR = dt.timedelta(hours=1)
DAYS = 30
CHANGE = START + dt.timedelta(days=20, hours=14, minutes=0)
TWO_PARAGRAPHS = 150  # prompt tokens


def store_hours(feature: str, hours: dict[dt.datetime, dict[tuple[str, str], tuple[float, float]]]) -> None:
    """Generated traffic as the hour rollups hold it: requests that a model answered and their tokens."""
    Rollup.objects.bulk_create([
        Rollup(granularity=Granularity.HOUR, bucket=hour, tenant=tenant, feature=feature, model=model,
               status_class="ok", requests=int(n), client_requests=int(n), prompt_tokens=int(tokens))
        for hour, cells in hours.items() for (tenant, model), (n, tokens) in cells.items()], batch_size=2000)


def check_every_hour(*, until: dt.datetime = START + DAYS * 24 * HOUR) -> dict[int, dt.datetime]:
    """Run the hourly check from the first hour with a full baseline; when each regression was found."""
    found_at: dict[int, dt.datetime] = {}
    now = START + WATCH + BASELINE
    while now <= until:
        for pk in regressions_detect(now=now + dt.timedelta(minutes=3)).found:
            found_at[pk] = now
        now += HOUR
    return found_at


def test_a_prompt_that_grows_by_two_paragraphs_is_flagged_within_six_hours_with_its_start_hour() -> None:
    store_hours("summarise", hourly_traffic(seed=18, days=DAYS, change_at=CHANGE, growth=TWO_PARAGRAPHS))
    found_at = check_every_hour()
    regression = CostRegression.objects.get()
    assert (regression.feature, regression.model, regression.metric) == ("summarise", "", Metric.TOKENS_PER_REQUEST)
    assert abs(regression.started_at - CHANGE) <= HOUR, regression.started_at
    assert found_at[regression.pk] <= CHANGE + 6 * HOUR, found_at[regression.pk]
    # The size at the same mix: about 150 tokens more per request on a mean near 700.
    assert 0.12 < regression.change < 0.35, regression.change
    assert regression.alert_status == AlertStatus.PENDING


def test_thirty_days_of_noisy_mixed_traffic_without_a_change_raise_no_alarm() -> None:
    store_hours("search", hourly_traffic(seed=1018, days=DAYS))
    store_hours("chat", hourly_traffic(seed=2018, days=DAYS, scale=0.1))  # a tenth of the traffic
    check_every_hour()
    assert list(CostRegression.objects.all()) == []


def regression(**fields: object) -> CostRegression:
    values = {"feature": "summarise", "model": "", "metric": Metric.TOKENS_PER_REQUEST, "started_at": CHANGE,
              "detected_at": CHANGE + 3 * HOUR, "before": 700.0, "after": 850.0, "score": 7.0, **fields}
    return CostRegression.objects.create(**values)


@override_settings(REGRESSION_ALERT_EMAILS=["finops@example.com"], SITE_URL="https://wattson.example")
def test_one_alert_email_per_regression_with_before_after_start_hour_and_a_link() -> None:
    regression()
    first, again = regression_alerts_send(), regression_alerts_send()
    assert (first.sent, again.sent) == (1, 0)
    [message] = mail.outbox
    assert message.to == ["finops@example.com"]
    assert "summarise" in message.subject and "+21%" in message.subject
    assert "700 tokens" in message.body and "850 tokens" in message.body
    assert "2026-10-21 14:00" in message.body  # the start hour (org time zone UTC in tests)
    assert "https://wattson.example/features/summarise/?range=custom" in message.body
    assert CostRegression.objects.get().alert_status == AlertStatus.SENT


def test_without_recipients_the_alert_says_so_instead_of_vanishing() -> None:
    regression()
    assert regression_alerts_send().no_recipients == 1
    assert CostRegression.objects.get().alert_status == AlertStatus.NO_RECIPIENTS
    assert mail.outbox == []


def test_an_admin_acknowledges_a_regression() -> None:
    row = regression()
    admin = get_user_model().objects.create_superuser("root", "root@example.com", "pw")
    client = Client()
    client.force_login(admin)
    response = client.post("/admin/regressions/costregression/",
                           {"action": "acknowledge", "_selected_action": [row.pk]}, follow=True)
    assert response.status_code == 200
    row.refresh_from_db()
    assert row.acknowledged_at is not None and row.acknowledged_by == admin


def test_cost_per_successful_task_that_jumps_is_a_regression_of_that_metric() -> None:
    rng = random.Random(7)
    change = START + dt.timedelta(days=9, hours=10)
    tasks = []
    for i in range(10 * 24):
        hour = START + i * HOUR
        for k in range(rng.randint(8, 14)):
            model = "big" if k % 3 == 0 else "smollm2"
            cost = (0.004 if model == "big" else 0.001) * rng.lognormvariate(0, 0.3) * (1.5 if hour >= change else 1)
            tasks.append(ClientTask(tenant="acme", task_id=f"t{i}-{k}", feature="support", model=model,
                                    model_at=hour, first_started_at=hour + dt.timedelta(minutes=k),
                                    last_started_at=hour, attempts=1, requests=1, succeeded=True,
                                    list_cost=Decimal(f"{cost:.9f}")))
    ClientTask.objects.bulk_create(tasks)
    for hours_after in range(1, 7):
        regressions_detect(now=change + hours_after * HOUR)
    found = CostRegression.objects.get(metric=Metric.COST_PER_SUCCESSFUL_TASK)
    assert found.feature == "support" and abs(found.started_at - change) <= HOUR
    assert found.change == pytest.approx(0.5, abs=0.15)


# -- the method on its own ------------------------------------------------------------------------

def _steady(hours: int, *, start: dt.datetime = START, seed: int = 3, scale: float = 1.0,
            level: float = 400.0) -> dict[dt.datetime, dict[tuple[str, str], tuple[float, float]]]:
    rng = random.Random(seed)
    result = {}
    for i in range(hours):
        cells = {}
        for cell, (rate, mean) in {("a", "m"): (30 * scale, level), ("b", "m"): (10, level * 4)}.items():
            n = rng.randint(int(rate * 0.7), int(rate * 1.3))
            cells[cell] = (float(n), sum(mean * rng.lognormvariate(-0.045, 0.3) for _ in range(n)))
        result[start + i * HOUR] = cells
    return result


def test_a_shift_in_the_mix_toward_long_documents_is_not_a_regression() -> None:
    baseline = _steady(7 * 24)
    watched = _steady(24, start=START + 7 * 24 * HOUR, seed=4, scale=0.1)  # "a" drops: "b"'s long prompts dominate
    assert changepoint_find(baseline=baseline, watched=watched) is None


def test_one_outlier_hour_is_not_a_regression_but_three_at_the_new_level_are() -> None:
    baseline = _steady(7 * 24)
    watched = _steady(24, start=START + 7 * 24 * HOUR, seed=5)
    outlier = START + 7 * 24 * HOUR + 5 * HOUR
    watched[outlier] = {cell: (n, total * 5) for cell, (n, total) in watched[outlier].items()}
    assert changepoint_find(baseline=baseline, watched=watched) is None
    for i in range(12, 24):
        hour = START + (7 * 24 + i) * HOUR
        watched[hour] = {cell: (n, total * 1.4) for cell, (n, total) in watched[hour].items()}
    found = changepoint_find(baseline=baseline, watched=watched)
    start = START + (7 * 24 + 12) * HOUR
    assert found is not None and abs(found.started_at - start) <= HOUR, found
    assert found.detected_at <= start + 4 * HOUR
    assert found.change == pytest.approx(0.4, abs=0.1)


def test_a_fall_is_not_a_regression() -> None:
    baseline = _steady(7 * 24)
    watched = {h: {c: (n, t * 0.5) for c, (n, t) in cells.items()}
               for h, cells in _steady(24, start=START + 7 * 24 * HOUR, seed=6).items()}
    assert changepoint_find(baseline=baseline, watched=watched) is None
