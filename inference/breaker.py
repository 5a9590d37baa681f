"""Circuit breakers: one per served model (local or upstream), fed by every request's outcome.

A breaker is *closed* while its model answers. It *opens* when, over the last ``window_s``
seconds, at least ``min_requests`` outcomes were counted and the share of failures among them
reached ``error_rate``. While open, requests for the model go along its fallback chain
(``inference.fallback``) and nothing reaches the model. After ``cooldown_s`` it is *half-open*: up
to ``probes`` requests go through as probes; the first probe that fails opens it again for another
cool-down, and once ``probes`` probes have succeeded it closes with an empty window. A request whose
attempt fails is sent along the chain at once, whatever the state (``inference.attempts``).

A failure is the backend failing (``BACKEND_FAILURES``): an upstream's error, timeout or overload,
or the engine's error. A client's mistake, a rule's refusal, a shed request or a client leaving
say nothing about the model's health and are not counted. Every attempt is counted once, when its
event is recorded (``CircuitBreakers.observe``): each retry and fallback of a request is an attempt
with an event of its own, so an upstream that fails three times in one request counts three.

Everything here runs on the event loop; the sampler thread only reads ``states``.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from inference.contracts import BreakerState, RequestEvent
from inference.metrics import LiveSample, counter, gauge

STATE_VALUES: dict[BreakerState, int] = {"closed": 0, "half_open": 1, "open": 2}
BACKEND_FAILURES = frozenset({"upstream_error", "upstream_timeout", "upstream_overloaded", "engine_error"})


@dataclass(frozen=True)
class BreakerSettings:
    window_s: float = 30.0
    min_requests: int = 10
    error_rate: float = 0.5
    cooldown_s: float = 15.0
    probes: int = 1
    # A probe that never reports (its task was cancelled before its event) stops holding its
    # place after this long, so a breaker can never be stuck half-open.
    probe_lease_s: float = 300.0


class CircuitBreaker:
    def __init__(self, model: str, settings: BreakerSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self.settings = settings
        self._clock = clock
        self._outcomes: deque[tuple[float, bool]] = deque()
        self._failures = 0  # among the outcomes in the window
        self._open_until: float | None = None  # set while open or half-open
        self._probes: dict[object, float] = {}  # probe id -> when it was let through
        self._probe_successes = 0
        self.opens_total = 0

    @property
    def state(self) -> BreakerState:
        if self._open_until is None:
            return "closed"
        return "open" if self._clock() < self._open_until else "half_open"

    def admit(self, request_id: object) -> bool:
        """Whether a request may go to the model now; in half-open it goes as a probe, and its
        outcome must come back through ``record`` with the same ``request_id``."""
        state = self.state
        if state == "closed":
            return True
        if state == "open":
            return False
        now = self._clock()
        for probe, since in list(self._probes.items()):
            if now - since > self.settings.probe_lease_s:
                del self._probes[probe]
        if len(self._probes) + self._probe_successes >= self.settings.probes:
            return False
        self._probes[request_id] = now
        return True

    def record(self, request_id: object | None, ok: bool | None) -> None:
        """Count one outcome: ``ok`` True for a success, False for a failure, None for one that says
        nothing about the model (which only frees a probe's place)."""
        if request_id is not None and request_id in self._probes:
            del self._probes[request_id]
            if ok is False:
                self._open()
            elif ok:
                self._probe_successes += 1
                if self._probe_successes >= self.settings.probes:
                    self._close()
            return
        if ok is None or self.state != "closed":
            return  # while open, only probes speak for the model
        now = self._clock()
        self._outcomes.append((now, ok))
        self._failures += not ok
        horizon = now - self.settings.window_s
        while self._outcomes and self._outcomes[0][0] < horizon:
            self._failures -= not self._outcomes.popleft()[1]
        if len(self._outcomes) >= self.settings.min_requests and \
                self._failures >= self.settings.error_rate * len(self._outcomes):
            self._open()

    def retry_after_s(self) -> int:
        """Seconds until the breaker lets a probe through (at least 1)."""
        if self._open_until is None:
            return 1
        return max(1, math.ceil(self._open_until - self._clock()))

    def _open(self) -> None:
        self._reset(open_until=self._clock() + self.settings.cooldown_s)
        self.opens_total += 1

    def _close(self) -> None:
        self._reset(open_until=None)

    def _reset(self, *, open_until: float | None) -> None:
        self._open_until = open_until
        self._outcomes.clear()
        self._failures = 0
        self._probes.clear()
        self._probe_successes = 0


class CircuitBreakers:
    """Every model's breaker, and the counts ``/metrics`` shows: opens and fallbacks taken."""

    def __init__(self, settings: BreakerSettings, chains: Mapping[str, tuple[str, ...]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._chains = dict(chains or {})
        self._clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}
        self.fallbacks_total: Counter[tuple[str, str]] = Counter()  # (model, step taken)

    def of(self, model: str) -> CircuitBreaker:
        breaker = self._breakers.get(model)
        if breaker is None:
            breaker = self._breakers[model] = CircuitBreaker(model, self.settings, self._clock)
        return breaker

    def track(self, models: Iterable[str]) -> None:
        """Give each served model its breaker up front, so samples and metrics list every one."""
        for model in models:
            self.of(model)

    def chain(self, model: str) -> tuple[str, ...]:
        """The steps ``model``'s requests take when it fails or its breaker is open (``--fallback``)."""
        return self._chains.get(model, ())

    def observe(self, event: RequestEvent) -> None:
        """Count a finished request against the breaker of the model that served it."""
        if event.model_served is None or event.model_served not in self._breakers:
            return
        self._breakers[event.model_served].record(event.event_id, request_outcome(event))

    def states(self) -> dict[str, BreakerState]:
        # Read from the sampler's thread: a copy of the items, taken in one step under the GIL.
        return {model: breaker.state for model, breaker in sorted(list(self._breakers.items()))}

    def samples(self) -> list[LiveSample]:
        rows: list[LiveSample] = []
        for model, breaker in sorted(self._breakers.items()):
            rows += gauge("wattson_breaker_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open",
                          STATE_VALUES[breaker.state], model=model)
            rows += counter("wattson_breaker_opens_total", "Times the circuit breaker opened",
                            breaker.opens_total, model=model)
        for (model, step), count in sorted(self.fallbacks_total.items()):
            rows += counter("wattson_fallbacks_total", "Requests sent along the fallback chain of a model that "
                            "failed or whose breaker was open, by the step that took them", count, model=model,
                            step=step)
        return rows


def request_outcome(event: RequestEvent) -> bool | None:
    """True: the model answered; False: the model failed; None: the request says nothing of it."""
    if event.cache_hit:
        return None
    if event.status == "ok":
        return True
    if event.status in ("error", "timeout") and event.error_type in BACKEND_FAILURES:
        return False
    return None
