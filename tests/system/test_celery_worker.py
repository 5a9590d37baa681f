"""`celery -A finops worker -B` runs the rollups on its own, on the broker the settings name: the
embedded filesystem broker by default, Redis when CELERY_BROKER_URL points at it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

STORE_EVENT = """
import datetime as dt, uuid
from finops.telemetry.models import RequestEvent
past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
RequestEvent.objects.create(event_id=uuid.uuid4(), runtime_id="r1", started_at=past, finished_at=past,
    received_at=past, tenant="acme", feature="search", api_key_id="k", model_requested="m", model_served="m",
    route_reason="requested", priority="normal", status="ok", status_class="ok", http_status=200,
    prompt_tokens=10, completion_tokens=5, e2e_ms=120.0)
"""
COUNT_ROLLUPS = "from finops.telemetry.models import Rollup; print(Rollup.objects.filter(requests=1).count())"


def redis_up() -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", 6379)) == 0


def manage(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("broker", ["filesystem://", "redis://127.0.0.1:6379/15"], ids=["embedded", "redis"])
def test_the_worker_with_beat_rolls_up_stored_events(broker: str, tmp_path: Path) -> None:
    if broker.startswith("redis") and not redis_up():
        pytest.skip("no Redis on 127.0.0.1:6379")
    env = {**os.environ, "WATTSON_DEV": "1", "WATTSON_VAR_DIR": str(tmp_path), "CELERY_BROKER_URL": broker}
    env.pop("DATABASE_URL", None)  # a file database the worker and this test both open
    manage(env, "migrate", "-v0")
    manage(env, "shell", "-c", STORE_EVENT)
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "finops", "worker", "-B", "--concurrency", "1",
                               "-l", "warning"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        rolled = "0"
        while time.monotonic() < deadline and rolled != "3":
            time.sleep(2)
            assert worker.poll() is None, worker.stderr.read() if worker.stderr else "the worker exited"
            rolled = manage(env, "shell", "--no-imports", "-c", COUNT_ROLLUPS).strip()
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    assert rolled == "3", "one row each for the minute, the hour and the day"
