"""The exporter's sender thread: batches from the spool's cursor to ``{url}/api/v1/events``.

A batch is settled in two steps after the collector is through with it: the records it refused
are set aside (``rejected/``, with its reasons), then the cursor moves past the batch (persisted at
once). Each step is done once; a step the disk refuses is tried again after a backoff without
posting the batch again. While the collector is down, slow, failing or answers something that is
not its own refusal, the same batch is retried with capped, jittered exponential backoff
(``inference/backoff.py``), its bytes unchanged. No error of the disk, the network or this code
ends the thread: it logs, counts, backs off and carries on, and sends again once the fault is gone.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime

import httpx

from inference.backoff import backoff_s
from inference.telemetry.answers import Answer, Verdict, read_answer
from inference.telemetry.records import SpoolRecord
from inference.telemetry.spool import Cursor, Spool

logger = logging.getLogger("inference.telemetry")

EVENTS_PATH = "/api/v1/events"
_LOG_EVERY = 10  # a failure that repeats is logged on its first attempt and every tenth


def batch_body(records: list[SpoolRecord]) -> bytes:
    events = b",".join(r.data for r in records if r.kind == "E")
    samples = b",".join(r.data for r in records if r.kind == "S")
    return b'{"events":[' + events + b'],"samples":[' + samples + b"]}"


@dataclass
class _Batch:
    records: list[SpoolRecord]
    next_cursor: Cursor
    body: bytes
    refusals: dict[int, str] | None = None  # set once the collector is through with the batch
    set_aside: bool = False


class Wakeups:
    """Why the sender should stop waiting: ``flush`` or ``close`` asked (``kicked``), or a full
    batch is in the spool (``data_ready``); ``final_deadline`` is set by ``close``."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.kicked = False
        self.data_ready = False
        self.flushing = 0
        self.final_deadline: float | None = None

    def wait(self, timeout: float, *, wake_on_data: bool) -> None:
        with self.cv:
            self.cv.wait_for(lambda: self.kicked or (wake_on_data and self.data_ready), timeout)
            self.kicked = False
            self.data_ready = False

    def notify(self, *, kick: bool = False, data: bool = False) -> None:
        with self.cv:
            self.kicked = self.kicked or kick
            self.data_ready = self.data_ready or data
            self.cv.notify_all()


