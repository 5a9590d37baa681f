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
    "upstream_overhead": "latency and requests/s the runtime adds in front of an instant upstream",
    "telemetry_overhead": "serving tokens/s with telemetry export on vs off",
}


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    listing = "\n".join(f"  {name:<20} {what}" for name, what in BENCHMARKS.items())
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     epilog=f"benchmarks:\n{listing}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that each benchmark works")
    args, rest = parser.parse_known_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if rest and len(args.names) != 1:
        parser.error(f"options {' '.join(rest)} need exactly one benchmark NAME to go to")
    return args, rest


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
    args, rest = parse_args(argv)
    print_machine()
    failed = [name for name in args.names or BENCHMARKS
              if not run_one(name, [*(["--quick"] if args.quick else []), *rest])]
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
