"""Refusals: the exporter sets records aside only when finops itself refused them by its contract,
keeps every one with finops's reason, counted and visible, never deletes one to make room, and
sends them again when an operator says so. Any other answer keeps the records for a retry."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from tests.inference.collector import FOREIGN, Collector
from tests.inference.telemetry_helpers import ids, make_event, raw_events, wait_until


def set_aside_text(tmp_path: Path) -> str:
    return "".join(p.read_text() for p in sorted((tmp_path / "spool" / "rejected").iterdir()))


def one_refused(make_exporter: Any, collector: Collector) -> tuple[Any, Any]:
    """An exporter that sent one event, which the collector refused."""
    event = make_event()
    collector.refuse = {str(event.event_id): "refused"}
    exporter = make_exporter()
    exporter.record_event(event)
    assert exporter.flush(timeout=5)
    return exporter, event


# -- an answer that is not finops's refusal ---------------------------------------------------


@pytest.mark.parametrize("mode", sorted(FOREIGN))
def test_a_foreign_4xx_sets_nothing_aside_and_every_record_arrives_once_it_stops(
    make_exporter: Any, collector: Collector, tmp_path: Path, mode: str
) -> None:
    collector.mode = mode  # a proxy's HTML 400, Django's DisallowedHost page, a 404 or 405 in between...
    exporter = make_exporter(batch_size=20)
    events = [make_event() for _ in range(60)]
    for event in events:
        exporter.record_event(event)

    assert not exporter.flush(timeout=1), "flush does not say done while nothing was delivered"
    stats = exporter.stats()
    assert (stats["rejected_records"], stats["set_aside_records"], stats["spooled_records"]) == (0, 0, 60)
    assert list((tmp_path / "spool" / "rejected").iterdir()) == []
    assert any("the telemetry sender is failing" in p and f"HTTP {FOREIGN[mode][0]}" in p
               for p in exporter.problems())

    collector.mode = "ok"

    assert exporter.flush(timeout=5)
    assert collector.event_order == ids(events)
    assert exporter.stats()["sent_records"] == 60
    assert exporter.problems() == []


# -- finops refuses records -------------------------------------------------------------------


def test_records_refused_inside_a_202_are_set_aside_with_the_reason_and_not_counted_as_sent(
    make_exporter: Any, collector: Collector, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = make_exporter(start=False)
    events = [make_event() for _ in range(10)]
    refused = [events[2], events[7]]
    collector.refuse = {str(e.event_id): "prompt_tokens: Input should be less than or equal to 2147483647"
                        for e in refused}
    for event in events:
        exporter.record_event(event)

    with caplog.at_level(logging.ERROR, logger="inference.telemetry"):
        exporter.start()
        assert exporter.flush(timeout=5)

    assert collector.event_order == ids([e for e in events if e not in refused])
    stats = exporter.stats()
    assert (stats["sent_records"], stats["rejected_records"], stats["set_aside_records"]) == (8, 2, 2)
    kept = set_aside_text(tmp_path)
    assert "# HTTP 202: event 2: prompt_tokens: Input should be less than or equal to 2147483647" in kept
    assert "# HTTP 202: event 7: prompt_tokens" in kept
    assert kept.count("\nE {") == 2 and all(str(e.event_id) in kept for e in refused)
    assert any("2 telemetry records set aside" in p for p in exporter.problems())
    assert any("refused 2 of 10 records" in r.getMessage() for r in caplog.records)


def test_a_batch_finops_refuses_whole_is_set_aside_record_by_record(
    make_exporter: Any, collector: Collector, tmp_path: Path
) -> None:
    events = [make_event() for _ in range(3)]
    collector.refuse = {str(e.event_id): f"reason {n}" for n, e in enumerate(events)}
    exporter = make_exporter(start=False)
    for event in events:
        exporter.record_event(event)

    exporter.start()

    assert exporter.flush(timeout=5)
    assert exporter.stats()["set_aside_records"] == 3
    kept = set_aside_text(tmp_path)
    assert all(f"HTTP 422: event {n}: reason {n}" in kept for n in range(3))


def test_one_record_that_spoils_a_batch_is_found_by_halving_and_the_rest_arrive(
    make_exporter: Any, collector: Collector, tmp_path: Path
) -> None:
    events = [make_event() for _ in range(16)]
    collector.spoilers = {str(events[11].event_id)}
    exporter = make_exporter(batch_size=16, start=False)
    for event in events:
        exporter.record_event(event)

    exporter.start()

    assert exporter.flush(timeout=5)
    assert collector.event_order == ids(events[:11] + events[12:])
    assert exporter.stats()["set_aside_records"] == 1
    assert str(events[11].event_id) in set_aside_text(tmp_path)


# -- kept, never deleted ----------------------------------------------------------------------


def test_refused_records_are_never_deleted_to_make_room(
    make_exporter: Any, collector: Collector, tmp_path: Path
) -> None:
    events = [make_event() for _ in range(100)]  # ~75 KB refused: the old rejected/ kept a quarter of 256 KiB
    collector.refuse = {str(e.event_id): "refused" for e in events}
    exporter = make_exporter(spool_max_bytes=256 * 1024, batch_size=10)
    for event in events:
        exporter.record_event(event)

    assert exporter.flush(timeout=10)

    assert exporter.stats()["set_aside_records"] == 100
    kept = set_aside_text(tmp_path)
    assert all(str(e.event_id) in kept for e in events)


def test_when_set_aside_records_fill_the_spool_new_records_are_refused_loudly(
    make_exporter: Any, collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    refused = [make_event() for _ in range(30)]  # ~23 KB set aside in a 16 KiB spool
    collector.refuse = {str(e.event_id): "refused" for e in refused}
    exporter = make_exporter(spool_max_bytes=16 * 1024, batch_size=5)
    for event in refused[:20]:
        exporter.record_event(event)
    assert wait_until(lambda: exporter.stats()["set_aside_records"] >= 18)

    with caplog.at_level(logging.ERROR, logger="inference.telemetry"):
        for _ in range(5):
            exporter.record_event(make_event())
        assert wait_until(lambda: exporter.stats()["dropped_records"] > 0)

    stats = exporter.stats()
    assert stats["spool_full"] is True
    assert stats["set_aside_records"] >= 18, "nothing set aside was deleted to make room"
    assert any("spool full" in p for p in exporter.problems())


# -- an operator resends or discards ----------------------------------------------------------


def test_an_operator_resends_set_aside_records_as_they_were_first_sent(
    make_exporter: Any, collector: Collector, tmp_path: Path
) -> None:
    events = [make_event() for _ in range(4)]
    collector.refuse = {str(events[1].event_id): "no price for tiny-random", str(events[3].event_id): "no price"}
    exporter = make_exporter(start=False)
    for event in events:
        exporter.record_event(event)
    exporter.start()
    assert exporter.flush(timeout=5)
    first_attempt = raw_events(collector.bodies)
    [kept] = exporter.set_aside_files()
    assert (kept.records, kept.label) == (2, "refused")
    assert kept.reasons == ("HTTP 202: event 1: no price for tiny-random", "HTTP 202: event 3: no price")

    collector.refuse = {}  # the operator added the price
    assert exporter.resend_set_aside(kept.name) == 2

    assert exporter.flush(timeout=5)
    assert sorted(collector.event_order) == sorted(ids(events))
    resent = raw_events(collector.accepted_bodies[-1:])
    assert resent == {i: first_attempt[i] for i in ids([events[1], events[3]])}, "byte for byte, seq included"
    assert exporter.set_aside_files() == []
    assert (exporter.stats()["set_aside_records"], exporter.stats()["resent_records"]) == (0, 2)
    assert exporter.problems() == []


def test_an_operator_discards_set_aside_records_and_the_runtime_is_healthy_again(
    make_exporter: Any, collector: Collector
) -> None:
    exporter, _ = one_refused(make_exporter, collector)
    [kept] = exporter.set_aside_files()

    assert exporter.discard_set_aside(kept.name) == 1

    assert exporter.set_aside_files() == []
    assert (exporter.stats()["set_aside_records"], exporter.stats()["discarded_records"]) == (0, 1)
    assert exporter.problems() == []
    with pytest.raises(KeyError):
        exporter.discard_set_aside("../cursor.json")


def test_set_aside_records_are_counted_again_after_a_restart(
    make_exporter: Any, collector: Collector, tmp_path: Path
) -> None:
    first, event = one_refused(make_exporter, collector)
    first.close(timeout=1)

    second = make_exporter()

    assert second.stats()["set_aside_records"] == 1
    assert any("1 telemetry records set aside" in p for p in second.problems())
    [kept] = second.set_aside_files()
    assert kept.records == 1 and str(event.event_id) in set_aside_text(tmp_path)
