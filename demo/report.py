"""The demo's closing report: what the runtime measured, per tenant and feature, as a table."""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _fmt(value: float | None, unit: str = "", digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}{unit}"


def print_report(events: list[dict[str, Any]], samples: list[dict[str, Any]]) -> None:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        groups[(event["tenant"], event["feature"])].append(event)
    header = (f"{'tenant':<9} {'feature':<15} {'reqs':>5} {'ok':>4} {'shed':>4} {'prompt':>7} {'compl':>6} "
              f"{'ttft p50':>9} {'e2e p95':>9} {'wait p95':>9} {'gpu-s':>7} {'energy J':>9}")
    print(f"\nMeasured by the runtime and received over HTTP ({len(events)} request events):\n")
    print(header)
    print("-" * len(header))
    for (tenant, feature), rows in sorted(groups.items()):
        ok = [r for r in rows if r["status"] == "ok"]
        gpu = [r["gpu_seconds"] for r in rows if r["gpu_seconds"] is not None]
        energy = [r["energy_joules"] for r in rows if r["energy_joules"] is not None]
        print(f"{tenant:<9} {feature:<15} {len(rows):>5} {len(ok):>4} "
              f"{sum(r['status'] == 'shed' for r in rows):>4} {sum(r['prompt_tokens'] for r in rows):>7} "
              f"{sum(r['completion_tokens'] for r in rows):>6} "
              f"{_fmt(_pct([r['ttft_ms'] for r in ok if r['ttft_ms'] is not None], 0.5), ' ms'):>9} "
              f"{_fmt(_pct([r['e2e_ms'] for r in ok], 0.95), ' ms'):>9} "
              f"{_fmt(_pct([r['queue_wait_ms'] for r in ok if r['queue_wait_ms'] is not None], 0.95), ' ms'):>9} "
              f"{_fmt(sum(gpu) if gpu else None, '', 2):>7} {_fmt(sum(energy) if energy else None, '', 1):>9}")
    if samples:
        rates = [s["tokens_per_s"] for s in samples if s["tokens_per_s"] > 0]
        devices = samples[-1]["devices"]
        print(f"\nRuntime samples: {len(samples)}; peak queue depth {max(s['queue_depth'] for s in samples)}; "
              f"median tokens/s while busy {_fmt(statistics.median(rates) if rates else None, '', 1)}; "
              f"GPUs: {', '.join(d['device'] for d in devices) if devices else 'none (CPU: GPU figures n/a)'}")
