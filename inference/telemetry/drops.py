"""Records the exporter could not keep, counted by reason and logged at ERROR at most every few
seconds per reason (with the count), so a flood of drops is loud without flooding the log."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

logger = logging.getLogger("inference.telemetry")

DROP_LOG_INTERVAL_S = 10.0


class DropLog:
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
