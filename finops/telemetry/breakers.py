"""Each runtime's circuit breakers as its samples last reported them, and since when each has held
its state: the runtime sends every model's breaker in each sample (``RuntimeSample.breakers``).

"Since" is the first sample of the unbroken run of that state that ends in the latest sample, read
back over at most ``LOOKBACK`` of samples (and only the ones kept: ``SAMPLE_RETENTION_DAYS``); a
state that held through all of it is "since at least" the oldest sample read.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from finops.telemetry.models import RuntimeSample

LOOKBACK = dt.timedelta(hours=24)
STATES = {"closed": "closed", "half_open": "half-open", "open": "open"}


@dataclass(frozen=True)
class BreakerState:
    model: str
    state: str  # closed, half_open, open
    since: dt.datetime
    at_least: bool  # held through every sample read: it began at ``since`` or earlier

    @property
    def label(self) -> str:
        return STATES.get(self.state, self.state)


def breaker_states(*, runtime_ids: list[str]) -> dict[str, list[BreakerState]]:
    """Per runtime, its models' breakers (by model name) as of its latest sample that reported them."""
    result: dict[str, list[BreakerState]] = {}
    for runtime_id in runtime_ids:
        latest = (RuntimeSample.objects.filter(runtime_id=runtime_id, breakers__isnull=False)
                  .order_by("-at").values_list("at", "breakers").first())
        if latest is None or not isinstance(latest[1], dict):
            continue
        newest, current = latest
        since = {model: newest for model in current}
        open_models = set(current)
        samples = (RuntimeSample.objects.filter(runtime_id=runtime_id, breakers__isnull=False,
                                                at__gte=newest - LOOKBACK, at__lt=newest)
                   .order_by("-at").values_list("at", "breakers").iterator(chunk_size=2000))
        for at, breakers in samples:
            for model in list(open_models):
                if isinstance(breakers, dict) and breakers.get(model) == current[model]:
                    since[model] = at
                else:
                    open_models.discard(model)  # the run of this state began at the later sample
            if not open_models:
                break
        result[runtime_id] = [BreakerState(model, str(current[model]), since[model], model in open_models)
                              for model in sorted(current)]
    return result
