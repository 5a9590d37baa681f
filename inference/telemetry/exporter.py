"""The telemetry exporter: request events and runtime samples to the control plane, never lost.

Write-ahead, in three steps, so the serving path never waits on a disk or on the network:

1. ``record_event`` / ``record_sample`` (asyncio loop, engine thread) serialize the record and put
   it on a bounded in-memory queue without blocking. A full queue drops the record and counts it.
2. The writer thread drains the queue into the on-disk ``Spool`` (append-only segments).
3. The sender thread reads batches from the spool's cursor, POSTs them to
   ``{url}/api/v1/events``, and moves the cursor (persisted at once) when the collector answers
   2xx. While the collector is down, slow or failing it retries the same batch with capped,
   jittered exponential backoff; a new exporter over the same directory resumes from the cursor.

The POST body is built from the stored JSON bytes, never re-serialized, so a resend is
byte-identical; the collector is idempotent on ``event_id``. A record can be sent twice only if
the process dies between the collector's answer and saving the cursor.

Nothing is dropped silently: records refused because the queue or the spool is full, or recorded
after ``close``, are counted in ``stats()["dropped_records"]`` and logged at ERROR (at most every
10 s, with the count), and ``stats()["spool_full"]`` says when the spool refuses records.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import httpx

from inference import __version__
from inference.backoff import backoff_s
from inference.contracts import RequestEvent, RuntimeSample
from inference.telemetry.spool import SEGMENT_BYTES, Cursor, Spool, SpoolRecord

logger = logging.getLogger("inference.telemetry")

EVENTS_PATH = "/api/v1/events"
DROP_LOG_INTERVAL_S = 10.0
_WRITE_CHUNK = 1000  # most queued records written (and flushed) together
_SYNC_INTERVAL_S = 1.0  # most time appended records wait in the page cache before an fsync
_BODY_LOG_CHARS = 2000


class _Outcome(Enum):
    SENT = "sent"
    REJECTED = "rejected"  # the collector refused the batch as malformed: keep it aside, move on
    TOO_LARGE = "too_large"  # 413 for a batch of several records: send smaller batches
    RETRY = "retry"


@dataclass
class _Batch:
    records: list[SpoolRecord]
    next_cursor: Cursor
    body: bytes


@dataclass
class _FlushMarker:
    """Queued by ``flush``: the writer notes how many lines the spool holds when it gets here."""

    done: threading.Event = field(default_factory=threading.Event)
    target: int = 0


def _batch_body(records: list[SpoolRecord]) -> bytes:
    events = b",".join(r.data for r in records if r.kind == "E")
    samples = b",".join(r.data for r in records if r.kind == "S")
    return b'{"events":[' + events + b'],"samples":[' + samples + b"]}"


class _DropLog:
    """Counts dropped records by reason and logs each reason at ERROR at most every few seconds."""

    def __init__(self, interval_s: float = DROP_LOG_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._unreported: Counter[str] = Counter()
        self._details: dict[str, str] = {}
        self._last_report: dict[str, float] = {}
        self.total = 0

    def note(self, reason: str, count: int = 1, detail: str = "") -> None:
        """Count ``count`` records dropped for ``reason`` (a fixed phrase; ``detail`` may vary)."""
        with self._lock:
            self._unreported[reason] += count
            self._details[reason] = detail
            self.total += count

    def report(self, *, force: bool = False) -> None:
        now = time.monotonic()
        lines: list[tuple[str, int, float | None, str]] = []
        with self._lock:
            for reason, count in list(self._unreported.items()):
                last = self._last_report.get(reason)
                if force or last is None or now - last >= self._interval_s:
                    lines.append((reason, count, None if last is None else now - last, self._details[reason]))
                    self._last_report[reason] = now
                    del self._unreported[reason]
            total = self.total
        for reason, count, since, detail in lines:
            window = "" if since is None else f" in the last {since:.0f} s"
            logger.error("telemetry: dropped %d records%s: %s%s (%d dropped in all)",
                         count, window, reason, f" ({detail})" if detail else "", total)


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
    ) -> None:
        if batch_size <= 0 or interval_s <= 0 or timeout_s <= 0 or queue_max <= 0:
            raise ValueError("batch_size, interval_s, timeout_s and queue_max must be positive")
        self._url = url.rstrip("/") + EVENTS_PATH
        self._headers = {"Content-Type": "application/json", "User-Agent": f"wattson-runtime/{__version__}"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._batch_size = batch_size
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        # Small spools get small segments, so acknowledged bytes waiting in the segment being
        # written never take more than a sliver of the cap.
        segment_bytes = max(1024, min(SEGMENT_BYTES, spool_max_bytes // 16))
        self._spool = Spool(Path(spool_dir), max_bytes=spool_max_bytes, segment_bytes=segment_bytes)
        self._queue: queue.Queue[tuple[str, str] | _FlushMarker] = queue.Queue(maxsize=queue_max)
        self._drops = _DropLog()

        self._offer_lock = threading.Lock()  # makes "not closed, then put" atomic against close()
        self._closed = False
        self._started = False
        self._stopping = threading.Event()  # the writer drains the queue and exits
        self._final_deadline: float | None = None  # set by close(): the sender's last chance
        self._cv = threading.Condition()
        self._data_ready = False  # a full batch is waiting
        self._kicked = False  # flush() or close() wants the sender now
        self._flushing = 0
        self._writer: threading.Thread | None = None
        self._sender: threading.Thread | None = None

        self._sent_records = 0
        self._sent_batches = 0
        self._failed_posts = 0
        self._failures = 0  # consecutive failed attempts, for backoff
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._last_success_at: float | None = None

    # -- serving path: never blocks, never raises --------------------------------------------

    def record_event(self, event: RequestEvent) -> None:
        """Queue a request event for export; drops it (counted, logged) if the queue is full."""
        self._offer("E", event)

    def record_sample(self, sample: RuntimeSample) -> None:
        """Queue a runtime sample for export; drops it (counted, logged) if the queue is full."""
        self._offer("S", sample)

    def _offer(self, kind: str, record: RequestEvent | RuntimeSample) -> None:
        try:
            data = record.model_dump_json()
        except Exception:
            logger.exception("telemetry: could not serialize a %s", type(record).__name__)
            self._drops.note("not serializable")
            return
        with self._offer_lock:
            if self._closed:
                self._drops.note("recorded after the exporter was closed")
                self._drops.report()  # no thread is left to report it
                return
            try:
                self._queue.put_nowait((kind, data))
            except queue.Full:
                self._drops.note("in-memory queue full", 1, f"{self._queue.maxsize} records")

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer and sender threads."""
        if self._started or self._closed:
            raise RuntimeError("the exporter can be started once, before it is closed")
        self._started = True
        self._writer = threading.Thread(target=self._run_writer, name="telemetry-writer", daemon=True)
        self._sender = threading.Thread(target=self._run_sender, name="telemetry-sender", daemon=True)
        self._writer.start()
        self._sender.start()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every record recorded before this call has been acknowledged by the collector
        (or refused by it and kept in ``rejected/``). True if so within ``timeout``; records
        dropped before reaching the spool are not waited for (see ``stats()["dropped_records"]``).
        """
        deadline = time.monotonic() + timeout
        if not self._started or self._closed:
            return self._queue.empty() and self._spool.pending == 0
        marker = _FlushMarker()
        with self._cv:
            self._flushing += 1
        try:
            try:
                self._queue.put(marker, timeout=max(0.0, timeout))
            except queue.Full:
                return False
            if not marker.done.wait(max(0.0, deadline - time.monotonic())):
                return False
            with self._cv:
                self._kicked = True
                self._cv.notify_all()
                return self._cv.wait_for(
                    lambda: self._spool.cursor.line >= marker.target,
                    max(0.0, deadline - time.monotonic()),
                )
        finally:
            with self._cv:
                self._flushing -= 1

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
        if self._writer is not None:
            self._writer.join(max(0.0, deadline - time.monotonic()))
        writer_alive = self._writer is not None and self._writer.is_alive()
        if writer_alive:
            logger.error("telemetry: the spool writer did not finish within %.1f s; %d records still queued",
                         timeout, self._queue.qsize())
        else:
            self._store(self._drain_queue(len(self._queue.queue) + 1))  # never started: write it now
        if self._sender is not None:
            with self._cv:
                self._final_deadline = deadline
                self._kicked = True
                self._cv.notify_all()
            self._sender.join(max(0.0, deadline - time.monotonic()) + 0.1)
            if self._sender.is_alive():
                logger.warning("telemetry: the sender is still waiting on the collector; "
                               "unacknowledged records stay in the spool")
        if not writer_alive:
            self._spool.close()
        self._drops.report(force=True)
        pending = self._spool.pending
        if pending:
            logger.warning("telemetry: %d records left in the spool at %s, to be sent after restart",
                           pending, self._spool.directory)

    def stats(self) -> dict[str, int | float | bool | str | None]:
        """Counters for /health and /metrics; reading them takes no lock that disk or network hold."""
        return {
            "queued": self._queue.qsize(),
            "spooled_records": self._spool.pending,
            "spooled_bytes": self._spool.size_bytes,
            "spool_max_bytes": self._spool.max_bytes,
            "spool_full": self._spool.full,
            "sent_records": self._sent_records,
            "sent_batches": self._sent_batches,
            "failed_posts": self._failed_posts,
            "dropped_records": self._drops.total,
            "rejected_records": self._spool.rejected_records,
            "corrupt_lines": self._spool.corrupt_lines,
            "last_error": self._last_error,
            "last_error_at": self._last_error_at,
            "last_success_at": self._last_success_at,
        }

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
            if dirty and time.monotonic() - last_sync >= _SYNC_INTERVAL_S:
                try:
                    self._spool.sync()
                except OSError as exc:
                    logger.error("telemetry: could not fsync the spool: %s", exc)
                last_sync, dirty = time.monotonic(), False
            self._drops.report()
            if not items and self._stopping.is_set() and self._queue.empty():
                return

    def _drain_queue(self, limit: int, wait_s: float | None = None) -> list[tuple[str, str] | _FlushMarker]:
        items: list[tuple[str, str] | _FlushMarker] = []
        try:
            items.append(self._queue.get(timeout=wait_s) if wait_s else self._queue.get_nowait())
            while len(items) < limit:
                items.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return items

    def _store(self, items: list[tuple[str, str] | _FlushMarker]) -> None:
        records: list[SpoolRecord] = []
        for item in items:
            if isinstance(item, _FlushMarker):
                self._append(records)
                records = []
                item.target = self._spool.appended
                item.done.set()
            else:
                records.append(SpoolRecord(kind=item[0], data=item[1].encode()))
        self._append(records)
        if self._spool.pending >= self._batch_size:
            with self._cv:
                self._data_ready = True
                self._cv.notify_all()

    def _append(self, records: list[SpoolRecord]) -> None:
        if not records:
            return
        refused = len(records) - self._spool.append(records)
        if refused:
            if self._spool.full:
                self._drops.note("spool full", refused, f"{self._spool.size_bytes} of {self._spool.max_bytes} "
                                 f"bytes at {self._spool.directory}; is the collector down?")
            else:
                self._drops.note("spool write failed", refused, str(self._spool.write_error))

    # -- sender thread -----------------------------------------------------------------------

    def _run_sender(self) -> None:
        with httpx.Client(timeout=self._timeout_s, headers=self._headers) as client:
            cursor = self._spool.cursor
            batch: _Batch | None = None
            limit = self._batch_size
            last_attempt = float("-inf")
            while True:
                deadline = self._final_deadline
                if deadline is not None and time.monotonic() >= deadline:
                    return
                try:
                    if batch is None:
                        records, next_cursor = self._spool.read_from(cursor, limit)
                        if not records:
                            if next_cursor != cursor:  # stepped over unreadable lines
                                self._ack(next_cursor)
                                cursor = next_cursor
                                continue
                            if deadline is not None:
                                return
                            self._wait(self._interval_s, wake_on_data=True)
                            continue
                        due = last_attempt + self._interval_s - time.monotonic()
                        if len(records) < limit and due > 0 and not self._flushing and deadline is None:
                            self._wait(due, wake_on_data=True)
                            continue
                        batch = _Batch(records, next_cursor, _batch_body(records))
                    last_attempt = time.monotonic()
                    outcome, retry_after = self._post(client, batch, deadline)
                except Exception as exc:  # the thread must survive a disk error or a bug in one round
                    logger.exception("telemetry: the sender failed; retrying")
                    self._note_error(f"{type(exc).__name__}: {exc}")
                    outcome, retry_after = _Outcome.RETRY, None
                    self._failures += 1
                if outcome is _Outcome.RETRY:
                    if deadline is not None:
                        return
                    self._wait(self._backoff(self._failures, retry_after), wake_on_data=False)
                    continue
                assert batch is not None
                if outcome is _Outcome.TOO_LARGE:
                    limit = max(1, len(batch.records) // 2)
                    batch = None
                    continue
                if self._failures:
                    logger.info("telemetry: the collector takes records again after %d failed attempts",
                                self._failures)
                    self._failures = 0
                # A 413 halved the batch size; grow it back one success at a time.
                limit = min(self._batch_size, limit * 2)
                self._ack(batch.next_cursor)
                cursor = batch.next_cursor
                batch = None

    def _post(
        self, client: httpx.Client, batch: _Batch, deadline: float | None
    ) -> tuple[_Outcome, float | None]:
        timeout = self._timeout_s
        if deadline is not None:
            timeout = max(0.05, min(timeout, deadline - time.monotonic()))
        count = len(batch.records)
        try:
            response = client.post(self._url, content=batch.body, timeout=timeout)
        except httpx.TimeoutException:
            return self._retry(f"no answer from {self._url} within {timeout:.1f} s"), None
        except httpx.HTTPError as exc:
            return self._retry(f"{type(exc).__name__} posting to {self._url}: {exc}"), None
        status = response.status_code
        if 200 <= status < 300:
            self._sent_records += count
            self._sent_batches += 1
            self._last_success_at = time.time()
            return _Outcome.SENT, None
        body = response.text[:_BODY_LOG_CHARS]
        if status in (401, 403):
            # A token problem is an operator's to fix; the records are fine, so keep them.
            self._retry(f"HTTP {status} from {self._url}: {body}", log=False)
            logger.error("telemetry: the collector refused the token (HTTP %d): %s; "
                         "keeping %d records and retrying", status, body, self._spool.pending)
            return _Outcome.RETRY, None
        if status == 413 and count > 1:
            logger.warning("telemetry: the collector found a batch of %d records too large; sending halves",
                           count)
            return _Outcome.TOO_LARGE, None
        if 400 <= status < 500 and status not in (408, 429):
            path = self._spool.reject(batch.records, f"HTTP {status}: {body}")
            self._note_error(f"HTTP {status} from {self._url}: {body}")
            logger.error("telemetry: the collector refused a batch of %d records (HTTP %d): %s; kept in %s",
                         count, status, body, path)
            return _Outcome.REJECTED, None
        return self._retry(f"HTTP {status} from {self._url}: {body}"), _retry_after(response)

    def _retry(self, error: str, *, log: bool = True) -> _Outcome:
        self._failed_posts += 1
        self._failures += 1
        self._note_error(error)
        if log and (self._failures == 1 or self._failures % 10 == 0):
            logger.warning("telemetry: %s; %d records kept in the spool, retrying (attempt %d)",
                           error, self._spool.pending, self._failures)
        return _Outcome.RETRY

    def _note_error(self, error: str) -> None:
        self._last_error = error
        self._last_error_at = time.time()

    def _ack(self, cursor: Cursor) -> None:
        self._spool.ack(cursor)
        with self._cv:
            self._cv.notify_all()

    def _backoff(self, failures: int, retry_after: float | None) -> float:
        delay = backoff_s(failures, base_s=self._backoff_initial_s, cap_s=self._backoff_max_s)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self._backoff_max_s))
        return delay

    def _wait(self, timeout: float, *, wake_on_data: bool) -> None:
        """Sleep up to ``timeout``; flush() and close() cut it short, a full batch too if asked."""
        with self._cv:
            self._cv.wait_for(lambda: self._kicked or (wake_on_data and self._data_ready), timeout)
            self._kicked = False
            self._data_ready = False
        self._drops.report()


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return None
