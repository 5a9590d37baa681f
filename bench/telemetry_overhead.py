"""What exporting telemetry costs serving: tokens/s with ``--finops-url`` set, against without.

Four processes: a collector (``bench.stub_server``, answers ``POST /api/v1/events`` with 202), two
runtimes serving the same model — one exporting to the collector (its spool in a temporary
directory), one with telemetry off — and this one, which runs ``--clients`` concurrent streaming
clients, each sending ``--requests-per-client`` completions of ``--new-tokens`` tokens in turn.
Both runtimes stay up for the whole run and take turns under load (on, off, off, on, ...), so the
machine's drift hits both alike; each side's figure is the median of its rounds.

Only one runtime is loaded at a time; the idle one only wakes for its periodic sample.

On two cores the round-to-round noise of that comparison is larger than the 1% goal, so the
benchmark also measures the cost directly: CPU time per event on the serving path
(``record_event``) and for the whole export (serialize, spool, POST), against the machine time one
request took in the "off" rounds.

    python -m bench telemetry_overhead [--quick] [--model smollm2] [--clients 16] [--alternations 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.http_load import completion_body, stream_burst
from bench.prompts import prompt_texts
from bench.report import median, print_table, progress
from bench.servers import runtime_server, stub_server

GOAL_COST = 0.01
FLUSH_WAIT_S = 10.0


@dataclass(frozen=True)
class Settings:
    model: str
    clients: int
    new_tokens: int
    requests_per_client: int
    alternations: int


@dataclass
class Side:
    """One runtime (telemetry on or off) and the tokens/s of each round it was loaded."""

    label: str
    url: str
    rates: list[float] = field(default_factory=list)

    @property
    def median_rate(self) -> float:
        return median(self.rates)


def parse_args(argv: Sequence[str]) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m bench telemetry_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny-random model, 16 tokens, 2 alternations (checks the script)")
    parser.add_argument("--model", help="smollm2 (default) or tiny-random (default with --quick)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent streaming clients (default 16)")
    parser.add_argument("--new-tokens", type=int, help="tokens per completion (default 64)")
    parser.add_argument("--requests-per-client", type=int, help="completions each client sends per round "
                        "(default 2)")
    parser.add_argument("--alternations", type=int, help="rounds on each side (default 4)")
    args = parser.parse_args(argv)
    quick = args.quick
    return Settings(
        model=args.model or ("tiny-random" if quick else "smollm2"),
        clients=args.clients,
        new_tokens=args.new_tokens or (16 if quick else 64),
        requests_per_client=args.requests_per_client or 2,
        alternations=args.alternations or (2 if quick else 4),
    )


def round_rate(side: Side, bodies: list[dict[str, Any]], settings: Settings) -> float:
    burst = stream_burst(side.url, bodies, requests_per_client=settings.requests_per_client)
    expected = len(bodies) * settings.requests_per_client * settings.new_tokens
    if burst.completion_tokens != expected:
        raise RuntimeError(f"{side.label}: {burst.completion_tokens} tokens, not {expected}")
    return burst.completion_tokens / burst.seconds


def measure(on: Side, off: Side, bodies: list[dict[str, Any]], settings: Settings) -> None:
    progress("warming up both runtimes")
    for side in (on, off):
        stream_burst(side.url, bodies[:2], requests_per_client=1)
    for i in range(settings.alternations):
        for side in (on, off) if i % 2 == 0 else (off, on):
            rate = round_rate(side, bodies, settings)
            side.rates.append(rate)
            progress(f"round {i + 1}/{settings.alternations} telemetry {side.label}: {rate:.1f} tokens/s")


def exporter_stats(on_url: str, collector_url: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the exporting runtime says it sent, once its spool is drained (or after ``FLUSH_WAIT_S``),
    and what the collector says it got."""
    deadline = time.monotonic() + FLUSH_WAIT_S
    while True:
        exporter = httpx.get(on_url + "/health", timeout=10).json().get("telemetry") or {}
        drained = not exporter.get("queued") and not exporter.get("spooled_records")
        if drained or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    collected = httpx.get(collector_url + "/stats", timeout=10).json()
    return exporter, collected


@dataclass(frozen=True)
class ExportCost:
    events: int
    record_us: float  # serving-path wall time of one record_event call
    export_cpu_us: float  # process CPU per event for record + spool + POST, until acknowledged


