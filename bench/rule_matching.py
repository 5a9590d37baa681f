"""What a ruleset costs admission: matching + reservation, and settlement, per request.

A ruleset of ``--rules`` rules and one hard-budget allowance per tenant (``--tenants``) is built the
way the control plane would compile it — rules scoped to one tenant, to one feature, to a tenant and
feature, to a model, and a few to everyone; throttles, downgrades, caps and a few blocks — then
parsed and compiled as a pushed document is. Requests from random tenants, features and models go
through the runtime's ``RuleEnforcer`` exactly as ``inference.serving`` drives it (``match`` before
tokenizing, ``reserve`` with the prompt and max_tokens, ``settle`` at the end), in process, timed one
by one with ``perf_counter_ns``. The same requests against no ruleset give the floor.

    python -m bench rule_matching [--quick] [--rules 1000] [--tenants 10000] [--requests 200000]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.report import percentile, print_table, progress
from inference.rules import RuleEnforcer, RuleRejection, ruleset_compile, ruleset_parse

GOAL_US = 50.0
MODELS = ("smollm2", "tiny-random", "big-model")
SERVED = frozenset(MODELS)
FEATURES = tuple(f"feature-{i}" for i in range(50))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench rule_matching", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20,000 requests (checks the script)")
    parser.add_argument("--rules", type=int, default=1000, help="rules in the ruleset (default 1000)")
    parser.add_argument("--tenants", type=int, default=10_000, help="tenants, one allowance each (default 10000)")
    parser.add_argument("--requests", type=int, help="timed requests (default 200000)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    args.requests = args.requests or (20_000 if args.quick else 200_000)
    return args


def build_document(rules: int, tenants: int, rng: random.Random) -> dict[str, Any]:
    now = datetime.now(UTC)
    iso = lambda d: d.isoformat().replace("+00:00", "Z")  # noqa: E731
    actions = [
        {"type": "throttle", "requests_per_minute": 10**9, "tokens_per_minute": 10**11},
        {"type": "cap_max_tokens", "max_tokens": 256},
        {"type": "downgrade", "model": "tiny-random"},
        {"type": "throttle", "tokens_per_minute": 10**11},
    ]
    out: list[dict[str, Any]] = []
    for i in range(rules):
        shape = i % 10
        tenant = f"tenant-{rng.randrange(tenants)}"
        feature = rng.choice(FEATURES)
        # Budgets are mostly per tenant; some per tenant and feature or model, a few per feature
        # across tenants, and one cap for everyone.
        scope = (
            {"tenant": "*", "feature": "*", "model": "*"} if i == 1 else
            {"tenant": tenant, "feature": "*", "model": "*"} if shape < 7 else
            {"tenant": tenant, "feature": feature, "model": "*"} if shape == 7 else
            {"tenant": "*", "feature": feature, "model": "*"} if shape == 8 else
            {"tenant": tenant, "feature": "*", "model": rng.choice(MODELS)}
        )
        action = {"type": "block"} if i % 97 == 0 and shape < 7 else actions[i % len(actions)]
        out.append({"id": f"rule-{i}", "budget_id": str(i), "budget_name": f"budget {i}", "scope": scope,
                    "action": action, "reason": f"budget {i}", "expires_at": iso(now + timedelta(days=30))})
    allowances = [
        {"budget_id": f"hard-{t}", "budget_name": f"tenant-{t} hard cap",
         "scope": {"tenant": f"tenant-{t}", "feature": "*", "model": "*"},
         "unit": ("usd_list", "tokens", "gpu_seconds")[t % 3], "period_start": "2026-11-01T00:00:00Z",
         "resets_at": "2026-12-01T00:00:00Z", "granted": 10**9, "reported": 0,
         "expires_at": iso(now + timedelta(hours=1)), "on_expiry": "closed"}
        for t in range(tenants)
    ]
    prices = {m: {"prompt_per_1m": 0.1, "completion_per_1m": 0.4} for m in MODELS}
    return {"version": 1, "issued_at": iso(now), "runtime_id": "bench", "prices": prices, "rules": out,
            "allowances": allowances}


def run(enforcer: RuleEnforcer, requests: list[tuple[str, str, str, int, int]]) -> dict[str, Any]:
    admit_ns: list[int] = []
    settle_ns: list[int] = []
    rejected = 0
    clock = time.perf_counter_ns
    gc.collect()
    gc.disable()  # a collection landing in one request is not what the rules cost
    try:
        for tenant, feature, model, prompt, max_tokens in requests:
            t0 = clock()
            try:
                match = enforcer.match(tenant, feature, model, SERVED)
                reservation = None
                if match is not None:
                    served = match.downgrade.model if match.downgrade is not None else model
                    cap = match.max_tokens_cap
                    reservation = enforcer.reserve(match, prompt_tokens=prompt,
                                                   max_tokens=min(max_tokens, cap) if cap else max_tokens,
                                                   model=served or model)
            except RuleRejection:
                rejected += 1
                admit_ns.append(clock() - t0)
                continue
            t1 = clock()
            admit_ns.append(t1 - t0)
            if reservation is not None:
                enforcer.settle(reservation, prompt_tokens=prompt, completion_tokens=max_tokens // 2,
                                gpu_seconds=0.01)
                settle_ns.append(clock() - t1)
    finally:
        gc.enable()
    return {"admit": admit_ns, "settle": settle_ns, "rejected": rejected}


def matched_per_request(enforcer: RuleEnforcer, requests: list[tuple[str, str, str, int, int]]) -> float:
    compiled = enforcer.compiled
    assert compiled is not None
    found = sum(len(compiled.rules.match(t, f, m)) + len(compiled.allowances.match(t, f, m))
                for t, f, m, _, _ in requests)
    return found / max(1, len(requests))


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    progress(f"building a ruleset: {args.rules} rules, {args.tenants} allowances")
    raw = json.dumps(build_document(args.rules, args.tenants, rng)).encode()
    t0 = time.perf_counter()
    document = ruleset_parse(raw)
    t1 = time.perf_counter()
    compiled = ruleset_compile(document)
    t2 = time.perf_counter()
    enforcer = RuleEnforcer()
    enforcer.apply(compiled)
    requests = [(f"tenant-{rng.randrange(args.tenants)}", rng.choice(FEATURES), rng.choice(MODELS),
                 rng.randrange(10, 500), rng.randrange(16, 512)) for _ in range(args.requests)]
    progress(f"timing {args.requests} requests")
    run(enforcer, requests[: min(5000, len(requests))])  # warm-up
    with_rules = run(enforcer, requests)
    without = run(RuleEnforcer(), requests)

    def row(label: str, samples: list[int]) -> list[object]:
        us = [s / 1000 for s in samples]
        return [label, len(us), percentile(us, 50), percentile(us, 95), percentile(us, 99),
                sum(us) / max(1, len(us))]

    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else v  # noqa: E731
    rows = [row("admission (match + reserve), ruleset", with_rules["admit"]),
            row("settlement, ruleset", with_rules["settle"]),
            row("admission, no ruleset", without["admit"])]
    print_table(
        f"Rule matching: {args.rules:,} rules, {args.tenants:,} tenants (one allowance each), "
        f"{args.requests:,} requests",
        ["path", "requests", "p50 µs", "p95 µs", "p99 µs", "mean µs"],
        [[fmt(v) for v in r] for r in rows],
        notes=[
            f"refused by a rule: {with_rules['rejected']:,} of {args.requests:,} requests; rules and "
            f"allowances matching a request: {matched_per_request(enforcer, requests):.1f} on average",
            f"document: {len(raw) / 1e6:.1f} MB; parse + validate {1000 * (t1 - t0):.0f} ms, "
            f"compile + index {1000 * (t2 - t1):.0f} ms (off the event loop when pushed or pulled)",
            f"goal: admission p95 < {GOAL_US:.0f} µs: "
            + ("met" if percentile([s / 1000 for s in with_rules["admit"]], 95) < GOAL_US else "NOT met"),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
