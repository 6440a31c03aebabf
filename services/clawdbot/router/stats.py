"""Live measurements per model instance, kept in-process from every call.

Keyed by instance id and kept outside the registry snapshot, so that a reload which keeps
an instance keeps what was learnt about it.
"""

from __future__ import annotations

from dataclasses import dataclass


def _ewma(previous: float | None, value: float, alpha: float) -> float:
    return value if previous is None else previous + alpha * (value - previous)


@dataclass
class InstanceStats:
    # Exponentially decayed moving averages; None until the first measurement.
    latency_s: float | None = None  # whole call
    ttft_s: float | None = None  # time to first token (streams)
    tpot_s: float | None = None  # time per output token after the first
    output_tokens: float | None = None
    in_flight: int = 0

    # Weight of the newest sample: about the last ten calls dominate.
    ALPHA = 0.2

    def record_success(self, latency_s: float, output_tokens: int | None = None, ttft_s: float | None = None) -> None:
        self.latency_s = _ewma(self.latency_s, latency_s, self.ALPHA)
        if output_tokens:
            self.output_tokens = _ewma(self.output_tokens, float(output_tokens), self.ALPHA)
        if ttft_s is not None:
            self.ttft_s = _ewma(self.ttft_s, ttft_s, self.ALPHA)
            if output_tokens and output_tokens > 1:
                per_token = max(0.0, latency_s - ttft_s) / (output_tokens - 1)
                self.tpot_s = _ewma(self.tpot_s, per_token, self.ALPHA)

    def expected_latency(self, output_tokens: float) -> float | None:
        """Seconds a call is expected to take, or None for an instance never measured."""
        if self.ttft_s is not None and self.tpot_s is not None:
            return self.ttft_s + self.tpot_s * max(0.0, output_tokens - 1)
        return self.latency_s


class StatsStore:
    def __init__(self) -> None:
        self._stats: dict[str, InstanceStats] = {}

    def get(self, instance_id: str) -> InstanceStats:
        stats = self._stats.get(instance_id)
        if stats is None:
            stats = self._stats[instance_id] = InstanceStats()
        return stats

    def drop(self, instance_id: str) -> None:
        """Forget an instance no snapshot has any more, once it has drained."""
        stats = self._stats.get(instance_id)
        if stats is not None and stats.in_flight == 0:
            del self._stats[instance_id]
