"""The circuit breaker's states on a clock the test moves, and the options that configure it and the
retries (the live behaviour is in test_resilience.py; the retries' backoff in test_backoff.py)."""

from __future__ import annotations

import pytest

from inference.breaker import BreakerSettings, CircuitBreaker, CircuitBreakers
from inference.config import ConfigError, Fallback, load_config
from tests.inference.telemetry_helpers import make_event

SETTINGS = BreakerSettings(window_s=10.0, min_requests=4, error_rate=0.5, cooldown_s=5.0, probes=2,
                           probe_lease_s=30.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def breaker(clock: Clock, settings: BreakerSettings = SETTINGS) -> CircuitBreaker:
    return CircuitBreaker("big", settings, clock)


def record(b: CircuitBreaker, *outcomes: bool | None) -> None:
    for ok in outcomes:
        b.record(None, ok)


def test_it_stays_closed_until_the_window_holds_the_fewest_requests(clock: Clock) -> None:
    b = breaker(clock)
    record(b, False, False, False)
    assert b.state == "closed", "three failures are fewer than min_requests"
    record(b, False)
    assert b.state == "open" and b.opens_total == 1


def test_it_opens_at_the_error_rate_and_not_below_it(clock: Clock) -> None:
    below = breaker(clock)
    record(below, True, True, False, True, False, True)  # 2 of 6 failed
    assert below.state == "closed"
    at = breaker(clock)
    record(at, True, False, True, False)  # 2 of 4 failed: the rate is reached
    assert at.state == "open"


def test_outcomes_that_say_nothing_about_the_model_are_not_counted(clock: Clock) -> None:
    b = breaker(clock)
    record(b, False, None, None, None, None, False)
    assert b.state == "closed", "two failures and four neutral outcomes are two outcomes"


def test_outcomes_older_than_the_window_are_forgotten(clock: Clock) -> None:
    b = breaker(clock)
    record(b, False, False, False)
    clock.now += 11
    record(b, False, True, True)
    assert b.state == "closed", "only 1 of the 3 outcomes in the window failed"


def test_after_the_cool_down_it_lets_only_its_probes_through(clock: Clock) -> None:
    b = breaker(clock)
    record(b, False, False, False, False)
    assert not b.admit("r1") and b.retry_after_s() == 5
    clock.now += 4.5
    assert b.state == "open" and b.retry_after_s() == 1
    clock.now += 0.5
    assert b.state == "half_open"
    assert b.admit("p1") and b.admit("p2")
    assert not b.admit("p3"), "two probes are in flight"


def test_it_closes_once_every_probe_succeeded(clock: Clock) -> None:
    b = breaker(clock)
    record(b, False, False, False, False)
    clock.now += 5
    assert b.admit("p1") and b.admit("p2")
    b.record("p1", True)
    assert b.state == "half_open" and not b.admit("p3"), "one probe still out; the successful one is spent"
    b.record("p2", True)
    assert b.state == "closed" and b.admit("anyone")
    record(b, False, False, False)
    assert b.state == "closed", "the window started empty after closing"


def test_a_failed_probe_opens_it_for_another_cool_down(clock: Clock) -> None:
    b = breaker(clock)
    record(b, False, False, False, False)
    clock.now += 5
    assert b.admit("p1")
    b.record("p1", False)
    assert b.state == "open" and b.opens_total == 2 and b.retry_after_s() == 5
    b.record("p2-never-admitted", True)
    assert b.state == "open", "a request that was not a probe does not speak for the model while open"


def test_a_neutral_probe_frees_its_place_and_a_lost_one_expires(clock: Clock) -> None:
    settings = BreakerSettings(window_s=10, min_requests=1, error_rate=0.5, cooldown_s=5, probes=1,
                               probe_lease_s=30)
    b = breaker(clock, settings)
    record(b, False)
    clock.now += 5
    assert b.admit("p1") and not b.admit("p2")
    b.record("p1", None)  # the client left: says nothing, but the place is free again
    assert b.admit("p3")
    clock.now += 31  # p3 never reported: its place is taken back after the lease
    assert b.admit("p4")


def test_the_board_counts_a_request_against_the_model_that_served_it(clock: Clock) -> None:
    board = CircuitBreakers(BreakerSettings(window_s=10, min_requests=2, error_rate=0.5, cooldown_s=5, probes=1),
                            {"big": ("small", "503")}, clock=clock)
    board.track(["big", "small"])
    for _ in range(2):
        board.observe(make_event(model_served="big", status="error", http_status=502, error_type="upstream_error"))
    board.observe(make_event(model_served="small", status="error", http_status=400, error_type="upstream_rejected"))
    board.observe(make_event(model_served="small", status="error", http_status=400, error_type="upstream_rejected"))
    board.observe(make_event(model_served="big", status="ok", cache_hit=True))
    assert board.states() == {"big": "open", "small": "closed"}, "a client's 400s are not the model failing"
    assert board.chain("big") == ("small", "503") and board.chain("small") == ()


# -- configuration ---------------------------------------------------------------------------------


def test_fallback_chains_are_read_from_flags_and_the_environment() -> None:
    config = load_config(["--model", "tiny-random", "--upstream", "big=http://127.0.0.1:1", "--upstream",
                          "mid=http://127.0.0.1:2", "--fallback", "big=mid:tiny-random:cache:503"])
    assert config.fallbacks == (Fallback("big", ("mid", "tiny-random", "cache", "503")),)
    from_env = load_config([], {"INFERENCE_UPSTREAM": "big=http://127.0.0.1:1", "INFERENCE_MODEL": "tiny-random",
                                "INFERENCE_FALLBACK": "big=tiny-random:503,tiny-random=cache",
                                "INFERENCE_BREAKER_ERROR_RATE": "0.25", "INFERENCE_UPSTREAM_RETRIES": "0"})
    assert from_env.fallbacks == (Fallback("big", ("tiny-random", "503")), Fallback("tiny-random", ("cache",)))
    assert (from_env.breaker_error_rate, from_env.upstream_retries) == (0.25, 0)


@pytest.mark.parametrize(("spec", "message"), [
    ("big", "must be MODEL=STEP"),
    ("big=", "must be MODEL=STEP"),
    ("big=tiny-random::503", "must be MODEL=STEP"),
    ("ghost=tiny-random", "no such model"),
    ("big=elsewhere", "neither a served model"),
    ("big=big", "cannot fall back to itself"),
    ("big=503:tiny-random", "nothing can follow"),
    ("big=cache:cache", "listed twice"),
])
def test_a_malformed_fallback_chain_is_refused_with_its_reason(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(["--model", "tiny-random", "--upstream", "big=http://127.0.0.1:1", "--fallback", spec])


@pytest.mark.parametrize("flags", [["--breaker-error-rate", "0"], ["--breaker-error-rate", "1.5"],
                                   ["--breaker-min-requests", "0"], ["--breaker-cooldown-s", "0"],
                                   ["--upstream-retries", "-1"], ["--job-max-attempts", "0"],
                                   ["--jobs-concurrency", "0"], ["--job-ttl-s", "0"]])
def test_breaker_retry_and_job_options_out_of_range_are_refused(flags: list[str]) -> None:
    with pytest.raises(ConfigError):
        load_config(["--model", "tiny-random", *flags])
