"""Cost-regression detection on generated traffic: how often it raises a false alarm, and how fast
and how exactly it finds a prompt that grew.

Traffic (``hourly_traffic``): one feature used by three tenants (short, medium and long documents)
on two models, each cell with its own Poisson request rate following the day (a night trough, a
weekday peak, weekends at half), a mix that drifts (one tenant's share slowly doubles and halves,
and it surges to 4x for whole days at random), per-request prompt and completion tokens drawn
around each cell's level with 30% and 45% noise, and an outlier hour now and then (a batch job
sending 5x longer prompts for one hour). A prompt change adds ``--growth`` tokens to every prompt
from a given hour (two paragraphs: ~150 tokens).

Each series is checked the way the control plane checks it (``detection.changepoint_at``) at every
hour from day 8 (a full baseline) to day 30, a regression restarting the baseline at its start.

    python -m bench regression_detection [--quick] [--series 200] [--days 30] [--growth 150] [--seed 1]
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import random
import sys
from collections.abc import Sequence

from bench.report import percentile, print_table, progress
from finops.regressions.detection import BASELINE, WATCH, Changepoint, changepoint_at

START = dt.datetime(2026, 10, 1, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
# (tenant, model) -> (requests per hour at the daily peak, prompt tokens, completion tokens)
CELLS = {
    ("acme", "smollm2"): (30.0, 350.0, 120.0),
    ("acme", "big"): (10.0, 350.0, 160.0),
    ("globex", "smollm2"): (12.0, 1200.0, 200.0),
    ("globex", "big"): (6.0, 1200.0, 260.0),
    ("initech", "smollm2"): (20.0, 150.0, 60.0),
    ("initech", "big"): (4.0, 150.0, 90.0),
}
SURGING = "globex"  # the tenant whose share drifts and surges: the mix changes, its levels do not


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 40:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, product = math.exp(-lam), 0, rng.random()
    while product > limit:
        k += 1
        product *= rng.random()
    return k


def hourly_traffic(*, seed: int, days: int = 30, change_at: dt.datetime | None = None, growth: float = 150.0,
                   scale: float = 1.0, start: dt.datetime = START
                   ) -> dict[dt.datetime, dict[tuple[str, str], tuple[float, float]]]:
    """hour -> (tenant, model) -> (requests, tokens) of one feature's generated traffic."""
    rng = random.Random(seed)
    surge_days = {d for d in range(days) if rng.random() < 0.1}
    hours: dict[dt.datetime, dict[tuple[str, str], tuple[float, float]]] = {}
    for i in range(days * 24):
        hour = start + i * HOUR
        day = i // 24
        diurnal = 0.15 + 0.85 * math.sin(math.pi * ((hour.hour - 6) % 24) / 24) ** 2
        weekly = 0.5 if hour.weekday() >= 5 else 1.0
        outlier = 5.0 if rng.random() < 0.005 else 1.0
        cells = {}
        for (tenant, model), (peak, prompt, completion) in CELLS.items():
            rate = peak * scale * diurnal * weekly
            if tenant == SURGING:
                rate *= (1.5 + math.sin(2 * math.pi * i / (24 * 9))) * (4.0 if day in surge_days else 1.0)
            n = _poisson(rng, rate)
            if not n:
                continue
            grown = growth if change_at is not None and hour >= change_at else 0.0
            tokens = 0.0
            for _ in range(n):
                tokens += round((prompt * outlier + grown) * rng.lognormvariate(-0.045, 0.3))
                tokens += round(completion * rng.lognormvariate(-0.1, 0.45))
            cells[(tenant, model)] = (float(n), tokens)
        hours[hour] = cells
    return hours


def hourly_checks(hours: dict[dt.datetime, dict[tuple[str, str], tuple[float, float]]], *, days: int,
                  start: dt.datetime = START) -> list[tuple[dt.datetime, Changepoint]]:
    """Every regression an hourly check finds over the series, each from the hour it was found."""
    found: list[tuple[dt.datetime, Changepoint]] = []
    since = None
    first = start + WATCH + BASELINE
    for i in range(int((start + days * 24 * HOUR - first) / HOUR) + 1):
        end = first + i * HOUR
        point = changepoint_at(hours, end=end, since=since)
        if point is not None and (since is None or point.started_at > since):
            found.append((end, point))
            since = point.started_at
    return found


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench regression_detection", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 series of each kind (checks the script)")
    parser.add_argument("--series", type=int, default=200, help="generated months of each kind (default 200)")
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--growth", type=float, default=150.0, help="prompt tokens added (default 150)")
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    series = 10 if args.quick else args.series
    checked_days = args.days - (WATCH + BASELINE).days
    rows = []
    for label, scale in (("normal traffic", 1.0), ("a tenth of it", 0.1)):
        progress(f"{series} months without a change, {label}")
        alarms = [len(hourly_checks(hourly_traffic(seed=args.seed * 100_000 + s, days=args.days, scale=scale),
                                    days=args.days)) for s in range(series)]
        with_alarm = sum(1 for a in alarms if a)
        rows.append([label, series, series * checked_days, sum(alarms), f"{with_alarm / series:.1%}",
                     f"{sum(alarms) / (series * checked_days) * 1000:.2f}"])
    print_table("False alarms: 30 days of noisy, mixed traffic without a change (checked every hour)",
                ["traffic", "series", "series-days checked", "alarms", "series with an alarm",
                 "alarms per 1,000 series-days"], rows)
    rows = []
    rng = random.Random(args.seed)
    for growth in (args.growth, args.growth / 2, args.growth / 5):
        for label, scale in (("normal traffic", 1.0), ("a tenth of it", 0.1)):
            progress(f"{series} months with +{growth:.0f} prompt tokens, {label}")
            delays, errors, missed, sizes = [], [], 0, []
            for s in range(series):
                change = START + dt.timedelta(days=rng.randrange(10, args.days - 3), hours=rng.randrange(24))
                found = [(at, p) for at, p in hourly_checks(
                    hourly_traffic(seed=args.seed * 7_000 + s, days=args.days, change_at=change, growth=growth,
                                   scale=scale), days=args.days) if at > change]
                if not found:
                    missed += 1
                    continue
                at, point = found[0]
                delays.append((at - change) / HOUR)
                errors.append(abs((point.started_at - change) / HOUR))
                sizes.append(point.change)
            rows.append([f"+{growth:.0f}", label, series, missed,
                         percentile(delays, 50) if delays else None, percentile(delays, 95) if delays else None,
                         f"{sum(1 for e in errors if e <= 1) / len(errors):.0%}" if errors else None,
                         f"{percentile(sizes, 50):+.0%}" if sizes else None])
    print_table("Detection: a prompt that grows at a random hour (hours from the change to the alarm)",
                ["prompt tokens", "traffic", "series", "missed", "delay p50 h", "delay p95 h", "start within ±1 h",
                 "size found p50"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
