"""CSV tables of the dashboards (``lib.tables``): the same rows the page shows, numbers unformatted."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from finops.dashboards.page_data import BreakdownRow
from finops.lib.tables import Table
from finops.runtimes.selectors import RuntimeRulesetState
from finops.telemetry.breakers import BreakerState
from finops.telemetry.capacity import DeviceIdle, RuntimeGauge
from finops.telemetry.selectors import EventCompleteness
from finops.telemetry.task_costs import TaskFigures
from finops.telemetry.usage import EndUser


def breakdown_table(rows: list[BreakdownRow], *, dimension: str, stem: str) -> Table:
    """One row per value: requests (clients' requests; ``attempts`` counts their retries and fallbacks
    too), tokens, costs and rates, semantic cache hits and what they saved, and its tasks (as far as
    rolled up; empty where none was counted)."""
    header = [dimension, "requests", "attempts", "ok", "errors", "rejections", "prompt_tokens", "completion_tokens",
              "tokens", "list_cost_usd", "hardware_cost_usd", "list_cost_per_1k_tokens_usd", "cache_hit_rate",
              "cache_saved_usd", "error_rate", "rejection_rate", "gpu_seconds", "energy_joules",
              "energy_joules_per_1k_tokens", "unpriced_requests", "semantic_cache_hits", "semantic_cache_saved_usd",
              "tasks", "successful_tasks", "task_attempts", "cost_per_successful_task_usd", "waste_usd",
              "hardware_cost_per_successful_task_usd", "hardware_waste_usd"]

    def tasks(t: TaskFigures) -> list[Any]:
        if not t.tasks:
            return [0, 0, 0, None, None, None, None]
        return [t.tasks, t.successful_tasks, t.attempts, t.cost_per_successful_task, t.waste,
                t.hardware_cost_per_successful_task, t.hardware_waste]

    return Table(stem, header, ([
        r.row.value, r.row.client_requests, r.row.requests, r.row.ok, r.row.errors, r.row.rejections,
        r.row.prompt_tokens, r.row.completion_tokens, r.row.tokens, r.row.list_cost, r.row.hardware_cost,
        r.row.cost_per_1k_tokens, r.row.cache_hit_rate, r.row.saved_cost, r.row.error_rate, r.row.rejection_rate,
        r.row.gpu_seconds, r.row.energy_joules, r.row.energy_per_1k_tokens, r.row.unpriced, r.row.semantic_hits,
        r.row.semantic_saved_cost, *tasks(r.tasks)]
        for r in rows))


def end_users_table(users: list[EndUser], *, stem: str) -> Table:
    return Table(stem, ["end_user", "requests", "tokens", "list_cost_usd"],
                 ([u.end_user, u.requests, u.tokens, u.list_cost] for u in users))


def runtimes_table(gauges: list[RuntimeGauge], states: dict[str, RuntimeRulesetState],
                   completeness: dict[str, EventCompleteness], breakers: dict[str, list[BreakerState]], *,
                   stem: str) -> Table:
    header = ["runtime", "last_seen_at", "ruleset_issued", "ruleset_acknowledged", "events_recorded", "events_stored",
              "events_missing", "samples", "last_sample_at", "queue_depth_avg", "queue_depth_max", "tokens_per_s_avg",
              "gpu_util_avg_percent", "power_avg_w", "energy_joules", "breakers"]

    def breaker_cell(runtime_id: str) -> str | None:
        # "model=state@since" per model, ";"-separated; ">=" where the state held through every sample read.
        states = breakers.get(runtime_id)
        if not states:
            return None
        return ";".join(f"{b.model}={b.state}@{'>=' if b.at_least else ''}{b.since.astimezone(dt.UTC).isoformat()}"
                        for b in states)

    def rows() -> Iterable[list[Any]]:
        for g in gauges:
            state = states.get(g.runtime_id)
            events = completeness.get(g.runtime_id)
            yield [g.runtime_id, state.last_seen_at if state else None, state.version if state else None,
                   state.acknowledged if state else None, *(
                       (events.recorded, events.stored, events.missing) if events else (None, None, None)),
                   g.samples, g.last_sample_at, g.queue_depth_avg, g.queue_depth_max, g.tokens_per_s_avg,
                   g.gpu_util_avg, g.power_avg_w, g.energy_joules, breaker_cell(g.runtime_id)]

    return Table(stem, header, rows())


def devices_table(gauges: list[RuntimeGauge], *, stem: str) -> Table:
    header = ["runtime", "device", "name", "samples", "gpu_util_avg_percent", "mem_used_max_bytes", "mem_total_bytes",
              "power_avg_w", "temperature_max_c", "energy_joules"]
    return Table(stem, header, ([d.runtime_id, d.device, d.name, d.samples, d.gpu_util_avg, d.mem_used_max,
                                 d.mem_total, d.power_avg_w, d.temperature_max_c, d.energy_joules]
                                for g in gauges for d in g.devices))


def idle_table(idle: list[DeviceIdle], *, stem: str) -> Table:
    header = ["runtime", "device", "device_type", "paid_seconds", "attributed_seconds", "idle_seconds",
              "idle_fraction", "idle_cost_usd"]
    return Table(stem, header, ([d.runtime_id, d.device, d.device_type, d.paid_seconds, d.attributed_seconds,
                                 d.idle_seconds, d.idle_fraction, d.idle_cost] for d in idle))
