"""The event journal: a request event survives a kill -9 from the moment ``record_event`` returns,
and reaches the collector once, numbered once, after the restart. A crash is an exporter abandoned
without ``close`` (its writer never ran: what it had queued is gone with it), and a new exporter
over the same spool directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inference.telemetry.exporter import TelemetryExporter
from inference.telemetry.journal import JOURNAL_FILE
from tests.inference.collector import Collector
from tests.inference.telemetry_helpers import ids, make_event


def crashed(exporters: list[TelemetryExporter], exporter: TelemetryExporter) -> None:
    """Forget ``exporter`` as a killed process would: nothing of it is closed or written."""
    exporters.remove(exporter)


def seqs(collector: Collector) -> list[int]:
    return [collector.events[i]["seq"] for i in collector.event_order]


def test_an_event_recorded_before_a_kill_is_exported_after_the_restart(
    make_exporter: Any, collector: Collector, exporters: list[TelemetryExporter]
) -> None:
    killed = make_exporter(start=False)
    events = [make_event() for _ in range(3)]
    for event in events:
        killed.record_event(event)
    crashed(exporters, killed)

    restarted = make_exporter()

    assert restarted.flush(timeout=5)
    assert collector.event_order == ids(events)
    assert seqs(collector) == [1, 2, 3]
    assert restarted.stats()["events_recorded"] == 3


def test_the_journal_is_emptied_once_its_events_are_in_the_spool(
    make_exporter: Any, collector: Collector, tmp_path: Path
) -> None:
    exporter = make_exporter()
    for _ in range(5):
        exporter.record_event(make_event())

    assert exporter.flush(timeout=5)
    assert (tmp_path / "spool" / JOURNAL_FILE).stat().st_size == 0


def test_a_journaled_event_the_spool_already_holds_is_sent_and_numbered_once(
    make_exporter: Any, collector: Collector, exporters: list[TelemetryExporter], tmp_path: Path
) -> None:
    journal = tmp_path / "spool" / JOURNAL_FILE
    spooled = [make_event() for _ in range(3)]
    first = make_exporter(start=False)
    for event in spooled:
        first.record_event(event)
    journaled = journal.read_bytes()
    first.close(timeout=0.5)  # spooled; then killed before the writer emptied the journal:
    journal.write_bytes(journaled)
    second = make_exporter(start=False)
    only_journaled = [make_event() for _ in range(2)]
    for event in only_journaled:
        second.record_event(event)
    crashed(exporters, second)

    third = make_exporter()

    assert third.flush(timeout=5)
    assert collector.event_order == ids(spooled + only_journaled)
    assert collector.duplicates == 0
    assert seqs(collector) == [1, 2, 3, 4, 5]
    assert third.stats()["events_recorded"] == 5


def test_a_line_the_kill_cut_short_is_skipped_and_does_not_swallow_the_next_one(
    make_exporter: Any, collector: Collector, exporters: list[TelemetryExporter], tmp_path: Path
) -> None:
    first = make_exporter(start=False)
    before = [make_event() for _ in range(2)]
    for event in before:
        first.record_event(event)
    crashed(exporters, first)
    with (tmp_path / "spool" / JOURNAL_FILE).open("ab") as f:
        f.write(b'{"event_id": "cut sh')
    second = make_exporter(start=False)
    after = make_event()
    second.record_event(after)
    crashed(exporters, second)

    third = make_exporter()

    assert third.flush(timeout=5)
    assert collector.event_order == ids([*before, after])


def test_a_journal_the_disk_refuses_fails_no_record_and_is_reported(
    make_exporter: Any, collector: Collector, tmp_path: Path
) -> None:
    (tmp_path / "spool" / JOURNAL_FILE).mkdir(parents=True)  # nothing can be written there
    exporter = make_exporter()
    events = [make_event() for _ in range(3)]

    for event in events:
        exporter.record_event(event)

    assert exporter.flush(timeout=5)
    assert collector.event_order == ids(events)
    assert exporter.stats()["journal_errors"] >= 3
    assert any("event journal cannot be written" in problem for problem in exporter.problems())
