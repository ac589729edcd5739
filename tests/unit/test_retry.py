from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from stem.retry import Retry, RetryPolicy, seconds


def test_exhausted_after_max_retries() -> None:
    policy = RetryPolicy(max_retries=2)
    assert policy.decide(0).retry
    assert policy.decide(1).retry
    decision = policy.decide(2)
    assert not decision.retry
    assert "retries exhausted (2 allowed)" in decision.reason


def test_zero_means_never_and_none_means_forever() -> None:
    assert not RetryPolicy(max_retries=0).decide(0).retry
    assert RetryPolicy(max_retries=None).decide(10_000).retry


def test_explicit_limit_overrides_policy() -> None:
    assert RetryPolicy(max_retries=1).decide(3, max_retries=5).retry
    assert not RetryPolicy(max_retries=10).decide(3, max_retries=3).retry


def test_countdown_replaces_backoff() -> None:
    assert RetryPolicy(max_retries=None).decide(5, countdown_s=7.5).delay_s == 7.5


def test_backoff_without_jitter_is_exponential_and_capped() -> None:
    policy = RetryPolicy(backoff_base_s=1.0, backoff_max_s=10.0, jitter=False)
    assert [policy.backoff_delay_s(n) for n in range(6)] == [1, 2, 4, 8, 10, 10]


def test_full_jitter_stays_within_the_exponential_ceiling() -> None:
    policy = RetryPolicy(backoff_base_s=0.5, backoff_max_s=100.0)
    rng = random.Random(7)
    for attempt in range(8):
        ceiling = min(100.0, 0.5 * 2**attempt)
        draws = [policy.backoff_delay_s(attempt, rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in draws)
        assert max(draws) > ceiling * 0.8  # spread over the whole range, not a constant
        assert min(draws) < ceiling * 0.2


def test_no_backoff_uses_the_base_delay() -> None:
    assert RetryPolicy(backoff=False, backoff_base_s=3.0).backoff_delay_s(9) == 3.0


def test_huge_attempt_numbers_do_not_overflow() -> None:
    assert RetryPolicy(max_retries=None, jitter=False).backoff_delay_s(10_000) == 600.0


def test_retry_exception_from_eta() -> None:
    r = Retry(eta=datetime.now(UTC) + timedelta(seconds=30))
    assert r.countdown is not None and 28 < r.countdown <= 30.1


@pytest.mark.parametrize(
    ("value", "expected"), [(None, None), (2, 2.0), (timedelta(minutes=1), 60.0)]
)
def test_seconds(value: object, expected: object) -> None:
    assert seconds(value) == expected  # type: ignore[arg-type]
