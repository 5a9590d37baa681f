"""The job runner: takes queued jobs from the store and runs them, a few at a time.

Each run is one *attempt*, made by the ``RunAttempt`` the app gives (``serving.run_job_attempt``:
the sync endpoints' path, with rules, the response cache, retries and the fallback chain, admission,
one request event per attempt at a model, numbered across the job by ``Attempt.number``). An attempt
that fails transiently (``is_transient``: a shed, a throttle, an upstream or breaker 502/503/504) is
queued again after a jittered backoff (or the ``Retry-After`` it was given, if longer) until the job
has had ``max_attempts`` or the next try would start past the job's deadline; any other failure, the
last attempt's, or a deadline that passed (504 ``deadline_exceeded``), fails the job to the
dead-letter list, from which an admin may replay it.

On stop, running attempts are cancelled but their jobs stay ``running`` in the store: the next
start puts them back in the queue (the interrupted attempt counts as one), so a job survives a
restart and runs to completion.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from inference.backoff import backoff_s
from inference.config import Tier
from inference.contracts import Priority
from inference.deadline import DEADLINE_CODE
from inference.errors import ApiError
from inference.jobs.store import Job, JobStore
from inference.retries import MAX_BACKOFF_S

log = logging.getLogger("inference.jobs")

JOB_BACKOFF_BASE_S = 1.0
_IDLE_WAKE_S = 60.0


class Attempt:
    """One attempt at a job, as its runner sees it: where its text goes, and why it was stopped
    if it was (the request event's ``error_type``)."""

    def __init__(self, runner: JobRunner, job: Job) -> None:
        self._runner = runner
        self.job = job
        self.cancel_reason = "job_cancelled"

    def token(self, text: str) -> None:
        self._runner.add_text(self.job.id, text)

    def number(self) -> int:
        """The number of the job's next attempt at a model (its request event's ``attempt``)."""
        return self._runner.store.next_model_attempt(self.job.id)


RunAttempt = Callable[[Job, Attempt], Awaitable[dict[str, Any]]]


def is_transient(error: ApiError) -> bool:
    """Worth trying again later: the model or the queue was busy or briefly unreachable. A budget
    that is spent is not, nor a deadline that passed: that job waits in the dead-letter list for a
    replay instead."""
    if error.code in ("rejected_budget", DEADLINE_CODE):
        return False
    return error.transient or error.status in (429, 502, 503, 504)


class JobRunner:
    def __init__(self, store: JobStore, run_attempt: RunAttempt, *, concurrency: int, max_attempts: int,
                 ttl_s: float, backoff_base_s: float = JOB_BACKOFF_BASE_S) -> None:
        self.store = store
        self._run_attempt = run_attempt
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.ttl_s = ttl_s
        self.backoff_base_s = backoff_base_s
        self._running: dict[str, tuple[asyncio.Task[None], Attempt]] = {}
        self._listeners: dict[str, set[asyncio.Event]] = {}
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self.stopping = False

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self.store.open()
        requeued, failed = self.store.requeue_interrupted(max_attempts=self.max_attempts)
        if requeued or failed:
            log.info("jobs interrupted by the last stop: %d queued again, %d failed", requeued, failed)
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch(), name="job-dispatcher")

    async def stop(self) -> None:
        """Stop dispatching and cancel running attempts, leaving their jobs to the next start."""
        self.stopping = True
        tasks = [task for task, _ in self._running.values()]
        for task, attempt in self._running.values():
            attempt.cancel_reason = "runtime_stopped"
            task.cancel()
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            tasks.append(self._dispatcher)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for job_id in list(self._listeners):
            self._notify(job_id)  # event streams end when the runner stops
        self.store.close()

    # -- what the API asks -------------------------------------------------------------------------

    def submit(self, *, tenant: str, api_key_id: str, tier: Tier, feature: str, priority: Priority, url: str,
               request: dict[str, Any], deadline_s: float | None = None, cache_sampled: bool = False) -> Job:
        job = self.store.create(tenant=tenant, api_key_id=api_key_id, tier=tier, feature=feature,
                                priority=priority, url=url, request=request, deadline_s=deadline_s,
                                cache_sampled=cache_sampled)
        self._wake.set()
        return job

    def cancel(self, job_id: str, *, tenant: str) -> tuple[Job | None, bool]:
        """Cancel a queued or running job (a running attempt is stopped, freeing its slot). Returns
        the job as it now stands (None when the tenant has no such job) and whether this call
        cancelled it (not when it had already finished)."""
        if self.store.get(job_id, tenant=tenant) is None:
            return None, False
        cancelled = self.store.cancel(job_id)
        if cancelled:
            running = self._running.get(job_id)
            if running is not None:
                running[0].cancel()
            self._notify(job_id)
        return self.store.get(job_id), cancelled

    def replay(self, job_id: str) -> Job | None:
        """Queue a dead-lettered job again; None when no failed job has that id."""
        if not self.store.replay(job_id):
            return None
        self._notify(job_id)
        self._wake.set()
        return self.store.get(job_id)

    def add_text(self, job_id: str, text: str) -> None:
        self.store.add_text(job_id, text)
        self._notify(job_id)

    def listen(self, job_id: str) -> asyncio.Event:
        """An event set whenever the job's log grows (or the runner stops); ``unlisten`` after."""
        event = asyncio.Event()
        self._listeners.setdefault(job_id, set()).add(event)
        return event

    def unlisten(self, job_id: str, event: asyncio.Event) -> None:
        listeners = self._listeners.get(job_id)
        if listeners is not None:
            listeners.discard(event)
            if not listeners:
                del self._listeners[job_id]

    # -- the work ----------------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        next_expiry = 0.0
        while True:
            now = time.time()
            if now >= next_expiry:
                expired = self.store.expire(finished_before=now - self.ttl_s)
                if expired:
                    log.info("forgot %d finished jobs older than %g s", expired, self.ttl_s)
                next_expiry = now + min(60.0, self.ttl_s / 4)
            free = self.concurrency - len(self._running)
            if free > 0:
                for job in self.store.claim(limit=free):
                    self._notify(job.id)
                    attempt = Attempt(self, job)
                    task = asyncio.get_running_loop().create_task(self._execute(attempt), name=f"job-{job.id}")
                    self._running[job.id] = (task, attempt)
            self._wake.clear()
            due = self.store.next_due_at()
            wait = min(_IDLE_WAKE_S, next_expiry - time.time())
            if due is not None and len(self._running) < self.concurrency:
                wait = min(wait, due - time.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.01, wait))

    async def _execute(self, attempt: Attempt) -> None:
        job = attempt.job
        try:
            result = await self._run_attempt(job, attempt)
        except asyncio.CancelledError:
            raise  # cancelled: its job was cancelled, or is left running for the next start
        except ApiError as error:
            self._failed(job, error)
        except Exception:  # a bug of ours: the job fails, and says so without the traceback
            log.exception("job %s failed", job.id)
            self._failed(job, ApiError(500, "The runtime failed while running the job.", code="internal_error"))
        else:
            self.store.succeed(job.id, result)
        finally:
            self._running.pop(job.id, None)
            if not self.stopping:
                self._notify(job.id)
                self._wake.set()

    def _failed(self, job: Job, error: ApiError) -> None:
        body = error.body()["error"]
        if is_transient(error) and job.attempts < self.max_attempts:
            delay = max(backoff_s(job.attempts, base_s=self.backoff_base_s, cap_s=MAX_BACKOFF_S),
                        float(error.retry_after_s or 0))
            if job.deadline_at is None or time.time() + delay < job.deadline_at:
                self.store.retry_later(job.id, error=body, delay_s=delay)
                return
        self.store.fail(job.id, body)

    def _notify(self, job_id: str) -> None:
        for event in self._listeners.get(job_id, ()):
            event.set()
