"""The durable job store: one SQLite file in the runtime's state directory (stdlib ``sqlite3``, WAL).

Two tables: ``jobs``, one row a job with its state, and ``job_events``, each job's event log
numbered 1, 2, 3… (the SSE ids). Every change of state is one transaction that updates the row
*only if it is still in the state the change expects* and appends the event that tells of it, so a
cancel racing a finish leaves exactly one of them, and a crash between the two never happens.

The store is used from the event loop only. WAL with ``synchronous=NORMAL`` makes a commit a write
to the log without an fsync: a killed process loses nothing committed, a power cut may lose the
last moments.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from inference.config import Tier
from inference.contracts import Priority
from inference.schemas import ChatCompletionRequest, CompletionRequest

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINISHED: tuple[JobStatus, ...] = ("succeeded", "failed", "cancelled")
ENDPOINTS: dict[str, type[ChatCompletionRequest] | type[CompletionRequest]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    api_key_id TEXT NOT NULL,
    tier TEXT NOT NULL,
    feature TEXT NOT NULL,
    priority TEXT NOT NULL,
    url TEXT NOT NULL,
    request TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    not_before REAL NOT NULL,
    deadline_at REAL,
    cache_sampled INTEGER NOT NULL DEFAULT 0,
    model_attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, not_before);
CREATE INDEX IF NOT EXISTS jobs_by_finish ON jobs (finished_at);
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
"""
_PRIORITY_ORDER = "CASE priority WHEN 'high' THEN 0 WHEN 'normal' THEN 1 ELSE 2 END"
# Columns added since the first schema, added to a store made before them: a job stored before
# them has no deadline, caches only greedy or seeded answers, and numbers its attempts from 1.
_ADDED_COLUMNS = {"deadline_at": "REAL", "cache_sampled": "INTEGER NOT NULL DEFAULT 0",
                  "model_attempts": "INTEGER NOT NULL DEFAULT 0"}


@dataclass(frozen=True)
class Job:
    id: str
    tenant: str
    api_key_id: str
    tier: Tier
    feature: str
    priority: Priority
    url: str
    request: dict[str, Any]
    status: JobStatus
    attempts: int
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    not_before: float
    deadline_at: float | None = None  # wall clock: no attempt is made or answered past it
    cache_sampled: bool = False  # the key it was submitted with lets sampled answers be cached

    def body(self) -> ChatCompletionRequest | CompletionRequest:
        return ENDPOINTS[self.url].model_validate(self.request)

    def public(self) -> dict[str, Any]:
        """The job as ``GET /v1/jobs/{id}`` shows it."""
        return {"id": self.id, "object": "job", "status": self.status, "url": self.url,
                "model": self.request.get("model"), "priority": self.priority, "feature": self.feature,
                "attempts": self.attempts, "created_at": _seconds(self.created_at),
                "started_at": _seconds(self.started_at), "finished_at": _seconds(self.finished_at),
                "deadline_at": _seconds(self.deadline_at), "result": self.result, "error": self.error}


@dataclass(frozen=True)
class JobEvent:
    seq: int
    type: str
    data: str  # JSON text, as stored and as sent


class JobStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        present = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
        for column, declaration in _ADDED_COLUMNS.items():
            if column not in present:
                db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {declaration}")
        self._db = db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the job store is not open")
        return self._db

    # -- reads -----------------------------------------------------------------------------------

    def get(self, job_id: str, *, tenant: str | None = None) -> Job | None:
        """The job, or None when there is none, or it is another tenant's."""
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or (tenant is not None and row["tenant"] != tenant):
            return None
        return _job(row)

    def events_after(self, job_id: str, seq: int) -> list[JobEvent]:
        rows = self.db.execute("SELECT seq, type, data FROM job_events WHERE job_id = ? AND seq > ? ORDER BY seq",
                               (job_id, seq)).fetchall()
        return [JobEvent(row["seq"], row["type"], row["data"]) for row in rows]

    def dead(self, *, limit: int = 500) -> list[Job]:
        """The dead-letter list: failed jobs, latest first."""
        rows = self.db.execute("SELECT * FROM jobs WHERE status = 'failed' ORDER BY finished_at DESC LIMIT ?",
                               (limit,)).fetchall()
        return [_job(row) for row in rows]

    def next_due_at(self) -> float | None:
        """When the earliest queued job may run (wall clock), or None with none queued."""
        row = self.db.execute("SELECT MIN(not_before) FROM jobs WHERE status = 'queued'").fetchone()
        return row[0]

    # -- changes of state --------------------------------------------------------------------------

    def create(self, *, tenant: str, api_key_id: str, tier: Tier, feature: str, priority: Priority, url: str,
               request: dict[str, Any], deadline_s: float | None = None, cache_sampled: bool = False) -> Job:
        """Queue a new job, to be answered within ``deadline_s`` of now (None: no deadline)."""
        now = time.time()
        job_id = "job_" + uuid.uuid4().hex
        deadline_at = None if deadline_s is None else now + deadline_s
        with self._transaction() as db:
            db.execute("INSERT INTO jobs (id, tenant, api_key_id, tier, feature, priority, url, request, status, "
                       "created_at, not_before, deadline_at, cache_sampled) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
                       (job_id, tenant, api_key_id, tier, feature, priority, url, _json(request), now, now,
                        deadline_at, int(cache_sampled)))
            _append(db, job_id, "queued", {"status": "queued"})
        job = self.get(job_id)
        assert job is not None
        return job

    def claim(self, *, limit: int) -> list[Job]:
        """Up to ``limit`` due queued jobs, highest priority then oldest first, now running."""
        now = time.time()
        claimed = []
        with self._transaction() as db:
            rows = db.execute(f"SELECT id FROM jobs WHERE status = 'queued' AND not_before <= ? "
                              f"ORDER BY {_PRIORITY_ORDER}, created_at LIMIT ?", (now, limit)).fetchall()
            for row in rows:
                db.execute("UPDATE jobs SET status = 'running', attempts = attempts + 1, started_at = ? "
                           "WHERE id = ?", (now, row["id"]))
                attempt = db.execute("SELECT attempts FROM jobs WHERE id = ?", (row["id"],)).fetchone()[0]
                _append(db, row["id"], "running", {"status": "running", "attempt": attempt})
                claimed.append(row["id"])
        return [job for job_id in claimed if (job := self.get(job_id)) is not None]

    def next_model_attempt(self, job_id: str) -> int:
        """Number the job's next attempt at a model (its request events' ``attempt``): 1, 2, 3... over
        all its job attempts, retries and fallbacks, replays included, never repeated."""
        with self._transaction() as db:
            row = db.execute("UPDATE jobs SET model_attempts = model_attempts + 1 WHERE id = ? "
                             "RETURNING model_attempts", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        return int(row[0])

    def add_text(self, job_id: str, text: str) -> None:
        with self._transaction() as db:
            _append(db, job_id, "token", {"text": text})

    def succeed(self, job_id: str, result: dict[str, Any]) -> bool:
        return self._finish(job_id, "succeeded", "running", {"status": "succeeded", "result": result},
                            result=result)

    def fail(self, job_id: str, error: dict[str, Any]) -> bool:
        """Fail a running job: it goes to the dead-letter list."""
        return self._finish(job_id, "failed", "running", {"status": "failed", "error": error}, error=error)

    def cancel(self, job_id: str) -> bool:
        return self._finish(job_id, "cancelled", ("queued", "running"), {"status": "cancelled"})

    def retry_later(self, job_id: str, *, error: dict[str, Any], delay_s: float) -> bool:
        """Put a running job that failed transiently back in the queue, due in ``delay_s``."""
        with self._transaction() as db:
            changed = db.execute("UPDATE jobs SET status = 'queued', not_before = ?, error = ? "
                                 "WHERE id = ? AND status = 'running'",
                                 (time.time() + delay_s, _json(error), job_id)).rowcount
            if changed:
                _append(db, job_id, "queued", {"status": "queued", "reason": "retry", "error": error,
                                               "retry_in_s": round(delay_s, 3)})
        return bool(changed)

    def replay(self, job_id: str) -> bool:
        """Put a dead-lettered job back in the queue with its attempts reset and as long a deadline as
        it was given at first, counted from now."""
        now = time.time()
        with self._transaction() as db:
            changed = db.execute("UPDATE jobs SET status = 'queued', attempts = 0, error = NULL, result = NULL, "
                                 "started_at = NULL, finished_at = NULL, not_before = ?, "
                                 "deadline_at = ? + deadline_at - created_at "
                                 "WHERE id = ? AND status = 'failed'", (now, now, job_id)).rowcount
            if changed:
                _append(db, job_id, "queued", {"status": "queued", "reason": "replay"})
        return bool(changed)

    def requeue_interrupted(self, *, max_attempts: int) -> tuple[int, int]:
        """After a restart: jobs left running go back in the queue, or to the dead-letter list when
        the interrupted attempt was their last. Returns (requeued, failed)."""
        now = time.time()
        error = {"type": "server_error", "code": "interrupted", "param": None,
                 "message": f"The runtime stopped during each of the job's {max_attempts} attempts."}
        with self._transaction() as db:
            rows = db.execute("SELECT id, attempts FROM jobs WHERE status = 'running'").fetchall()
            requeued = failed = 0
            for row in rows:
                if row["attempts"] >= max_attempts:
                    db.execute("UPDATE jobs SET status = 'failed', error = ?, finished_at = ? WHERE id = ?",
                               (_json(error), now, row["id"]))
                    _append(db, row["id"], "failed", {"status": "failed", "error": error})
                    failed += 1
                else:
                    db.execute("UPDATE jobs SET status = 'queued', not_before = ? WHERE id = ?", (now, row["id"]))
                    _append(db, row["id"], "queued", {"status": "queued", "reason": "runtime_restarted"})
                    requeued += 1
        return requeued, failed

    def expire(self, *, finished_before: float) -> int:
        """Forget finished jobs (and their events) that finished before the given time."""
        with self._transaction() as db:
            db.execute("DELETE FROM job_events WHERE job_id IN (SELECT id FROM jobs WHERE finished_at < ?)",
                       (finished_before,))
            return db.execute("DELETE FROM jobs WHERE finished_at < ?", (finished_before,)).rowcount

    def _finish(self, job_id: str, status: JobStatus, expected: str | tuple[str, ...], event: dict[str, Any], *,
                result: dict[str, Any] | None = None, error: dict[str, Any] | None = None) -> bool:
        states = (expected,) if isinstance(expected, str) else expected
        with self._transaction() as db:
            changed = db.execute(
                f"UPDATE jobs SET status = ?, result = ?, error = ?, finished_at = ? "
                f"WHERE id = ? AND status IN ({', '.join('?' * len(states))})",
                (status, _json(result), _json(error), time.time(), job_id, *states)).rowcount
            if changed:
                _append(db, job_id, status, event)
        return bool(changed)

    def _transaction(self) -> _Transaction:
        return _Transaction(self.db)


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on an error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> sqlite3.Connection:
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        self._db.execute("ROLLBACK" if kind is not None else "COMMIT")


def _append(db: sqlite3.Connection, job_id: str, kind: str, data: dict[str, Any]) -> None:
    db.execute("INSERT INTO job_events (job_id, seq, type, data, at) "
               "SELECT ?, COALESCE(MAX(seq), 0) + 1, ?, ?, ? FROM job_events WHERE job_id = ?",
               (job_id, kind, _json(data), time.time(), job_id))


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _job(row: sqlite3.Row) -> Job:
    return Job(id=row["id"], tenant=row["tenant"], api_key_id=row["api_key_id"], tier=row["tier"],
               feature=row["feature"], priority=row["priority"], url=row["url"], request=json.loads(row["request"]),
               status=row["status"], attempts=row["attempts"],
               result=json.loads(row["result"]) if row["result"] else None,
               error=json.loads(row["error"]) if row["error"] else None,
               created_at=row["created_at"], started_at=row["started_at"], finished_at=row["finished_at"],
               not_before=row["not_before"], deadline_at=row["deadline_at"], cache_sampled=bool(row["cache_sampled"]))


def _seconds(at: float | None) -> int | None:
    return None if at is None else int(at)
