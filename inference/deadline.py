"""One request's deadline: the time by which its client has its whole answer, or an error.

Every part of a request spends from it — its queue wait, each attempt at a model, the backoff
before a retry, the fallbacks after a failure, the generation itself, and for an async job every
job attempt too — so however many of those a request takes, it ends by its deadline. A client sets
it with ``X-Wattson-Deadline`` (seconds, shorter than the runtime's limit); otherwise it is
``--request-deadline-s`` after the request arrived (``--job-deadline-s`` after a job's submission).

A request whose deadline passes is answered 504, code ``deadline_exceeded``, and recorded with
status ``timeout``; what it had spent is still counted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from inference.errors import ApiError

T = TypeVar("T")
DEADLINE_HEADER = "x-wattson-deadline"
DEADLINE_CODE = "deadline_exceeded"


class DeadlineExceeded(Exception):
    """The request's deadline passed while it waited for ``what``."""


class Deadline:
    """A moment on the monotonic clock; ``remaining_s`` is what is left of it (never negative)."""

    def __init__(self, at: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.at = at
        self._clock = clock

    @classmethod
    def after(cls, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> Deadline:
        return cls(clock() + seconds, clock=clock)

    @classmethod
    def at_wall_clock(cls, epoch_s: float) -> Deadline:
        """The deadline at a wall-clock moment (a job's, kept across restarts), on the monotonic clock."""
        return cls.after(epoch_s - time.time())

    def remaining_s(self) -> float:
        return max(0.0, self.at - self._clock())

    @property
    def passed(self) -> bool:
        return self._clock() >= self.at

    def leaves(self, seconds: float) -> bool:
        """Whether more than ``seconds`` remain (room to wait that long and still do something)."""
        return self.at - self._clock() > seconds

    async def bound(self, work: Awaitable[T]) -> T:
        """Await ``work`` until the deadline; past it, cancel it and raise ``DeadlineExceeded``."""
        try:
            return await asyncio.wait_for(work, timeout=self.remaining_s())
        except TimeoutError:
            raise DeadlineExceeded from None


def deadline_error(waiting_for: str) -> ApiError:
    """What a client whose deadline passed is told (504, recorded as a timeout)."""
    return ApiError(504, f"The request's deadline passed {waiting_for}.", code=DEADLINE_CODE,
                    error_type="timeout_error")

