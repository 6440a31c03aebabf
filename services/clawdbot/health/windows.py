"""Each instance's recent calls, and what a window of them says: rate, error ratio,
latency percentiles, time to first token, tokens per second."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

# Failures that are the instance's fault; a client error (a bad request) is not.
INSTANCE_FAILURES: Final = frozenset(
    {"unreachable", "server_error", "timeout", "rate_limited", "bad_response", "truncated", "auth"}
)


@dataclass(frozen=True)
class Call:
    at: float  # when it ended (epoch seconds)
    failed: bool
    latency_s: float
    ttft_s: float | None
    output_tokens: int

    @classmethod
    def from_observation(cls, observation: dict[str, Any]) -> Call:
        latency = float(observation.get("latency_s") or 0.0)
        ttft = observation.get("ttft_s")
        return cls(
            at=float(observation.get("started_at") or 0.0) + latency,
            failed=observation.get("status", "ok") in INSTANCE_FAILURES,
            latency_s=latency,
            ttft_s=float(ttft) if isinstance(ttft, int | float) else None,
            output_tokens=int(observation.get("output_tokens") or 0),
        )


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class WindowStats:
    window_s: float
    requests: int = 0
    errors: int = 0
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    latency_p99_s: float | None = None
    ttft_p50_s: float | None = None
    tokens_per_s: float | None = None

    @property
    def error_ratio(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def rate(self) -> float:
        """Calls per second over the window."""
        return self.requests / self.window_s

    def features(self) -> list[float]:
        """The anomaly detector's view of the window; absent measures stand in as 0 or
        the latency, so every window has the same shape."""
        p50 = self.latency_p50_s or 0.0
        return [
            p50,
            self.latency_p95_s or p50,
            self.error_ratio,
            self.rate,
            self.ttft_p50_s if self.ttft_p50_s is not None else p50,
            self.tokens_per_s or 0.0,
        ]

    def public(self) -> dict[str, Any]:
        return {
            "window_s": self.window_s,
            "requests": self.requests,
            "errors": self.errors,
            "error_ratio": round(self.error_ratio, 4),
            "rate_per_s": round(self.rate, 3),
            "latency_p50_s": self.latency_p50_s,
            "latency_p95_s": self.latency_p95_s,
            "latency_p99_s": self.latency_p99_s,
            "ttft_p50_s": self.ttft_p50_s,
            "tokens_per_s": self.tokens_per_s,
        }


FEATURE_NAMES: Final = ("latency_p50_s", "latency_p95_s", "error_ratio", "rate_per_s", "ttft_p50_s", "tokens_per_s")


class CallLog:
    """One instance's calls of the last `keep_s` seconds."""

    def __init__(self, keep_s: float) -> None:
        self._keep_s = keep_s
        self._calls: deque[Call] = deque()

    def add(self, call: Call) -> None:
        self._calls.append(call)

    def _trim(self, now: float) -> None:
        while self._calls and self._calls[0].at < now - self._keep_s:
            self._calls.popleft()

    def stats(self, now: float, window_s: float, end: float | None = None) -> WindowStats:
        """The calls that ended in (end - window_s, end], end being now by default."""
        self._trim(now)
        until = now if end is None else end
        calls = [c for c in self._calls if until - window_s < c.at <= until]
        if not calls:
            return WindowStats(window_s)
        latencies = sorted(c.latency_s for c in calls)
        ttfts = sorted(c.ttft_s for c in calls if c.ttft_s is not None)
        generating = [c for c in calls if c.output_tokens and not c.failed]
        busy = sum(c.latency_s for c in generating)
        return WindowStats(
            window_s=window_s,
            requests=len(calls),
            errors=sum(c.failed for c in calls),
            latency_p50_s=percentile(latencies, 50),
            latency_p95_s=percentile(latencies, 95),
            latency_p99_s=percentile(latencies, 99),
            ttft_p50_s=percentile(ttfts, 50) if ttfts else None,
            tokens_per_s=sum(c.output_tokens for c in generating) / busy if busy > 0 else None,
        )
