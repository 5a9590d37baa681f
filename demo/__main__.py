"""`python -m demo`: start the runtime on SmolLM2, send demo traffic, show what was measured.

The runtime runs as its own process, exporting telemetry over HTTP to a collector in this process
(a stand-in until the control plane lands), exactly as it would to the control plane. Ctrl-C stops
everything this started.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from demo.collector import DemoCollector
from demo.report import print_report
from demo.traffic import api_keys_setting, drive

PORT = int(os.environ.get("DEMO_PORT", "8100"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument("--model", default="smollm2", help="model to serve (default: smollm2, real weights)")
    parser.add_argument("--rounds", type=int, default=3, help="bursts per feature (default 3)")
    parser.add_argument("--exit", action="store_true", default=bool(os.environ.get("DEMO_EXIT")),
                        help="stop after the report instead of serving until Ctrl-C")
    args = parser.parse_args(argv)

    token = "demo-ingest-token"
    collector = DemoCollector(token)
    spool = Path(tempfile.mkdtemp(prefix="wattson-demo-spool-"))
    env = {**os.environ, "INFERENCE_API_KEYS": api_keys_setting(), "INFERENCE_FINOPS_URL": collector.url,
           "INFERENCE_FINOPS_TOKEN": token, "INFERENCE_SPOOL_DIR": str(spool), "INFERENCE_SAMPLE_INTERVAL_S": "2",
           "INFERENCE_RUNTIME_ID": "demo-runtime", "INFERENCE_LOG_LEVEL": "warning"}
    runtime = subprocess.Popen([sys.executable, "-m", "inference", "serve", "--model", args.model,
                                "--port", str(PORT)], env=env)
    base_url = f"http://127.0.0.1:{PORT}"
    try:
        _wait_ready(base_url, runtime)
        print(f"runtime serving {args.model} at {base_url}/v1 (keys: {api_keys_setting()})")
        outcomes = asyncio.run(drive(base_url, model=args.model, rounds=args.rounds))
        print("responses by status:", ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items())))
        time.sleep(3)  # one export interval and one sample, so the report has everything
        events, samples = collector.snapshot()
        print_report(events, samples)
        print(f"\nPrometheus metrics: {base_url}/metrics    health: {base_url}/health")
        if not args.exit:
            print("Serving until Ctrl-C.")
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        runtime.send_signal(signal.SIGINT)
        try:
            runtime.wait(timeout=15)
        except subprocess.TimeoutExpired:
            runtime.kill()
        collector.close()
    return 0


def _wait_ready(base_url: str, runtime: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if runtime.poll() is not None:
            raise SystemExit(f"the runtime exited with status {runtime.returncode}")
        try:
            if httpx.get(base_url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit("the runtime did not become ready in time")


if __name__ == "__main__":
    sys.exit(main())
