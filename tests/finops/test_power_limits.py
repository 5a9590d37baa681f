"""A GPU's power limit changing (a power cap set or lifted) is listed with energy per 1k tokens and
tokens/s on that GPU in the minutes before against the minutes after, from what runtimes sent."""

from __future__ import annotations

import datetime as dt
import html
import re
from typing import Any

import pytest
from django.utils import timezone

from finops.telemetry.power_limits import power_limit_changes
from tests.finops.dashboard_factories import logged_in
from tests.finops.factories import batch_body, device_dict, event_dict, sample_dict

pytestmark = pytest.mark.django_db

GPU = "GPU-00000000-0000-0000-0000-000000000001"


def minute(at: dt.datetime, n: int) -> dt.datetime:
    return at + dt.timedelta(minutes=n)


@pytest.fixture
def capped_at(post_batch: Any) -> dt.datetime:
    """Ten minutes at 700 W drawing 1000 J a minute, then ten at 400 W drawing 600 J a minute;
    three requests of 100 + 200 tokens before, three of 100 + 100 after."""
    change = (timezone.now() - dt.timedelta(minutes=30)).replace(second=0, microsecond=0)
    samples, energy = [], 1e6
    for n in range(-10, 10):
        samples.append(sample_dict(at=minute(change, n), devices=[device_dict(
            device=GPU, power_limit_w=700.0 if n < 0 else 400.0, energy_joules_total=energy)]))
        energy += 1000 if n < -1 else 600
    events = [event_dict(started_at=minute(change, n), device=GPU, prompt_tokens=100,
                         completion_tokens=200 if n < 0 else 100, gpu_seconds=1.0) for n in (-9, -6, -3, 1, 4, 7)]
    response = post_batch(batch_body(events=events, samples=samples))
    assert response.json()["accepted"] == len(events) + len(samples), response.json()
    return change


def test_a_limit_change_shows_energy_per_token_and_throughput_before_and_after(capped_at: dt.datetime) -> None:
    (change,) = power_limit_changes(start=capped_at - dt.timedelta(hours=1), end=capped_at + dt.timedelta(hours=1))

    assert (change.device, change.at, change.from_w, change.to_w) == (GPU, capped_at, 700.0, 400.0)
    assert change.before.energy_joules == pytest.approx(9 * 1000)
    assert change.after.energy_joules == pytest.approx(9 * 600)
    assert change.before.joules_per_1k_tokens == pytest.approx(9000 / 900 * 1000)
    assert change.after.joules_per_1k_tokens == pytest.approx(5400 / 600 * 1000)
    assert change.before.tokens_per_s == pytest.approx(600 / 600)
    assert change.after.tokens_per_s == pytest.approx(300 / 600)


def test_a_change_outside_the_range_is_not_listed(capped_at: dt.datetime) -> None:
    assert power_limit_changes(start=capped_at + dt.timedelta(minutes=1), end=capped_at + dt.timedelta(hours=1)) == []


def test_without_an_energy_counter_or_tokens_the_figures_are_unmeasured(post_batch: Any) -> None:
    change = (timezone.now() - dt.timedelta(minutes=30)).replace(second=0, microsecond=0)
    samples = [sample_dict(at=minute(change, n), devices=[device_dict(
        device=GPU, power_limit_w=300.0 if n < 0 else 250.0, energy_joules_total=None)]) for n in range(-3, 3)]
    post_batch(batch_body(samples=samples))

    (listed,) = power_limit_changes(start=change - dt.timedelta(hours=1), end=change + dt.timedelta(hours=1))

    assert listed.before.joules_per_1k_tokens is None and listed.after.tokens_per_s is None


def test_the_gpus_page_lists_the_change_with_its_figures(capped_at: dt.datetime) -> None:
    page = logged_in("product-manager", "pat").get("/gpus/?range=24h")
    text = html.unescape(re.sub(r"\s+", " ", page.content.decode()))

    table = text.split('id="power-limits"')[1].split("</table>")[0]
    assert "700 W → 400 W" in table
    assert "10 kJ" in table and "9 kJ" in table
    assert '<td class="num">1</td><td class="num">0.5</td>' in table
