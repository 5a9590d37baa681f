"""The rig the fault scenarios run on: the whole product in processes of its own, and the means to
break each part.

Nothing here touches the machine's shared services. PostgreSQL is a private cluster (``initdb``
into the rig's directory, the server on a free port, its socket in that directory) and Redis two
private servers on free ports (one the Celery broker, one the runtime's response cache), so a
scenario that restarts PostgreSQL or kills Redis disturbs only its own. The control plane runs as
in production: ``uvicorn finops.asgi:application`` with two workers on the private database,
migrated with ``manage.py migrate``, the runtime registered with ``manage.py register_runtime``
(its tokens read from what it prints) and a price book saved; ``celery -A finops worker -B``
on the private broker runs the beat's rollups. The runtime is ``python -m inference serve --model
tiny-random`` exporting through the fault proxy (``bench.fault_proxy``) every 0.2 s, its spool on
a small tmpfs of its own when this process may mount one (as root), so a scenario can fill it.

Every process is a ``demo.processes.Child``: its own process group, stopped with everything it
started, its log in the rig's ``logs/`` (kept when a run fails). PostgreSQL runs in the foreground
as a child too (``postgres -D``, as the ``postgres`` user when the rig runs as root) rather than
daemonised by ``pg_ctl start``, so it is stopped like the rest; ``pg_ctl -m immediate stop``
crashes it. (Changing user clears the parent-death signal, so PostgreSQL alone outlives a rig
that is itself killed with SIGKILL.)
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.fault_proxy import FaultProxy, Mode
from bench.servers import MODEL_CACHE_DIR, free_port
from demo.processes import Child, group_alive

REPO = Path(__file__).resolve().parent.parent
DATABASE = "wattson_faults"
RUNTIME_ID = "faults"
API_KEY = "sk-faults-key-0001"
TENANT = "faults"
START_TIMEOUT_S = 120.0
EXPORT_INTERVAL_S = 0.2
SAMPLE_INTERVAL_S = 1.0
EXPORTER_TIMEOUT_S = 5.0  # the runtime's exporter gives up on a POST after this (TelemetryExporter)
SPOOL_DISK_MB = 16

PRICE_BOOK = """
import datetime as dt
from decimal import Decimal
from finops.pricing.models import DevicePrice, ModelPrice, PriceBook
book = PriceBook.objects.create(name="faults", effective_from=dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
ModelPrice.objects.create(book=book, model="tiny-random", prompt_per_1m=Decimal("0.10"),
                          completion_per_1m=Decimal("0.40"))
DevicePrice.objects.create(book=book, device_type="cpu", per_gpu_hour=Decimal("0.05"), per_kwh=Decimal("0.15"))
"""


class Unavailable(RuntimeError):
    """The rig, or one scenario, cannot run on this machine; the message says why."""


def kill9(child: Child) -> None:
    """SIGKILL to the child's whole process group (a server and its workers), then reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pgid, signal.SIGKILL)
    child.process.wait(timeout=10)
    deadline = time.monotonic() + 5
    while group_alive(child.pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _postgres_bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


class PrivatePostgres:
    """A PostgreSQL cluster of the rig's own in ``directory`` on a free port."""

    def __init__(self, directory: Path, logs: Path) -> None:
        bindir = _postgres_bindir()
        if bindir is None:
            raise Unavailable("no PostgreSQL server binaries (initdb) on this machine")
        self.bindir = bindir
        self.directory = directory
        self.data = directory / "data"
        self.logs = logs
        self.port = free_port()
        self.child: Child | None = None
        # initdb refuses to run as root: as root the cluster belongs to the postgres user.
        self._as_owner: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None or not _user_exists("postgres"):
                raise Unavailable("running as root, and there is no postgres user (or no setpriv) to run "
                                  "a PostgreSQL server as")
            self._as_owner = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]

    def init(self) -> None:
        self.directory.mkdir(parents=True)
        if self._as_owner:
            shutil.chown(self.directory, "postgres", "postgres")
        subprocess.run([*self._as_owner, str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust",
                        "-U", "postgres", "--no-sync"], check=True, capture_output=True, cwd=self.directory)

    def start(self) -> None:
        # fsync off: a crash of the server process (what the scenarios cause) loses nothing
        # committed without it; only a machine crash would.
        argv = [*self._as_owner, str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                "-k", str(self.directory), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]
        self.child = Child("postgres", argv, env=dict(os.environ), log=self.logs / "postgres.log",
                           cwd=self.directory, stop_signal=signal.SIGINT)
        self.child.wait_until(lambda: self.connect("postgres").close() is None, what="accept connections",
                              timeout=60)

    def crash(self) -> None:
        """Stop the server the way a crash does (``pg_ctl -m immediate``): no checkpoint, every
        session cut; the next start recovers from the WAL."""
        subprocess.run([*self._as_owner, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                        "-w", "stop"], check=True, capture_output=True, cwd=self.directory)
        if self.child is not None:
            self.child.process.wait(timeout=30)

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()

    def running(self) -> bool:
        return self.child is not None and self.child.running()

    def url(self, database: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str, *, autocommit: bool = True) -> Any:
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=database,
                               autocommit=autocommit, connect_timeout=5)


