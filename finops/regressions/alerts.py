"""One alert email per cost regression, claimed before it is sent (the budgets' alert shape, ``budgets.alerts``).

Detection only writes ``CostRegression`` rows with ``alert_status = pending``. ``regression_alerts_send``
claims each with a conditional ``UPDATE … WHERE alert_status = 'pending'`` (or a claim whose lease of
``ALERT_CLAIM_LEASE_SECONDS`` has run out: its sender died) committed before the email goes out, so
two senders never both send one; a send that raised is pending again, up to ``MAX_ATTEMPTS``.
Recipients: ``REGRESSION_ALERT_EMAILS``, else every active superuser with an email address.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from dataclasses import dataclass
from urllib.parse import urlencode

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import EmailMultiAlternatives
from django.db.models import F, Q
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone

from finops.lib.timezones import org_time_zone
from finops.regressions.models import AlertStatus, CostRegression, Metric

logger = logging.getLogger("finops.regressions")
MAX_ATTEMPTS = 5


@dataclass
class RegressionAlerts:
    sent: int = 0
    failed: int = 0
    no_recipients: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"sent": self.sent, "failed": self.failed, "no_recipients": self.no_recipients}


def recipients() -> list[str]:
    if settings.REGRESSION_ALERT_EMAILS:
        return list(settings.REGRESSION_ALERT_EMAILS)
    users = get_user_model().objects.filter(is_superuser=True, is_active=True).exclude(email="")
    return sorted(users.values_list("email", flat=True))


def regression_alerts_send(*, now: dt.datetime | None = None) -> RegressionAlerts:
    """Send the email of every pending regression (and of every one whose sender's lease ran out), once."""
    result = RegressionAlerts()
    moment = now or timezone.now()
    lapsed = Q(alert_status=AlertStatus.SENDING,
               claimed_at__lt=moment - dt.timedelta(seconds=settings.ALERT_CLAIM_LEASE_SECONDS))
    claimable = (Q(alert_status=AlertStatus.PENDING) | lapsed) & Q(attempts__lt=MAX_ATTEMPTS)
    CostRegression.objects.filter(lapsed, attempts__gte=MAX_ATTEMPTS).update(
        alert_status=AlertStatus.FAILED, last_error=f"The sender stopped before finishing, {MAX_ATTEMPTS} times.")
    for pk in list(CostRegression.objects.filter(claimable).order_by("pk").values_list("pk", flat=True)):
        token = uuid.uuid4()
        if not CostRegression.objects.filter(claimable, pk=pk).update(
                alert_status=AlertStatus.SENDING, claimed_at=moment, claim_token=token, attempts=F("attempts") + 1):
            continue  # another sender claimed it first
        _deliver(CostRegression.objects.get(pk=pk), token, result, now=moment)
    return result


def _deliver(regression: CostRegression, token: uuid.UUID, result: RegressionAlerts, *, now: dt.datetime) -> None:
    held = CostRegression.objects.filter(pk=regression.pk, claim_token=token, alert_status=AlertStatus.SENDING)
    to = recipients()
    if not to:
        held.update(alert_status=AlertStatus.NO_RECIPIENTS)
        result.no_recipients += 1
        return
    try:
        regression_message(regression=regression, to=to).send()
    except Exception as exc:  # SMTP refusals and network errors: nothing was delivered, try again later
        logger.warning("regression alert %s: sending failed: %s", regression.pk, exc)
        retry = regression.attempts < MAX_ATTEMPTS
        held.update(alert_status=AlertStatus.PENDING if retry else AlertStatus.FAILED,
                    last_error=f"{type(exc).__name__}: {exc}"[:2000])
        result.failed += 1
        return
    CostRegression.objects.filter(pk=regression.pk).update(alert_status=AlertStatus.SENT, sent_at=now, last_error="")
    result.sent += 1


def regression_url(regression: CostRegression) -> str:
    """The feature's page over the day before the regression to the day after it was detected."""
    tz = org_time_zone()
    start = timezone.localtime(regression.started_at - dt.timedelta(days=1), tz)
    end = timezone.localtime(regression.detected_at + dt.timedelta(days=1), tz)
    query = {"range": "custom", "start": f"{start:%Y-%m-%dT%H:%M}", "end": f"{end:%Y-%m-%dT%H:%M}"}
    if regression.model:
        query["model"] = regression.model
    return settings.SITE_URL + reverse("dashboards:feature", args=[regression.feature]) + "?" + urlencode(query)


def _amount(metric: str, value: float) -> str:
    return f"${value:,.6f}" if metric == Metric.COST_PER_SUCCESSFUL_TASK else f"{value:,.0f} tokens"


def regression_message(*, regression: CostRegression, to: list[str]) -> EmailMultiAlternatives:
    """Subject, plain text and HTML from three templates."""
    context = {
        "regression": regression, "metric": regression.get_metric_display(),
        "before": _amount(regression.metric, regression.before), "after": _amount(regression.metric, regression.after),
        "change": f"{regression.change:+.0%}",
        "started_at": timezone.localtime(regression.started_at, org_time_zone()),
        "detected_at": timezone.localtime(regression.detected_at, org_time_zone()),
        "url": regression_url(regression),
    }
    subject = " ".join(render_to_string("emails/regression_alert_subject.txt", context).split())
    message = EmailMultiAlternatives(subject=subject, body=render_to_string("emails/regression_alert.txt", context),
                                     to=to)
    message.attach_alternative(render_to_string("emails/regression_alert.html", context), "text/html")
    return message
