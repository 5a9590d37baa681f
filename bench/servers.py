"""Servers a benchmark talks to, each in a process of its own so none shares a GIL with the load.

``runtime_server`` runs the real ``python -m inference serve``; ``stub_server`` runs
``bench.stub_server`` (an instant upstream and telemetry collector). Both yield a base URL once the
server answers, and stop the process group (SIGTERM, then SIGKILL) when the block ends. Each server
is a ``demo.processes.Child``, the one supervisor the demo's services and the benchmarks' share.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

from bench.report import progress
from demo.processes import Child

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
    with logged_process(name, [sys.executable, *argv], env=child_env) as child:
        progress(f"starting {name} (pid {child.pid}) on {base_url}")
        started = time.monotonic()
        child.wait_until(lambda: httpx.get(base_url + "/health", timeout=2.0).status_code == 200,
                         what="become healthy", timeout=START_TIMEOUT_S, interval=0.2)
        progress(f"{name} ready in {time.monotonic() - started:.1f} s")
        yield base_url


@contextmanager
def logged_process(name: str, argv: Sequence[str], *, env: dict[str, str], cwd: Path | None = None,
                   stop_timeout_s: float = 20.0) -> Iterator[Child]:
    """``argv`` as a child writing to a temporary log; stopped (SIGTERM to it, then its whole group,
    then SIGKILL) when the block ends. The log is deleted after a clean run and kept (and its path
    printed) after a failure."""
    with tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False) as log:
        log_path = Path(log.name)
    child = Child(name, argv, env=env, cwd=cwd, log=log_path, stop_signal=signal.SIGTERM)
    failed = True
    try:
        yield child
        failed = False
    finally:
        child.stop(stop_timeout_s)
        if failed:
            progress(f"{name}'s log is kept in {log_path}")
        else:
            log_path.unlink(missing_ok=True)
