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


CREATE_BUDGETS = """
from decimal import Decimal
from finops.budgets.services import budget_create
from finops.runtimes.models import Runtime
Runtime.objects.create(name="rt-1", base_url="http://127.0.0.1:9")
for tenant in ("acme", "globex", "initech", "umbrella", "hooli"):
    budget_create(fields={"name": tenant, "tenant": tenant, "limit": Decimal("10")})
"""
COUNT_EVALUATED = ("from finops.budgets.models import Budget; from finops.runtimes.models import Ruleset; "
                   "print(Budget.objects.filter(evaluated_at__isnull=False).count(), Ruleset.objects.count())")


def test_a_pass_over_more_budgets_than_a_chunk_is_a_chord_over_the_workers(tmp_path: Path) -> None:
    if not redis_up():
        pytest.skip("no Redis on 127.0.0.1:6379")
    broker = "redis://127.0.0.1:6379/14"  # a result backend too: what a chord needs
    env = {**os.environ, "WATTSON_DEV": "1", "WATTSON_VAR_DIR": str(tmp_path), "CELERY_BROKER_URL": broker,
           "BUDGET_EVALUATION_CHUNK": "2"}
    env.pop("DATABASE_URL", None)
    manage(env, "migrate", "-v0")
    manage(env, "shell", "-c", CREATE_BUDGETS)
    log = tmp_path / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "finops", "worker", "-B", "--concurrency", "2",
                               "-l", "info", "--logfile", str(log)],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        counts = ""
        while time.monotonic() < deadline and counts != "5 1":
            time.sleep(2)
            assert worker.poll() is None, "the worker exited"
            counts = manage(env, "shell", "--no-imports", "-c", COUNT_EVALUATED).strip()
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    assert counts == "5 1", "every budget evaluated and the runtime's ruleset compiled"
    succeeded = [line for line in log.read_text().splitlines() if " succeeded in " in line]
    assert sum("tasks.evaluate_chunk[" in line for line in succeeded) >= 3  # 2 + 2 + 1 budgets per pass
    assert any("tasks.finish_evaluation[" in line for line in succeeded)