class Sender:
    """Sends what the spool holds, in order; its counters are read by ``TelemetryExporter.stats``."""

    def __init__(self, spool: Spool, wakeups: Wakeups, *, url: str, headers: dict[str, str], batch_size: int,
                 interval_s: float, timeout_s: float, backoff_initial_s: float, backoff_max_s: float) -> None:
        self._spool = spool
        self._wakeups = wakeups
        self._url = url.rstrip("/") + EVENTS_PATH
        self._headers = headers
        self._batch_size = batch_size
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self.sent_records = 0
        self.sent_batches = 0
        self.failed_posts = 0
        self.rejected_records = 0  # refused by the collector and set aside, by this process
        self.io_errors = 0
        self.failures = 0  # attempts in a row that did not get a batch through (posts and disk)
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_success_at: float | None = None
        self.oldest_unsent_at: float | None = None  # when the record at the cursor was recorded

    def run(self) -> None:
        with httpx.Client(timeout=self._timeout_s, headers=self._headers) as client:
            cursor = self._spool.cursor
            batch: _Batch | None = None
            limit = self._batch_size
            last_attempt = float("-inf")
            while True:
                deadline = self._wakeups.final_deadline
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
                            self.oldest_unsent_at = None
                            if deadline is not None:
                                return
                            self._wait(self._interval_s, wake_on_data=True)
                            continue
                        self.oldest_unsent_at = _recorded_at(records[0])
                        due = last_attempt + self._interval_s - time.monotonic()
                        if len(records) < limit and due > 0 and not self._wakeups.flushing and deadline is None:
                            self._wait(due, wake_on_data=True)
                            continue
                        batch = _Batch(records, next_cursor, batch_body(records))
                    if batch.refusals is None:
                        last_attempt = time.monotonic()
                        answer = self._post(client, batch, deadline)
                        if answer.verdict is Verdict.RETRY:
                            self._failed(answer)
                            if deadline is not None:
                                return
                            self._wait(self._backoff(answer.retry_after_s), wake_on_data=False)
                            continue
                        if answer.verdict is Verdict.SPLIT:
                            logger.warning("telemetry: the collector could not take a batch of %d records (%s); "
                                           "sending halves", len(batch.records), answer.problem)
                            limit = max(1, len(batch.records) // 2)
                            batch = None
                            continue
                        self._delivered(batch, answer)
                    self._settle(batch)
                except Exception as exc:  # the thread outlives any fault of the disk, the network or a bug
                    self._trouble(exc)
                    if deadline is not None:
                        return
                    self._wait(self._backoff(None), wake_on_data=False)
                    continue
                if self.failures:
                    logger.info("telemetry: records flow again after %d failed attempts", self.failures)
                    self.failures = 0
                # A split halved the batch size; grow it back one success at a time.
                limit = min(self._batch_size, limit * 2)
                cursor = batch.next_cursor
                batch = None

    # -- one batch ---------------------------------------------------------------------------

    def _post(self, client: httpx.Client, batch: _Batch, deadline: float | None) -> Answer:
        timeout = self._timeout_s
        if deadline is not None:
            timeout = max(0.05, min(timeout, deadline - time.monotonic()))
        try:
            response = client.post(self._url, content=batch.body, timeout=timeout)
        except httpx.TimeoutException:
            return Answer(Verdict.RETRY, f"no answer from {self._url} within {timeout:.1f} s")
        except httpx.HTTPError as exc:
            return Answer(Verdict.RETRY, f"{type(exc).__name__} posting to {self._url}: {exc}")
        return read_answer(response.status_code, response.headers, response.content,
                           kinds=[r.kind for r in batch.records])

    def _delivered(self, batch: _Batch, answer: Answer) -> None:
        """The collector is through with the batch: count what it stored."""
        batch.refusals = answer.refusals
        self.sent_records += len(batch.records) - len(answer.refusals)
        self.sent_batches += 1
        self.last_success_at = time.time()
        if answer.unplaced:
            logger.warning("telemetry: the collector's answer (HTTP %s) refused %d records this batch does not "
                           "hold; nothing set aside for them", answer.status, answer.unplaced)

    def _settle(self, batch: _Batch) -> None:
        """Set the refused records aside, then move the cursor past the batch; either step raises
        ``OSError`` when the disk refuses it, and is then done again on the next round."""
        if batch.refusals and not batch.set_aside:
            refused = sorted(batch.refusals.items())
            path = self._spool.set_aside([(batch.records[place], reason) for place, reason in refused])
            batch.set_aside = True
            self.rejected_records += len(refused)
            logger.error("telemetry: the collector refused %d of %d records (first: %s); kept in %s",
                         len(refused), len(batch.records), refused[0][1], path)
        self._ack(batch.next_cursor)

    def _ack(self, cursor: Cursor) -> None:
        self._spool.ack(cursor)
        self._wakeups.notify()

    # -- failures ----------------------------------------------------------------------------

    def _failed(self, answer: Answer) -> None:
        self.failed_posts += 1
        self.failures += 1
        self._note_error(answer.problem)
        status = answer.status
        if status in (401, 403):
            # A token problem is an operator's to fix; the records are fine, so keep them.
            logger.error("telemetry: the collector refused the token (%s); keeping %d records and retrying",
                         answer.problem, self._spool.pending)
        elif self.failures == 1 or self.failures % _LOG_EVERY == 0:
            level = logging.ERROR if status is not None and 400 <= status < 500 else logging.WARNING
            logger.log(level, "telemetry: %s; %d records kept in the spool, retrying (attempt %d)",
                       answer.problem, self._spool.pending, self.failures)

    def _trouble(self, exc: Exception) -> None:
        self.failures += 1
        self._note_error(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, OSError):
            self.io_errors += 1
            if self.failures == 1 or self.failures % _LOG_EVERY == 0:
                logger.error("telemetry: the spool's disk failed (%s: %s); %d records kept, retrying (attempt %d)",
                             type(exc).__name__, exc, self._spool.pending, self.failures)
        else:
            logger.exception("telemetry: the sender failed; retrying")

    def _note_error(self, error: str) -> None:
        self.last_error = error
        self.last_error_at = time.time()

    def _backoff(self, retry_after: float | None) -> float:
        delay = backoff_s(max(1, self.failures), base_s=self._backoff_initial_s, cap_s=self._backoff_max_s)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self._backoff_max_s))
        return delay

    def _wait(self, timeout: float, *, wake_on_data: bool) -> None:
        self._wakeups.wait(timeout, wake_on_data=wake_on_data)


def _recorded_at(record: SpoolRecord) -> float:
    """When a record was made (an event's end, a sample's time), as a Unix time; now if unknown."""
    try:
        document = json.loads(record.data)
        return datetime.fromisoformat(document["finished_at" if record.kind == "E" else "at"]).timestamp()
    except (ValueError, KeyError, TypeError):
        return time.time()
