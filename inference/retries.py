"""Whether a failed attempt is sent to the same model again, and after how long.

An attempt that failed transiently (``ApiError.transient``: an upstream's dropped connection,
timeout or 502/503/504) before its first output is retried (``inference.attempts`` sends it):

- at most ``--upstream-retries`` times in one request; a 4xx or any other failure never is;
- only while the model's breaker is closed: a probe's failure must reopen it, and retrying into an
  open breaker is what the breaker is there to stop;
- only when the request's deadline leaves room for the backoff and an attempt after it;
- only within the model's retry budget: over the last ``RETRY_BUDGET_WINDOW_S`` seconds, the
  retries sent to one model are at most ``--retry-budget-ratio`` of the other attempts it was sent,
  plus ``--retry-budget-min``. Without a budget a model that fails for everyone receives every
  request ``retries + 1`` times, and the retries keep it down; with one, retries add at most that
  share to its load (``wattson_retry_budget_exhausted_total`` counts the retries it refused).

A retry that is not allowed sends the request along its fallback chain instead. Every attempt,
retried or not, is a request event of its own (``attempt`` 1, 2, 3... of one ``request_id``).
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable

from inference.backoff import backoff_s
from inference.deadline import Deadline
from inference.errors import ApiError
from inference.metrics import LiveSample, counter

MAX_BACKOFF_S = 10.0
RETRY_BUDGET_WINDOW_S = 10


class RetryBudget:
    """One model's retries and other attempts over the last ``window_s`` seconds, counted per second."""

    def __init__(self, *, ratio: float, minimum: int, window_s: int = RETRY_BUDGET_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ratio = ratio
        self.minimum = minimum
        self.window_s = window_s
        self._clock = clock
        self._seconds: deque[list[int]] = deque()  # [second, attempts that were not retries, retries]
        self.exhausted_total = 0

    def attempted(self) -> None:
        """An attempt that is not a retry (a request's first, or a fallback's) was sent to the model."""
        self._current()[1] += 1

    def spend(self) -> bool:
        """Take one retry from the budget: False (and counted) when it holds none."""
        current = self._current()
        attempts = sum(second[1] for second in self._seconds)
        retries = sum(second[2] for second in self._seconds)
        if retries + 1 > self.minimum + self.ratio * attempts:
            self.exhausted_total += 1
            return False
        current[2] += 1
        return True

    def _current(self) -> list[int]:
        second = math.floor(self._clock())
        while self._seconds and self._seconds[0][0] <= second - self.window_s:
            self._seconds.popleft()
        if not self._seconds or self._seconds[-1][0] != second:
            self._seconds.append([second, 0, 0])
        return self._seconds[-1]


class Retries:
    """The runtime's retry policy, every model's retry budget, and the counts ``/metrics`` shows."""

    def __init__(self, *, retries: int, backoff_base_s: float, budget_ratio: float, budget_min: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.retries = retries
        self.backoff_base_s = backoff_base_s
        self._budget_ratio = budget_ratio
        self._budget_min = budget_min
        self._clock = clock
        self._budgets: dict[str, RetryBudget] = {}
        self.retries_total: Counter[str] = Counter()

    def budget(self, model: str) -> RetryBudget:
        budget = self._budgets.get(model)
        if budget is None:
            budget = self._budgets[model] = RetryBudget(ratio=self._budget_ratio, minimum=self._budget_min,
                                                        clock=self._clock)
        return budget

    def track(self, models: Iterable[str]) -> None:
        """Give each served model its budget up front, so ``/metrics`` lists every one."""
        for model in models:
            self.budget(model)

    def attempted(self, model: str) -> None:
        self.budget(model).attempted()

    def backoff_before_retry(self, model: str, error: ApiError, *, retries_done: int, breaker_closed: bool,
                             deadline: Deadline) -> float | None:
        """The wait before sending a failed attempt to ``model`` again, with the retry counted;
        None when it is not to be retried (the module's docstring says when)."""
        if not error.transient or retries_done >= self.retries or not breaker_closed:
            return None
        wait = backoff_s(retries_done + 1, base_s=self.backoff_base_s, cap_s=MAX_BACKOFF_S)
        if not deadline.leaves(wait):
            return None
        if not self.budget(model).spend():
            return None
        self.retries_total[model] += 1
        return wait

    def samples(self) -> list[LiveSample]:
        rows: list[LiveSample] = []
        for model, budget in sorted(self._budgets.items()):
            rows += counter("wattson_retries_total", "Attempts retried after a transient failure",
                            self.retries_total[model], model=model)
            rows += counter("wattson_retry_budget_exhausted_total",
                            "Retries not sent because the model's retry budget was spent", budget.exhausted_total,
                            model=model)
        return rows
