"""The held ruleset and ledger on disk: accepted documents (pushed or pulled) are written before
they take effect, and both are loaded before the runtime serves.

Files in ``--state-dir``: ``ruleset.json`` (the accepted document, byte for byte as it came) and
``ledger.json`` (settled spend per budget and period). Each is replaced atomically (write a
temporary file beside it, then rename), so a crash leaves the old or the new file, never half of
one. The ruleset is fsynced (rare, and it decides what is enforced); the ledger is not — it is
rewritten at most every ``LEDGER_FLUSH_S`` while requests settle, and a crash loses at most that
window of spend, which the control plane's ``reported`` figure then covers. A lock file keeps a
second runtime off the same state directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import IO, Any

from inference.rules.compiled import PeriodKey, ruleset_compile
from inference.rules.contract import RulesetDocument, RulesetInvalid, ruleset_parse
from inference.rules.enforcement import RuleEnforcer, RulesetNotNewer

log = logging.getLogger("inference.rules")

RULESET_FILE = "ruleset.json"
LEDGER_FILE = "ledger.json"
LOCK_FILE = "lock"
LEDGER_FLUSH_S = 0.05
LEDGER_FORMAT = 1


class StateDirError(RuntimeError):
    """The state directory cannot be used (not writable, or held by another runtime)."""


class RulesetKeeper:
    def __init__(self, enforcer: RuleEnforcer, state_dir: Path, *, runtime_id: str | None = None) -> None:
        self.enforcer = enforcer
        self.state_dir = state_dir
        self.runtime_id = runtime_id
        self._lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()
        self._flush_handle: asyncio.TimerHandle | None = None
        self._lock_file: IO[str] | None = None
        self.last_accepted_at: float | None = None
        self.held_document: bytes | None = None  # the held ruleset's JSON text, as accepted
        # Told of each document accepted (on the event loop), for what follows it beside the rules:
        # the semantic cache's policies.
        self.on_accept: Callable[[RulesetDocument], None] | None = None
        enforcer.on_ledger_change = self._ledger_changed

    # -- start and stop ------------------------------------------------------------------------

    def open(self) -> None:
        """Take the state directory and load what it holds. Blocking: call off the event loop."""
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            lock_file = open(self.state_dir / LOCK_FILE, "a")  # noqa: SIM115 (held until close)
        except OSError as exc:
            raise StateDirError(f"--state-dir {self.state_dir} cannot be used: {exc}") from exc
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock_file.close()
            raise StateDirError(f"--state-dir {self.state_dir} is in use by another runtime; give each "
                                "runtime its own") from None
        self._lock_file = lock_file
        self._load()

    async def close(self) -> None:
        """Write the ledger a last time (after any write in flight) and let go of the directory."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._lock_file is None:
            return
        content = self._ledger_bytes()
        async with self._write_lock:
            try:
                await asyncio.to_thread(self._write, LEDGER_FILE, content)
            except OSError:
                log.exception("could not write the ledger to %s", self.state_dir)
        self._lock_file.close()
        self._lock_file = None

    def _load(self) -> None:
        path = self.state_dir / RULESET_FILE
        if not path.exists():
            return
        try:
            raw = path.read_bytes()
            compiled = ruleset_compile(self._parse(raw))
        except (OSError, RulesetInvalid) as exc:
            # Only a broken disk or a hand edit gets here (writes are atomic); keep the file for a
            # person to read and start without rules until the control plane sends them again.
            aside = path.with_name(f"{RULESET_FILE}.unreadable-{int(time.time())}")
            with contextlib.suppress(OSError):
                path.rename(aside)
            log.error("the held ruleset in %s could not be read (%s); moved to %s, starting without rules",
                      path, exc, aside)
            return
        self.enforcer.apply(compiled, settled=self._read_ledger())
        self.held_document = raw
        log.info("loaded ruleset version %d from %s", compiled.version, path)

    def _read_ledger(self) -> dict[PeriodKey, Decimal]:
        path = self.state_dir / LEDGER_FILE
        try:
            data = json.loads(path.read_bytes())
            if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
                raise ValueError("not a ledger of format 1")
            settled: dict[PeriodKey, Decimal] = {}
            for row in data["settled"]:
                amount = Decimal(row["settled"])
                budget_id, period = row["budget_id"], row["period_start"]
                if not (isinstance(budget_id, str) and isinstance(period, str)) or not amount.is_finite() \
                        or amount < 0:
                    raise ValueError(f"bad row {row!r}")
                settled[(budget_id, period)] = amount
            return settled
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, InvalidOperation) as exc:
            log.error("the ledger in %s could not be read (%s); starting from the control plane's "
                      "reported spend", path, exc)
            return {}

    # -- accepting a document ------------------------------------------------------------------

    async def accept(self, raw: bytes) -> int:
        """Validate, persist and apply a document; returns the version now held. Raises
        ``RulesetInvalid`` or ``RulesetNotNewer`` (nothing changes then)."""
        document = await asyncio.to_thread(self._parse, raw)
        if document.version <= self.enforcer.version:
            raise RulesetNotNewer(self.enforcer.version, document.version)
        compiled = await asyncio.to_thread(ruleset_compile, document)
        async with self._lock:
            if compiled.version <= self.enforcer.version:  # a newer one won while this was compiled
                raise RulesetNotNewer(self.enforcer.version, compiled.version)
            await asyncio.to_thread(self._write, RULESET_FILE, raw, True)
            self.enforcer.apply(compiled)
            self.held_document = raw
            self.last_accepted_at = time.time()
        if self.on_accept is not None:
            self.on_accept(document)
        log.info("ruleset version %d accepted: %d rules, %d allowances", compiled.version,
                 compiled.rules.size, compiled.allowances.size)
        return compiled.version

    def _parse(self, raw: bytes) -> RulesetDocument:
        document = ruleset_parse(raw)
        # Grants are per runtime: another runtime's document would spend its budget a second time.
        if document.runtime_id is not None and self.runtime_id is not None and document.runtime_id != self.runtime_id:
            raise RulesetInvalid(f"The ruleset is for runtime '{document.runtime_id}'; this runtime is "
                                 f"'{self.runtime_id}'.", param="runtime_id")
        return document

    # -- the ledger ----------------------------------------------------------------------------

    def _ledger_changed(self) -> None:
        if self._flush_handle is not None or self._lock_file is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # settled outside the loop (a test driving the enforcer directly)
            return
        self._flush_handle = loop.call_later(LEDGER_FLUSH_S, self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_handle = None
        content = self._ledger_bytes()  # a snapshot taken on the loop, written off it

        async def write() -> None:
            async with self._write_lock:  # in order: an older snapshot never replaces a newer one
                try:
                    await asyncio.to_thread(self._write, LEDGER_FILE, content)
                except OSError:
                    log.exception("could not write the ledger to %s", self.state_dir)

        _background(write())

    def _ledger_bytes(self) -> bytes:
        body: dict[str, Any] = {"format": LEDGER_FORMAT, "ruleset_version": self.enforcer.version,
                                "settled": self.enforcer.ledger.rows()}
        return json.dumps(body, separators=(",", ":")).encode()

    def _write(self, name: str, content: bytes, durable: bool = False) -> None:
        path = self.state_dir / name
        tmp = path.with_name(f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as f:
            f.write(content)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fd = os.open(self.state_dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


_tasks: set[asyncio.Task[Any]] = set()


def _background(coro: Any) -> None:
    task = asyncio.ensure_future(coro)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
