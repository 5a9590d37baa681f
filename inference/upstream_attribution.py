"""Device time and energy for requests an upstream engine served, attributed from outside it.

An upstream (vLLM, llama.cpp, TGI) does not say what each request cost it, but the runtime sees
every request's in-flight interval and its tokens as they come back. The upstream is *busy* while
at least one request is in flight; its busy time is cut into short windows (at every request's
start and end, and every ``window_s`` while tokens arrive), and each window's length — and, with
the upstream's GPU visible through NVML, the growth of its energy counter over the window — is
split among the requests in flight by the tokens each processed in it, as the engine splits a step
(``attribute_step_time``). So what is attributed adds up to the busy time and to the counter's
delta over it (conservation, DESIGN.md "Cost model"); time and energy with nothing in flight are
idle, kept apart and never given to a request.

Tokens processed in a window: a streamed request's pieces as they arrive (one token each until the
upstream's ``usage`` says otherwise), its prompt's tokens (estimated from the text) when its first
piece arrives, since prefill is what ran before it; whatever ``usage`` reports beyond what was
counted is booked when the request ends. An unstreamed request's tokens are all known at its end.
A window in which no request in flight reported a token is split evenly among them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from inference.engine.attribution import attribute_step_time

# Short enough that a request's share follows the batch it ran in, long enough that a window is not
# one NVML counter tick (the counter updates every 20-100 ms).
DEFAULT_WINDOW_S = 0.25


@dataclass(frozen=True)
class AttributedUse:
    """What one request was attributed: busy seconds, and joules when the device's counter is read."""

    seconds: float
    joules: float | None


@dataclass(eq=False)
class InFlight:
    """One request's running share of the upstream; ``UpstreamAttribution`` owns its fields."""

    seconds: float = 0.0
    joules: float = 0.0
    counted_tokens: int = 0
    window_tokens: int = 0
    result: AttributedUse | None = field(default=None, repr=False)


class UpstreamAttribution:
    """The busy-time and energy ledger of one upstream; every call is made from one thread (the
    event loop). ``energy_reader`` returns the upstream GPU's energy counter in joules, or ``None``
    when no reading is available; without it joules are not measured and are ``None``."""

    def __init__(self, *, window_s: float = DEFAULT_WINDOW_S, clock: Callable[[], float] = time.perf_counter,
                 energy_reader: Callable[[], float | None] | None = None) -> None:
        if window_s <= 0:
            raise ValueError("the attribution window must be positive")
        self.window_s = window_s
        self._clock = clock
        self._energy_reader = energy_reader
        self._in_flight: list[InFlight] = []
        self._window_start = clock()
        self._energy_at = self._read_energy()
        self.busy_seconds = 0.0
        self.idle_seconds = 0.0
        self.busy_joules = 0.0
        self.idle_joules = 0.0

    @property
    def measures_energy(self) -> bool:
        return self._energy_reader is not None and self._energy_at is not None

    def in_flight(self) -> int:
        return len(self._in_flight)

    def begin(self) -> InFlight:
        """A request was sent to the upstream: from now on it shares the upstream's busy time."""
        self._cut()
        share = InFlight()
        self._in_flight.append(share)
        return share

    def tokens(self, share: InFlight, count: int) -> None:
        """``count`` tokens of this request were processed by now (a streamed piece, or its prompt)."""
        if count < 0:
            raise ValueError("token counts cannot be negative")
        if share.result is not None:
            return
        share.window_tokens += count
        share.counted_tokens += count
        if self._clock() - self._window_start >= self.window_s:
            self._cut()

    def end(self, share: InFlight, *, total_tokens: int = 0) -> AttributedUse:
        """The request left the upstream (answered, failed or cancelled): book the tokens its
        ``usage`` reported beyond those counted, close the window and return its final share.
        Ending a request twice returns the same share."""
        if share.result is not None:
            return share.result
        share.window_tokens += max(0, total_tokens - share.counted_tokens)
        self._cut()
        self._in_flight.remove(share)
        share.result = AttributedUse(seconds=share.seconds, joules=share.joules if self.measures_energy else None)
        return share.result

    def _cut(self) -> None:
        now = self._clock()
        seconds = max(0.0, now - self._window_start)
        joules = 0.0
        energy = self._read_energy()
        if energy is not None and self._energy_at is not None:
            # A counter that went back (driver reload) gives no delta rather than a negative one.
            joules = max(0.0, energy - self._energy_at)
        if energy is not None:
            self._energy_at = energy
        self._window_start = now
        members = self._in_flight
        if not members:
            self.idle_seconds += seconds
            self.idle_joules += joules
            return
        self.busy_seconds += seconds
        self.busy_joules += joules
        tokens = [m.window_tokens for m in members]
        for member, second_share, joule_share in zip(members, attribute_step_time(seconds, tokens),
                                                     attribute_step_time(joules, tokens), strict=True):
            member.seconds += second_share
            member.joules += joule_share
            member.window_tokens = 0

    def _read_energy(self) -> float | None:
        return self._energy_reader() if self._energy_reader is not None else None
