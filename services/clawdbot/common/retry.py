"""The one retry policy of the mesh: exponential backoff with full jitter, a retry budget,
and the retryable failures named once.

Which layer retries what, so that retries never multiply:
- the router retries upstream model calls (timeouts, connection failures, 5xx, 429),
  across the ranked instances, inside the request's deadline (model_router.retry);
- a job retries only when the router could not take the request at all (unreachable,
  overloaded, draining): an upstream failure the router already retried ends the job, so
  one job makes at most model_router.retry.max_attempts upstream calls;
- a workflow step retries only when its definition asks (`retry:`), the author's choice;
- webhooks (job callbacks, alerts) retry their own deliveries: no layer sits under them;
- waits for something settling (Kafka topics, a restarted child, a consumer whose broker
  is away) back off the same way, bounded by a deadline rather than a count.

Full jitter (a delay drawn uniformly from zero to the exponential cap) spreads the
retries of many callers that failed together, instead of sending them back in waves.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import grpc

# HTTP statuses worth another try: the server was busy, restarting, or timed out.
RETRYABLE_HTTP_STATUSES: Final = frozenset({408, 425, 429, 500, 502, 503, 504})
# gRPC codes for a call that did not reach, or was refused by, a busy or restarting peer.
RETRYABLE_GRPC_CODES: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


def retryable_http(status: int) -> bool:
    return status in RETRYABLE_HTTP_STATUSES


def retryable_grpc(code: grpc.StatusCode | None) -> bool:
    return code in RETRYABLE_GRPC_CODES


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts in all (the first included; 0: no limit by count, for waits bounded by a
    deadline or that never give up), and the backoff between them: before attempt n+1 a
    delay drawn from [0, min(max_backoff_s, base_s * 2**(n-1))]."""

    max_attempts: int
    base_s: float
    max_backoff_s: float = 30.0

    def may_retry(self, attempts_made: int) -> bool:
        return self.max_attempts == 0 or attempts_made < self.max_attempts

    def backoff(self, attempts_made: int, draw: Callable[[], float] = random.random) -> float:
        if attempts_made < 1:
            return 0.0
        cap = min(self.max_backoff_s, self.base_s * 2 ** (attempts_made - 1))
        return cap * draw()


class RetryBudget:
    """Retries allowed as a share of first attempts, over a sliding window: when a whole
    upstream is down, every request retrying it would multiply the load on it just as it
    tries to recover. Each first attempt earns `ratio` of a retry; a few retries per second
    are always allowed (`min_per_s`) so a quiet service can still retry."""

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_s: float = 10.0,
        window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ratio = ratio
        self._floor = min_per_s * window_s
        self._window_s = window_s
        self._clock = clock
        self._started = clock()
        self._firsts = 0
        self._retries = 0

    def _roll(self) -> None:
        now = self._clock()
        if now - self._started >= self._window_s:
            self._started, self._firsts, self._retries = now, 0, 0

    def record_first(self) -> None:
        self._roll()
        self._firsts += 1

    def try_retry(self) -> bool:
        """Spend one retry if the budget has one."""
        self._roll()
        if self._retries >= self._floor + self._firsts * self._ratio:
            return False
        self._retries += 1
        return True
