"""Telemetry completeness: per runtime, the control plane knows how many events the runtime
recorded, how many it stored (each once, whatever is resent) and how many are missing, and the
runtimes table and its CSV show them (issue 15)."""

from __future__ import annotations

import csv
import datetime as dt
import html
import io
import re
from typing import Any

import pytest
from django.utils import timezone

from finops.telemetry.models import RequestEvent
from finops.telemetry.retention import retention_run
from finops.telemetry.rollups import rollup_run
from finops.telemetry.selectors import EventCompleteness, event_completeness
from tests.finops.dashboard_factories import logged_in
from tests.finops.factories import batch_body, event_dict, sample_dict

pytestmark = pytest.mark.django_db


def events(*seqs: int | None) -> list[dict[str, Any]]:
    return [event_dict(seq=seq) if seq is not None else event_dict(seq=...) for seq in seqs]


def recorded(count: int, *, minutes_ago: float = 1) -> dict[str, Any]:
    return sample_dict(at=timezone.now() - dt.timedelta(minutes=minutes_ago), events_recorded=count)


def test_a_gap_in_the_sequence_is_counted_missing(post_batch: Any) -> None:
    post_batch(batch_body(events=events(1, 2, 4), samples=[recorded(4)]))

    assert event_completeness()["rt-1"] == EventCompleteness(recorded=4, stored=3, missing=1)


def test_nothing_is_missing_when_nothing_was_lost(post_batch: Any) -> None:
    post_batch(batch_body(events=events(1, 2), samples=[recorded(2, minutes_ago=2)]))
    post_batch(batch_body(events=events(3, 4), samples=[recorded(4)]))

    assert event_completeness()["rt-1"] == EventCompleteness(recorded=4, stored=4, missing=0)


def test_records_still_on_their_way_are_not_missing(post_batch: Any) -> None:
    """The runtime has recorded 6, the control plane stored 1 to 3: 4 to 6 may be in its spool."""
    post_batch(batch_body(events=events(1, 2, 3), samples=[recorded(6)]))

    assert event_completeness()["rt-1"] == EventCompleteness(recorded=6, stored=3, missing=0)


def test_a_resent_batch_is_stored_once_and_counted_once(post_batch: Any) -> None:
    body = batch_body(events=events(1, 2, 4))
    post_batch(body)
    post_batch(body)
    post_batch(batch_body(events=events(1, 2, 4)[:1]))  # same seq, a new event id: counted, as it is stored

    counts = event_completeness()["rt-1"]

    assert RequestEvent.objects.count() == 4
    assert (counts.stored, counts.recorded) == (4, 4)


def test_refused_records_are_missing(post_batch: Any) -> None:
    refused = event_dict(seq=2, tenant="acme\n")

    post_batch(batch_body(events=[*events(1), refused, *events(3)], samples=[recorded(3)]))

    assert event_completeness()["rt-1"] == EventCompleteness(recorded=3, stored=2, missing=1)


def test_events_from_runtimes_without_a_sequence_are_not_counted(post_batch: Any) -> None:
    post_batch(batch_body(events=events(None, None), samples=[sample_dict()]))

    assert event_completeness() == {}


def test_the_counts_outlive_the_raw_events(post_batch: Any) -> None:
    old = timezone.now() - dt.timedelta(days=20)
    post_batch(batch_body(events=[event_dict(started_at=old, seq=1), event_dict(seq=3)]))
    rollup_run(now=timezone.now() + dt.timedelta(minutes=1))

    retention_run(now=timezone.now() + dt.timedelta(days=15))

    assert event_completeness()["rt-1"] == EventCompleteness(recorded=3, stored=2, missing=1)


def test_the_runtimes_table_and_its_csv_show_recorded_stored_and_missing(post_batch: Any) -> None:
    post_batch(batch_body(events=events(1, 2, 4), samples=[recorded(5)]))
    client = logged_in()

    page = html.unescape(re.sub(r"\s+", " ", client.get("/gpus/").content.decode()))
    exported = list(csv.DictReader(io.StringIO(client.get("/gpus/?format=csv&table=runtimes").content.decode())))

    table = page.split('id="runtimes"')[1].split("</table>")[0]
    assert "Events recorded / stored / missing" in table
    assert "5 / 3 / 1" in re.sub(r"<[^>]+>", "", table)
    [row] = exported
    assert (row["runtime"], row["events_recorded"], row["events_stored"], row["events_missing"]) == (
        "rt-1", "5", "3", "1")


def test_a_runtime_that_sends_no_sequence_shows_na(post_batch: Any) -> None:
    post_batch(batch_body(samples=[sample_dict()]))
    client = logged_in()

    table = client.get("/gpus/").content.decode().split('id="runtimes"')[1].split("</table>")[0]
    [row] = list(csv.DictReader(io.StringIO(client.get("/gpus/?format=csv&table=runtimes").content.decode())))

    assert "n/a" in table
    assert (row["events_recorded"], row["events_stored"], row["events_missing"]) == ("", "", "")
