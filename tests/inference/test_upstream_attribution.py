"""An upstream's busy time and device energy are split among the requests in flight by their tokens,
and what is attributed adds up to what was measured: the union of in-flight intervals, and the
energy counter's growth over it (idle time and energy are kept apart, never given to a request)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.upstream_attribution import union_length
from inference.gpu import GpuMonitor
from inference.upstream_attribution import AttributedUse, InFlight, UpstreamAttribution
from tests.inference.fake_nvml import FakeGpu, FakeNvml


@dataclass
class Clock:
    now: float = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Counter:
    """An energy counter in joules that only moves when the test moves it; ``None`` when unread."""

    joules: float | None = 5_000.0

    def __call__(self) -> float | None:
        return self.joules


# One step of a run: let time pass (and energy grow), then start a request, report tokens of one in
# flight, or end one (with the extra tokens its usage reports).
Step = tuple[str, float, float, int, int]
steps = st.lists(st.tuples(st.sampled_from(["begin", "tokens", "end"]), st.floats(0, 2.0), st.floats(0, 500.0),
                           st.integers(0, 10_000), st.integers(0, 600)), max_size=80)


def run(ledger: UpstreamAttribution, clock: Clock, counter: Counter, plan: list[Step], *, gaps: bool = False
        ) -> tuple[list[AttributedUse], list[InFlight], list[tuple[float, float]]]:
    """Play ``plan``; return the ended requests' shares, those still in flight, and every request's
    in-flight interval (open ones until now)."""
    ended: list[AttributedUse] = []
    flying: list[tuple[InFlight, float]] = []
    intervals: list[tuple[float, float]] = []
    for kind, dt, dj, pick, count in plan:
        clock.now += dt
        if counter.joules is not None or not gaps:
            counter.joules = (counter.joules or 0.0) + dj
        if gaps and pick % 7 == 0:
            counter.joules = None if counter.joules is not None else 5_000.0 + clock.now
        if kind == "begin" or not flying:
            flying.append((ledger.begin(), clock.now))
        elif kind == "tokens":
            ledger.tokens(flying[pick % len(flying)][0], count)
        else:
            share, began = flying.pop(pick % len(flying))
            ended.append(ledger.end(share, total_tokens=count))
            intervals.append((began, clock.now))
    intervals += [(began, clock.now) for _, began in flying]
    return ended, [share for share, _ in flying], intervals


@settings(max_examples=300)
@given(plan=steps, window_s=st.floats(0.01, 1.0))
def test_attributed_seconds_add_up_to_the_union_of_in_flight_intervals(plan: list[Step], window_s: float) -> None:
    clock, counter = Clock(), Counter()
    ledger = UpstreamAttribution(window_s=window_s, clock=clock, energy_reader=counter)
    start = clock.now

    ended, flying, intervals = run(ledger, clock, counter, plan)
    ended += [ledger.end(share) for share in flying]  # everything in flight ends now

    assert all(use.seconds >= 0 for use in ended)
    assert math.fsum(use.seconds for use in ended) == pytest.approx(ledger.busy_seconds, rel=1e-9, abs=1e-9)
    assert ledger.busy_seconds == pytest.approx(union_length(intervals), rel=1e-9, abs=1e-9)
    assert ledger.busy_seconds + ledger.idle_seconds == pytest.approx(clock.now - start, rel=1e-9, abs=1e-9)


@settings(max_examples=300)
@given(plan=steps, window_s=st.floats(0.01, 1.0), gaps=st.booleans())
def test_attributed_joules_add_up_to_the_counters_delta_while_busy(plan: list[Step], window_s: float,
                                                                   gaps: bool) -> None:
    clock, counter = Clock(), Counter()
    ledger = UpstreamAttribution(window_s=window_s, clock=clock, energy_reader=counter)
    first = counter.joules
    assert first is not None

    ended, flying, _ = run(ledger, clock, counter, plan, gaps=gaps)
    if counter.joules is None:  # the counter's last reading failed: the next one closes the balance
        counter.joules = 5_000.0 + clock.now + 1
    ended += [ledger.end(share) for share in flying]

    assert all(use.joules is not None and use.joules >= 0 for use in ended)
    attributed = math.fsum(use.joules or 0.0 for use in ended)
    assert attributed == pytest.approx(ledger.busy_joules, rel=1e-9, abs=1e-6)
    if not gaps:  # a counter that never skips a reading: busy + idle is exactly its growth
        assert ledger.busy_joules + ledger.idle_joules == pytest.approx(counter.joules - first, rel=1e-9, abs=1e-6)


def test_a_window_is_split_by_the_tokens_each_request_processed_in_it() -> None:
    clock, counter = Clock(), Counter()
    ledger = UpstreamAttribution(window_s=10.0, clock=clock, energy_reader=counter)
    long, short = ledger.begin(), ledger.begin()
    clock.now += 1.0
    counter.joules = (counter.joules or 0) + 300.0
    ledger.tokens(long, 30)
    ledger.tokens(short, 10)

    short_use = ledger.end(short)

    assert short_use == AttributedUse(seconds=pytest.approx(0.25), joules=pytest.approx(75.0))
    clock.now += 1.0
    assert ledger.end(long) == AttributedUse(seconds=pytest.approx(1.75), joules=pytest.approx(225.0))


def test_time_with_nothing_in_flight_is_idle_and_given_to_no_request() -> None:
    clock = Clock()
    ledger = UpstreamAttribution(clock=clock)
    clock.now += 5.0
    share = ledger.begin()
    clock.now += 2.0

    use = ledger.end(share, total_tokens=12)
    clock.now += 3.0
    ledger.begin()

    assert use == AttributedUse(seconds=pytest.approx(2.0), joules=None), "no counter read: joules unmeasured"
    assert (ledger.busy_seconds, ledger.idle_seconds) == (pytest.approx(2.0), pytest.approx(8.0))


def test_usage_beyond_the_counted_pieces_is_booked_when_the_request_ends() -> None:
    clock = Clock()
    ledger = UpstreamAttribution(window_s=10.0, clock=clock)
    streamed, unstreamed = ledger.begin(), ledger.begin()
    ledger.tokens(streamed, 10)
    clock.now += 1.0

    # usage says 40 tokens, 10 of them already counted: 30 more in this window against the other's 10
    first = ledger.end(unstreamed, total_tokens=30)

    assert first.seconds == pytest.approx(0.75)
    assert ledger.end(unstreamed) is first, "ending twice returns the same share"


def test_tokens_reported_after_the_window_closes_cut_a_new_window() -> None:
    clock = Clock()
    ledger = UpstreamAttribution(window_s=0.5, clock=clock)
    a, b = ledger.begin(), ledger.begin()
    clock.now += 0.6
    ledger.tokens(a, 1)  # the window [0, 0.6] closes: all of it to a
    clock.now += 0.4
    ledger.tokens(b, 1)  # not yet 0.5 s since the cut: the window stays open

    assert ledger.end(a).seconds == pytest.approx(0.6), "a processed nothing in the second window"
    assert ledger.end(b).seconds == pytest.approx(0.4)


def test_bad_inputs_are_refused() -> None:
    ledger = UpstreamAttribution(clock=Clock())
    with pytest.raises(ValueError, match="negative"):
        ledger.tokens(ledger.begin(), -1)
    with pytest.raises(ValueError, match="positive"):
        UpstreamAttribution(window_s=0)


def test_the_upstream_gpus_counter_is_read_through_nvml_in_joules() -> None:
    gpu = FakeGpu(uuid="GPU-up", energy_mj=1_000_000)
    monitor = GpuMonitor(nvml=FakeNvml([gpu]))
    clock = Clock()
    ledger = UpstreamAttribution(clock=clock, energy_reader=lambda: monitor.energy_joules(0))
    share = ledger.begin()
    clock.now += 1.5
    gpu.advance_energy(420.0)

    assert ledger.end(share, total_tokens=5) == AttributedUse(seconds=pytest.approx(1.5), joules=pytest.approx(420.0))
