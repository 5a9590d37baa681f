"""Disk faults: the exporter's sender outlives any I/O error (a full disk while it saves the
cursor or sets records aside, EIO while it reads, its directory removed), logs and counts it,
backs off, says so on /health, and sends again once the disk answers; nothing it holds is lost."""

from __future__ import annotations

import errno
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tests.inference.collector import Collector
from tests.inference.disk_faults import DiskFaults, fill, tiny_disk
from tests.inference.telemetry_helpers import ids, make_event, wait_until


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> DiskFaults:
    return DiskFaults(monkeypatch, tmp_path / "spool")


def failing(exporter: Any) -> bool:
    return any("the telemetry sender is failing" in p for p in exporter.problems())


def test_a_full_disk_while_the_cursor_is_saved_does_not_stop_the_sender(
    make_exporter: Any, collector: Collector, disk: DiskFaults
) -> None:
    exporter = make_exporter(start=False)  # all five queued first, so the sender takes them as one batch
    before = [make_event() for _ in range(5)]
    disk.fail("replace", errno.ENOSPC, "cursor.json")
    for event in before:
        exporter.record_event(event)
    exporter.start()

    assert wait_until(lambda: failing(exporter))
    assert collector.event_order == ids(before), "the collector has them; the cursor could not move"
    stats = exporter.stats()
    assert stats["io_errors"] >= 3 and "No space left on device" in str(stats["last_error"])
    assert stats["spooled_records"] == 5

    disk.heal()
    after = [make_event() for _ in range(3)]
    for event in after:
        exporter.record_event(event)

    assert exporter.flush(timeout=5)
    assert collector.event_order == ids(before + after)
    assert collector.duplicates == 0, "a batch taken is never posted again"
    assert len(collector.bodies) == len(collector.accepted_bodies)
    assert exporter.problems() == []


def test_a_full_disk_while_refused_records_are_set_aside_keeps_them_until_they_are_kept(
    make_exporter: Any, collector: Collector, disk: DiskFaults, tmp_path: Path
) -> None:
    event = make_event()
    collector.refuse = {str(event.event_id): "refused"}
    disk.fail("open", errno.ENOSPC, "rejected")
    exporter = make_exporter()
    exporter.record_event(event)

    assert wait_until(lambda: failing(exporter))
    assert exporter.stats()["spooled_records"] == 1, "not acknowledged while it is kept nowhere"

    disk.heal()

    assert exporter.flush(timeout=5)
    assert exporter.stats()["set_aside_records"] == 1
    assert str(event.event_id) in "".join(p.read_text() for p in (tmp_path / "spool" / "rejected").iterdir())
    assert len(collector.bodies) == 1


def test_an_io_error_reading_the_spool_is_retried_until_the_disk_answers(
    make_exporter: Any, collector: Collector, disk: DiskFaults
) -> None:
    exporter = make_exporter()
    disk.fail("open", errno.EIO, "segment-")
    events = [make_event() for _ in range(4)]
    for event in events:
        exporter.record_event(event)

    assert wait_until(lambda: failing(exporter))
    assert collector.bodies == []

    disk.heal()

    assert exporter.flush(timeout=5)
    assert collector.event_order == ids(events)


def test_a_failed_segment_write_keeps_the_records_until_the_disk_has_room(
    make_exporter: Any, collector: Collector, disk: DiskFaults
) -> None:
    exporter = make_exporter()
    disk.fail("write", errno.ENOSPC, "segment-")
    during = [make_event() for _ in range(3)]
    for event in during:
        exporter.record_event(event)
    assert wait_until(lambda: any("spool cannot be written" in p for p in exporter.problems()))
    assert exporter.stats()["dropped_records"] == 0

    disk.heal()
    later = [make_event() for _ in range(3)]
    for event in later:
        exporter.record_event(event)

    assert exporter.flush(timeout=5)
    assert collector.event_order == ids(during + later), "held in memory, written in order once it could be"
    assert exporter.stats()["io_errors"] >= 1 and exporter.stats()["dropped_records"] == 0
    assert exporter.problems() == []


def test_records_the_disk_refuses_at_close_are_counted_as_dropped(
    make_exporter: Any, collector: Collector, disk: DiskFaults
) -> None:
    exporter = make_exporter()
    disk.fail("write", errno.ENOSPC, "segment-")
    exporter.record_event(make_event())
    assert wait_until(lambda: any("spool cannot be written" in p for p in exporter.problems()))

    exporter.close(timeout=2)

    assert exporter.stats()["dropped_records"] == 1, "lost at shutdown, but never silently"


def test_the_spool_directory_removed_under_a_running_exporter_is_made_again(
    make_exporter: Any, collector: Collector, tmp_path: Path
) -> None:
    exporter = make_exporter()
    before = [make_event() for _ in range(2)]
    for event in before:
        exporter.record_event(event)
    assert exporter.flush(timeout=5)

    shutil.rmtree(tmp_path / "spool")  # an operator "cleaning up" under the segment being written
    later = [make_event() for _ in range(3)]
    for event in later:
        exporter.record_event(event)

    assert exporter.flush(timeout=5)
    assert collector.event_order == ids(before + later)
    assert list((tmp_path / "spool").glob("segment-*.log")), "written into a directory made again"
    assert exporter.problems() == []


def test_a_really_full_disk_stops_nothing_and_export_resumes_when_room_comes_back(
    make_exporter: Any, collector: Collector, tmp_path: Path
) -> None:
    with tiny_disk(tmp_path / "disk") as mounted:
        collector.down()
        exporter = make_exporter(spool_dir=mounted / "spool")
        before = [make_event() for _ in range(20)]
        for event in before:
            exporter.record_event(event)
        assert wait_until(lambda: exporter.stats()["spooled_records"] == 20)
        filler = fill(mounted)

        collector.up()
        assert wait_until(lambda: failing(exporter)), "the cursor cannot be saved on a full disk"
        during = [make_event() for _ in range(10)]
        started = time.monotonic()
        for event in during:
            exporter.record_event(event)
        assert time.monotonic() - started < 1.0, "recording never waits for the disk"
        # They are held in memory: those the writer took before the disk refused them in its batch,
        # retried after a backoff, the rest on the queue behind it (how many of each is a race: a
        # check that the queue was empty failed whenever the writer woke between two of them).
        assert wait_until(lambda: exporter.stats()["io_errors"] > 0)
        assert exporter.stats()["dropped_records"] == 0

        filler.unlink()
        after = [make_event() for _ in range(5)]
        for event in after:
            exporter.record_event(event)

        assert exporter.flush(timeout=10)
        stats = exporter.stats()
        assert collector.event_order[:20] == ids(before)
        assert collector.event_order[-5:] == ids(after)
        assert collector.duplicates == 0
        assert collector.event_order[20:-5] == ids(during), "held in memory while the disk was full"
        assert stats["dropped_records"] == 0
        exporter.close(timeout=1)
