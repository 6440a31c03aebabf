"""Each instance's recent calls, and what a window of them says: rate, error ratio,
latency percentiles, time to first token, tokens per second."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
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


# Latencies are counted in logarithmic bins, eight to a doubling (each about 9% wide): a
# window's percentiles come from its bins' counts, so the cost of a window does not grow
# with the traffic it saw.
_BINS_PER_DOUBLING: Final = 8
_SMALLEST_S: Final = 1e-4


def _bin(seconds: float) -> int:
    return max(0, math.ceil(math.log2(max(seconds, _SMALLEST_S) / _SMALLEST_S) * _BINS_PER_DOUBLING))


def _bin_value(index: int) -> float:
    """The upper edge of a bin: a percentile is never reported below the truth."""
    return _SMALLEST_S * 2 ** (index / _BINS_PER_DOUBLING)


def percentile(histogram: Counter[int], q: float) -> float | None:
    """The q-th (0..100) percentile of the values counted in a histogram of bins."""
    total = sum(histogram.values())
    if not total:
        return None
    rank = max(1, math.ceil(q / 100 * total))
    seen = 0
    for index in sorted(histogram):
        seen += histogram[index]
        if seen >= rank:
            return _bin_value(index)
    raise AssertionError("unreachable: the ranks add up to the total")


@dataclass
class _Second:
    """The calls that ended within one second."""

    requests: int = 0
    errors: int = 0
    latency: Counter[int] = field(default_factory=Counter)
    ttft: Counter[int] = field(default_factory=Counter)
    output_tokens: int = 0
    generating_s: float = 0.0

    def add(self, call: Call) -> None:
        self.requests += 1
        self.errors += call.failed
        self.latency[_bin(call.latency_s)] += 1
        if call.ttft_s is not None:
            self.ttft[_bin(call.ttft_s)] += 1
        if call.output_tokens and not call.failed:
            self.output_tokens += call.output_tokens
            self.generating_s += call.latency_s


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
    """One instance's calls of the last `keep_s` seconds, aggregated per second."""

    def __init__(self, keep_s: float) -> None:
        self._keep_s = keep_s
        self._seconds: dict[int, _Second] = {}

    def add(self, call: Call) -> None:
        second = int(call.at)
        bucket = self._seconds.get(second)
        if bucket is None:
            # A new second: the time to drop the ones past keeping (once a second at most,
            # not on every read; an idle instance keeps at most `keep_s` of them).
            self._trim(second)
            bucket = self._seconds[second] = _Second()
        bucket.add(call)

    def _trim(self, latest: int) -> None:
        oldest = int(latest - self._keep_s)
        for second in [s for s in self._seconds if s < oldest]:
            del self._seconds[second]

    def stats(self, now: float, window_s: float, end: float | None = None) -> WindowStats:
        """The calls of the last `window_s` seconds before `end` (now by default), in whole
        seconds: a window is as fine as its buckets."""
        until = now if end is None else end
        # Now: up to the current (partial) second; a closed window: its last whole second.
        last = math.floor(until) if end is None else math.ceil(until) - 1
        first = last - max(1, math.ceil(window_s)) + 1
        # By the window's seconds, not every second kept: the rules read four times a second.
        kept = self._seconds
        buckets = [kept[second] for second in range(first, last + 1) if second in kept]
        if not buckets:
            return WindowStats(window_s)
        latency: Counter[int] = Counter()
        ttft: Counter[int] = Counter()
        for bucket in buckets:
            latency.update(bucket.latency)
            ttft.update(bucket.ttft)
        generating_s = sum(b.generating_s for b in buckets)
        return WindowStats(
            window_s=window_s,
            requests=sum(b.requests for b in buckets),
            errors=sum(b.errors for b in buckets),
            latency_p50_s=percentile(latency, 50),
            latency_p95_s=percentile(latency, 95),
            latency_p99_s=percentile(latency, 99),
            ttft_p50_s=percentile(ttft, 50),
            tokens_per_s=sum(b.output_tokens for b in buckets) / generating_s if generating_s > 0 else None,
        )
