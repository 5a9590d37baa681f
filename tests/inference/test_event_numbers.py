"""Event numbers: every event the runtime records carries ``seq`` 1, 2, 3, ... per runtime_id, never
repeated, not across a restart nor a crash; every runtime sample carries ``events_recorded``, the
highest number given before it; an event lost after it was numbered leaves a gap, so the control
plane counts it as lost."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.inference.collector import Collector
from tests.inference.telemetry_helpers import make_event, make_sample, segment_files, wait_until


def seqs(collector: Collector, runtime_id: str = "rt-1") -> list[int]:
    return [collector.events[i]["seq"] for i in collector.event_order
            if collector.events[i]["runtime_id"] == runtime_id]


def test_events_are_numbered_from_1_per_runtime_id_in_the_order_they_are_recorded(
    make_exporter: Any, collector: Collector
) -> None:
    exporter = make_exporter()
    for n in range(7):
        exporter.record_event(make_event(runtime_id="rt-1" if n % 3 else "rt-2"))

    assert exporter.flush(timeout=5)
    assert seqs(collector, "rt-1") == [1, 2, 3, 4]
    assert seqs(collector, "rt-2") == [1, 2, 3]
    assert exporter.stats()["events_recorded"] == 7


def test_a_sample_carries_the_highest_number_given_before_it(make_exporter: Any, collector: Collector) -> None:
    exporter = make_exporter(start=False)
    exporter.record_sample(make_sample())
    for _ in range(3):
        exporter.record_event(make_event())
    exporter.record_sample(make_sample())
    exporter.record_event(make_event(runtime_id="rt-2"))
    exporter.record_sample(make_sample())

    exporter.start()

    assert exporter.flush(timeout=5)
    assert [s["events_recorded"] for s in collector.samples] == [0, 3, 3]


def test_numbering_resumes_after_a_restart_over_the_same_spool_sent_or_not(
    make_exporter: Any, collector: Collector
) -> None:
    first = make_exporter()
    for _ in range(3):
        first.record_event(make_event())
    assert first.flush(timeout=5)
    collector.down()
    for _ in range(2):
        first.record_event(make_event())
    first.close(timeout=0.5)

    collector.up()
    second = make_exporter()
    for _ in range(2):
        second.record_event(make_event())
    second.record_sample(make_sample())

    assert second.flush(timeout=5)
    assert seqs(collector) == [1, 2, 3, 4, 5, 6, 7]
    assert collector.samples[-1]["events_recorded"] == 7


def test_events_turned_away_by_a_full_queue_keep_their_numbers_so_the_gap_counts_them_lost(
    make_exporter: Any, collector: Collector
) -> None:
    exporter = make_exporter(queue_max=5, start=False)
    for _ in range(8):
        exporter.record_event(make_event())  # 3 of them do not fit
    exporter.start()
    exporter.record_sample(make_sample())

    assert exporter.flush(timeout=5)
    delivered = seqs(collector)
    assert len(delivered) == len(set(delivered)) == 5
    assert max(delivered) == 8 and min(delivered) >= 1
    assert collector.samples[-1]["events_recorded"] == 8, "8 recorded, 5 stored: the control plane sees 3 lost"
    assert exporter.stats()["dropped_records"] == 3


def test_a_crash_after_numbering_and_before_spooling_never_repeats_a_number(
    make_exporter: Any, collector: Collector, tmp_path: Path
) -> None:
    first = make_exporter()
    for _ in range(3):
        first.record_event(make_event())
    assert first.flush(timeout=5)
    first.close(timeout=0.5)
    # Numbers 4 and 5 were saved, then the process died before their events reached the spool.
    (tmp_path / "spool" / "sequence.json").write_text(json.dumps({"last": {"rt-1": 5}}))

    second = make_exporter()
    second.record_event(make_event())

    assert second.flush(timeout=5)
    assert seqs(collector) == [1, 2, 3, 6]


def test_numbers_in_the_spool_are_not_given_again_when_the_sequence_file_is_behind(
    make_exporter: Any, collector: Collector, tmp_path: Path
) -> None:
    collector.down()
    first = make_exporter()
    for _ in range(4):
        first.record_event(make_event())
    assert wait_until(lambda: first.stats()["spooled_records"] == 4)
    first.close(timeout=0.5)
    assert segment_files(tmp_path / "spool")
    (tmp_path / "spool" / "sequence.json").unlink()  # lost, or restored from an older backup

    collector.up()
    second = make_exporter()
    second.record_event(make_event())

    assert second.flush(timeout=5)
    assert seqs(collector) == [1, 2, 3, 4, 5]
