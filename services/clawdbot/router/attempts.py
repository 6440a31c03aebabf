"""The attempts of one request: which instance next, how long it may take, when to stop.

Instances are tried in the chosen order, cycling if attempts remain; one whose breaker
refuses is skipped. Before each retry the request waits the mesh's one backoff (common/
retry.py: exponential, full jitter), always inside the request's deadline, and only while
the router's retry budget allows; each attempt's timeout is what is left of the deadline
(capped by the instance's own timeout). A non-retryable failure ends the request at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from clawdbot.common.config import RetryConfig
from clawdbot.common.retry import RetryBudget, RetryPolicy
from clawdbot.router.breaker import CircuitBreaker
from clawdbot.router.connectors.openai import UpstreamError
from clawdbot.router.registry import Instance


class Attempts:
    def __init__(
        self,
        order: list[Instance],
        breakers: dict[str, CircuitBreaker],
        retry: RetryConfig,
        deadline: float,
        clock: Callable[[], float] = time.monotonic,
        budget: RetryBudget | None = None,
    ) -> None:
        self._order = order
        self._breakers = breakers
        self._deadline = deadline
        self._clock = clock
        self._next = 0
        self.made = 0
        self._policy = RetryPolicy(retry.max_attempts, retry.backoff_s, retry.max_backoff_s)
        self._budget = budget

    def __aiter__(self) -> Attempts:
        return self

    async def __anext__(self) -> tuple[Instance, float]:
        if not self._policy.may_retry(self.made) or not self._order:
            raise StopAsyncIteration
        if self.made > 0:
            if self._budget is not None and not self._budget.try_retry():
                raise StopAsyncIteration  # the router's retries are spent: fail, not pile on
            pause = min(self._policy.backoff(self.made), max(0.0, self._deadline - self._clock()))
            if pause > 0:
                await asyncio.sleep(pause)
        elif self._budget is not None:
            self._budget.record_first()
        for _ in range(len(self._order)):
            instance = self._order[self._next % len(self._order)]
            self._next += 1
            if self._breakers[instance.id].acquire():
                left = self._deadline - self._clock()
                if left <= 0:
                    raise StopAsyncIteration
                self.made += 1
                return instance, min(instance.timeout_s, left)
        raise StopAsyncIteration  # every breaker refused

    def should_retry(self, err: UpstreamError) -> bool:
        return err.retryable and self._policy.may_retry(self.made) and self._clock() < self._deadline
