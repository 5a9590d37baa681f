"""Child processes of the demo and the benchmarks: each in its own process group, its output in a
log file, waited for until it is ready and stopped with everything it started.

A child started in a new session does not receive the terminal's Ctrl-C; the demo catches it and
stops the children itself, in an order that lets the runtime flush its telemetry to a control
plane that is still up (a benchmark stops its own as its ``with`` block ends). Stopping signals the
whole group (a Celery worker's pool and beat, uvicorn's workers), waits, then kills what is left.
On Linux each child is also asked to receive SIGTERM if its parent dies without cleaning up
(``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

PR_SET_PDEATHSIG = 1

# Looked up once, here: loading a library in the child between fork and exec can hang when other
# threads ran in the parent (a benchmark's torch threads).
_prctl = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError):
        _prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl


class ChildFailed(RuntimeError):
    """A child exited or did not become ready; the message says which and shows its log's tail."""


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    """One service started: ``name`` for messages, ``log`` for its output (appended to), ``cwd``
    where it runs (this process's when not given)."""

    def __init__(self, name: str, argv: Sequence[str], *, env: Mapping[str, str], log: Path, cwd: Path | None = None,
                 stop_signal: signal.Signals = signal.SIGINT) -> None:
        self.name = name
        self.log = log
        self.stop_signal = stop_signal
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
            out.flush()
            self.process = subprocess.Popen(list(argv), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=_die_with_parent)
        self.pgid = self.process.pid  # a new session: the child leads its own process group

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def check(self) -> None:
        """Raise ``ChildFailed`` if the child has exited."""
        if not self.running():
            raise ChildFailed(f"the {self.name} exited with status {self.process.returncode}; the end of "
                              f"{self.log}:\n{self.log_tail()}")

    def wait_until(self, ready: Callable[[], bool], *, what: str, timeout: float, interval: float = 0.3) -> None:
        """Poll ``ready`` until it is true; fail if the child exits or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            try:
                if ready():
                    return
            except Exception:  # not ready yet: connection refused, a table not there yet
                pass
            if time.monotonic() > deadline:
                raise ChildFailed(f"the {self.name} did not {what} within {timeout:.0f} s; the end of "
                                  f"{self.log}:\n{self.log_tail()}")
            time.sleep(interval)

    def stop(self, timeout: float = 20.0) -> None:
        """Ask the child to stop, wait up to ``timeout``, then end whatever is left of its group (a
        Celery worker stops its own pool; its beat process may outlive it briefly)."""
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(self.stop_signal)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.process.wait(timeout=5)
        # The leader is gone; members of its group (a pool process, say) may linger briefly.
        deadline = time.monotonic() + 5
        while group_alive(self.pgid) and time.monotonic() < deadline:
            self._signal_group(signal.SIGTERM)
            time.sleep(0.2)
        if group_alive(self.pgid):
            self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, sig)


def group_alive(pgid: int) -> bool:
    """Whether any process is left in process group ``pgid`` (zombies count until reaped)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Children:
    """The demo's children, stopped in reverse order of start (the runtime before the control plane
    it exports to)."""

    def __init__(self) -> None:
        self._started: list[Child] = []

    def start(self, name: str, argv: Sequence[str], **kwargs: object) -> Child:
        child = Child(name, argv, **kwargs)  # type: ignore[arg-type]
        self._started.append(child)
        print(f"  started the {name} (pid {child.pid}, log {child.log})", flush=True)
        return child

    def stop_all(self) -> None:
        while self._started:
            child = self._started.pop()
            if child.running() or group_alive(child.pgid):
                print(f"  stopping the {child.name} (pid {child.pid})", end="", flush=True)
                began = time.monotonic()
                child.stop()
                print(f": stopped in {time.monotonic() - began:.1f} s", flush=True)
