"""Servers a benchmark talks to, each in a process of its own so none shares a GIL with the load.

``runtime_server`` runs the real ``python -m inference serve``; ``stub_server`` runs
``bench.stub_server`` (an instant upstream and telemetry collector). Both yield a base URL once the
server answers, and stop the process (SIGTERM, then SIGKILL) when the block ends.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

from bench.report import progress

BENCH_KEY = "sk-bench-key-0001"
BENCH_TENANT = "bench"
MODEL_CACHE_DIR = Path(os.environ.get("INFERENCE_MODEL_CACHE_DIR", ".cache/models"))
START_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def runtime_server(*options: str, name: str = "runtime") -> Iterator[str]:
    """The runtime on a free port with one API key (``BENCH_KEY``); ``options`` are serve flags."""
    port = free_port()
    argv = ["-m", "inference", "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
            "--model-cache-dir", str(MODEL_CACHE_DIR), "--runtime-id", f"bench-{name}",
            "--log-level", "warning", *options]
    with _process(name, argv, port, env={"INFERENCE_API_KEYS": f"{BENCH_KEY}:{BENCH_TENANT}"}) as url:
        yield url


@contextmanager
def stub_server(name: str = "stub") -> Iterator[str]:
    port = free_port()
    with _process(name, ["-m", "bench.stub_server", "--port", str(port)], port) as url:
        yield url


@contextmanager
def _process(name: str, argv: Sequence[str], port: int, env: dict[str, str] | None = None) -> Iterator[str]:
    # The runtime reads INFERENCE_* variables; the caller's must not change what is measured.
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_")}
    child_env.update(env or {})
    base_url = f"http://127.0.0.1:{port}"
    with logged_process(name, [sys.executable, *argv], env=child_env) as (proc, log_path):
        progress(f"starting {name} (pid {proc.pid}) on {base_url}")
        _wait_until_healthy(proc, name, base_url, log_path)
        yield base_url


@contextmanager
def logged_process(name: str, argv: Sequence[str], *, env: dict[str, str], cwd: Path | None = None,
                   stop_timeout_s: float = 20.0) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """``argv`` as a child writing to a temporary log; stopped (SIGTERM, then SIGKILL) when the block
    ends. The log is deleted after a clean run and kept (and its path printed) after a failure."""
    with tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False) as log:
        log_path = Path(log.name)
        proc = subprocess.Popen(list(argv), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    failed = True
    try:
        yield proc, log_path
        failed = False
    finally:
        _stop(proc, stop_timeout_s)
        if failed:
            progress(f"{name}'s log is kept in {log_path}")
        else:
            log_path.unlink(missing_ok=True)


def _wait_until_healthy(proc: subprocess.Popen[bytes], name: str, base_url: str, log_path: Path) -> None:
    started = time.monotonic()
    while time.monotonic() - started < START_TIMEOUT_S:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} while starting:\n{_tail(log_path)}")
        try:
            if httpx.get(base_url + "/health", timeout=2.0).status_code == 200:
                progress(f"{name} ready in {time.monotonic() - started:.1f} s")
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{name} did not become healthy within {START_TIMEOUT_S:.0f} s:\n{_tail(log_path)}")


def _stop(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
