"""RetryPolicy: retryable classes only, bounded attempts, full-jitter backoff, Retry-After, a budget."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from imgpipe_dagster.resilience import RetryPolicy, parse_retry_after
from imgpipe_dagster_tests.resilience.medium import medium_retry


def policy(**overrides) -> RetryPolicy:
    return RetryPolicy(medium_retry(**overrides), rng=random.Random(7))


def test_only_retryable_failures_are_retried():
    retries = policy()
    retries.note_first_attempt()
    assert not retries.should_retry(retryable=False, attempt=1)
    assert retries.should_retry(retryable=True, attempt=1)


def test_at_most_retry_attempts_retries_after_the_first_attempt():
    retries = policy(retry_attempts=2)
    assert retries.should_retry(True, attempt=1)
    assert retries.should_retry(True, attempt=2)
    assert not retries.should_retry(True, attempt=3)
    assert retries.counters["denied_attempts"] == 1


def test_delay_is_full_jitter_under_an_exponential_cap():
    retries = policy(retry_delay=1.0, max_backoff_s=5.0)
    assert [retries.backoff_cap(n) for n in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    delays = [retries.delay(3) for _ in range(500)]
    assert all(0.0 <= d <= 4.0 for d in delays)
    assert min(delays) < 0.5 and max(delays) > 3.5  # the whole range is used, not a band near the cap


def test_a_seeded_rng_gives_the_same_delays():
    first = RetryPolicy(medium_retry(), rng=random.Random(42))
    second = RetryPolicy(medium_retry(), rng=random.Random(42))
    assert [first.delay(n) for n in range(1, 6)] == [second.delay(n) for n in range(1, 6)]


def test_retry_after_is_never_undercut_and_is_clamped():
    retries = policy(retry_delay=0.5, max_retry_after_s=300)
    assert retries.delay(1, retry_after=30.0) == 30.0
    assert retries.delay(1, retry_after=10_000.0) == 300.0
    assert retries.delay(1, retry_after=0.0) <= 0.5


def test_the_budget_bounds_retries_to_a_share_of_first_attempts():
    retries = policy(retry_budget_ratio=0.25, retry_budget_initial_tokens=2.0, retry_attempts=5)
    granted = 0
    for _ in range(100):
        retries.note_first_attempt()
        if retries.should_retry(True, attempt=1):
            granted += 1
    assert granted == 2 + 25  # initial tokens + 25% of 100 first attempts
    assert retries.counters["denied_budget"] == 100 - granted


def test_the_budget_cannot_bank_more_than_its_cap():
    retries = policy(retry_budget_ratio=1.0, retry_budget_max_tokens=3.0)
    for _ in range(1000):
        retries.note_first_attempt()
    assert retries.tokens == 3.0


def test_retryable_statuses():
    retries = policy()
    assert all(retries.is_retryable_status(s) for s in (408, 429, 500, 502, 503, 504))
    assert not any(retries.is_retryable_status(s) for s in (400, 403, 404, 410, 415))


@pytest.mark.parametrize(
    ("header", "expected"),
    [("120", 120.0), ("  7 ", 7.0), ("Wed, 21 Oct 2015 07:28:30 GMT", 30.0), ("soon", None), ("", None), (None, None)],
)
def test_parse_retry_after(header, expected):
    now = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC)
    assert parse_retry_after(header, now=now) == expected
