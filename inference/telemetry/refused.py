"""Records set aside, in ``rejected/`` under the spool: what the control plane refused by its
contract, and spool lines that could not be read. They stay until an operator resends or discards
them; nothing here is ever deleted to make room. Their bytes count against the spool's budget, so
a spool that cannot keep them refuses new records instead (loudly, as a full spool does).

One file per set-aside, ``<UTC time>-<n>-<label>.log`` (label ``refused`` or ``corrupt``). A
comment line gives the reason for the record lines after it, up to the next comment::

    # HTTP 202: event 3: prompt_tokens: Input should be less than or equal to 2147483647
    E {"event_id": "...", ...}

A record line is a spool line, byte for byte, so a resend is what was first sent (an operator
may also fix a record in place before resending it). A line that could not be read is kept as
``X `` and its bytes, so it is never taken for a record. Files are written whole (temporary file,
fsync, rename): a crash or a full disk never leaves half a file to be counted.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from inference.telemetry.records import SpoolRecord, parse_line

REFUSED_DIR = "rejected"
UNREADABLE = b"X "  # the tag of a kept line that is not a record

_NAME_RE = re.compile(r"^[0-9]{8}T[0-9]{6}\.[0-9]{6}Z-[0-9]{5,}-(refused|corrupt)\.log$")
_SHOWN_REASONS = 5


@dataclass(frozen=True, slots=True)
class RefusedFile:
    """One set-aside as an operator sees it."""

    name: str
    label: str
    records: int  # record lines: what a resend sends
    unreadable: int  # lines that are no record
    bytes: int
    reasons: tuple[str, ...]  # the first few distinct reasons

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "label": self.label, "records": self.records, "unreadable": self.unreadable,
                "bytes": self.bytes, "reasons": list(self.reasons)}


@dataclass(frozen=True, slots=True)
class Entry:
    """One kept line (with its newline), the reason it was kept, and the record it holds (None
    for a line that is no record)."""

    line: bytes
    reason: str
    record: SpoolRecord | None


def one_line(reason: str) -> str:
    return " ".join(reason.split())


class RefusedStore:
    """The ``rejected/`` directory: kept records counted by line and by byte."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._seq = 0
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob("*.tmp"):  # a keep that a crash interrupted
            stale.unlink(missing_ok=True)
        self._records, self._bytes = self._count()

    @property
    def records(self) -> int:
        """Lines kept (records and unreadable lines), across restarts."""
        return self._records

    @property
    def bytes(self) -> int:
        return self._bytes

    # -- keeping -----------------------------------------------------------------------------

    def keep(self, entries: Sequence[tuple[bytes, str]], label: str) -> Path:
        """Write one file of ``(line, reason)`` entries (a line with its newline). Raises
        ``OSError`` when the disk refuses it; then nothing was kept and the caller must not move on."""
        content = _render(entries)
        with self._lock:
            self._seq += 1
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            path = self.directory / f"{stamp}-{self._seq:05d}-{label}.log"
            self._write(path, content)
            self._records += len(entries)
            self._bytes += len(content)
        return path

    def _write(self, path: Path, content: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)  # an operator may have removed it
            with open(tmp, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    # -- what an operator sees and does ------------------------------------------------------

    def files(self) -> list[RefusedFile]:
        """Every kept file, oldest first (the counts are taken again from disk)."""
        listed = []
        with self._lock:
            for path in self._paths():
                entries = self._read(path)
                reasons = tuple(dict.fromkeys(e.reason for e in entries))[:_SHOWN_REASONS]
                records = sum(1 for e in entries if e.record is not None)
                label = path.name.rsplit("-", 1)[-1].removesuffix(".log")
                listed.append(RefusedFile(path.name, label, records, len(entries) - records,
                                          path.stat().st_size, reasons))
            self._records = sum(f.records + f.unreadable for f in listed)
            self._bytes = sum(f.bytes for f in listed)
        return listed

    def entries(self, name: str) -> list[Entry]:
        """The lines of one kept file; ``KeyError`` for a name that is not one."""
        with self._lock:
            return self._read(self._path_of(name))

    def replace(self, name: str, remaining: Sequence[Entry]) -> None:
        """Keep only ``remaining`` of a file (after a resend); the file goes when nothing is left."""
        with self._lock:
            path = self._path_of(name)
            before, lines_before = path.stat().st_size, len(self._read(path))
            content = _render([(e.line, e.reason) for e in remaining])
            if remaining:
                self._write(path, content)
            else:
                path.unlink()
            self._bytes += len(content) - before
            self._records += len(remaining) - lines_before

    def discard(self, name: str) -> int:
        """Delete one file on an operator's word; returns how many lines it held."""
        with self._lock:
            path = self._path_of(name)
            lines, size = len(self._read(path)), path.stat().st_size
            path.unlink()
            self._records -= lines
            self._bytes -= size
            return lines

    # -- reading -----------------------------------------------------------------------------

    def _paths(self) -> list[Path]:
        try:
            return sorted(p for p in self.directory.iterdir() if p.is_file() and p.suffix == ".log")
        except FileNotFoundError:
            return []

    def _path_of(self, name: str) -> Path:
        # Only a name of this directory's own making: never a path elsewhere.
        path = self.directory / name
        if not _NAME_RE.match(name) or not path.is_file():
            raise KeyError(name)
        return path

    @staticmethod
    def _read(path: Path) -> list[Entry]:
        entries: list[Entry] = []
        reason = ""
        with open(path, "rb") as f:
            for raw in f:
                if raw.startswith(b"# "):
                    reason = raw[2:].decode(errors="replace").strip()
                    continue
                line = raw if raw.endswith(b"\n") else raw + b"\n"
                entries.append(Entry(line, reason, None if line.startswith(UNREADABLE) else parse_line(line)))
        return entries

    def _count(self) -> tuple[int, int]:
        records = size = 0
        for path in self._paths():
            records += len(self._read(path))
            size += path.stat().st_size
        return records, size


def _render(entries: Sequence[tuple[bytes, str]]) -> bytes:
    """Lines under their reasons: a comment line wherever the reason changes."""
    content = bytearray()
    reason = None
    for line, why in entries:
        if one_line(why) != reason:
            reason = one_line(why)
            content += b"# " + reason.encode(errors="replace") + b"\n"
        content += line
    return bytes(content)
