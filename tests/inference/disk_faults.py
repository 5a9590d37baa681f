"""Disk faults on demand for the telemetry tests: a wrapper around the calls the spool makes that
fails the ones under one directory (and whose path matches) with the errno asked for, and a tiny
tmpfs for a disk that is really full (root only)."""

from __future__ import annotations

import builtins
import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from inference.telemetry import refused, sequence, spool

_MODULES = (spool, refused, sequence)


class DiskFaults:
    """``fail("replace", errno.ENOSPC, "cursor.json")``: every ``os.replace`` onto a path under
    ``root`` containing ``cursor.json`` raises ENOSPC until ``heal()``. Operations: ``open``
    (Python's, as the spool's modules call it), ``os_open``, ``write``, ``fsync``, ``replace``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
        self.root = str(root)
        self.faults: dict[str, tuple[int, str]] = {}
        self.tripped: dict[str, int] = {}
        real = {"open": builtins.open, "os_open": os.open, "write": os.write, "fsync": os.fsync,
                "replace": os.replace}

        def check(op: str, path: Any) -> None:
            fault = self.faults.get(op)
            if fault is None or not isinstance(path, str | os.PathLike):
                return
            text = os.fspath(path)
            if text.startswith(self.root) and fault[1] in text:
                self.tripped[op] = self.tripped.get(op, 0) + 1
                raise OSError(fault[0], os.strerror(fault[0]), text)

        def fd_path(fd: int) -> str:
            try:
                return os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                return ""

        def faulty_open(file: Any, *args: Any, **kwargs: Any) -> Any:
            check("open", file)
            return real["open"](file, *args, **kwargs)

        def faulty_os_open(path: Any, *args: Any, **kwargs: Any) -> int:
            check("os_open", path)
            return real["os_open"](path, *args, **kwargs)

        def faulty_write(fd: int, data: Any) -> int:
            check("write", fd_path(fd))
            return real["write"](fd, data)

        def faulty_fsync(fd: Any) -> None:
            check("fsync", fd_path(fd if isinstance(fd, int) else fd.fileno()))
            real["fsync"](fd)

        def faulty_replace(src: Any, dst: Any, **kwargs: Any) -> None:
            check("replace", dst)
            real["replace"](src, dst, **kwargs)

        for module in _MODULES:
            monkeypatch.setattr(module, "open", faulty_open, raising=False)
        monkeypatch.setattr(os, "open", faulty_os_open)
        monkeypatch.setattr(os, "write", faulty_write)
        monkeypatch.setattr(os, "fsync", faulty_fsync)
        monkeypatch.setattr(os, "replace", faulty_replace)

    def fail(self, op: str, code: int = errno.ENOSPC, matching: str = "") -> None:
        self.faults[op] = (code, matching)

    def heal(self) -> None:
        self.faults.clear()


@contextmanager
def tiny_disk(path: Path, size: str = "256k") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (the test is skipped where that is not allowed)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the fault wrapper tests cover the same paths")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"could not mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> Path:
    """Take every free byte of ``disk`` with one file; deleting it gives the room back."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler
