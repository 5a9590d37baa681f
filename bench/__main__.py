"""``python -m bench [--quick] [NAME [options for it]]``: run the benchmarks, print their tables.

The machine is described first (CPU, cores, memory, versions, load average), since every figure
below depends on it. With no NAME every benchmark runs in turn; options after a single NAME go to
that benchmark (``python -m bench engine_throughput --streams 1 8``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from collections.abc import Sequence

from bench.machine import print_machine

BENCHMARKS = {
    "engine_throughput": "continuous batching vs static generate(), in process and over HTTP",
    "engine_vs_llamacpp": "the engine per precision vs llama-server: tokens/s, TTFT, share of bandwidth ceiling",
    "decode_compile": "one decode step eager vs torch.compile over a static KV cache, per batch size",
    "precision_quality": "greedy agreement and perplexity of bf16 / int8 weights against fp32 on a fixed prompt set",
    "upstream_overhead": "latency and requests/s the runtime adds in front of an instant upstream",
    "upstream_attribution": "events' device seconds against a real llama-server's busy time (within 5%)",
    "telemetry_overhead": "serving tokens/s with telemetry export on vs off",
    "ingest_throughput": "telemetry events/s over HTTP into PostgreSQL, next to a raw COPY",
    "selector_latency": "dashboard selector latency over 30 days of 10 million events",
    "rule_matching": "admission overhead of a ruleset: 1,000 rules, 10,000 tenants, µs per request",
    "budget_enforcement": "spend reaching a budget's limit -> the runtime's first 429, hard and soft budgets",
    "overload": "3x the engine's capacity with mixed priorities: high p95 vs unloaded, low shed with 503",
    "org_scale": "10,000 budgets, 1,000 tenants, 1M events, 20 runtimes: evaluation pass, budgets page, fleet ingest",
    "faults": "the telemetry pipeline broken ten ways under load: answered vs stored, lost, duplicated, recovery",
    "regression_detection": "cost-regression detection on 30 days of generated traffic: false alarms, delay, start",
    "semantic_cache": "false-hit rate, recall and threshold curve on labelled pairs; lookup p50/p95 at 100k entries",
    "fairness": "a flooding tenant under fair share (VTC) vs FIFO: the light tenant's p95, the service gap, tokens/s",
}


def parse_args(argv: Sequence[str]) -> tuple[list[str], bool, list[str]]:
    """Split ``argv`` into benchmark names, ``--quick``, and the options meant for one benchmark
    (everything from the first other option on, so their values are never read as names)."""
    listing = "\n".join(f"  {name:<20} {what}" for name, what in BENCHMARKS.items())
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     epilog=f"benchmarks:\n{listing}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that each benchmark works")
    names: list[str] = []
    quick = False
    rest: list[str] = []
    for arg in argv:
        if rest:
            rest.append(arg)
        elif arg == "--quick":
            quick = True
        elif arg in ("-h", "--help") and not names:
            parser.print_help()
            sys.exit(0)
        elif arg.startswith("-"):
            rest.append(arg)
        elif arg in BENCHMARKS:
            names.append(arg)
        else:
            parser.error(f"unknown benchmark {arg!r}; choose from {', '.join(BENCHMARKS)}")
    if rest and len(names) != 1:
        parser.error(f"options {' '.join(rest)} need exactly one benchmark NAME before them")
    return names, quick, rest


def run_one(name: str, argv: list[str]) -> bool:
    print(f"\n=== {name} {' '.join(argv)}".rstrip(), flush=True)
    started = time.perf_counter()
    try:
        module = importlib.import_module(f"bench.{name}")
        ok = module.main(argv) == 0
    except Exception:
        traceback.print_exc()
        ok = False
    print(f"\n({name} {'took' if ok else 'FAILED after'} {time.perf_counter() - started:.0f} s)", flush=True)
    return ok


def main(argv: Sequence[str]) -> int:
    names, quick, rest = parse_args(argv)
    print_machine()
    failed = [name for name in names or BENCHMARKS if not run_one(name, [*(["--quick"] if quick else []), *rest])]
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
