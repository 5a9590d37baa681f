"""The telemetry exporter: every recorded event reaches the collector once, in order, whatever the
collector does in between; the serving path never waits on it."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.inference.collector import Collector
from tests.inference.telemetry_helpers import (
    TOKEN,
    ids,
    make_event,
    make_sample,
    raw_events,
    segment_files,
    wait_until,
)

# -- delivery ---------------------------------------------------------------------------------


def test_records_reach_the_collector_with_the_bearer_token(make_exporter: Any, collector: Collector) -> None:
    exporter = make_exporter()
    events = [make_event() for _ in range(3)]

    for event in events:
        exporter.record_event(event)
    exporter.record_sample(make_sample(queue_depth=7))

    assert exporter.flush(timeout=5)
    assert collector.event_order == ids(events)
    assert [s["queue_depth"] for s in collector.samples] == [7]
    assert set(collector.authorizations) == {f"Bearer {TOKEN}"}
    stats = exporter.stats()
    assert stats["sent_records"] == 4
    assert stats["spooled_records"] == 0
    assert stats["last_success_at"] is not None


def test_post_body_is_the_recorded_json_byte_for_byte(make_exporter: Any, collector: Collector) -> None:
    exporter = make_exporter()
    event, sample = make_event(end_user="ü-ser"), make_sample()

    exporter.record_event(event)
    exporter.record_sample(sample)

    assert exporter.flush(timeout=5)
    numbered = event.model_copy(update={"seq": 1})  # the exporter's numbers: see test_event_numbers.py
    counted = sample.model_copy(update={"events_recorded": 1})
    expected = (b'{"events":[' + numbered.model_dump_json().encode() + b'],"samples":['
                + counted.model_dump_json().encode() + b"]}")
    assert collector.accepted_bodies == [expected]


def test_batches_hold_at_most_batch_size_records(make_exporter: Any, collector: Collector) -> None:
    exporter = make_exporter(batch_size=7, start=False)
    events = [make_event() for _ in range(30)]
    for event in events:
        exporter.record_event(event)

    exporter.start()

    assert exporter.flush(timeout=5)
    sizes = [len(json.loads(body)["events"]) for body in collector.accepted_bodies]
    assert max(sizes) == 7
    assert sum(sizes) == 30
    assert collector.event_order == ids(events)


def test_a_full_batch_goes_out_without_waiting_for_the_interval(make_exporter: Any, collector: Collector) -> None:
    exporter = make_exporter(batch_size=10, interval_s=30.0)

    for _ in range(10):
        exporter.record_event(make_event())

    assert wait_until(lambda: len(collector.events) == 10, timeout=3)


def test_a_partial_batch_goes_out_within_the_interval(make_exporter: Any, collector: Collector) -> None:
    exporter = make_exporter(batch_size=500, interval_s=0.2)

    exporter.record_event(make_event())

    assert wait_until(lambda: len(collector.events) == 1, timeout=3)


# -- the collector goes away ------------------------------------------------------------------


def test_records_wait_on_disk_while_the_collector_is_down_and_arrive_in_order_when_it_is_back(
    make_exporter: Any, collector: Collector, tmp_path: Path
) -> None:
    collector.down()
    exporter = make_exporter(batch_size=10)
    events = [make_event() for _ in range(45)]

    for event in events:
        exporter.record_event(event)

    assert not exporter.flush(timeout=0.5)
    stats = exporter.stats()
    assert stats["spooled_records"] == 45
    assert stats["failed_posts"] >= 1
    assert stats["last_error"]
    assert sum(p.read_bytes().count(b"\n") for p in segment_files(tmp_path / "spool")) == 45

    collector.up()

    assert exporter.flush(timeout=5)
    assert collector.event_order == ids(events)
    assert collector.duplicates == 0
    assert exporter.stats()["spooled_records"] == 0


@pytest.mark.parametrize("failure", ["error", "slow"])
def test_a_failing_collector_gets_the_same_bytes_again(
    make_exporter: Any, collector: Collector, failure: str
) -> None:
    collector.mode, collector.slow_s = failure, 0.8
    exporter = make_exporter(timeout_s=0.3, start=False)
    events = [make_event() for _ in range(5)]
    for event in events:
        exporter.record_event(event)
    exporter.start()
    assert wait_until(lambda: len(collector.bodies) >= 1)
    first_attempt = collector.bodies[0]

    collector.mode = "ok"

    assert exporter.flush(timeout=5)
    assert collector.accepted_bodies == [first_attempt]
    assert collector.event_order == ids(events)


def test_records_spooled_before_a_restart_are_sent_once_and_unchanged_by_the_next_runtime(
    make_exporter: Any, collector: Collector
) -> None:
    first = make_exporter(batch_size=10)
    delivered = [make_event() for _ in range(8)]
    for event in delivered:
        first.record_event(event)
    assert first.flush(timeout=5)
    collector.mode = "error"
    spooled = [make_event() for _ in range(25)]
    for event in spooled:
        first.record_event(event)
    assert wait_until(lambda: first.stats()["failed_posts"] >= 1)
    first.close(timeout=1)
    assert first.stats()["spooled_records"] == 25
    first_attempts = raw_events(collector.bodies[len(collector.accepted_bodies) :])

    collector.mode = "ok"
    second = make_exporter(batch_size=10)
    after_restart = [make_event() for _ in range(3)]
    for event in after_restart:
        second.record_event(event)

    assert second.flush(timeout=5)
    assert collector.event_order == ids(delivered + spooled + after_restart)
    assert collector.duplicates == 0
    resent = raw_events(collector.accepted_bodies)
    assert first_attempts
    assert all(resent[event_id] == raw for event_id, raw in first_attempts.items())


def test_records_from_many_threads_all_arrive_each_thread_in_order(
    make_exporter: Any, collector: Collector
) -> None:
    exporter = make_exporter(batch_size=64)
    per_thread = {n: [make_event(feature=f"thread-{n}") for _ in range(250)] for n in range(4)}
    threads = [
        threading.Thread(target=lambda evs=evs: [exporter.record_event(e) for e in evs])
        for evs in per_thread.values()
    ]

    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert exporter.flush(timeout=5)
    assert len(collector.events) == 1000
    assert collector.duplicates == 0
    for n, events in per_thread.items():
        arrived = [i for i in collector.event_order if collector.events[i]["feature"] == f"thread-{n}"]
        assert arrived == ids(events)


def test_a_restart_after_a_torn_write_delivers_every_complete_record(
    make_exporter: Any, collector: Collector, tmp_path: Path
) -> None:
    collector.down()
    first = make_exporter()
    events = [make_event() for _ in range(6)]
    for event in events:
        first.record_event(event)
    first.close(timeout=0.5)
    with segment_files(tmp_path / "spool")[-1].open("ab") as f:
        f.write(b'E {"event_id": "killed mid-wri')  # the process was killed mid-write

    collector.up()
    second = make_exporter()

    assert second.flush(timeout=5)
    assert collector.event_order == ids(events)
    assert second.stats()["corrupt_lines"] == 1


def test_acknowledged_segments_are_deleted_from_disk(
    make_exporter: Any, collector: Collector, tmp_path: Path
) -> None:
    collector.down()
    exporter = make_exporter(spool_max_bytes=64 * 1024, batch_size=20)  # 4 KiB segments
    for _ in range(60):
        exporter.record_event(make_event())
    assert wait_until(lambda: exporter.stats()["spooled_records"] == 60)
    assert len(segment_files(tmp_path / "spool")) >= 5
    spooled_bytes = exporter.stats()["spooled_bytes"]

    collector.up()

    assert exporter.flush(timeout=5)
    assert len(segment_files(tmp_path / "spool")) <= 1
    assert exporter.stats()["spooled_bytes"] < spooled_bytes / 4
    assert len(collector.events) == 60


# -- refusals ---------------------------------------------------------------------------------


def test_a_record_the_collector_refuses_as_no_batch_is_set_aside_and_later_records_flow(
    make_exporter: Any, collector: Collector, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    collector.mode = "invalid_batch"  # finops's own 400, code invalid_batch
    exporter = make_exporter()
    refused = make_event()
    exporter.record_event(refused)
    with caplog.at_level(logging.ERROR, logger="inference.telemetry"):
        assert exporter.flush(timeout=5)

    collector.mode = "ok"
    later = make_event()
    exporter.record_event(later)

    assert exporter.flush(timeout=5)
    assert collector.event_order == [str(later.event_id)]
    assert exporter.stats()["rejected_records"] == 1
    [kept] = (tmp_path / "spool" / "rejected").iterdir()
    assert refused.model_copy(update={"seq": 1}).model_dump_json().encode() in kept.read_bytes()
    assert any("HTTP 400 invalid_batch" in r.getMessage() and "bad batch" in r.getMessage() for r in caplog.records)


def test_a_refused_token_keeps_the_records_until_the_collector_takes_them(
    make_exporter: Any, collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    collector.mode = "unauthorized"
    exporter = make_exporter()
    event = make_event()
    exporter.record_event(event)

    with caplog.at_level(logging.ERROR, logger="inference.telemetry"):
        assert not exporter.flush(timeout=0.4)
    assert any("HTTP 401" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert exporter.stats()["rejected_records"] == 0

    collector.mode = "ok"

    assert exporter.flush(timeout=5)
    assert collector.event_order == [str(event.event_id)]


def test_a_batch_too_large_for_the_collector_is_sent_in_smaller_batches(
    make_exporter: Any, collector: Collector
) -> None:
    collector.mode = "small"
    exporter = make_exporter(batch_size=8, start=False)
    events = [make_event() for _ in range(8)]
    for event in events:
        exporter.record_event(event)

    exporter.start()

    assert exporter.flush(timeout=5)
    assert collector.event_order == ids(events)
    assert exporter.stats()["rejected_records"] == 0


# -- never block, never lose silently ---------------------------------------------------------


def test_recording_never_blocks_while_the_collector_hangs(make_exporter: Any, collector: Collector) -> None:
    collector.mode, collector.slow_s = "slow", 3.0
    exporter = make_exporter(timeout_s=2.0)
    exporter.record_event(make_event())
    assert wait_until(lambda: len(collector.bodies) == 1)  # the sender is now stuck in a POST
    events = [make_event() for _ in range(1000)]

    started = time.perf_counter()
    for event in events:
        exporter.record_event(event)
    elapsed = time.perf_counter() - started

    assert elapsed < 0.5
    assert exporter.stats()["dropped_records"] == 0


def test_a_full_spool_refuses_new_records_loudly_and_keeps_the_earlier_ones(
    make_exporter: Any, collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    collector.down()
    exporter = make_exporter(spool_max_bytes=16 * 1024)
    events = [make_event() for _ in range(60)]  # ~700 bytes each: about 23 fit

    with caplog.at_level(logging.ERROR, logger="inference.telemetry"):
        for event in events:
            exporter.record_event(event)
        assert wait_until(lambda: exporter.stats()["queued"] == 0 and exporter.stats()["dropped_records"] > 0)
        assert wait_until(lambda: any("spool full" in r.getMessage() for r in caplog.records))

    stats = exporter.stats()
    assert stats["spool_full"] is True
    assert stats["spooled_bytes"] <= 16 * 1024
    kept = stats["spooled_records"]
    assert stats["dropped_records"] == 60 - kept

    collector.up()

    assert exporter.flush(timeout=5)
    assert collector.event_order == ids(events[:kept])
    assert exporter.stats()["spool_full"] is False


def test_records_beyond_the_in_memory_queue_are_dropped_loudly(
    make_exporter: Any, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = make_exporter(queue_max=5, start=False)

    with caplog.at_level(logging.ERROR, logger="inference.telemetry"):
        for _ in range(8):
            exporter.record_event(make_event())
        exporter.close(timeout=1)

    assert exporter.stats()["dropped_records"] == 3
    assert exporter.stats()["spooled_records"] == 5
    assert any("queue full" in r.getMessage() for r in caplog.records)


def test_recording_after_close_is_counted_as_dropped_not_raised(
    make_exporter: Any, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = make_exporter()
    exporter.close(timeout=1)

    with caplog.at_level(logging.ERROR, logger="inference.telemetry"):
        exporter.record_event(make_event())
        exporter.record_sample(make_sample())

    assert exporter.stats()["dropped_records"] == 2
    assert any("closed" in r.getMessage() for r in caplog.records)


def test_close_writes_queued_records_to_the_spool_before_stopping(
    make_exporter: Any, collector: Collector
) -> None:
    collector.down()
    exporter = make_exporter()
    for _ in range(200):
        exporter.record_event(make_event())

    exporter.close(timeout=1)

    stats = exporter.stats()
    assert stats["queued"] == 0
    assert stats["spooled_records"] == 200
    assert stats["dropped_records"] == 0