class PrivateRedis:
    """A Redis server of the rig's own on a free port, with nothing persisted."""

    def __init__(self, name: str, directory: Path, logs: Path) -> None:
        if shutil.which("redis-server") is None:
            raise Unavailable("no redis-server on this machine")
        self.name = name
        self.directory = directory
        self.logs = logs
        self.port = free_port()
        self.child: Child | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.directory)]
        self.child = Child(self.name, argv, env=dict(os.environ), log=self.logs / f"{self.name}.log")
        self.child.wait_until(self._answers, what="answer PING", timeout=30, interval=0.05)

    def kill(self) -> None:
        if self.child is not None:
            kill9(self.child)

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()

    def running(self) -> bool:
        return self.child is not None and self.child.running()

    def _answers(self) -> bool:
        import socket

        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")


class SpoolDisk:
    """Where the runtime's spool lives: a small tmpfs of its own when this process may mount one,
    so a scenario can fill it; a plain directory otherwise (``unavailable`` then says why)."""

    def __init__(self, directory: Path, size_mb: int) -> None:
        self.directory = directory
        self.size_mb = size_mb
        self.mounted = False
        self.unavailable: str | None = None
        self._filler = directory / "filler"

    def mount(self) -> None:
        self.directory.mkdir(parents=True)
        if os.geteuid() != 0:
            self.unavailable = "not root: cannot mount a tmpfs of the spool's own to fill"
            return
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m,mode=0755", "tmpfs",
                               str(self.directory)], capture_output=True, text=True)
        if done.returncode != 0:
            self.unavailable = f"mounting a tmpfs was refused: {done.stderr.strip() or done.returncode}"
            return
        self.mounted = True

    def fill(self) -> int:
        """Write a file until the disk refuses more; return the bytes written."""
        if not self.mounted:
            raise Unavailable(self.unavailable or "the spool is not on a disk of its own")
        written = 0
        chunk = b"\0" * (1 << 20)
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while True:
                try:
                    written += os.write(fd, chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    if len(chunk) == 1:
                        return written
                    chunk = chunk[: len(chunk) // 16 or 1]
        finally:
            os.close(fd)

    def free(self) -> None:
        self._filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        if self.mounted:
            if subprocess.run(["umount", str(self.directory)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(self.directory)], capture_output=True)
            self.mounted = False


class Stack:
    """The product running in ``root`` (a directory the ``postgres`` user can reach when this runs
    as root), the processes' logs in ``logs`` (``root/logs`` unless given): private PostgreSQL and
    Redis, the control plane behind the fault proxy, the Celery worker with beat, and the runtime.
    Use it as a context manager."""

    def __init__(self, root: Path, *, logs: Path | None = None, slow_hold_s: float = EXPORTER_TIMEOUT_S + 1.5) -> None:
        self.root = root
        self.logs = logs or root / "logs"
        self.secret_key = secrets.token_urlsafe(40)
        self.pg = PrivatePostgres(root / "postgres", self.logs)
        self.broker = PrivateRedis("redis-broker", root / "redis-broker", self.logs)
        self.cache = PrivateRedis("redis-cache", root / "redis-cache", self.logs)
        self.spool_disk = SpoolDisk(root / "spool-disk", SPOOL_DISK_MB)
        self.control_plane_port = free_port()
        self.runtime_port = free_port()
        self.runtime_url = f"http://127.0.0.1:{self.runtime_port}"
        self.proxy = FaultProxy(("127.0.0.1", self.control_plane_port), port=free_port(), slow_hold_s=slow_hold_s)
        self.control_plane: Child | None = None
        self.worker: Child | None = None
        self.runtime: Child | None = None
        self.token = self.admin_token = ""
        self._worker_log_from = 0
        self.suspect = False  # the last scenario may have left the runtime exporting nothing

    # -- start and stop ------------------------------------------------------------------------

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self.root.chmod(0o755)  # the postgres user must reach its directory inside
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pg.init()
        self.pg.start()
        self.broker.start()
        self.cache.start()
        self.spool_disk.mount()
        self._prepare_database()
        self.proxy.start()
        self.start_control_plane(wait=False)
        self.start_worker(wait=False)
        self.start_runtime(wait=False)
        # While they load: prices in force before the first request is priced on arrival.
        self._manage("shell", "-c", PRICE_BOOK)
        self.wait_control_plane()
        self.wait_worker()
        self.wait_runtime()

    def close(self) -> None:
        for child in (self.runtime, self.worker, self.control_plane):
            if child is not None:
                child.stop()
        self.proxy.close()
        for server in (self.cache, self.broker, self.pg):
            server.stop()
        self.spool_disk.unmount()
        shutil.rmtree(self.pg.directory, ignore_errors=True)

    def django_env(self) -> dict[str, str]:
        """The control plane's environment: production settings (never development's, whatever this
        process has) on the private database and broker with a secret of its own, served over plain
        HTTP on loopback as the README's production notes allow for a trusted network."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("INFERENCE_")
               and k not in ("DEBUG", "WATTSON_DEV", "DATABASE_URL", "CELERY_BROKER_URL")}
        env.update(DATABASE_URL=self.pg.url(DATABASE), SECRET_KEY=self.secret_key, LOG_LEVEL="WARNING",
                   DJANGO_SETTINGS_MODULE="finops.settings", WATTSON_VAR_DIR=str(self.root / "var"),
                   CELERY_BROKER_URL=self.broker.url(0), SECURE_SSL_REDIRECT="0", SESSION_COOKIE_SECURE="0",
                   CSRF_COOKIE_SECURE="0")
        return env

    def _manage(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "manage.py", *args], cwd=REPO, env=self.django_env(),
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{done.stderr[-2000:]}")
        return done.stdout

    def _prepare_database(self) -> None:
        with self.pg.connect("postgres") as conn:
            conn.execute(f'CREATE DATABASE "{DATABASE}"')
        self._manage("migrate", "--verbosity", "0")
        printed = self._manage("register_runtime", RUNTIME_ID, "--url", self.runtime_url)
        token = re.search(r"^Token \(.*?\): (\S+)$", printed, re.MULTILINE)
        admin = re.search(r"^Admin token \(.*?\): (\S+)$", printed, re.MULTILINE)
        if token is None or admin is None:
            raise RuntimeError(f"register_runtime printed no tokens:\n{printed}")
        self.token, self.admin_token = token.group(1), admin.group(1)

    # -- the control plane ---------------------------------------------------------------------

    def start_control_plane(self, *, wait: bool = True) -> None:
        argv = [sys.executable, "-m", "uvicorn", "finops.asgi:application", "--host", "127.0.0.1",
                "--port", str(self.control_plane_port), "--workers", "2", "--log-level", "warning",
                "--no-access-log"]
        self.control_plane = Child("control plane", argv, env=self.django_env(), cwd=REPO,
                                   log=self.logs / "control-plane.log", stop_signal=signal.SIGTERM)
        if wait:
            self.wait_control_plane()

    def wait_control_plane(self) -> None:
        url = f"http://127.0.0.1:{self.control_plane_port}/api/v1/events"
        assert self.control_plane is not None
        self.control_plane.wait_until(lambda: httpx.post(url, content=b"{}", timeout=2).status_code == 401,
                                      what="answer /api/v1/events", timeout=START_TIMEOUT_S, interval=0.1)

    def kill_control_plane(self) -> None:
        assert self.control_plane is not None
        kill9(self.control_plane)

    # -- the Celery worker ---------------------------------------------------------------------

    def start_worker(self, *, wait: bool = True) -> None:
        argv = [sys.executable, "-m", "celery", "-A", "finops", "worker", "-B", "--concurrency", "1", "-l", "info"]
        log = self.logs / "celery.log"
        self._worker_log_from = log.stat().st_size if log.exists() else 0
        self.worker = Child("celery worker", argv, env=self.django_env(), cwd=REPO, log=log,
                            stop_signal=signal.SIGTERM)
        if wait:
            self.wait_worker()

    def wait_worker(self) -> None:
        assert self.worker is not None
        log = self.worker.log

        def ready() -> bool:
            with log.open("rb") as f:
                f.seek(self._worker_log_from)
                return b" ready." in f.read()

        self.worker.wait_until(ready, what="say it is ready", timeout=START_TIMEOUT_S)

    def kill_worker(self) -> None:
        assert self.worker is not None
        kill9(self.worker)

    # -- the runtime ---------------------------------------------------------------------------

    @property
    def spool_dir(self) -> Path:
        return self.spool_disk.directory / "spool"

    def start_runtime(self, *, wait: bool = True) -> None:
        argv = [sys.executable, "-m", "inference", "serve", "--host", "127.0.0.1", "--port", str(self.runtime_port),
                "--device", "cpu", "--torch-threads", "1", "--model", "tiny-random",
                "--model-cache-dir", str(MODEL_CACHE_DIR), "--runtime-id", RUNTIME_ID,
                "--finops-url", self.proxy.url, "--finops-token", self.token, "--admin-token", self.admin_token,
                "--spool-dir", str(self.spool_dir), "--state-dir", str(self.root / "runtime-state"),
                "--export-interval-s", str(EXPORT_INTERVAL_S), "--sample-interval-s", str(SAMPLE_INTERVAL_S),
                "--cache-enabled", "on", "--cache-redis-url", self.cache.url(0), "--log-level", "info"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_")}
        env["INFERENCE_API_KEYS"] = f"{API_KEY}:{TENANT}"
        self.runtime = Child("runtime", argv, env=env, cwd=REPO, log=self.logs / "runtime.log",
                             stop_signal=signal.SIGTERM)
        if wait:
            self.wait_runtime()

    def wait_runtime(self) -> None:
        assert self.runtime is not None
        self.runtime.wait_until(lambda: httpx.get(self.runtime_url + "/health", timeout=2).status_code == 200,
                                what="become healthy", timeout=START_TIMEOUT_S, interval=0.1)

    def kill_runtime(self) -> None:
        assert self.runtime is not None
        kill9(self.runtime)

    def restart_runtime(self) -> None:
        """A clean restart (SIGTERM, then start over the same spool and state)."""
        assert self.runtime is not None
        self.runtime.stop()
        self.start_runtime()

    def runtime_health(self) -> dict[str, Any]:
        """The runtime's /health, or what kept it from answering."""
        try:
            return httpx.get(self.runtime_url + "/health", timeout=5).json()
        except (httpx.HTTPError, ValueError) as exc:
            return {"status": f"no answer ({type(exc).__name__})"}

    def runtime_metric(self, name: str) -> float | None:
        """One unlabelled series of the runtime's /metrics, None when it is not there."""
        try:
            text = httpx.get(self.runtime_url + "/metrics", timeout=5).text
        except httpx.HTTPError:
            return None
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    # -- between scenarios ---------------------------------------------------------------------

    def ensure_running(self) -> list[str]:
        """Bring back whatever a scenario left down; say what that was."""
        notes = []
        self.proxy.set_mode(Mode.PASS)
        self.proxy.disarm()
        self.spool_disk.free()
        for server in (self.pg, self.broker, self.cache):
            if not server.running():
                notes.append(f"started {type(server).__name__} again")
                server.start()
        if self.control_plane is None or not self.control_plane.running():
            notes.append("started the control plane again")
            self.start_control_plane()
        if self.worker is None or not self.worker.running():
            notes.append("started the Celery worker again")
            self.start_worker()
        if self.runtime is None or not self.runtime.running():
            notes.append("started the runtime again")
            self.start_runtime()
        return notes
