"""`python -m demo`: the whole system on this machine, with traffic, until Ctrl-C.

Prepares the control plane's database (migrations, two demo logins, the runtime's registration, a
price book, demo budgets), starts the control plane (uvicorn), the runtime on SmolLM2 and a Celery
worker with beat as child processes, waits for each to be healthy, drives several tenants'
traffic until the trial tenant's hard budget trips, prints what was stored and where to look, then
serves until Ctrl-C (or stops at once with --exit / DEMO_EXIT=1). Ctrl-C at any point stops every
process it started.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import signal
import socket
import sys
import time
from decimal import Decimal
from pathlib import Path
from types import FrameType

import httpx

from demo.processes import ChildFailed, Children
from demo.traffic import FAQ, Outcomes, api_keys_setting, drive

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_NAME = "demo-runtime"
DEFAULT_PASSWORD = "wattson-demo"
# What acme's monthly budget has left at the start of a run, per round of traffic: measured on
# SmolLM2, acme spends $0.0025-0.0028 a round, so the budget crosses 50% and 80% but not 100%.
ACME_USD_PER_ROUND = Decimal("0.0030")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2",
                        help="model to serve: smollm2 (real weights, the default) or tiny-random (for tests)")
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("DEMO_ROUNDS", "3")),
                        help="passes over each tenant's features (default 3: about 90 requests)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("DEMO_PORT", "8100")),
                        help="the runtime's port (default 8100, or DEMO_PORT)")
    parser.add_argument("--finops-port", type=int, default=int(os.environ.get("DEMO_FINOPS_PORT", "8000")),
                        help="the control plane's port (default 8000, or DEMO_FINOPS_PORT)")
    parser.add_argument("--trip-tokens", type=int, default=600,
                        help="tokens the trial tenant may still use today before its hard budget blocks it")
    parser.add_argument("--torch-threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="the runtime's CPU threads (default: one core less than the machine has, which "
                             "leaves a core to the control plane, the worker and the traffic)")
    parser.add_argument("--password", default=os.environ.get("DEMO_PASSWORD", DEFAULT_PASSWORD),
                        help=f"password of the demo logins (default {DEFAULT_PASSWORD!r}, or DEMO_PASSWORD)")
    parser.add_argument("--exit", action="store_true", default=bool(os.environ.get("DEMO_EXIT")),
                        help="stop everything after the traffic instead of serving until Ctrl-C (DEMO_EXIT=1)")
    return parser.parse_args(argv)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    try:
        return run(parse_args(argv))
    except KeyboardInterrupt:  # while the database was being prepared: nothing was started yet
        print("\nInterrupted before any process was started.", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    begun = time.monotonic()
    finops_url = f"http://127.0.0.1:{args.finops_port}"
    runtime_url = f"http://127.0.0.1:{args.port}"
    os.environ.setdefault("WATTSON_DEV", "1")  # the development SECRET_KEY unless one is set
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "finops.settings")
    os.environ.setdefault("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
    os.environ.setdefault("SITE_URL", finops_url)
    os.environ.setdefault("LOG_LEVEL", "WARNING")  # the children's logs and this terminal: what matters
    for port in (args.finops_port, args.port):
        if _port_taken(port):
            print(f"port {port} is in use: stop what runs there, or choose others with --port / --finops-port",
                  file=sys.stderr)
            return 2
    # Ctrl-C, a kill and a closed terminal all stop the children; SIGINT too when the demo was
    # started in the background by a shell that ignores it.
    signal.signal(signal.SIGINT, signal.default_int_handler)  # asyncio.run cancels its tasks on this one
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)

    import django

    django.setup()
    from django.conf import settings

    from demo import control_plane as cp
    from demo.report import print_report

    database = settings.DATABASES["default"]
    print(f"[1/5] control plane database: {database['ENGINE'].rsplit('.', 1)[-1]} {database['NAME']}")
    cp.database_migrate()
    logins = cp.demo_logins_ensure(password=args.password)
    creds = cp.demo_runtime_register(name=RUNTIME_NAME, base_url=runtime_url)
    print(f"  migrated; logins ready; runtime {creds.name!r} "
          f"{'registered' if creds.registered_now else 'already registered: issued it a new token'}")
    print(f"  {cp.demo_prices_ensure(model=args.model)}")
    for budget in cp.demo_budgets_ensure(trip_tokens=args.trip_tokens, acme_usd=ACME_USD_PER_ROUND * args.rounds):
        print(f"  budget {budget.name!r}: {budget.description}")
    print(f"  {cp.demo_semantic_cache_ensure(feature=FAQ.name)}")
    compiled = cp.budgets_compile(runtime_name=RUNTIME_NAME)
    cp.connections_close()

    demo_dir = Path(settings.VAR_DIR) / "demo"
    logs = demo_dir / "logs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    children = Children()
    code = 0
    try:
        print(f"[2/5] starting the control plane at {finops_url}")
        control = children.start(
            "control plane", [sys.executable, "-m", "uvicorn", "finops.asgi:application", "--host", "127.0.0.1",
                              "--port", str(args.finops_port), "--log-level", "warning", "--no-access-log"],
            env=env, cwd=ROOT, log=logs / "control-plane.log")
        control.wait_until(lambda: httpx.get(f"{finops_url}/accounts/login/", timeout=2).status_code == 200,
                           what="answer on /accounts/login/", timeout=60)
        print("  control plane is up")
        print(f"[3/5] starting the runtime on {args.model} at {runtime_url}")
        # Threads that spin while waiting for a busy core slow torch several times over on a small
        # shared machine (measured on 2 cores: a forward pass 3.4x slower with 2 threads than with 1).
        runtime_env = {"OMP_WAIT_POLICY": "PASSIVE", **env, "INFERENCE_API_KEYS": api_keys_setting(),
                       "INFERENCE_FINOPS_TOKEN": creds.token, "INFERENCE_ADMIN_TOKEN": creds.admin_token}
        runtime = children.start(
            "runtime", [sys.executable, "-m", "inference", "serve", "--model", args.model, "--port", str(args.port),
                        "--runtime-id", RUNTIME_NAME, "--finops-url", finops_url,
                        "--torch-threads", str(args.torch_threads),
                        "--state-dir", str(demo_dir / "runtime-state"), "--spool-dir", str(demo_dir / "spool"),
                        # Eight running sequences: bursts queue in front of the engine, as on a busier
                        # server, so the queue charts have something to show.
                        "--max-batch-size", "8", "--sample-interval-s", "2", "--export-interval-s", "0.5",
                        "--ruleset-pull-interval-s", "5",
                        # The exact cache answers the deterministic repeats (temperature 0); the
                        # semantic cache is on for the FAQ feature through the ruleset's policy.
                        "--cache-enabled", "on",
                        "--log-level", "warning"],
            env=runtime_env, cwd=ROOT, log=logs / "runtime.log")
        runtime.wait_until(lambda: httpx.get(f"{runtime_url}/health", timeout=2).status_code == 200,
                           what="answer /health", timeout=300)
        # The runtime pulls its ruleset itself; the worker's pushes keep it current from now on.
        runtime.wait_until(lambda: _held_version(runtime_url, creds.admin_token) >= compiled,
                           what=f"pull ruleset v{compiled} from the control plane", timeout=60)
        print(f"  runtime is up and holds the budgets' ruleset (v{_held_version(runtime_url, creds.admin_token)})")
        print("[4/5] starting the Celery worker with beat (rollups every 10 s, budgets every 5 s)")
        worker_started = dt.datetime.now(dt.UTC)
        worker = children.start(
            "worker", [sys.executable, "-m", "celery", "-A", "finops", "worker", "-B", "--concurrency", "1",
                       "-l", "warning"],
            env=env, cwd=ROOT, log=logs / "worker.log", stop_signal=signal.SIGTERM)
        worker.wait_until(lambda: cp.budgets_evaluated_since(worker_started), what="evaluate the budgets", timeout=120)
        print("  worker is up: budgets evaluated")

        print(f"[5/5] traffic: 3 tenants, 4 features, {args.rounds} round(s), until initech's budget trips, while "
              "umbrella floods the queue")
        traffic_started = dt.datetime.now(dt.UTC)
        sent_at = time.monotonic()
        outcomes = asyncio.run(drive(runtime_url, model=args.model, rounds=args.rounds))
        traffic_s = time.monotonic() - sent_at
        _summarize(outcomes, traffic_s)
        arrived = cp.events_wait(runtime_name=RUNTIME_NAME, count=outcomes.sent, since=traffic_started)
        print(f"  the control plane stored {arrived.events} of {outcomes.sent} request events "
              f"({arrived.rejected_budget} refused by the budget)")
        done = dt.datetime.now(dt.UTC)
        worker.wait_until(lambda: cp.budgets_evaluated_since(done), what="evaluate the budgets again", timeout=60)
        print_report(runtime_name=RUNTIME_NAME, since=traffic_started)
        cp.connections_close()
        print(f"\nDemo ready in {time.monotonic() - begun:.0f} s. Dashboards: {finops_url}/  "
              f"(budgets: {finops_url}/budgets/, admin: {finops_url}/admin/; the tenants page's fairness view "
              f"{finops_url}/tenants/ shows umbrella's flood and the others still served)")
        for login in logins:
            print(f"  log in as {login.username} / {login.password}  ({login.role})")
        print(f"  runtime: {runtime_url}/v1 (metrics {runtime_url}/metrics); alert emails and logs: {logs}/")
        if not args.exit:
            print("Serving until Ctrl-C.", flush=True)
            while True:
                for child in (control, worker, runtime):
                    child.check()
                time.sleep(1)
    except KeyboardInterrupt:
        print("\nInterrupted: stopping everything the demo started.")
    except ChildFailed as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave children behind
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        children.stop_all()
        print(f"Stopped. ({time.monotonic() - begun:.0f} s in all)", flush=True)
    return code


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _held_version(runtime_url: str, admin_token: str) -> int:
    response = httpx.get(f"{runtime_url}/admin/ruleset", headers={"Authorization": f"Bearer {admin_token}"},
                         timeout=2)
    response.raise_for_status()
    return int(response.json()["version"])


def _summarize(outcomes: Outcomes, seconds: float) -> None:
    print(f"  sent {outcomes.sent} requests in {seconds:.0f} s ({outcomes.streamed} streamed, "
          f"{outcomes.repeats} exact repeats): " + ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.counts.items())))
    print(f"  tokens served: {outcomes.prompt_tokens:,} prompt, {outcomes.completion_tokens:,} completion "
          f"({outcomes.completion_tokens / seconds:.0f} completion tokens/s)")
    if outcomes.budget_rejections:
        print(f"  initech's hard budget tripped: {outcomes.budget_rejections} requests refused with 429")
    else:
        print("  initech's hard budget did not trip (its requests all fit): see the budgets page")


if __name__ == "__main__":
    sys.exit(main())
