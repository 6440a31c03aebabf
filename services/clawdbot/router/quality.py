"""Accuracy estimates per instance and task: the configured prior, moved by feedback.

estimate = (prior * k + sum of scores) / (k + number of scores), where k
(`quality_prior_weight`) says how many ratings the prior is worth: early feedback nudges,
lasting feedback decides.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from clawdbot.common.errors import GatewayError

# Instances without a configured prior start in the middle.
DEFAULT_PRIOR = 0.5


@dataclass
class _Ratings:
    total: float = 0.0
    count: int = 0


class QualityBook:
    def __init__(self, prior_weight: float, remember: int = 100_000) -> None:
        self._prior_weight = prior_weight
        self._ratings: dict[tuple[str, str], _Ratings] = {}
        # request id -> (instance, task) of recent answers, so feedback can find them.
        self._answered: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._remember = remember

    def estimate(self, instance_id: str, task: str, prior: float | None) -> float:
        base = DEFAULT_PRIOR if prior is None else prior
        ratings = self._ratings.get((instance_id, task))
        if ratings is None or ratings.count == 0:
            return base
        return (base * self._prior_weight + ratings.total) / (self._prior_weight + ratings.count)

    def answered(self, request_id: str, instance_id: str, task: str) -> None:
        if not request_id:
            return
        self._answered[request_id] = (instance_id, task)
        if len(self._answered) > self._remember:
            self._answered.popitem(last=False)

    def rate(self, request_id: str, score: float) -> tuple[str, str]:
        """Record a score for the answer to request_id; (instance, task) it counted for."""
        if not 0.0 <= score <= 1.0:
            raise GatewayError.bad_request("'score' must be between 0 and 1.", "score", "invalid_value")
        found = self._answered.get(request_id)
        if found is None:
            raise GatewayError(
                404,
                f"No recent answer has request id `{request_id}`.",
                "invalid_request_error",
                "request_not_found",
                "request_id",
            )
        ratings = self._ratings.setdefault(found, _Ratings())
        ratings.total += score
        ratings.count += 1
        return found
