"""The wait before trying again after failures, one formula for every retry loop of the runtime:
an upstream request's retries and an async job's (inference/retries.py, jobs/runner.py), the
telemetry exporter's resends and the ruleset pull's reconciliation.

The wait doubles with each failure up to a cap; the top ``jitter`` share of it is random, so that
clients that failed together do not come back together.
"""

from __future__ import annotations

import random

# Past 2**30 any base is over any cap; the bound only keeps the power finite.
_MAX_DOUBLINGS = 30


def backoff_s(failures: int, *, base_s: float, cap_s: float, jitter: float = 0.5) -> float:
    """The wait after ``failures`` (1, 2, ...) failures in a row: ``base_s`` doubled per failure after
    the first, at most ``cap_s``, drawn uniformly from its top ``jitter`` share (0: exactly the ceiling)."""
    ceiling = min(cap_s, base_s * 2 ** min(failures - 1, _MAX_DOUBLINGS))
    return random.uniform(ceiling * (1 - jitter), ceiling)
