from clawdbot.common.config import BreakerConfig
from clawdbot.router.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_trips_on_consecutive_failures_then_half_open_probe_closes() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerConfig(consecutive_failures=3, open_s=5), clock)
    for _ in range(3):
        assert breaker.acquire()
        breaker.record_failure()
    assert breaker.status() == OPEN and not breaker.acquire()
    clock.now += 5
    assert breaker.status() == HALF_OPEN
    assert breaker.acquire()  # the one probe
    assert not breaker.acquire()  # nobody else while it runs
    breaker.record_success()
    assert breaker.status() == CLOSED and breaker.acquire()


def test_failed_probe_reopens_for_longer() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerConfig(consecutive_failures=1, open_s=2, max_open_s=5), clock)
    breaker.record_failure()
    clock.now += 2
    assert breaker.acquire()
    breaker.record_failure()
    clock.now += 2
    assert breaker.status() == OPEN  # second trip: 4 s
    clock.now += 2
    assert breaker.status() == HALF_OPEN
    breaker.acquire()
    breaker.record_failure()
    clock.now += 4.9
    assert breaker.status() == OPEN  # capped at 5 s
    clock.now += 0.2
    assert breaker.status() == HALF_OPEN


def test_trips_on_failure_ratio_over_minimum_count() -> None:
    breaker = CircuitBreaker(BreakerConfig(consecutive_failures=100, failure_ratio=0.5, min_requests=10), Clock())
    for i in range(9):
        breaker.record_success() if i % 2 else breaker.record_failure()
    assert breaker.status() == CLOSED  # 9 calls: under the minimum
    breaker.record_failure()
    assert breaker.status() == OPEN  # 6 of 10 failed


def test_cancelled_probe_frees_the_slot() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerConfig(consecutive_failures=1, open_s=1), clock)
    breaker.record_failure()
    clock.now += 1
    assert breaker.acquire()
    breaker.release()
    assert breaker.acquire()
