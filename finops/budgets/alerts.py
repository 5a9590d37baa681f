"""Alert emails for threshold and forecast events, each sent once.

Evaluation only writes ``BudgetEvent`` rows with ``alert_status = pending``. ``alerts_send`` picks
pending rows (``SELECT … FOR UPDATE SKIP LOCKED``, so concurrent senders take different rows) and
claims each with a conditional ``UPDATE … WHERE alert_status = 'pending'`` committed *before* the
email goes out: only the sender whose update changed the row sends it (the conditional update is
what guarantees it where rows cannot be locked, as on SQLite). A send that raised is queued again,
up to ``MAX_ATTEMPTS``.

A claim is a lease of ``ALERT_CLAIM_LEASE_SECONDS`` (five minutes) with a token of its own: a sender
killed between the claim and the send leaves the event ``sending``, and once the lease has run out
the next sender claims it again with a new token (a claim lapsed ``MAX_ATTEMPTS`` times is given up as
failed). So that a sender that is slow but alive does not send a second email beside the one that
took over, it renews its lease with its token right before it hands the message to the mail server
and sends nothing if the token is no longer the event's. Once the email has gone out the event is
marked sent whoever holds it, which stops a sender that reclaimed it and has not yet renewed.
The window left: a sender whose hand-over to the mail server itself outlasts the lease (each socket
operation is bounded by ``EMAIL_TIMEOUT``, 30 s, a small fraction of the lease; or its process is
frozen that long) while another reclaims, renews and sends; that case is logged as a possible duplicate.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.mail import EmailMultiAlternatives
from django.db import transaction
from django.db.models import F, Q
from django.template.loader import render_to_string
from django.utils import timezone

from finops.budgets.models import Action, AlertStatus, Budget, BudgetEvent, EventKind
from finops.budgets.periods import period_at
from finops.budgets.selectors import amount_label
from finops.lib.timezones import org_time_zone

logger = logging.getLogger("finops.budgets")

MAX_ATTEMPTS = 5
CLAIM_BATCH = 50


@dataclass
class AlertsResult:
    sent: int = 0
    failed: int = 0
    no_recipients: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"sent": self.sent, "failed": self.failed, "no_recipients": self.no_recipients}


def alerts_send(*, now: dt.datetime | None = None) -> AlertsResult:
    """Send every pending alert, and every one whose sender's lease ran out, once; return what
    became of them. ``now`` stands in for the clock (tests)."""
    result = AlertsResult()
    skipped: set[int] = set()
    _lapsed_claims_give_up(lapsed=_lapsed(now or timezone.now()))
    while True:
        moment = now or timezone.now()
        claimable = Q(alert_status=AlertStatus.PENDING) | Q(_lapsed(moment), attempts__lt=MAX_ATTEMPTS)
        with transaction.atomic():
            candidates = list(BudgetEvent.objects.select_for_update(skip_locked=True).filter(claimable)
                              .exclude(pk__in=skipped).order_by("pk").values_list("pk", flat=True)[:CLAIM_BATCH])
            claims = [(pk, token) for pk in candidates if (token := _claim(pk, claimable, moment))]
        if not candidates:
            return result
        skipped.update(candidates)
        for pk, token in claims:
            _deliver(pk, token, result, now=now)


def _lapsed(now: dt.datetime) -> Q:
    """Alerts claimed by a sender whose lease has run out by ``now``."""
    lease_start = now - dt.timedelta(seconds=settings.ALERT_CLAIM_LEASE_SECONDS)
    return Q(alert_status=AlertStatus.SENDING) & (Q(claimed_at__isnull=True) | Q(claimed_at__lt=lease_start))


def _lapsed_claims_give_up(*, lapsed: Q) -> None:
    """An alert whose every attempt ended with its sender gone (a message that kills the worker) fails."""
    BudgetEvent.objects.filter(lapsed, attempts__gte=MAX_ATTEMPTS).update(
        alert_status=AlertStatus.FAILED, last_error=f"The sender stopped before finishing, {MAX_ATTEMPTS} times.")


def _claim(pk: int, claimable: Q, now: dt.datetime) -> uuid.UUID | None:
    token = uuid.uuid4()
    claimed = BudgetEvent.objects.filter(claimable, pk=pk).update(
        alert_status=AlertStatus.SENDING, claimed_at=now, claim_token=token, attempts=F("attempts") + 1)
    return token if claimed else None


def _held(pk: int, token: uuid.UUID) -> Any:
    return BudgetEvent.objects.filter(pk=pk, claim_token=token, alert_status=AlertStatus.SENDING)


def _deliver(pk: int, token: uuid.UUID, result: AlertsResult, *, now: dt.datetime | None) -> None:
    event = BudgetEvent.objects.select_related("budget").filter(pk=pk).first()
    if event is None:  # its budget was deleted after the claim
        return
    recipients = list(event.budget.recipients)
    if not recipients:
        _held(pk, token).update(alert_status=AlertStatus.NO_RECIPIENTS)
        result.no_recipients += 1
        return
    message = alert_message(event=event)
    # The lease is renewed as late as possible: from here on the email may go out.
    if not _held(pk, token).update(claimed_at=now or timezone.now()):
        logger.warning("budget alert %s: another sender took it over after this one's lease ran out; not sent", pk)
        return
    try:
        message.send()
    except Exception as exc:  # SMTP refusals and network errors: nothing was delivered, try again later
        logger.warning("budget alert %s: sending failed: %s", pk, exc)
        retry = event.attempts < MAX_ATTEMPTS
        _held(pk, token).update(alert_status=AlertStatus.PENDING if retry else AlertStatus.FAILED,
                                last_error=f"{type(exc).__name__}: {exc}"[:2000])
        result.failed += 1
        return
    _mark_sent(pk, token, now=now)
    result.sent += 1


def _mark_sent(pk: int, token: uuid.UUID, *, now: dt.datetime | None) -> None:
    """The email went out: the event says so whoever holds it now, so that no later sender repeats it."""
    sent = {"alert_status": AlertStatus.SENT, "sent_at": now or timezone.now(), "last_error": ""}
    if not BudgetEvent.objects.filter(pk=pk, claim_token=token).update(**sent):
        BudgetEvent.objects.filter(pk=pk).update(**sent)
        logger.warning("budget alert %s: sent after this sender's lease ran out; another sender may have sent it "
                       "too", pk)


def alerts_requeue(*, events: Any) -> int:
    """Queue failed or interrupted alerts again (an admin's decision: an interrupted one may have
    gone out already)."""
    return events.filter(alert_status__in=[AlertStatus.FAILED, AlertStatus.SENDING]).update(
        alert_status=AlertStatus.PENDING, attempts=0)


def action_summary(*, budget: Budget, event: BudgetEvent) -> str:
    """What Wattson did, or will do, about the budget: the sentence the email leads with."""
    reset = timezone.localtime(period_at(budget.period, event.period_start).end, org_time_zone())
    until = f"until the {budget.period_noun} resets at {reset:%Y-%m-%d %H:%M %Z}"
    scope = budget.scope_label
    reached = event.kind == EventKind.THRESHOLD and (event.threshold or 0) >= 100
    if budget.is_hard:
        if reached:
            return f"Hard limit reached: the runtimes refuse requests for {scope} {until}."
        return (f"This is a hard budget: the runtimes reserve every request for {scope} against it and will "
                f"refuse any that would take it past its limit.")
    doing = {
        Action.ALERT_ONLY: "This budget only alerts: no requests are limited",
        Action.BLOCK: f"Requests for {scope} are blocked",
        Action.THROTTLE: f"Requests for {scope} are throttled to {_throttle(budget)}",
        Action.DOWNGRADE: f"Requests for {scope} are served by {budget.downgrade_model} instead",
    }[budget.action]
    if budget.cap_max_tokens and budget.action in (Action.THROTTLE, Action.DOWNGRADE):
        doing += f", with max_tokens capped at {budget.cap_max_tokens}"
    if budget.action == Action.ALERT_ONLY:
        return doing + "."
    if reached:
        return f"{doing} {until}."
    return f"Nothing has been limited yet. At 100% of the limit: {doing[0].lower()}{doing[1:]} {until}."


def _throttle(budget: Budget) -> str:
    parts = []
    if budget.throttle_tokens_per_minute:
        parts.append(f"{budget.throttle_tokens_per_minute:,} tokens/minute")
    if budget.throttle_requests_per_minute:
        parts.append(f"{budget.throttle_requests_per_minute:,} requests/minute")
    return " and ".join(parts)


def alert_message(*, event: BudgetEvent) -> EmailMultiAlternatives:
    """The email for a threshold or forecast event: subject, plain text and HTML from three templates."""
    budget = event.budget
    tz = org_time_zone()
    context = {
        "budget": budget, "event": event, "is_forecast": event.kind == EventKind.FORECAST,
        # A hard budget used up short of the threshold: what is left cannot fit another request.
        "exhausted": event.kind == EventKind.THRESHOLD and event.spend * 100 < event.limit * (event.threshold or 0),
        "spend": amount_label(event.unit, event.spend), "limit": amount_label(event.unit, event.limit),
        "percent": f"{event.spend / event.limit * 100:.1f}" if event.limit else "n/a",
        "forecast_at": timezone.localtime(event.forecast_at, tz) if event.forecast_at else None,
        "resets_at": timezone.localtime(period_at(budget.period, event.period_start).end, tz),
        "action": action_summary(budget=budget, event=event),
        "url": settings.SITE_URL + budget.get_absolute_url(),
    }
    subject = " ".join(render_to_string("emails/budget_alert_subject.txt", context).split())
    text = render_to_string("emails/budget_alert.txt", context)
    html = render_to_string("emails/budget_alert.html", context)
    message = EmailMultiAlternatives(subject=subject, body=text, to=list(budget.recipients))
    message.attach_alternative(html, "text/html")
    return message
