"""RetryPolicy: exponential backoff, capped, and a last attempt after which nothing is retried."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from service.queue.retry import RetryPolicy

NOW = datetime(2026, 11, 24, 10, 0, 0, tzinfo=UTC)


def test_defaults() -> None:
    policy = RetryPolicy()
    assert (policy.max_attempts, policy.base_delay_s, policy.max_delay_s) == (3, 1.0, 60.0)


@pytest.mark.parametrize(
    ("attempt", "delay_s"), [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (6, 32.0), (7, 60.0)]
)
def test_delay_doubles_then_caps(attempt: int, delay_s: float) -> None:
    assert RetryPolicy(max_attempts=10).delay_s(attempt) == delay_s


def test_delay_with_custom_base_and_cap() -> None:
    policy = RetryPolicy(max_attempts=10, base_delay_s=0.5, max_delay_s=3.0)
    assert [policy.delay_s(a) for a in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_delay_of_attempt_zero_or_less_is_the_base() -> None:
    # Defensive: a corrupt attempt number must not produce a delay below the base (or a fraction of it).
    assert RetryPolicy().delay_s(0) == 1.0
    assert RetryPolicy().delay_s(-3) == 1.0


def test_huge_attempt_numbers_stay_capped() -> None:
    assert RetryPolicy(max_attempts=10_000).delay_s(5_000) == 60.0


def test_next_attempt_at_until_the_last_attempt() -> None:
    policy = RetryPolicy(max_attempts=3, base_delay_s=2.0)
    assert policy.next_attempt_at(1, NOW) == NOW + timedelta(seconds=2)
    assert policy.next_attempt_at(2, NOW) == NOW + timedelta(seconds=4)
    assert policy.next_attempt_at(3, NOW) is None
    assert policy.next_attempt_at(4, NOW) is None


def test_a_single_attempt_is_never_retried() -> None:
    assert RetryPolicy(max_attempts=1).next_attempt_at(1, NOW) is None


def test_next_attempt_keeps_the_timezone() -> None:
    at = RetryPolicy().next_attempt_at(1, NOW)
    assert at is not None and at.tzinfo is UTC
