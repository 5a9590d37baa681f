"""A real Celery worker for tests, in a process of its own: ``celery -A finops worker`` on the test's
own database (pytest-django's, as a URL the process can open: the SQLite test file or the
PostgreSQL test database) and on a queue of its own, so a worker another test run started on the
same broker never takes its tasks, nor it theirs."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import socket
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from django.conf import settings
from django.db import connection
from kombu import Connection

from demo.processes import Child

ROOT = Path(__file__).resolve().parents[1]
# Override with WATTSON_TEST_REDIS_URL to keep off a Redis database others use.
REDIS_URL = os.environ.get("WATTSON_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
FILESYSTEM = "filesystem://"


def redis_up(url: str = REDIS_URL) -> bool:
    parts = urlsplit(url)
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((parts.hostname or "127.0.0.1", parts.port or 6379)) == 0


def shared_database_url() -> str:
    """The database this test runs on, as a ``DATABASE_URL`` for another process."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    if connection.vendor != "postgresql":
        raise RuntimeError(f"no URL for a {connection.vendor} database")
    credentials = quote(db["USER"] or "postgres") + (f":{quote(db['PASSWORD'])}" if db.get("PASSWORD") else "")
    return f"postgres://{credentials}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{quote(db['NAME'])}"


def broker_transport_options(broker: str, var_dir: Path) -> dict[str, Any]:
    """What ``finops.settings`` gives the filesystem broker under ``WATTSON_VAR_DIR=var_dir``."""
    if broker != FILESYSTEM:
        return {}
    folder = var_dir / "celery-broker"
    for name in ("out", "processed", "control"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    return {"data_folder_in": str(folder / "out"), "data_folder_out": str(folder / "out"),
            "processed_folder": str(folder / "processed"), "control_folder": str(folder / "control"),
            "store_processed": False}


def control_plane_env(*, broker: str, var_dir: Path, queue: str) -> dict[str, str]:
    """The environment of a control-plane process (a worker, a server) that shares this test's
    database and secret (the runtimes' admin tokens are derived from it), with ``queue`` as
    Celery's default queue."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_")}
    env.update(WATTSON_DEV="1", SECRET_KEY=settings.SECRET_KEY, DATABASE_URL=shared_database_url(),
               CELERY_BROKER_URL=broker, CELERY_TASK_DEFAULT_QUEUE=queue, WATTSON_VAR_DIR=str(var_dir),
               DJANGO_SETTINGS_MODULE="finops.settings", LOG_LEVEL="WARNING")
    return env


def unique_queue(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@contextmanager
def celery_worker(*, broker: str, var_dir: Path, queue: str, log: Path, concurrency: int = 1) -> Iterator[Child]:
    """``celery -A finops worker`` consuming ``queue`` only; stopped (its pool too) when the block
    ends, and the queue removed with what it left (a retry it held, put back on shutdown)."""
    argv = [sys.executable, "-m", "celery", "-A", "finops", "worker", "-Q", queue, "--concurrency",
            str(concurrency), "-l", "info", "--without-gossip", "--without-mingle"]
    worker = Child("celery worker", argv, env=control_plane_env(broker=broker, var_dir=var_dir, queue=queue),
                   cwd=ROOT, log=log, stop_signal=signal.SIGTERM)
    try:
        yield worker
    finally:
        worker.stop(30)
        queue_remove(broker, var_dir, queue)


def queue_remove(broker: str, var_dir: Path, queue: str) -> None:
    """Empty ``queue`` and, on Redis, drop the routing keys its worker declared for it (each test's
    queue is new: they would pile up)."""
    with broker_connection(broker, var_dir) as conn:
        channel = conn.default_channel
        channel.queue_purge(queue)
        if broker.startswith("redis"):
            channel.client.delete(f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")


def worker_ready(worker: Child) -> bool:
    return b" ready." in worker.log.read_bytes()


def broker_connection(broker: str, var_dir: Path) -> Connection:
    return Connection(broker, transport_options=broker_transport_options(broker, var_dir))


def send(task: Any, args: Sequence[Any], *, broker: str, var_dir: Path, queue: str, **options: Any) -> str:
    """Queue ``task`` on ``queue`` of ``broker`` (not this process's configured broker); return the
    task's id."""
    with broker_connection(broker, var_dir) as conn:
        return task.apply_async(args=tuple(args), queue=queue, connection=conn, **options).id


LOG_LINE = re.compile(r"^\[(?P<at>[\d-]+ [\d:]+,\d+): \w+/[\w-]+\] Task [\w.]+\[(?P<id>[\w-]+)\] (?P<what>received|"
                      r"retry|succeeded|failed|raised)")


def task_log(worker: Child) -> list[tuple[dt.datetime, str, str]]:
    """What the worker's log (``-l info``) says happened to each task: (time, task id, one of
    received / retry / succeeded / failed / raised), in the order logged."""
    entries = []
    for line in worker.log.read_text(errors="replace").splitlines():
        match = LOG_LINE.match(line)
        if match:
            at = dt.datetime.strptime(match["at"], "%Y-%m-%d %H:%M:%S,%f")
            entries.append((at, match["id"], match["what"]))
    return entries
