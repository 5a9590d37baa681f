"""Threshold crossings, state history and forecasts are recorded as events; each alert email goes
out exactly once per threshold per period, however often or concurrently evaluation and sending run."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from decimal import Decimal

import pytest
from django.core import mail
from django.db import IntegrityError, connection, transaction
from django.db.models import Q
from django.utils import timezone

from finops.budgets.alerts import MAX_ATTEMPTS, alerts_send
from finops.budgets.evaluation import budget_evaluate, budgets_evaluate
from finops.budgets.models import BudgetEvent
from finops.budgets.periods import period_at
from finops.budgets.services import budget_update
from tests.finops.budget_factories import budget
from tests.finops.budget_factories import spend as spend_at

pytestmark = pytest.mark.django_db

# An hour into this month: too early in the period for a forecast, so only thresholds alert here.
EARLY = period_at("monthly", timezone.now()).start + dt.timedelta(hours=1)


def spend(amount: str) -> None:
    spend_at(amount, at=EARLY - dt.timedelta(minutes=10))


def evaluate_and_send(now: dt.datetime = EARLY) -> None:
    budgets_evaluate(now=now)
    alerts_send()


def subjects() -> list[str]:
    return sorted(message.subject for message in mail.outbox)


def test_crossing_a_threshold_sends_one_email_naming_it() -> None:
    budget(limit=Decimal("10"))
    spend("5.5")

    evaluate_and_send()

    (message,) = mail.outbox
    assert message.subject == 'Budget "acme monthly" crossed 50%: $5.50 of $10.00'
    assert message.to == ["finance@example.com"]


def test_evaluating_again_and_again_sends_nothing_more() -> None:
    budget(limit=Decimal("10"))
    spend("5.5")

    for _ in range(3):
        evaluate_and_send()

    assert len(mail.outbox) == 1


def test_each_threshold_crossed_at_once_gets_its_own_single_email() -> None:
    budget(limit=Decimal("10"))
    spend("10.5")

    evaluate_and_send()
    evaluate_and_send()

    assert subjects() == [
        'Budget "acme monthly" crossed 100%: $10.50 of $10.00',
        'Budget "acme monthly" crossed 50%: $10.50 of $10.00',
        'Budget "acme monthly" crossed 80%: $10.50 of $10.00',
    ]


def test_the_email_has_text_and_html_a_link_to_the_budget_and_what_was_done(settings) -> None:
    settings.SITE_URL = "https://wattson.example.com"
    blocked = budget(limit=Decimal("10"), thresholds=[100], action="block")
    spend("12")

    evaluate_and_send()

    (message,) = mail.outbox
    link = f"https://wattson.example.com/budgets/{blocked.pk}/"
    html, mimetype = message.alternatives[0]
    assert mimetype == "text/html"
    assert link in message.body and f'href="{link}"' in html
    assert "What Wattson did: Requests for tenant acme are blocked until the month resets" in message.body
    assert "Requests for tenant acme are blocked" in html


def test_a_warning_email_says_what_will_happen_at_the_limit() -> None:
    budget(limit=Decimal("10"), thresholds=[50], action="throttle", throttle_requests_per_minute=30)
    spend("6")

    evaluate_and_send()

    assert ("Nothing has been limited yet. At 100% of the limit: requests for tenant acme are throttled to "
            "30 requests/minute") in mail.outbox[0].body


def test_the_database_refuses_a_second_alert_for_the_same_threshold_and_period() -> None:
    crossed = budget()
    spend("6")
    budget_evaluate(budget_id=crossed.pk, now=EARLY)
    first = BudgetEvent.objects.get(kind="threshold", threshold=50)

    with pytest.raises(IntegrityError), transaction.atomic():
        BudgetEvent.objects.create(budget=crossed, kind="threshold", threshold=50, period_start=first.period_start,
                                   spend=first.spend, limit=first.limit, unit=first.unit, alert_status="pending")


def test_a_budget_without_recipients_records_that_no_email_was_sent() -> None:
    budget(recipients=[])
    spend("6")

    evaluate_and_send()

    assert mail.outbox == []
    assert BudgetEvent.objects.get(kind="threshold").alert_status == "no_recipients"


def test_a_failed_send_is_retried_and_then_sent_once(monkeypatch: pytest.MonkeyPatch) -> None:
    budget(thresholds=[50])
    spend("6")
    budgets_evaluate(now=EARLY)
    failures = iter([ConnectionRefusedError("smtp down")])
    real_send = mail.EmailMultiAlternatives.send

    def flaky_send(self: mail.EmailMultiAlternatives, fail_silently: bool = False) -> int:
        for failure in failures:
            raise failure
        return real_send(self, fail_silently)

    monkeypatch.setattr(mail.EmailMultiAlternatives, "send", flaky_send)

    alerts_send()
    event = BudgetEvent.objects.get(kind="threshold")
    assert (event.alert_status, mail.outbox) == ("pending", [])
    assert "smtp down" in event.last_error

    alerts_send()
    alerts_send()
    assert len(mail.outbox) == 1
    assert BudgetEvent.objects.get(kind="threshold").alert_status == "sent"


class WorkerKilled(BaseException):
    """Stands in for a worker killed mid-send (SIGKILL, OOM): nothing after it runs."""


def lease(settings) -> dt.timedelta:
    return dt.timedelta(seconds=settings.ALERT_CLAIM_LEASE_SECONDS)


def a_sender_dies_while_sending(monkeypatch: pytest.MonkeyPatch, *, at: dt.datetime) -> None:
    """One pending threshold alert, claimed at ``at`` by a sender that dies before its email goes out."""
    budget(thresholds=[50])
    spend("6")
    budgets_evaluate(now=EARLY)

    def killed(self: mail.EmailMultiAlternatives, fail_silently: bool = False) -> int:
        raise WorkerKilled

    with monkeypatch.context() as patch:
        patch.setattr(mail.EmailMultiAlternatives, "send", killed)
        with pytest.raises(WorkerKilled):
            alerts_send(now=at)
    assert BudgetEvent.objects.get(kind="threshold").alert_status == "sending"


def test_an_alert_whose_sender_died_waits_out_the_lease_then_is_sent_once(monkeypatch: pytest.MonkeyPatch,
                                                                          settings) -> None:
    a_sender_dies_while_sending(monkeypatch, at=EARLY)

    alerts_send(now=EARLY + lease(settings) - dt.timedelta(seconds=1))
    assert mail.outbox == []  # the sender may still be alive: its lease holds

    alerts_send(now=EARLY + lease(settings) + dt.timedelta(seconds=1))
    alerts_send(now=EARLY + 3 * lease(settings))

    (message,) = mail.outbox
    assert "crossed 50%" in message.subject
    event = BudgetEvent.objects.get(kind="threshold")
    assert (event.alert_status, event.attempts) == ("sent", 2)


def test_a_slow_sender_whose_lease_was_taken_over_sends_nothing(monkeypatch: pytest.MonkeyPatch, settings) -> None:
    budget(thresholds=[50])
    spend("6")
    budgets_evaluate(now=EARLY)
    import finops.budgets.alerts as alerts

    real_message = alerts.alert_message
    took_over: dict[str, alerts.AlertsResult] = {}

    def slow_message(*, event: BudgetEvent) -> mail.EmailMultiAlternatives:
        # The first sender stalls after its claim; past its lease another sender claims and sends.
        monkeypatch.setattr(alerts, "alert_message", real_message)
        took_over["result"] = alerts_send(now=EARLY + lease(settings) + dt.timedelta(seconds=1))
        return real_message(event=event)

    monkeypatch.setattr(alerts, "alert_message", slow_message)
    slow = alerts_send(now=EARLY)

    assert (took_over["result"].sent, slow.sent) == (1, 0)
    assert len(mail.outbox) == 1
    assert BudgetEvent.objects.get(kind="threshold").alert_status == "sent"


def test_an_email_that_went_out_after_its_lease_ran_out_is_marked_sent_and_not_repeated(
        monkeypatch: pytest.MonkeyPatch, settings) -> None:
    budget(thresholds=[50])
    spend("6")
    budgets_evaluate(now=EARLY)
    import finops.budgets.alerts as alerts

    pk = BudgetEvent.objects.get(kind="threshold").pk
    rival: dict[str, uuid.UUID | None] = {}
    real_send = mail.EmailMultiAlternatives.send

    def slow_send(self: mail.EmailMultiAlternatives, fail_silently: bool = False) -> int:
        delivered = real_send(self, fail_silently)
        # This hand-over to the mail server outlasted the lease: another sender has claimed the alert.
        rival["token"] = alerts._claim(pk, Q(), EARLY + lease(settings) + dt.timedelta(seconds=1))
        return delivered

    with monkeypatch.context() as patch:
        patch.setattr(mail.EmailMultiAlternatives, "send", slow_send)
        alerts_send(now=EARLY)
    assert BudgetEvent.objects.get(pk=pk).alert_status == "sent"

    rival_result = alerts.AlertsResult()
    alerts._deliver(pk, rival["token"], rival_result, now=EARLY + lease(settings) + dt.timedelta(seconds=2))

    assert rival_result.sent == 0
    assert len(mail.outbox) == 1


def test_an_alert_whose_senders_keep_dying_is_given_up_as_failed(monkeypatch: pytest.MonkeyPatch, settings) -> None:
    a_sender_dies_while_sending(monkeypatch, at=EARLY)
    BudgetEvent.objects.filter(kind="threshold").update(attempts=MAX_ATTEMPTS)

    alerts_send(now=EARLY + lease(settings) + dt.timedelta(seconds=1))

    event = BudgetEvent.objects.get(kind="threshold")
    assert mail.outbox == []
    assert event.alert_status == "failed" and "stopped before finishing" in event.last_error


@pytest.mark.django_db(transaction=True)
def test_two_workers_evaluating_and_sending_at_once_send_each_alert_once() -> None:
    for name in ("acme monthly", "acme weekly"):
        budget(name=name, period="monthly" if "monthly" in name else "weekly", limit=Decimal("10"))
    spend("10.5")
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            for _ in range(3):
                evaluate_and_send()
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert errors == []
    assert len(mail.outbox) == 6  # 50, 80 and 100% of each budget
    assert len(set(subjects())) == 6
    assert BudgetEvent.objects.filter(kind="threshold").count() == 6
    assert BudgetEvent.objects.filter(kind="state_change").count() == 2  # ok → exceeded, once each


def test_a_sender_that_loses_the_claim_to_another_does_not_send(monkeypatch: pytest.MonkeyPatch) -> None:
    budget(thresholds=[50])
    spend("6")
    budgets_evaluate(now=EARLY)
    import finops.budgets.alerts as alerts

    real_claim = alerts._claim

    def rival_claims_first(pk: int, claimable: Q, now: dt.datetime) -> uuid.UUID | None:
        assert real_claim(pk, claimable, now)  # the rival sender's claim lands between our select and our claim
        return real_claim(pk, claimable, now)

    monkeypatch.setattr(alerts, "_claim", rival_claims_first)
    result = alerts_send()

    assert (result.sent, mail.outbox) == (0, [])


def test_state_history_records_ok_warning_exceeded_and_back_with_the_period() -> None:
    tracked = budget(limit=Decimal("10"), period="daily")
    start = period_at("daily", EARLY).start + dt.timedelta(minutes=30)

    spend("6")
    budget_evaluate(budget_id=tracked.pk, now=start)
    spend("5")
    budget_evaluate(budget_id=tracked.pk, now=start)
    budget_evaluate(budget_id=tracked.pk, now=start)  # no change, no row
    budget_evaluate(budget_id=tracked.pk, now=start + dt.timedelta(days=1))

    changes = list(BudgetEvent.objects.filter(kind="state_change").order_by("id").values_list("from_state", "to_state"))
    assert changes == [("ok", "warning"), ("warning", "exceeded"), ("exceeded", "ok")]


def test_raising_the_limit_moves_an_exceeded_budget_back_to_warning() -> None:
    tracked = budget(limit=Decimal("10"))
    spend("11")
    budget_evaluate(budget_id=tracked.pk, now=EARLY)

    budget_update(budget=tracked, fields={"limit": Decimal("20")})
    budget_evaluate(budget_id=tracked.pk, now=EARLY)

    last = BudgetEvent.objects.filter(kind="state_change").order_by("id").last()
    assert (last.from_state, last.to_state) == ("exceeded", "warning")


def test_a_forecast_alert_fires_once_when_the_breach_falls_inside_the_period() -> None:
    tracked = budget(period="daily", limit=Decimal("10"), thresholds=[100])
    day = period_at("daily", timezone.now())
    halfway = day.start + day.length / 2
    spend_at("6", at=day.start + dt.timedelta(minutes=5))  # 60% spent by halfway: on course for 120%

    budget_evaluate(budget_id=tracked.pk, now=halfway)
    budget_evaluate(budget_id=tracked.pk, now=halfway + dt.timedelta(minutes=10))
    alerts_send()

    (forecast,) = BudgetEvent.objects.filter(kind="forecast")
    assert day.start < forecast.forecast_at < day.end
    assert len(mail.outbox) == 1
    assert "is on course to reach its limit" in mail.outbox[0].subject


def test_no_forecast_alert_when_the_burn_rate_reaches_the_limit_only_after_the_reset() -> None:
    tracked = budget(period="daily", limit=Decimal("10"), thresholds=[100])
    day = period_at("daily", timezone.now())
    spend_at("2", at=day.start + dt.timedelta(minutes=5))

    budget_evaluate(budget_id=tracked.pk, now=day.start + day.length / 2)

    assert not BudgetEvent.objects.filter(kind="forecast").exists()


def test_a_hard_budget_whose_rest_cannot_fit_a_request_is_exceeded_and_says_so() -> None:
    from finops.runtimes.models import Runtime

    Runtime.objects.create(name="rt-1", base_url="http://rt-1.test", last_seen_at=timezone.now())
    hard = budget(limit=Decimal("0.05"), enforcement="hard", action="block", thresholds=[50, 100])
    budgets_evaluate(now=EARLY)  # the lone runtime is granted the whole limit
    for _ in range(3):
        spend_at("0.0148", at=EARLY - dt.timedelta(minutes=10))
    spend_at("0", at=EARLY - dt.timedelta(minutes=9), status="rejected_budget", rule_id=f"allowance:{hard.pk}")

    evaluate_and_send()

    hard.refresh_from_db()
    assert (hard.state, hard.spend) == ("exceeded", Decimal("0.0444"))
    assert subjects() == ['Budget "acme monthly" crossed 50%: $0.0444 of $0.0500',
                          'Budget "acme monthly" is used up: $0.0444 of $0.0500, the rest cannot fit a request']
    assert "Hard limit reached: the runtimes refuse requests for tenant acme" in mail.outbox[1].body


def test_a_hard_budget_that_refused_one_oversized_request_is_not_called_used_up() -> None:
    from finops.runtimes.models import Runtime

    Runtime.objects.create(name="rt-1", base_url="http://rt-1.test", last_seen_at=timezone.now())
    hard = budget(limit=Decimal("1"), enforcement="hard", action="block")
    budgets_evaluate(now=EARLY)
    spend_at("0.01", at=EARLY - dt.timedelta(minutes=10))
    spend_at("0", at=EARLY - dt.timedelta(minutes=9), status="rejected_budget", rule_id=f"allowance:{hard.pk}")

    budgets_evaluate(now=EARLY)

    hard.refresh_from_db()
    assert hard.state == "ok"
