"""A circuit breaker per model instance.

closed ──(N consecutive failures, or failure ratio ≥ R over ≥ M calls in the window)──► open
open ──(open time passed)──► half-open: one probe request at a time
half-open ──probe succeeds──► closed        half-open ──probe fails──► open, for longer
The open time doubles on every trip in a row (up to a ceiling) and resets once closed.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from clawdbot.common.config import BreakerConfig

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    def __init__(self, config: BreakerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self.state = CLOSED
        self._consecutive = 0
        self._outcomes: deque[tuple[float, bool]] = deque()
        self._open_until = 0.0
        self._trips = 0
        self._probe_in_flight = False

    def _current(self) -> str:
        if self.state == OPEN and self._clock() >= self._open_until:
            self.state = HALF_OPEN
            self._probe_in_flight = False
        return self.state

    def status(self) -> str:
        return self._current()

    def allows(self) -> bool:
        """Whether a request may go to the instance now (does not reserve the probe)."""
        state = self._current()
        return state == CLOSED or (state == HALF_OPEN and not self._probe_in_flight)

    def acquire(self) -> bool:
        """Take the right to send one request; in half-open, the single probe slot."""
        state = self._current()
        if state == CLOSED:
            return True
        if state == HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def _trim(self, now: float) -> None:
        horizon = now - self._config.window_s
        while self._outcomes and self._outcomes[0][0] < horizon:
            self._outcomes.popleft()

    def record_success(self) -> None:
        now = self._clock()
        if self.state == HALF_OPEN:
            self.state = CLOSED
            self._trips = 0
            self._outcomes.clear()
        self._probe_in_flight = False
        self._consecutive = 0
        self._outcomes.append((now, True))
        self._trim(now)

    def record_failure(self) -> None:
        now = self._clock()
        self._probe_in_flight = False
        if self.state == HALF_OPEN:
            self._trip(now)
            return
        self._consecutive += 1
        self._outcomes.append((now, False))
        self._trim(now)
        failures = sum(1 for _, ok in self._outcomes if not ok)
        ratio_tripped = (
            len(self._outcomes) >= self._config.min_requests
            and failures / len(self._outcomes) >= self._config.failure_ratio
        )
        if self.state == CLOSED and (self._consecutive >= self._config.consecutive_failures or ratio_tripped):
            self._trip(now)

    def release(self) -> None:
        """A call that ended without a verdict (cancelled): free the probe slot."""
        self._probe_in_flight = False

    def trip(self) -> None:
        """Open now (an instance that failed its health check on reload)."""
        self._trip(self._clock())

    def _trip(self, now: float) -> None:
        open_s = min(self._config.open_s * (2**self._trips), self._config.max_open_s)
        self._trips += 1
        self.state = OPEN
        self._open_until = now + open_s
        self._consecutive = 0
        self._outcomes.clear()
