"""The telemetry spool: an append-only log of serialized records on disk, read from a cursor.

Layout of the spool directory::

    segment-0000000001.log   one record per line: a kind tag (``E`` request event, ``S`` runtime
    segment-0000000002.log   sample), a space, then the record's JSON exactly as it is sent
    cursor.json              {"segment": 2, "offset": 4096}: everything before it is acknowledged
    sequence.json            the highest event number given per runtime_id (``sequence.py``)
    journal.jsonl            request events recorded and not yet known to be spooled (``journal.py``)
    rejected/                records the collector refused and lines that could not be read, kept
                             until an operator resends or discards them (``refused.py``)

Records are stored as the bytes they were first serialized to and never parsed back into models,
so a resend is byte-identical to the first attempt. Only the newest segment is appended to, and
only by this process: a spool opened after a crash starts a fresh segment, so a torn line can only
be at the end of the segment that was newest at the crash, where opening truncates it. A segment
is deleted once the cursor has moved past it. The cursor is replaced atomically (temp file,
fsync, ``os.replace``) so a crash leaves either the old cursor or the new one.

The cap (``max_bytes``) covers the segments and the records set aside together: set-aside records
are never deleted to make room, so when they fill it the spool refuses new records instead. A
disk error is raised to the caller (or, on append, reported in ``write_error``), never swallowed;
a segment that vanished from disk (its directory removed) is stepped over and its records counted
in ``lost_lines``, and the spool carries on in a directory made again.

The spool is thread-safe: one thread appends while another reads and acknowledges.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from inference.telemetry.records import KINDS, SpoolRecord, parse_line
from inference.telemetry.refused import REFUSED_DIR, UNREADABLE, RefusedStore

logger = logging.getLogger("inference.telemetry")

SEGMENT_BYTES = 8 * 1024 * 1024
CURSOR_FILE = "cursor.json"

_SEGMENT_PREFIX = "segment-"
_SEGMENT_SUFFIX = ".log"
_READ_CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Cursor:
    """A position in the spool: a segment, a byte offset in it, and how many lines lie before it.

    ``line`` counts from where the spool was opened; it makes ``Spool.pending`` a subtraction
    instead of a scan. Only ``segment`` and ``offset`` are persisted.
    """

    segment: int
    offset: int
    line: int = 0


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Spool:
    """An append-only, size-capped log of telemetry records in ``directory``."""

    def __init__(self, directory: Path, *, max_bytes: int, segment_bytes: int = SEGMENT_BYTES) -> None:
        if max_bytes <= 0 or segment_bytes <= 0:
            raise ValueError("max_bytes and segment_bytes must be positive")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.corrupt_lines = 0
        self.lost_lines = 0  # in segments that vanished from disk before they were sent
        self.write_error: str | None = None
        self._lock = threading.Lock()
        self._sizes: dict[int, int] = {}  # segment id -> bytes on disk, oldest first
        self._first_line: dict[int, int] = {}  # segment id -> line number of its first line (from the cursor)
        self._bytes = 0
        self._active: int | None = None
        self._active_fd: int | None = None
        self._full = False
        self._quarantined: set[tuple[int, int]] = set()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.refused = RefusedStore(self.directory / REFUSED_DIR)
        self._open()

    # -- state -------------------------------------------------------------------------------

    @property
    def cursor(self) -> Cursor:
        """Where the next unacknowledged record starts."""
        return self._cursor

    @property
    def pending(self) -> int:
        """Lines appended and not yet acknowledged."""
        return max(0, self._appended - self._cursor.line)

    @property
    def appended(self) -> int:
        """Lines appended so far (counting those pending when the spool was opened): a cursor
        whose ``line`` reaches this value has passed every one of them."""
        return self._appended

    @property
    def size_bytes(self) -> int:
        """Bytes the segments take on disk (acknowledged bytes stay until their segment goes)."""
        return self._bytes

    @property
    def full(self) -> bool:
        """True from a refused append until room is freed or an append fits again."""
        return self._full

    @property
    def segments(self) -> list[Path]:
        with self._lock:
            return [self._segment_path(s) for s in self._sizes]

    # -- writing -----------------------------------------------------------------------------

    def append(self, records: Sequence[SpoolRecord], *, extra_room: int = 0) -> int:
        """Append records in order; returns how many were stored.

        Stops at the first record that would take the spool (segments and set-aside records
        together, less ``extra_room``: bytes about to be freed, as by a resend) past ``max_bytes``
        (``full`` turns True) or when the disk refuses a write (``write_error`` says why, and it
        is logged); the records from there on are not stored and the caller must count them as
        dropped.
        """
        for record in records:
            if record.kind not in KINDS or b"\n" in record.data:
                raise ValueError(f"not a one-line {KINDS} record: {record.data[:80]!r}")
        with self._lock:
            buf = bytearray()
            stored = 0
            written = 0
            room = self.max_bytes + extra_room - self._bytes - self.refused.bytes
            try:
                self._seal_if_vanished()
                for record in records:
                    line = record.line()
                    if len(buf) + len(line) > room:
                        self._full = True
                        break
                    if self._active is None or self._sizes[self._active] + len(buf) >= self.segment_bytes:
                        self._write(buf)
                        room -= len(buf)
                        written = stored
                        buf.clear()
                        self._roll(first_line=self._appended + written)
                    buf += line
                    stored += 1
                self._write(buf)
                written = stored
            except OSError as exc:
                self.write_error = f"{type(exc).__name__}: {exc}"
                logger.error("telemetry spool: could not write to %s: %s", self.directory, exc)
            else:
                self.write_error = None
                if written == len(records):
                    self._full = False
            self._appended += written
            return written

    def _write(self, buf: bytearray) -> None:
        if not buf:
            return
        assert self._active is not None and self._active_fd is not None
        try:
            _write_all(self._active_fd, buf)
        except OSError:
            # Cut what a failed write left behind so the segment never holds half a line; if even
            # that fails, seal the segment (readers quarantine a torn tail) and start a new one.
            with contextlib.suppress(OSError):
                os.ftruncate(self._active_fd, self._sizes[self._active])
            self._close_active(sync=False)
            raise
        self._sizes[self._active] += len(buf)
        self._bytes += len(buf)

    def _seal_if_vanished(self) -> None:
        """Stop writing to a segment someone deleted (its directory removed): what goes into an
        unlinked file is lost; the next write opens a new segment in a directory made again."""
        if self._active_fd is not None and os.fstat(self._active_fd).st_nlink == 0:
            logger.error("telemetry spool: %s was deleted while it was written; starting a new segment",
                         self._segment_path(self._active))  # type: ignore[arg-type]
            self._close_active(sync=False)

    def _roll(self, *, first_line: int) -> None:
        self._close_active(sync=True)
        segment = self._next_segment
        path = self._segment_path(segment)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._next_segment += 1
        self._active, self._active_fd = segment, fd
        self._sizes[segment] = 0
        self._first_line[segment] = first_line

    def _close_active(self, *, sync: bool) -> None:
        if self._active_fd is not None:
            try:
                if sync:
                    os.fsync(self._active_fd)
            finally:
                os.close(self._active_fd)
        self._active = self._active_fd = None

    def sync(self) -> None:
        """fsync the segment being written, so a power loss cannot take what was appended."""
        with self._lock:
            if self._active_fd is not None:
                os.fsync(self._active_fd)

    def close(self) -> None:
        with self._lock:
            self._close_active(sync=True)

    # -- reading -----------------------------------------------------------------------------

    def read_from(self, cursor: Cursor, max_records: int) -> tuple[list[SpoolRecord], Cursor]:
        """Up to ``max_records`` records from ``cursor`` on, and the cursor just past them.

        Lines that are not valid records are set aside (``rejected/``) and stepped over, and so
        are segments that vanished from disk, so the returned cursor may have moved even when no
        record is returned. A disk error is raised.
        """
        records: list[SpoolRecord] = []
        segment, offset, line = cursor.segment, cursor.offset, cursor.line
        with self._lock:
            while len(records) < max_records:
                if segment not in self._sizes:
                    later = [s for s in self._sizes if s > segment]
                    if not later:
                        break
                    segment, offset = min(later), 0
                sealed = segment != self._active
                try:
                    f = open(self._segment_path(segment), "rb")  # noqa: SIM115 (closed below)
                except FileNotFoundError:
                    line = self._step_over_vanished(segment, line)
                    continue
                with f:
                    offset, line = self._read_segment(f, segment, offset, line, records, max_records, sealed=sealed)
                if len(records) >= max_records or not sealed:
                    break
                later = [s for s in self._sizes if s > segment]
                if not later:
                    break
                segment, offset = min(later), 0
        return records, Cursor(segment, offset, line)

    def _read_segment(self, f: BinaryIO, segment: int, offset: int, line: int, records: list[SpoolRecord],
                      max_records: int, *, sealed: bool) -> tuple[int, int]:
        f.seek(offset)
        while len(records) < max_records:
            raw = f.readline()
            if not raw:
                break
            if not raw.endswith(b"\n"):
                # Only a sealed segment can end in half a line (a failed write that could not be
                # cut back); the segment being written never does.
                if sealed:
                    self._quarantine(segment, offset, raw, "torn line")
                    offset += len(raw)
                break
            record = parse_line(raw)
            if record is None:
                self._quarantine(segment, offset, raw, "unreadable line")
            else:
                records.append(record)
            offset += len(raw)
            line += 1
        return offset, line

    def _step_over_vanished(self, segment: int, line: int) -> int:
        """Forget a segment that is gone from disk; returns the line number just past it."""
        later = [s for s in self._sizes if s > segment]
        end = self._first_line[min(later)] if later else self._appended
        lost = max(0, end - line)
        self.lost_lines += lost
        if segment == self._active:
            self._close_active(sync=False)
        self._bytes -= self._sizes.pop(segment)
        self._first_line.pop(segment, None)
        logger.error("telemetry spool: %s vanished from disk with %d records not yet sent (%d lost in all)",
                     self._segment_path(segment), lost, self.lost_lines)
        return line + lost

    def ack(self, cursor: Cursor) -> None:
        """Mark everything before ``cursor`` acknowledged: persist it, delete passed segments.
        A disk error is raised, and then nothing changed."""
        with self._lock:
            self._write_cursor(cursor)
            self._cursor = cursor
            freed = False
            for segment in [s for s in self._sizes if s < cursor.segment and s != self._active]:
                self._segment_path(segment).unlink(missing_ok=True)
                self._bytes -= self._sizes.pop(segment)
                self._first_line.pop(segment, None)
                freed = True
            if freed:
                self.room_freed()

    def newest_records(self, segments: int = 3) -> list[SpoolRecord]:
        """The records of the newest segments that hold any (at most ``segments`` of them)."""
        with self._lock:
            for segment in sorted(self._sizes, reverse=True)[:segments]:
                with open(self._segment_path(segment), "rb") as f:
                    records = [r for raw in f if (r := parse_line(raw)) is not None]
                if records:
                    return records
        return []

    def records_on_disk(self) -> Iterator[SpoolRecord]:
        """Every readable record in the segments still on disk, acknowledged or not, oldest first
        (a segment that vanishes meanwhile is passed over)."""
        for segment in sorted(self._sizes):
            try:
                with open(self._segment_path(segment), "rb") as f:
                    yield from (r for raw in f if (r := parse_line(raw)) is not None)
            except FileNotFoundError:
                continue

    # -- records set aside -------------------------------------------------------------------

    def set_aside(self, entries: Sequence[tuple[SpoolRecord, str]]) -> Path:
        """Keep records the collector refused, each with its reason, in ``rejected/``; the caller
        then acks past them. Raises ``OSError`` when the disk refuses (nothing was kept then)."""
        return self.refused.keep([(record.line(), reason) for record, reason in entries], "refused")

    def room_freed(self) -> None:
        """Segments went, or set-aside records were resent or discarded: an append may fit again."""
        if self._bytes + self.refused.bytes < self.max_bytes:
            self._full = False

    def _quarantine(self, segment: int, offset: int, raw: bytes, what: str) -> None:
        if (segment, offset) in self._quarantined:
            return
        where = f"{self._segment_path(segment).name} at byte {offset}"
        content = UNREADABLE + raw if raw.endswith(b"\n") else UNREADABLE + raw + b"\n"
        path = self.refused.keep([(content, f"{what} in {where}")], "corrupt")
        self._quarantined.add((segment, offset))
        self.corrupt_lines += 1
        logger.warning("telemetry spool: skipped an %s in %s; kept in %s", what, where, path)

    # -- opening -----------------------------------------------------------------------------

    def _segment_path(self, segment: int) -> Path:
        return self.directory / f"{_SEGMENT_PREFIX}{segment:010d}{_SEGMENT_SUFFIX}"

    def _open(self) -> None:
        (self.directory / (CURSOR_FILE + ".tmp")).unlink(missing_ok=True)
        found = sorted(
            int(p.name[len(_SEGMENT_PREFIX) : -len(_SEGMENT_SUFFIX)])
            for p in self.directory.glob(f"{_SEGMENT_PREFIX}*{_SEGMENT_SUFFIX}")
            if p.name[len(_SEGMENT_PREFIX) : -len(_SEGMENT_SUFFIX)].isdigit()
        )
        if found:
            self._truncate_torn_tail(found[-1])
        cursor = self._read_cursor() or Cursor(found[0] if found else 0, 0)
        for segment in found:
            if segment < cursor.segment:
                # Acknowledged before a crash that came between saving the cursor and deleting.
                self._segment_path(segment).unlink(missing_ok=True)
            else:
                self._sizes[segment] = self._segment_path(segment).stat().st_size
        if cursor.segment not in self._sizes and self._sizes:
            cursor = Cursor(min(self._sizes), 0)
        cursor = Cursor(cursor.segment, min(cursor.offset, self._sizes.get(cursor.segment, 0)))
        self._cursor = cursor
        self._bytes = sum(self._sizes.values())
        self._appended = 0
        for segment in self._sizes:
            self._first_line[segment] = self._appended
            self._appended += self._count_lines(segment, cursor.offset if segment == cursor.segment else 0)
        self._next_segment = max([*self._sizes, cursor.segment]) + 1
        self._full = self._bytes + self.refused.bytes >= self.max_bytes

    def _truncate_torn_tail(self, segment: int) -> None:
        """Cut a last line that has no newline: a write the previous process did not finish."""
        path = self._segment_path(segment)
        with open(path, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            end = size
            keep = 0
            while end > 0:
                start = max(0, end - 64 * 1024)
                f.seek(start)
                newline = f.read(end - start).rfind(b"\n")
                if newline >= 0:
                    keep = start + newline + 1
                    break
                end = start
            if keep == size:
                return
            f.seek(keep)
            torn = f.read()
            try:
                kept: object = self.refused.keep(
                    [(UNREADABLE + torn + b"\n", f"torn last line of {path.name} at byte {keep}")], "corrupt")
            except OSError as exc:  # half a record is no record: the spool must open all the same
                kept = f"nowhere ({exc}); it began {torn[:200]!r}"
            f.truncate(keep)
        self.corrupt_lines += 1
        logger.warning(
            "telemetry spool: cut a torn last line (%d bytes) from %s, left by an interrupted write; "
            "kept in %s",
            len(torn), path.name, kept,
        )

    def _read_cursor(self) -> Cursor | None:
        path = self.directory / CURSOR_FILE
        try:
            raw = json.loads(path.read_bytes())
            return Cursor(int(raw["segment"]), int(raw["offset"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            # Cannot happen with os.replace; if it does, resending is safe (ingest is idempotent).
            logger.error("telemetry spool: unreadable %s (%s); resending from the oldest segment", path, exc)
            return None

    def _write_cursor(self, cursor: Cursor) -> None:
        path = self.directory / CURSOR_FILE
        tmp = path.with_name(CURSOR_FILE + ".tmp")
        self.directory.mkdir(parents=True, exist_ok=True)  # an operator may have removed it
        try:
            with open(tmp, "wb") as f:
                f.write(json.dumps({"segment": cursor.segment, "offset": cursor.offset}).encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def _count_lines(self, segment: int, offset: int) -> int:
        count = 0
        with open(self._segment_path(segment), "rb") as f:
            f.seek(offset)
            while chunk := f.read(_READ_CHUNK):
                count += chunk.count(b"\n")
        return count