def export_cost(collector_url: str, events: int) -> ExportCost:
    """Ship ``events`` request events through a real exporter to the collector, timing the serving
    path's call and the process CPU the whole export took."""
    import uuid
    from datetime import UTC, datetime
    from pathlib import Path

    from inference.contracts import RequestEvent
    from inference.telemetry.exporter import TelemetryExporter

    now = datetime.now(UTC)
    batch = [RequestEvent(event_id=uuid.uuid4(), runtime_id="bench", started_at=now, finished_at=now,
                          tenant="acme", feature="search", end_user="u1", api_key_id="acme:…0001",
                          model_requested="smollm2", model_served="smollm2", route_reason="requested",
                          priority="normal", status="ok", http_status=200, prompt_tokens=32, completion_tokens=64,
                          queue_wait_ms=1.5, ttft_ms=120.0, e2e_ms=900.0, tpot_ms=12.0, queue_depth_at_admit=0,
                          mean_batch_size=12.5, gpu_seconds=0.42, energy_joules=None, device="cpu")
             for _ in range(events)]
    with tempfile.TemporaryDirectory(prefix="bench-cost-spool-") as spool:
        exporter = TelemetryExporter(url=collector_url, token="bench", spool_dir=Path(spool),
                                     spool_max_bytes=1 << 30, batch_size=500, interval_s=0.2)
        exporter.start()
        cpu_before = time.process_time()
        wall_before = time.perf_counter()
        for event in batch:
            exporter.record_event(event)
        record_s = time.perf_counter() - wall_before
        if not exporter.flush(timeout=60):
            raise RuntimeError("the exporter did not deliver every event within 60 s")
        cpu_s = time.process_time() - cpu_before
        exporter.close()
    return ExportCost(events=events, record_us=record_s / events * 1e6, export_cpu_us=cpu_s / events * 1e6)


def report(settings: Settings, on: Side, off: Side, exporter: dict[str, Any], collected: dict[str, Any],
           cost_direct: ExportCost) -> None:
    cost = (off.median_rate - on.median_rate) / off.median_rate
    headers = ["telemetry", "median tok/s", "min tok/s", "max tok/s", "rounds"]
    rows = [[s.label, s.median_rate, min(s.rates), max(s.rates), len(s.rates)] for s in (on, off)]
    # Round-to-round spread on either side bounds what a difference of medians can show.
    spread = max((max(s.rates) - min(s.rates)) / s.median_rate for s in (on, off))
    verdict = "met" if cost < GOAL_COST else "NOT met"
    if spread > GOAL_COST:
        verdict = f"inconclusive (rounds on one side spread by {spread:.0%}, more than the goal itself)"
    notes = [
        f"model {settings.model}, {settings.clients} streaming clients x {settings.requests_per_client} "
        f"completions of {settings.new_tokens} tokens per round, rounds alternating on/off",
        f"cost of telemetry: {cost:+.1%} of tokens/s (negative: 'on' was faster, i.e. noise)",
        f"collector received {collected.get('events')} events and {collected.get('samples')} samples in "
        f"{collected.get('posts')} POSTs; exporter: sent {exporter.get('sent_records')}, "
        f"dropped {exporter.get('dropped_records')}, still spooled {exporter.get('spooled_records')}",
        f"on/off comparison against the goal (< {GOAL_COST:.0%} cost): {verdict}",
    ]
    print_table("Telemetry export overhead: serving tokens/s with export on vs off", headers, rows, notes)

    # Machine time one request took in the "off" rounds: both cores, divided among the requests served.
    request_s = settings.new_tokens / off.median_rate
    machine_us = request_s * (os.cpu_count() or 1) * 1e6
    share = cost_direct.export_cpu_us / machine_us
    print_table(
        "Telemetry export cost measured directly",
        ["events", "record_event us", "export CPU us/event", "machine us/request (off)", "share"],
        [[cost_direct.events, cost_direct.record_us, cost_direct.export_cpu_us, machine_us, f"{share:.3%}"]],
        ["record_event: serving-path wall time per call; export CPU: this process's CPU per event for record, "
         "spool, batch and POST until the collector acknowledged it",
         f"goal: < {GOAL_COST:.0%} cost: {'met' if share < GOAL_COST else 'NOT met'} ({share:.3%} of a request's "
         "machine time)"])


def main(argv: Sequence[str]) -> int:
    settings = parse_args(argv)
    bodies = [completion_body(settings.model, text, settings.new_tokens) for text in prompt_texts(settings.clients)]
    common = ("--model", settings.model, "--max-batch-size", str(max(32, settings.clients)))
    with tempfile.TemporaryDirectory(prefix="bench-spool-") as spool, stub_server("collector") as collector, \
            runtime_server(*common, "--finops-url", collector, "--spool-dir", spool, name="runtime-on") as on_url, \
            runtime_server(*common, name="runtime-off") as off_url:
        on, off = Side("on", on_url), Side("off", off_url)
        measure(on, off, bodies, settings)
        exporter, collected = exporter_stats(on_url, collector)
        progress("measuring the export's own CPU cost")
        cost_direct = export_cost(collector, 2_000 if settings.model == "tiny-random" else 20_000)
    report(settings, on, off, exporter, collected, cost_direct)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
