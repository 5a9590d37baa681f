"""The runtimes table shows each model's circuit breaker as the runtime's samples last reported it,
and since when it has held that state; a runtime that does not report breakers shows n/a."""

from __future__ import annotations

import csv
import datetime as dt
import html
import io
import re
from typing import Any

import pytest
from django.utils import timezone

from finops.telemetry.breakers import breaker_states
from tests.finops.dashboard_factories import logged_in
from tests.finops.factories import batch_body, sample_dict

pytestmark = pytest.mark.django_db


def test_each_model_s_breaker_and_since_when_it_holds_its_state(post_batch: Any) -> None:
    now = timezone.now().replace(microsecond=0)
    history = [("closed", "closed", 10), ("open", "closed", 8), ("open", "closed", 6), ("half_open", "closed", 4),
               ("open", "closed", 2), ("open", "closed", 1)]
    post_batch(batch_body(samples=[sample_dict(at=now - dt.timedelta(minutes=m), breakers={"big": big, "tiny": tiny})
                                   for big, tiny, m in history]))
    states = {b.model: b for b in breaker_states(runtime_ids=["rt-1"])["rt-1"]}
    assert (states["big"].state, states["big"].since, states["big"].at_least) == (
        "open", now - dt.timedelta(minutes=2), False)
    assert (states["tiny"].state, states["tiny"].since, states["tiny"].at_least) == (
        "closed", now - dt.timedelta(minutes=10), True)

    client = logged_in()
    page = html.unescape(re.sub(r"\s+", " ", client.get("/gpus/").content.decode()))
    table = re.sub(r"<[^>]+>", "", page.split('id="runtimes"')[1].split("</table>")[0])
    assert "big: open since" in table and "tiny: closed since at least" in table
    [row] = list(csv.DictReader(io.StringIO(client.get("/gpus/?format=csv&table=runtimes").content.decode())))
    assert row["breakers"].startswith("big=open@") and ";tiny=closed@>=" in row["breakers"]


def test_a_runtime_that_reports_no_breakers_shows_na(post_batch: Any) -> None:
    post_batch(batch_body(samples=[sample_dict()]))
    assert breaker_states(runtime_ids=["rt-1"]) == {}
    table = logged_in().get("/gpus/").content.decode().split('id="runtimes"')[1].split("</table>")[0]
    assert "n/a" in table
