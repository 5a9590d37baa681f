"""`python -m demo` end to end on the tiny model: it prepares a fresh control plane database,
starts the control plane, a worker with beat and the runtime as child processes, drives traffic
until the trial tenant's hard budget trips, and leaves no process behind, whether it stops by
itself (``--exit``) or on Ctrl-C.

Each run has its own database, broker and runtime state (``WATTSON_VAR_DIR``) and free ports.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from tests.inference.live import free_port

ROOT = Path(__file__).resolve().parents[2]
STARTED = re.compile(r"started the (.+?) \(pid (\d+)")


def demo(tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "WATTSON_DEV": "1", "WATTSON_VAR_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    for name in ("DATABASE_URL", "CELERY_BROKER_URL", "DEMO_EXIT", "DEMO_PASSWORD", "SECRET_KEY"):
        env.pop(name, None)  # a SQLite file and the filesystem broker in tmp_path, shared by every child
    argv = [sys.executable, "-m", "demo", "--model", "tiny-random", "--rounds", "1", "--trip-tokens", "300",
            "--port", str(free_port()), "--finops-port", str(free_port()), *extra]
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def children_of(output: str) -> dict[str, int]:
    return {name: int(pid) for name, pid in STARTED.findall(output)}


def assert_all_stopped(children: dict[str, int]) -> None:
    assert set(children) == {"control plane", "worker", "runtime"}
    deadline = time.monotonic() + 5
    while any(group_alive(pid) for pid in children.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = {name: pid for name, pid in children.items() if group_alive(pid)}
    for pid in left.values():  # leave the machine clean even when the assertion fails
        os.killpg(pid, signal.SIGKILL)
    assert not left, f"process groups left running: {left}"


def test_the_demo_fills_the_control_plane_trips_a_budget_and_stops_everything(tmp_path: Path) -> None:
    process = demo(tmp_path, "--exit")
    try:
        output, _ = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, output
    assert_all_stopped(children_of(output))
    assert "log in as demo-admin / wattson-demo" in output and "log in as demo-pm" in output
    sent = int(re.search(r"sent (\d+) requests", output).group(1))

    with sqlite3.connect(tmp_path / "wattson.sqlite3") as db:
        events = dict(db.execute("SELECT status, count(*) FROM telemetry_requestevent GROUP BY status").fetchall())
        budgets = dict(db.execute("SELECT name, state FROM budgets_budget").fetchall())
        hits = dict(db.execute("SELECT coalesce(cache_kind, 'none'), count(*) FROM telemetry_requestevent "
                               "WHERE cache_hit GROUP BY 1").fetchall())
        groups = {user: group for user, group in db.execute(
            "SELECT u.username, g.name FROM auth_user u JOIN auth_user_groups ug ON ug.user_id = u.id "
            "JOIN auth_group g ON g.id = ug.group_id")}
    assert sum(events.values()) == sent, "every request the demo sent reached the control plane's database"
    assert events.get("rejected_budget", 0) >= 1 and events.get("ok", 0) >= 10
    assert budgets["initech trial (hard)"] == "exceeded"
    assert len(budgets) == 6
    assert groups == {"demo-admin": "budget-admin", "demo-pm": "product-manager"}
    assert hits.get("exact", 0) >= 1 and hits.get("semantic", 0) >= 1, f"the cache tiles show hits: {hits}"


def test_ctrl_c_during_the_traffic_stops_every_child(tmp_path: Path) -> None:
    process = demo(tmp_path)
    output = ""
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 180
        for line in process.stdout:
            output += line
            if "[5/5]" in line or time.monotonic() > deadline:
                break
        assert "[5/5]" in output, output
        time.sleep(1.5)  # requests in flight
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's foreground group
        rest, _ = process.communicate(timeout=90)
        output += rest
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert "stopping everything the demo started" in output, output
    assert_all_stopped(children_of(output))
