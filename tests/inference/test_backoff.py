"""One backoff for every retry loop: doubling per failure, capped, its top share jittered."""

from __future__ import annotations

import pytest

from inference.backoff import backoff_s
from inference.retries import MAX_BACKOFF_S
from inference.rules.pull import RulesetPuller


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    for retry, ceiling in ((1, 0.2), (2, 0.4), (3, 0.8)):
        waits = [backoff_s(retry, base_s=0.2, cap_s=MAX_BACKOFF_S) for _ in range(200)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits)
        assert max(waits) - min(waits) > ceiling / 10, "jittered, not fixed"
    assert backoff_s(30, base_s=0.2, cap_s=MAX_BACKOFF_S) <= MAX_BACKOFF_S
    assert backoff_s(10_000, base_s=0.2, cap_s=MAX_BACKOFF_S) <= MAX_BACKOFF_S, "no overflow, however long"


def test_the_jitter_is_the_share_of_the_wait_that_is_random() -> None:
    waits = [backoff_s(3, base_s=1.0, cap_s=60.0, jitter=0.25) for _ in range(200)]
    assert all(3.0 <= w <= 4.0 for w in waits) and max(waits) - min(waits) > 0.1
    assert [backoff_s(n, base_s=10.0, cap_s=60.0, jitter=0) for n in range(1, 6)] == [10.0, 20.0, 40.0, 60.0, 60.0]


@pytest.mark.parametrize(("interval_s", "delays"), [
    (10.0, [10.0, 20.0, 40.0, 60.0, 60.0, 60.0]),
    (2.5, [2.5, 5.0, 10.0, 20.0, 40.0, 60.0]),
    (120.0, [120.0, 120.0, 120.0, 120.0, 120.0, 120.0]),
])
def test_the_ruleset_pull_waits_its_interval_then_doubles_it_up_to_a_minute_without_jitter(
    interval_s: float, delays: list[float]
) -> None:
    puller = RulesetPuller(None, url="http://127.0.0.1:9", token=None, interval_s=interval_s)  # type: ignore[arg-type]
    waits = []
    for failures in range(6):
        puller.failures_in_a_row = failures
        waits.append(puller.next_delay_s())
    assert waits == delays
