"""The event journal: a request event recorded survives a kill -9 from the moment it is recorded.

The exporter's queue is memory; its writer appends to the spool up to a tenth of a second later
(more under load), and a SIGKILL in between would lose an event its client already has the answer
of. So ``record_event`` also appends the event's JSON, one line, to ``journal.jsonl`` beside the
spool's segments: one ``os.write`` to the page cache, never an fsync (the page cache outlives the
process; a power loss is the spool's fsync interval's business, as before). The writer empties the
journal whenever everything journaled has reached the spool; opening the exporter after a crash
puts what the journal still holds back on the queue, less the events the spool already has (by
``event_id``), so an event is numbered (``seq``) and spooled once.

The journal is written and emptied under the exporter's offer lock: it has no lock of its own. A
disk error on it never fails the caller: it is counted and logged (at most every 10 s), and the
event goes on by the queue alone, as without a journal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from pydantic import ValidationError

from inference.contracts import RequestEvent
from inference.telemetry.records import SpoolRecord

logger = logging.getLogger("inference.telemetry")

JOURNAL_FILE = "journal.jsonl"
_ERROR_LOG_INTERVAL_S = 10.0
_EVENT_ID = re.compile(rb'"event_id":\s*"([^"]+)"')  # as pydantic writes it, or spaced


class EventJournal:
    """Request events recorded and not yet known to be in the spool, one JSON line each."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / JOURNAL_FILE
        self.errors = 0  # appends and truncations the disk refused
        self.write_error: str | None = None  # why the last append failed (None: it did not)
        self.lines = 0  # lines in the file since it was last emptied
        self._bytes = 0
        self._fd: int | None = None
        self._last_error_log: float | None = None

    def recover(self, *, spooled_ids: Callable[[], set[str]]) -> list[RequestEvent]:
        """The events a previous process journaled that are not among ``spooled_ids()`` (called
        only when there are any, since it reads every segment on disk), in the order they were
        recorded; then opens the journal for appending (its lines stay until ``clear``).
        Unreadable lines (a write the kill cut short) are logged and skipped."""
        events: list[RequestEvent] = []
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            raw = b""
        except OSError as exc:
            self._failed("could not read", exc)
            raw = b""
        lines = raw.splitlines()
        if lines:
            spooled = spooled_ids()
            unreadable = 0
            for line in lines:
                try:
                    event = RequestEvent.model_validate_json(line)
                except ValidationError:
                    unreadable += 1
                    continue
                if str(event.event_id) not in spooled:
                    events.append(event)
            logger.warning("telemetry: the event journal %s held %d events; %d were not in the spool and go to it "
                           "now%s", self.path, len(lines), len(events),
                           f" ({unreadable} unreadable lines skipped)" if unreadable else "")
        if self._open() and not raw.endswith(b"\n"):
            # A torn last line must not swallow the next one appended.
            raw = raw[: raw.rfind(b"\n") + 1]
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, len(raw))  # type: ignore[arg-type]
        self.lines, self._bytes = len(lines), len(raw)
        return events

    def append(self, event: RequestEvent) -> None:
        """Append one event (one write, no fsync); a disk error is counted and logged, not raised."""
        if self._fd is None and not self._open():
            return
        assert self._fd is not None
        line = event.model_dump_json().encode() + b"\n"
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            # Cut what a failed write left, so the next line does not run into half of this one.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._bytes)
            self._failed("could not append to", exc)
            return
        self.lines += 1
        self._bytes += len(line)
        self.write_error = None

    def clear(self) -> None:
        """Empty the journal: everything in it has reached the spool (or was counted as dropped)."""
        try:
            if self._fd is not None and os.fstat(self._fd).st_nlink == 0:
                self.close()  # the directory was removed: journal where it is made again
            if self._fd is None and not self._open():
                return
            assert self._fd is not None
            os.ftruncate(self._fd, 0)
        except OSError as exc:
            self._failed("could not empty", exc)
            return
        self.lines, self._bytes = 0, 0
        self.write_error = None

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _open(self) -> bool:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._bytes = os.fstat(self._fd).st_size
        except OSError as exc:
            self._fd = None
            self._failed("could not open", exc)
            return False
        return True

    def _failed(self, what: str, exc: OSError) -> None:
        self.errors += 1
        self.write_error = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if self._last_error_log is None or now - self._last_error_log >= _ERROR_LOG_INTERVAL_S:
            self._last_error_log = now
            logger.error("telemetry: %s the event journal %s (%s; %d journal errors in all); request events "
                         "wait in memory alone until the spool takes them", what, self.path, exc, self.errors)


def spooled_event_ids(records: Iterable[SpoolRecord]) -> set[str]:
    """The ``event_id`` of each request event among ``records``, found without parsing the whole
    JSON (a start after a crash may read a spool of a million records)."""
    found: set[str] = set()
    for record in records:
        if record.kind == "E" and (match := _EVENT_ID.search(record.data)) is not None:
            found.add(match.group(1).decode())
    return found
