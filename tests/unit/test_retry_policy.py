"""The mesh's one retry policy: full-jitter backoff under an exponential cap, and a budget
that stops retries from multiplying the load on a failing upstream."""

from __future__ import annotations

import grpc

from clawdbot.common.retry import RetryBudget, RetryPolicy, retryable_grpc, retryable_http


def test_backoff_is_drawn_from_zero_to_an_exponential_cap() -> None:
    policy = RetryPolicy(max_attempts=5, base_s=0.1, max_backoff_s=0.5)
    assert policy.backoff(1, draw=lambda: 1.0) == 0.1
    assert policy.backoff(2, draw=lambda: 1.0) == 0.2
    assert policy.backoff(3, draw=lambda: 1.0) == 0.4
    assert policy.backoff(4, draw=lambda: 1.0) == 0.5  # capped
    assert policy.backoff(3, draw=lambda: 0.0) == 0.0  # full jitter reaches zero
    assert policy.backoff(3, draw=lambda: 0.5) == 0.2
    drawn = {policy.backoff(3) for _ in range(200)}
    assert len(drawn) > 100 and all(0.0 <= d <= 0.4 for d in drawn)


def test_attempts_count_the_first_one() -> None:
    policy = RetryPolicy(max_attempts=3, base_s=0.1)
    assert [policy.may_retry(n) for n in (1, 2, 3)] == [True, True, False]


def test_the_retryable_failures_are_named_once() -> None:
    assert retryable_http(503) and retryable_http(429) and not retryable_http(400) and not retryable_http(501)
    assert retryable_grpc(grpc.StatusCode.UNAVAILABLE) and not retryable_grpc(grpc.StatusCode.INVALID_ARGUMENT)


def test_budget_allows_a_share_of_first_attempts_then_refuses() -> None:
    now = [0.0]
    budget = RetryBudget(ratio=0.2, min_per_s=0.0, window_s=10.0, clock=lambda: now[0])
    for _ in range(50):
        budget.record_first()
    granted = sum(budget.try_retry() for _ in range(100))
    assert granted == 10
    now[0] = 10.0  # a new window starts afresh
    assert not budget.try_retry()  # no first attempts yet in this window
    budget.record_first()
    budget.record_first()
    budget.record_first()
    budget.record_first()
    budget.record_first()
    assert budget.try_retry() and not budget.try_retry()


def test_budget_floor_lets_a_quiet_service_retry() -> None:
    budget = RetryBudget(ratio=0.2, min_per_s=1.0, window_s=10.0, clock=lambda: 0.0)
    assert sum(budget.try_retry() for _ in range(20)) == 10


def test_zero_attempts_means_no_limit_by_count() -> None:
    waits = RetryPolicy(max_attempts=0, base_s=0.1, max_backoff_s=1.0)
    assert waits.may_retry(1_000)
    assert waits.backoff(50, draw=lambda: 1.0) == 1.0
