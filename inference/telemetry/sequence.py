"""Event numbers: every request event the runtime records gets ``seq`` 1, 2, 3, ... per runtime_id,
so the control plane can hold what it stored against what was recorded and count the gaps as lost.

The spool's writer numbers events as it takes them off the in-memory queue (and the events the
full queue turned away, which were recorded too), and saves the new highest numbers
(``sequence.json`` beside the spool's segments: a temporary file, fsync, rename) before it appends
the events. So a number is never given twice, not after a crash nor a power loss: what is saved
covers every number that can be in the spool or at the control plane. And every number belongs
to an event the runtime recorded; one lost after it was numbered (turned away by a full queue or
spool, refused by the disk, or in memory when the process died) leaves a gap, which the control
plane rightly counts as lost. No number is handed out in advance, so no gap stands for nothing.

Should the file be behind (it could not be written, or was restored from a backup), opening also
takes the highest ``seq`` of the spool's newest segment, so numbering resumes past both.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from inference.telemetry.records import SpoolRecord

logger = logging.getLogger("inference.telemetry")

SEQUENCE_FILE = "sequence.json"


class EventSequence:
    """The highest ``seq`` given so far per runtime_id, persisted in ``directory``."""

    def __init__(self, directory: Path, *, spooled: Iterable[SpoolRecord] = ()) -> None:
        self.path = Path(directory) / SEQUENCE_FILE
        self.write_error: str | None = None
        self._lock = threading.Lock()
        self._last = _read(self.path)
        for runtime_id, seq in highest_seqs(spooled).items():
            if seq > self._last.get(runtime_id, 0):
                logger.warning("telemetry: %s is behind the spool for runtime %s (seq %d); numbering resumes "
                               "past the spool", self.path, runtime_id, seq)
                self._last[runtime_id] = seq

    def last(self, runtime_id: str) -> int:
        """The highest number given to an event of ``runtime_id`` (0: none yet)."""
        return self._last.get(runtime_id, 0)

    @property
    def recorded(self) -> int:
        """Events numbered so far, every runtime_id together."""
        return sum(self._last.values())

    def take(self, counts: Mapping[str, int]) -> dict[str, int]:
        """Give ``counts[runtime_id]`` numbers to each runtime_id and save the new highest ones
        before returning the first number of each. A save the disk refuses is logged and kept in
        ``write_error`` (the numbers are used all the same: they are never given again by this
        process, and the spool holds them for the next one)."""
        with self._lock:
            first = {runtime_id: self._last.get(runtime_id, 0) + 1 for runtime_id, n in counts.items() if n > 0}
            if not first:
                return {}
            for runtime_id in first:
                self._last[runtime_id] = self._last.get(runtime_id, 0) + counts[runtime_id]
            try:
                self._save()
            except OSError as exc:
                if self.write_error is None:
                    logger.error("telemetry: could not save event numbers to %s: %s", self.path, exc)
                self.write_error = f"{type(exc).__name__}: {exc}"
            else:
                self.write_error = None
            return first

    def _save(self) -> None:
        tmp = self.path.with_name(SEQUENCE_FILE + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(json.dumps({"last": self._last}, sort_keys=True).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def highest_seqs(records: Iterable[SpoolRecord]) -> dict[str, int]:
    """The highest ``seq`` among request events, per runtime_id."""
    highest: dict[str, int] = {}
    for record in records:
        if record.kind != "E" or b'"seq"' not in record.data:
            continue
        try:
            event = json.loads(record.data)
            runtime_id, seq = event["runtime_id"], event["seq"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(runtime_id, str) and isinstance(seq, int) and seq > highest.get(runtime_id, 0):
            highest[runtime_id] = seq
    return highest


def _read(path: Path) -> dict[str, int]:
    try:
        document = json.loads(path.read_bytes())
        last = document["last"]
        return {str(runtime_id): int(seq) for runtime_id, seq in last.items()}
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        # Cannot happen with os.replace; the spool's newest segment is then the only witness.
        logger.error("telemetry: unreadable %s (%s); numbering resumes from the spool", path, exc)
        return {}
