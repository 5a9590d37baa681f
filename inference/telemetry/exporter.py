"""The telemetry exporter: request events and runtime samples to the control plane, never lost.

Write-ahead, in three steps, so the serving path never waits on a disk or on the network:

1. ``record_event`` / ``record_sample`` (asyncio loop, engine thread) put the record on a bounded
   in-memory queue without blocking. A full queue turns the record away and counts it. A request
   event queued is also appended to the event journal (``journal.py``: one write to the page cache,
   no fsync), so that a kill -9 before the writer has spooled it does not lose it: the next start
   spools what the journal holds and the spool does not.
2. The writer thread numbers the events (``seq``, ``sequence.py``), stamps each sample with the
   highest number given so far (``events_recorded``), serializes them and appends them to the
   on-disk ``Spool`` (append-only segments).
3. The sender thread (``sender.py``) reads batches from the spool's cursor, POSTs them to
   ``{url}/api/v1/events`` and moves the cursor (persisted at once) when the collector is through
   with them; what it refused by its contract is set aside in ``rejected/`` with the reasons, and
   anything else it answers (a proxy's page, a 5xx, no answer) keeps the batch for a retry.

The POST body is built from the stored JSON bytes, never re-serialized, so a resend is
byte-identical; the collector is idempotent on ``event_id``. A record can be sent twice only if
the process dies between the collector's answer and saving the cursor.

A disk that refuses a write (full, EIO) holds the writer, not the records: the chunk is kept in
memory and written again after a backoff while new records wait on the queue, so a disk that fills
and frees again loses nothing; only a queue that overflows meanwhile turns records away.

Nothing is dropped silently: records turned away because the queue or the spool is full, or
recorded after ``close``, are counted in ``stats()["dropped_records"]`` and logged at ERROR (at most
every 10 s, with the count); the records set aside stay until an operator resends or discards
them. ``problems()`` says in words what ``/health`` should report as degraded.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from inference import __version__
from inference.backoff import backoff_s
from inference.contracts import RequestEvent, RuntimeSample
from inference.metrics import LiveSample, counter, gauge
from inference.telemetry.drops import DropLog
from inference.telemetry.journal import EventJournal, spooled_event_ids
from inference.telemetry.refused import RefusedFile
from inference.telemetry.sender import Sender, Wakeups
from inference.telemetry.sequence import EventSequence
from inference.telemetry.spool import SEGMENT_BYTES, Spool, SpoolRecord

logger = logging.getLogger("inference.telemetry")

_WRITE_CHUNK = 1000  # most queued records written (and flushed) together
_WRITE_RETRY_S, _WRITE_RETRY_MAX_S = 0.1, 5.0  # backoff while the disk refuses a write
_SYNC_INTERVAL_S = 1.0  # most time appended records wait in the page cache before an fsync
FAILING_AFTER = 3  # failed attempts in a row from which the sender counts as failing

Item = RequestEvent | RuntimeSample


@dataclass
class _FlushMarker:
    """Queued by ``flush``: the writer notes how many lines the spool holds when it gets here."""

    done: threading.Event = field(default_factory=threading.Event)
    target: int = 0


class TelemetryExporter:
    """Exports request events and runtime samples to the control plane through a disk spool."""

    def __init__(
        self,
        *,
        url: str,
        token: str | None,
        spool_dir: Path,
        spool_max_bytes: int,
        batch_size: int = 500,
        interval_s: float = 1.0,
        timeout_s: float = 5.0,
        queue_max: int = 100_000,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        stale_after_s: float = 300.0,
    ) -> None:
        if batch_size <= 0 or interval_s <= 0 or timeout_s <= 0 or queue_max <= 0 or stale_after_s <= 0:
            raise ValueError("batch_size, interval_s, timeout_s, queue_max and stale_after_s must be positive")
        headers = {"Content-Type": "application/json", "User-Agent": f"wattson-runtime/{__version__}"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._batch_size = batch_size
        self._stale_after_s = stale_after_s
        # Small spools get small segments, so acknowledged bytes waiting in the segment being
        # written never take more than a sliver of the cap.
        segment_bytes = max(1024, min(SEGMENT_BYTES, spool_max_bytes // 16))
        self._spool = Spool(Path(spool_dir), max_bytes=spool_max_bytes, segment_bytes=segment_bytes)
        self._sequence = EventSequence(Path(spool_dir), spooled=self._spool.newest_records())
        self._queue: queue.Queue[Item | _FlushMarker] = queue.Queue(maxsize=queue_max)
        self._drops = DropLog()
        self._journal = EventJournal(Path(spool_dir))
        # Journaled by a process that was killed before its writer spooled them: numbered and
        # spooled now, ahead of anything this process records.
        for event in self._journal.recover(
                spooled_ids=lambda: spooled_event_ids(self._spool.records_on_disk())):
            try:
                self._queue.put_nowait(event)
            except queue.Full:
                self._drops.note("in-memory queue full", 1, f"{self._queue.maxsize} records (journal replay)")
        self._turned_away: Counter[str] = Counter()  # events the full queue refused, by runtime_id, not numbered
        self._wakeups = Wakeups()
        self._sender = Sender(self._spool, self._wakeups, url=url, headers=headers, batch_size=batch_size,
                              interval_s=interval_s, timeout_s=timeout_s, backoff_initial_s=backoff_initial_s,
                              backoff_max_s=backoff_max_s)

        self._offer_lock = threading.Lock()  # makes "not closed, then put" atomic against close()
        self._closed = False
        self._started = False
        self._stopping = threading.Event()  # the writer drains the queue and exits
        self._writer_thread: threading.Thread | None = None
        self._sender_thread: threading.Thread | None = None
        self._write_errors = 0
        self._write_failing = False  # the disk refused the last write; the writer is retrying it
        self.resent_records = 0
        self.discarded_records = 0

    # -- serving path: never blocks, never raises --------------------------------------------

    def record_event(self, event: RequestEvent) -> None:
        """Queue a request event for export; drops it (counted, logged) if the queue is full."""
        self._offer(event)

    def record_sample(self, sample: RuntimeSample) -> None:
        """Queue a runtime sample for export; drops it (counted, logged) if the queue is full."""
        self._offer(sample)

    def _offer(self, record: Item) -> None:
        with self._offer_lock:
            if self._closed:
                self._drops.note("recorded after the exporter was closed")
                self._drops.report()  # no thread is left to report it
                return
            try:
                self._queue.put_nowait(record)
            except queue.Full:
                self._drops.note("in-memory queue full", 1, f"{self._queue.maxsize} records")
                if isinstance(record, RequestEvent):
                    self._turned_away[record.runtime_id] += 1  # recorded all the same: numbered as lost
                return
            if isinstance(record, RequestEvent):
                # Under the lock that queued it, so the writer cannot empty the journal between.
                self._journal.append(record)

    def _journal_spooled(self) -> None:
        """Empty the journal once everything journaled has been through ``_store``: called by
        the thread that drains the queue, between chunks, so an empty queue means none is in hand."""
        with self._offer_lock:
            if self._journal.lines and self._queue.empty():
                self._journal.clear()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer and sender threads."""
        if self._started or self._closed:
            raise RuntimeError("the exporter can be started once, before it is closed")
        self._started = True
        self._writer_thread = threading.Thread(target=self._run_writer, name="telemetry-writer", daemon=True)
        self._sender_thread = threading.Thread(target=self._sender.run, name="telemetry-sender", daemon=True)
        self._writer_thread.start()
        self._sender_thread.start()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every record recorded before this call has been acknowledged by the collector
        (or refused by it and set aside). True if so within ``timeout``; records dropped before
        reaching the spool are not waited for (see ``stats()["dropped_records"]``).
        """
        deadline = time.monotonic() + timeout
        if not self._started or self._closed:
            return self._queue.empty() and self._spool.pending == 0
        marker = _FlushMarker()
        wakeups = self._wakeups
        with wakeups.cv:
            wakeups.flushing += 1
        try:
            try:
                self._queue.put(marker, timeout=max(0.0, timeout))
            except queue.Full:
                return False
            if not marker.done.wait(max(0.0, deadline - time.monotonic())):
                return False
            with wakeups.cv:
                wakeups.kicked = True
                wakeups.cv.notify_all()
                return wakeups.cv.wait_for(
                    lambda: self._spool.cursor.line >= marker.target,
                    max(0.0, deadline - time.monotonic()),
                )
        finally:
            with wakeups.cv:
                wakeups.flushing -= 1

    def close(self, timeout: float = 5.0) -> None:
        """Write everything queued to the spool, give the sender one last chance to send within
        ``timeout``, and stop both threads. What is not acknowledged stays spooled for the next
        start. Records recorded from now on are dropped (counted and logged)."""
        deadline = time.monotonic() + timeout
        with self._offer_lock:
            if self._closed:
                return
            self._closed = True
        self._stopping.set()
        if self._writer_thread is not None:
            self._writer_thread.join(max(0.0, deadline - time.monotonic()))
        writer_alive = self._writer_thread is not None and self._writer_thread.is_alive()
        if writer_alive:
            logger.error("telemetry: the spool writer did not finish within %.1f s; %d records still queued",
                         timeout, self._queue.qsize())
        else:
            self._store(self._drain_queue(len(self._queue.queue) + 1))  # never started: write it now
            self._journal_spooled()
        if self._sender_thread is not None:
            with self._wakeups.cv:
                self._wakeups.final_deadline = deadline
            self._wakeups.notify(kick=True)
            self._sender_thread.join(max(0.0, deadline - time.monotonic()) + 0.1)
            if self._sender_thread.is_alive():
                logger.warning("telemetry: the sender is still waiting on the collector; "
                               "unacknowledged records stay in the spool")
        if not writer_alive:
            self._spool.close()
            self._journal.close()
        self._drops.report(force=True)
        pending = self._spool.pending
        if pending:
            logger.warning("telemetry: %d records left in the spool at %s, to be sent after restart",
                           pending, self._spool.directory)

    # -- what /health and /metrics show ------------------------------------------------------

    def stats(self) -> dict[str, int | float | bool | str | None]:
        """Counters for /health and /metrics; reading them takes no lock that disk or network hold."""
        spool, sender = self._spool, self._sender
        pending = spool.pending
        oldest = sender.oldest_unsent_at
        return {
            "queued": self._queue.qsize(),
            "spooled_records": pending,
            "spooled_bytes": spool.size_bytes,
            "spool_max_bytes": spool.max_bytes,
            "spool_full": spool.full,
            "sent_records": sender.sent_records,
            "sent_batches": sender.sent_batches,
            "failed_posts": sender.failed_posts,
            "failing_attempts": sender.failures,
            "dropped_records": self._drops.total,
            "rejected_records": sender.rejected_records,
            "set_aside_records": spool.refused.records,
            "set_aside_bytes": spool.refused.bytes,
            "resent_records": self.resent_records,
            "discarded_records": self.discarded_records,
            "corrupt_lines": spool.corrupt_lines,
            "lost_records": spool.lost_lines,
            "io_errors": sender.io_errors + self._write_errors,
            "journal_errors": self._journal.errors,
            "oldest_unsent_age_s": max(0.0, time.time() - oldest) if pending and oldest is not None else 0.0,
            "events_recorded": self._sequence.recorded,
            "last_error": sender.last_error,
            "last_error_at": sender.last_error_at,
            "last_success_at": sender.last_success_at,
        }

    def problems(self) -> list[str]:
        """Why the telemetry is degraded, in words (none when it is not)."""
        stats = self.stats()
        spool = self._spool
        problems = []
        if stats["spool_full"]:
            problems.append(f"telemetry spool full: new records are refused ({stats['spooled_bytes']} bytes spooled "
                            f"and {stats['set_aside_bytes']} set aside, of {spool.max_bytes})")
        if stats["dropped_records"]:
            problems.append(f"{stats['dropped_records']} telemetry records dropped (see the log)")
        age = float(stats["oldest_unsent_age_s"] or 0.0)
        if age > self._stale_after_s:
            problems.append(f"the oldest unsent telemetry record is {age:.0f} s old (over {self._stale_after_s:g} s); "
                            f"{stats['spooled_records']} records wait in the spool")
        if stats["set_aside_records"]:
            problems.append(f"{stats['set_aside_records']} telemetry records set aside in {spool.refused.directory} "
                            "(refused by the control plane, or unreadable): list, resend or discard them at "
                            "/admin/telemetry/refused")
        if stats["failing_attempts"] >= FAILING_AFTER:
            problems.append(f"the telemetry sender is failing ({stats['failing_attempts']} attempts in a row): "
                            f"{stats['last_error']}")
        if self._write_failing:
            problems.append(f"the telemetry spool cannot be written ({self._spool.write_error}); records wait in "
                            f"memory ({stats['queued']} queued) until the disk takes them")
        if self._journal.write_error is not None:
            problems.append(f"the telemetry event journal cannot be written ({self._journal.write_error}); request "
                            "events wait in memory alone until the spool takes them, and a crash would lose them")
        if stats["lost_records"]:
            problems.append(f"{stats['lost_records']} spooled telemetry records were lost: their segment vanished "
                            "from disk")
        thread = self._sender_thread
        if thread is not None and not thread.is_alive() and not self._closed:
            problems.append("the telemetry sender thread is not running")
        return problems

    def samples(self) -> list[LiveSample]:
        """The stats as /metrics series: levels as gauges, running totals as counters."""
        return _samples(self.stats())

    @property
    def events_recorded(self) -> int:
        """Events numbered so far (every runtime_id together)."""
        return self._sequence.recorded

    # -- records set aside: an operator's to resend or discard -------------------------------

    def set_aside_files(self) -> list[RefusedFile]:
        return self._spool.refused.files()

    def resend_set_aside(self, name: str | None = None) -> int:
        """Put set-aside records (one file's, or all) back in the spool to be sent as they are,
        once an operator has fixed what made them refused; returns how many went back. Records
        the spool has no room for stay set aside. ``KeyError`` for a name that is not a file."""
        store = self._spool.refused
        names = [name] if name is not None else [f.name for f in store.files()]
        resent = 0
        for each in names:
            entries = store.entries(each)
            records = [e.record for e in entries if e.record is not None]
            if not records:
                continue
            room = sum(len(e.line) for e in entries if e.record is not None)
            stored = self._spool.append(records, extra_room=room)
            if stored:
                taken = {id(r) for r in records[:stored]}
                store.replace(each, [e for e in entries if id(e.record) not in taken])
                self._spool.room_freed()
                resent += stored
                logger.warning("telemetry: %d set-aside records of %s put back in the spool", stored, each)
            if stored < len(records):
                break  # the spool is full: the rest wait
        self.resent_records += resent
        if resent:
            self._wakeups.notify(kick=True)
        return resent

    def discard_set_aside(self, name: str) -> int:
        """Delete one file of set-aside records on an operator's word; returns how many it held."""
        discarded = self._spool.refused.discard(name)
        self._spool.room_freed()
        self.discarded_records += discarded
        logger.warning("telemetry: an operator discarded %d set-aside records (%s)", discarded, name)
        return discarded

    # -- writer thread -----------------------------------------------------------------------

    def _run_writer(self) -> None:
        last_sync = time.monotonic()
        dirty = False
        while True:
            items = self._drain_queue(_WRITE_CHUNK, wait_s=0.1)
            if items:
                try:
                    self._store(items)
                    dirty = True
                except Exception:  # the thread must outlive any one bad chunk
                    logger.exception("telemetry: the spool writer failed on %d records", len(items))
                self._journal_spooled()
            if dirty and time.monotonic() - last_sync >= _SYNC_INTERVAL_S:
                try:
                    self._spool.sync()
                except OSError as exc:
                    logger.error("telemetry: could not fsync the spool: %s", exc)
                last_sync, dirty = time.monotonic(), False
            self._drops.report()
            if not items and self._stopping.is_set() and self._queue.empty():
                return

    def _drain_queue(self, limit: int, wait_s: float | None = None) -> list[Item | _FlushMarker]:
        items: list[Item | _FlushMarker] = []
        try:
            items.append(self._queue.get(timeout=wait_s) if wait_s else self._queue.get_nowait())
            while len(items) < limit:
                items.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return items

    def _store(self, items: list[Item | _FlushMarker]) -> None:
        numbers = self._number(items)
        records: list[SpoolRecord] = []
        for item in items:
            if isinstance(item, _FlushMarker):
                self._append(records)
                records = []
                item.target = self._spool.appended
                item.done.set()
            elif (record := self._serialize(item, numbers)) is not None:
                records.append(record)
        self._append(records)
        if self._spool.pending >= self._batch_size:
            self._wakeups.notify(data=True)

    def _number(self, items: list[Item | _FlushMarker]) -> dict[str, int]:
        """Number the chunk's events and those the full queue turned away since the last chunk
        (saved before anything is appended); returns the next number of each runtime_id."""
        with self._offer_lock:
            turned_away, self._turned_away = self._turned_away, Counter()
        counts = Counter(turned_away)
        counts.update(item.runtime_id for item in items if isinstance(item, RequestEvent))
        first = self._sequence.take(counts)
        return {runtime_id: n + turned_away[runtime_id] for runtime_id, n in first.items()}

    def _serialize(self, item: Item, numbers: dict[str, int]) -> SpoolRecord | None:
        try:
            if isinstance(item, RequestEvent):
                seq = numbers[item.runtime_id]
                numbers[item.runtime_id] = seq + 1
                return SpoolRecord("E", item.model_copy(update={"seq": seq}).model_dump_json().encode())
            recorded = numbers[item.runtime_id] - 1 if item.runtime_id in numbers \
                else self._sequence.last(item.runtime_id)
            return SpoolRecord("S", item.model_copy(update={"events_recorded": recorded}).model_dump_json().encode())
        except Exception:
            logger.exception("telemetry: could not serialize a %s", type(item).__name__)
            self._drops.note("not serializable")
            return None

    def _append(self, records: list[SpoolRecord]) -> None:
        """Append in order. Records past the spool's budget are turned away (counted: the budget is
        the operator's); records the disk refused are written again after a backoff, for as long as
        it takes, unless the exporter is closing (then they are counted as dropped)."""
        failures = 0
        while records:
            records = records[self._spool.append(records):]
            if not records:
                break
            if self._spool.full:
                self._drops.note("spool full", len(records), f"{self._spool.size_bytes} spooled and "
                                 f"{self._spool.refused.bytes} set aside of {self._spool.max_bytes} bytes at "
                                 f"{self._spool.directory}; is the collector down?")
                break
            self._write_errors += 1
            failures += 1
            self._write_failing = True
            if self._stopping.wait(backoff_s(failures, base_s=_WRITE_RETRY_S, cap_s=_WRITE_RETRY_MAX_S)):
                self._drops.note("spool write failed", len(records), str(self._spool.write_error))
                break
        self._write_failing = False


# The exporter's stats on /metrics: stats key -> (metric name, help). Levels are gauges, running
# totals counters (their names end in _total).
_TELEMETRY_LEVELS = {
    "queued": ("wattson_telemetry_queued", "Records waiting in memory for the spool"),
    "spooled_records": ("wattson_telemetry_spooled_records", "Records in the spool not yet taken by the control plane"),
    "spooled_bytes": ("wattson_telemetry_spooled_bytes", "Bytes the spool's segments take"),
    "set_aside_records": ("wattson_telemetry_set_aside_records",
                          "Records set aside (refused by the control plane, or unreadable) until an operator acts"),
    "set_aside_bytes": ("wattson_telemetry_set_aside_bytes",
                        "Bytes the records set aside take (counted against the spool's cap)"),
    "oldest_unsent_age_s": ("wattson_telemetry_oldest_unsent_age_seconds",
                            "Age of the oldest record the control plane has not yet taken"),
    "failing_attempts": ("wattson_telemetry_failing_attempts", "Attempts in a row that got no batch through"),
}
_TELEMETRY_TOTALS = {
    "sent_records": ("wattson_telemetry_sent_records_total", "Records the control plane stored"),
    "failed_posts": ("wattson_telemetry_failed_posts_total", "POSTs that got no usable answer"),
    "dropped_records": ("wattson_telemetry_dropped_records_total",
                        "Records turned away (queue or spool full, disk error, after close)"),
    "rejected_records": ("wattson_telemetry_rejected_records_total",
                         "Records the control plane refused, set aside by the runtime"),
    "lost_records": ("wattson_telemetry_lost_records_total",
                     "Spooled records lost with a segment that vanished from disk"),
    "io_errors": ("wattson_telemetry_io_errors_total", "Disk errors met by the spool's writer and sender"),
    "journal_errors": ("wattson_telemetry_journal_errors_total",
                       "Disk errors met writing the event journal (those events waited in memory alone)"),
    "events_recorded": ("wattson_telemetry_events_recorded_total",
                        "Request events numbered (the highest seq given, every runtime_id together)"),
}


def _samples(stats: dict[str, int | float | bool | str | None]) -> list[LiveSample]:
    rows: list[LiveSample] = []
    for key, (name, help_text) in _TELEMETRY_LEVELS.items():
        rows += gauge(name, help_text, stats.get(key))  # type: ignore[arg-type]
    for key, (name, help_text) in _TELEMETRY_TOTALS.items():
        rows += counter(name, help_text, stats.get(key))  # type: ignore[arg-type]
    rows += gauge("wattson_telemetry_spool_full", "1 while the spool refuses records",
                  1.0 if stats.get("spool_full") else 0.0)
    return rows
