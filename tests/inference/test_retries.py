"""The retry policy on a clock the test moves: a retry is sent only for a transient failure, within
the request's retries and deadline, while the breaker is closed, and within the model's retry
budget, which caps retries at a share of the model's other attempts over the last ten seconds (the
live behaviour is in test_resilience.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from inference.config import ConfigError, load_config
from inference.deadline import Deadline
from inference.errors import ApiError
from inference.retries import RETRY_BUDGET_WINDOW_S, Retries, RetryBudget

TRANSIENT = ApiError(503, "Upstream 'big' answered 503.", code="upstream_overloaded", transient=True)
FOREVER = Deadline(float("inf"))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def budget(clock: Clock, *, ratio: float = 0.2, minimum: int = 0) -> RetryBudget:
    return RetryBudget(ratio=ratio, minimum=minimum, clock=clock)


def test_a_budget_allows_retries_up_to_its_share_of_the_other_attempts() -> None:
    clock = Clock()
    b = budget(clock, ratio=0.2)
    for _ in range(10):
        b.attempted()

    assert [b.spend() for _ in range(3)] == [True, True, False]
    assert b.exhausted_total == 1


def test_the_minimum_lets_a_quiet_model_retry_at_all() -> None:
    clock = Clock()
    b = budget(clock, ratio=0.2, minimum=3)
    b.attempted()

    assert [b.spend() for _ in range(4)] == [True, True, True, False]


def test_attempts_and_retries_older_than_the_window_are_forgotten() -> None:
    clock = Clock()
    b = budget(clock, ratio=1.0)
    for _ in range(5):
        b.attempted()
    assert all(b.spend() for _ in range(5))
    assert not b.spend()

    clock.now += RETRY_BUDGET_WINDOW_S
    assert not b.spend(), "the old attempts are gone, and with them their share"
    b.attempted()
    assert b.spend(), "the old retries are gone too"


@given(st.lists(st.tuples(st.sampled_from(["attempt", "retry"]), st.floats(0, 3)), max_size=300),
       st.floats(0, 1), st.integers(0, 5))
def test_a_retry_is_sent_only_while_its_window_stays_within_the_share_of_attempts_plus_the_minimum(
        steps: list[tuple[str, float]], ratio: float, minimum: int) -> None:
    # Checked when a retry is sent: later, the attempts that allowed it may leave the window
    # before it does (a sliding budget bounds what it lets through, not every window afterwards).
    clock = Clock()
    b = budget(clock, ratio=ratio, minimum=minimum)
    log: list[tuple[float, str]] = []
    for kind, wait in steps:
        clock.now += wait
        if kind == "attempt":
            b.attempted()
            log.append((clock.now, "attempt"))
        elif b.spend():
            log.append((clock.now, "retry"))
            # What the budget counts: whole seconds, the current one and the nine before it.
            since = int(clock.now) - RETRY_BUDGET_WINDOW_S + 1
            recent = [kind for at, kind in log if int(at) >= since]
            assert recent.count("retry") <= minimum + ratio * recent.count("attempt")


def retries(clock: Clock, **overrides: float) -> Retries:
    options = {"retries": 2, "backoff_base_s": 0.2, "budget_ratio": 1.0, "budget_min": 10, **overrides}
    return Retries(clock=clock, **options)  # type: ignore[arg-type]


def test_a_transient_failure_is_retried_after_a_backoff_until_the_retries_are_spent() -> None:
    policy = retries(Clock())

    waits = [policy.backoff_before_retry("big", TRANSIENT, retries_done=n, breaker_closed=True, deadline=FOREVER)
             for n in range(3)]

    assert waits[0] is not None and 0.1 <= waits[0] <= 0.2
    assert waits[1] is not None and 0.2 <= waits[1] <= 0.4
    assert waits[2] is None
    assert policy.retries_total["big"] == 2


@pytest.mark.parametrize(("error", "breaker_closed", "deadline_s"), [
    (ApiError(400, "no", code="upstream_rejected"), True, 60.0),
    (ApiError(502, "bug", code="upstream_error"), True, 60.0),  # an upstream's 500: not transient
    (TRANSIENT, False, 60.0),
    (TRANSIENT, True, 0.1),  # the shortest backoff (0.1 s) would leave nothing of the deadline
], ids=["client_error", "server_bug", "breaker_not_closed", "no_time_left"])
def test_no_retry_is_sent_when_it_could_not_help(error: ApiError, breaker_closed: bool, deadline_s: float) -> None:
    clock = Clock()
    policy = retries(clock, backoff_base_s=0.2)

    wait = policy.backoff_before_retry("big", error, retries_done=0, breaker_closed=breaker_closed,
                                       deadline=Deadline(clock.now + deadline_s, clock=clock))

    assert wait is None
    assert policy.retries_total["big"] == 0


def test_a_spent_budget_stops_retries_and_says_so_in_metrics() -> None:
    policy = retries(Clock(), budget_ratio=0.5, budget_min=0)
    policy.attempted("big")
    policy.attempted("big")

    sent = [policy.backoff_before_retry("big", TRANSIENT, retries_done=0, breaker_closed=True, deadline=FOREVER)
            for _ in range(3)]

    assert [wait is not None for wait in sent] == [True, False, False]
    rows = {(s.name, s.labels["model"]): s.value for s in policy.samples()}
    assert rows[("wattson_retries_total", "big")] == 1
    assert rows[("wattson_retry_budget_exhausted_total", "big")] == 2


@pytest.mark.parametrize("flags", [["--retry-budget-ratio", "-0.1"], ["--retry-budget-min", "-1"],
                                   ["--request-deadline-s", "0"], ["--job-deadline-s", "-5"],
                                   ["--cache-stale-if-error-s", "-1"]])
def test_retry_budget_and_deadline_options_out_of_range_are_refused(flags: list[str]) -> None:
    with pytest.raises(ConfigError):
        load_config(flags, environ={})


def test_retry_budget_and_deadline_options_are_read_from_flags_and_the_environment() -> None:
    config = load_config(["--retry-budget-ratio", "0.1", "--request-deadline-s", "30"],
                         environ={"INFERENCE_RETRY_BUDGET_MIN": "7", "INFERENCE_JOB_DEADLINE_S": "3600",
                                  "INFERENCE_CACHE_STALE_IF_ERROR_S": "0"})

    assert (config.retry_budget_ratio, config.retry_budget_min, config.request_deadline_s, config.job_deadline_s,
            config.cache_stale_if_error_s) == (0.1, 7, 30.0, 3600.0, 0.0)
