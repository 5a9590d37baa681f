"""The telemetry spool: an append-only, size-capped log of serialized records read from a cursor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from inference.telemetry.spool import Cursor, Spool, SpoolRecord


def event_record(n: int, padding: int = 0) -> SpoolRecord:
    return SpoolRecord(kind="E", data=json.dumps({"event_id": f"e-{n}", "pad": "x" * padding}).encode())


def sample_record(n: int) -> SpoolRecord:
    return SpoolRecord(kind="S", data=json.dumps({"runtime_id": "r1", "n": n}).encode())


def read_all(spool: Spool, cursor: Cursor | None = None) -> tuple[list[SpoolRecord], Cursor]:
    records, cursor = spool.read_from(cursor or spool.cursor, 1_000_000)
    return records, cursor


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("segment-*.log"))


def rejected_text(directory: Path) -> str:
    return "".join(p.read_text() for p in sorted((directory / "rejected").iterdir()))


def test_records_read_back_in_order_and_byte_identical(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    written = [event_record(1), sample_record(2), event_record(3)]

    assert spool.append(written) == 3

    records, _ = read_all(spool)
    assert records == written
    assert spool.pending == 3


def test_read_from_returns_at_most_max_records_and_continues_at_next_cursor(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append([event_record(n) for n in range(10)])

    first, after_first = spool.read_from(spool.cursor, 4)
    second, after_second = spool.read_from(after_first, 4)
    third, _ = spool.read_from(after_second, 4)

    assert [r.data for r in first + second + third] == [event_record(n).data for n in range(10)]
    assert (len(first), len(second), len(third)) == (4, 4, 2)


def test_reading_does_not_acknowledge(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append([event_record(n) for n in range(3)])

    spool.read_from(spool.cursor, 2)

    assert spool.pending == 3
    assert spool.read_from(spool.cursor, 10)[0] == [event_record(n) for n in range(3)]


def test_acknowledged_cursor_survives_reopen(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append([event_record(n) for n in range(5)])
    _, after_two = spool.read_from(spool.cursor, 2)
    spool.ack(after_two)
    spool.close()

    reopened = Spool(tmp_path, max_bytes=1 << 20)

    assert reopened.pending == 3
    assert read_all(reopened)[0] == [event_record(n) for n in range(2, 5)]


def test_records_appended_after_reopen_follow_the_unacknowledged_ones(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append([event_record(0), event_record(1)])
    spool.close()

    reopened = Spool(tmp_path, max_bytes=1 << 20)
    reopened.append([event_record(2)])

    assert read_all(reopened)[0] == [event_record(0), event_record(1), event_record(2)]
    assert reopened.pending == 3


def test_torn_last_line_is_cut_on_open_and_kept_aside(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append([event_record(0), event_record(1)])
    spool.close()
    [segment] = segment_files(tmp_path)
    with segment.open("ab") as f:
        f.write(b'E {"event_id": "e-torn", "pa')  # the process died mid-write

    reopened = Spool(tmp_path, max_bytes=1 << 20)
    reopened.append([event_record(2)])

    assert read_all(reopened)[0] == [event_record(0), event_record(1), event_record(2)]
    assert segment.read_bytes().endswith(b"\n")
    assert reopened.corrupt_lines == 1
    assert "e-torn" in rejected_text(tmp_path)


def test_unreadable_line_is_quarantined_and_stepped_over(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append([event_record(0)])
    spool.close()
    [segment] = segment_files(tmp_path)
    with segment.open("ab") as f:
        f.write(b"\x00\x00garbage\n")
    reopened = Spool(tmp_path, max_bytes=1 << 20)
    reopened.append([event_record(1)])

    records, cursor = read_all(reopened)
    reopened.ack(cursor)

    assert records == [event_record(0), event_record(1)]
    assert reopened.corrupt_lines == 1
    assert "garbage" in rejected_text(tmp_path)
    assert reopened.pending == 0


def test_quarantine_keeps_one_copy_however_often_a_line_is_read(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.close()
    (tmp_path / "segment-0000000001.log").write_bytes(b"not a record\n" + event_record(0).line())
    reopened = Spool(tmp_path, max_bytes=1 << 20)

    read_all(reopened)
    read_all(reopened)

    assert reopened.corrupt_lines == 1
    assert len(list((tmp_path / "rejected").iterdir())) == 1


def test_segments_roll_at_their_size_and_are_deleted_once_acknowledged(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1000)
    spool.append([event_record(n, padding=200) for n in range(20)])  # ~240 bytes each
    assert len(segment_files(tmp_path)) >= 4

    records, cursor = spool.read_from(spool.cursor, 12)
    spool.ack(cursor)
    assert len(records) == 12

    remaining = segment_files(tmp_path)
    assert 1 <= len(remaining) < 4
    assert cursor.segment == int(remaining[0].name.split("-")[1].split(".")[0])
    assert read_all(spool)[0] == [event_record(n, padding=200) for n in range(12, 20)]
    assert spool.size_bytes == sum(p.stat().st_size for p in remaining)


def test_appends_beyond_max_bytes_are_refused_and_earlier_records_kept(tmp_path: Path) -> None:
    line_bytes = len(event_record(0, padding=100).line())
    spool = Spool(tmp_path, max_bytes=line_bytes * 5, segment_bytes=line_bytes * 2)

    stored = spool.append([event_record(n, padding=100) for n in range(8)])

    assert stored == 5
    assert spool.full
    assert spool.size_bytes <= spool.max_bytes
    assert read_all(spool)[0] == [event_record(n, padding=100) for n in range(5)]


def test_acknowledging_frees_room_for_new_records(tmp_path: Path) -> None:
    line_bytes = len(event_record(0, padding=100).line())
    spool = Spool(tmp_path, max_bytes=line_bytes * 4, segment_bytes=line_bytes * 2)
    spool.append([event_record(n, padding=100) for n in range(6)])
    assert spool.full

    _, cursor = spool.read_from(spool.cursor, 3)  # passes the first segment
    spool.ack(cursor)

    assert not spool.full
    assert spool.append([event_record(10, padding=100)]) == 1


def test_records_set_aside_are_kept_with_their_reasons(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append([event_record(0), event_record(1), event_record(2)])
    records, cursor = read_all(spool)

    path = spool.set_aside([(records[0], "HTTP 400: bad field"), (records[1], "HTTP 400: bad field"),
                            (records[2], "HTTP 202: event 2: cost: too large")])
    spool.ack(cursor)

    assert path.parent == tmp_path / "rejected"
    assert path.read_bytes() == (b"# HTTP 400: bad field\n" + event_record(0).line() + event_record(1).line()
                                 + b"# HTTP 202: event 2: cost: too large\n" + event_record(2).line())
    assert spool.refused.records == 3
    assert spool.pending == 0


def test_records_set_aside_are_never_deleted_to_make_room_the_spool_refuses_new_ones_instead(
        tmp_path: Path) -> None:
    line_bytes = len(event_record(0, padding=100).line())
    spool = Spool(tmp_path, max_bytes=line_bytes * 8, segment_bytes=line_bytes)
    for n in range(5):
        spool.append([event_record(n, padding=100)])
        records, cursor = read_all(spool)
        spool.set_aside([(records[0], f"refused {n}")])
        spool.ack(cursor)

    stored = spool.append([event_record(n, padding=100) for n in range(10, 14)])

    assert stored < 4
    assert spool.full
    assert spool.size_bytes + spool.refused.bytes <= spool.max_bytes
    assert spool.refused.records == 5
    kept = rejected_text(tmp_path)
    assert all(f"refused {n}" in kept for n in range(5)), "the oldest are still there"
    spool.close()
    assert Spool(tmp_path, max_bytes=line_bytes * 8).refused.records == 5, "counted again after a restart"


def test_a_segment_that_vanished_from_disk_is_stepped_over_and_its_records_counted_lost(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=100)
    spool.append([event_record(n, padding=100) for n in range(2)])  # one record per segment
    spool.append([event_record(2, padding=100)])
    segment_files(tmp_path)[0].unlink()

    records, cursor = read_all(spool)
    spool.ack(cursor)

    assert records == [event_record(n, padding=100) for n in (1, 2)]
    assert spool.lost_lines == 1
    assert spool.pending == 0
    assert spool.size_bytes == sum(p.stat().st_size for p in segment_files(tmp_path))


def test_appends_after_the_directory_was_removed_go_to_a_new_segment_in_a_new_directory(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    spool = Spool(directory, max_bytes=1 << 20)
    spool.append([event_record(0)])
    _, cursor = read_all(spool)
    spool.ack(cursor)
    shutil.rmtree(directory)

    assert spool.append([event_record(1)]) == 1

    assert read_all(spool, cursor)[0] == [event_record(1)]
    assert len(segment_files(directory)) == 1 and spool.lost_lines == 0


def test_a_half_written_cursor_file_is_ignored(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append([event_record(n) for n in range(3)])
    _, cursor = spool.read_from(spool.cursor, 1)
    spool.ack(cursor)
    spool.close()
    (tmp_path / "cursor.json.tmp").write_bytes(b'{"segm')  # crash while replacing the cursor

    reopened = Spool(tmp_path, max_bytes=1 << 20)

    assert read_all(reopened)[0] == [event_record(1), event_record(2)]
    assert not (tmp_path / "cursor.json.tmp").exists()


def test_segments_the_cursor_passed_before_a_crash_are_deleted_on_open(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=100)
    spool.append([event_record(n, padding=100) for n in range(3)])  # one record per segment
    first_segment = segment_files(tmp_path)[0]
    _, cursor = spool.read_from(spool.cursor, 2)
    spool.close()
    # The cursor was saved, then the process died before deleting the segment it had passed.
    (tmp_path / "cursor.json").write_text(json.dumps({"segment": cursor.segment, "offset": cursor.offset}))

    reopened = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=100)

    assert not first_segment.exists()
    assert read_all(reopened)[0] == [event_record(2, padding=100)]
    assert reopened.pending == 1


def test_a_record_with_a_newline_is_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)

    with pytest.raises(ValueError):
        spool.append([SpoolRecord(kind="E", data=b'{"a":\n1}')])

    assert spool.pending == 0
