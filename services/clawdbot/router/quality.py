"""Accuracy estimates per instance and task: the configured prior, moved by feedback.

estimate = (prior * k + sum of scores) / (k + number of scores), where k
(`quality_prior_weight`) says how many ratings the prior is worth: early feedback nudges,
lasting feedback decides.

Feedback moves routing for every caller, so each answer may be rated once, and only by
the key that asked for it, within `window_s` of being given. Anything else is refused
without telling whether the request exists: another key's request is as unknown as one
that never was.
"""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from clawdbot.common.errors import GatewayError

# Instances without a configured prior start in the middle.
DEFAULT_PRIOR = 0.5


@dataclass
class _Ratings:
    total: float = 0.0
    count: int = 0


class _Answer:
    __slots__ = ("api_key_id", "at", "instance_id", "rated", "task")

    def __init__(self, instance_id: str, task: str, api_key_id: str, at: float) -> None:
        self.instance_id = instance_id
        self.task = task
        self.api_key_id = api_key_id
        self.at = at
        self.rated = False


def _not_found(request_id: str) -> GatewayError:
    return GatewayError(
        404,
        f"No recent answer has request id `{request_id}`.",
        "invalid_request_error",
        "request_not_found",
        "request_id",
    )


class QualityBook:
    def __init__(
        self,
        prior_weight: float,
        remember: int = 100_000,
        window_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._prior_weight = prior_weight
        self._ratings: dict[tuple[str, str], _Ratings] = {}
        # request id -> recent answer, oldest first (insertion order is answer order, so
        # expiry only ever looks at the front), bounded in entries and in age.
        self._answered: OrderedDict[str, _Answer] = OrderedDict()
        self._remember = remember
        self._window_s = window_s
        self._clock = clock

    def estimate(self, instance_id: str, task: str, prior: float | None) -> float:
        base = DEFAULT_PRIOR if prior is None else prior
        ratings = self._ratings.get((instance_id, task))
        if ratings is None or ratings.count == 0:
            return base
        return (base * self._prior_weight + ratings.total) / (self._prior_weight + ratings.count)

    def _expire(self, now: float) -> None:
        oldest = now - self._window_s
        answered = self._answered
        while answered:
            first = next(iter(answered.values()))
            if first.at > oldest and len(answered) <= self._remember:
                return
            answered.popitem(last=False)

    def answered(self, request_id: str, instance_id: str, task: str, api_key_id: str = "") -> None:
        if not request_id:
            return
        now = self._clock()
        previous = self._answered.get(request_id)
        if previous is not None and previous.api_key_id != api_key_id:
            # Request ids can come from the client (x-request-id): a key must not take
            # over another key's answer by reusing its id.
            return
        if previous is not None:
            del self._answered[request_id]  # re-inserted last: it is the newest answer now
        self._answered[request_id] = _Answer(instance_id, task, api_key_id, now)
        self._expire(now)

    def rate(self, request_id: str, score: float, api_key_id: str = "") -> tuple[str, str]:
        """Record a score for the answer to request_id, given to `api_key_id`; the
        (instance, task) it counted for. 404 when unknown, expired or another key's;
        409 when rated already."""
        if not 0.0 <= score <= 1.0:
            raise GatewayError.bad_request("'score' must be between 0 and 1.", "score", "invalid_value")
        self._expire(self._clock())
        found = self._answered.get(request_id)
        if found is None or not hmac.compare_digest(found.api_key_id.encode(), api_key_id.encode()):
            raise _not_found(request_id)
        if found.rated:
            raise GatewayError(
                409,
                f"The answer to request `{request_id}` has been rated already; each answer counts once.",
                "invalid_request_error",
                "feedback_already_given",
                "request_id",
            )
        found.rated = True
        target = (found.instance_id, found.task)
        ratings = self._ratings.setdefault(target, _Ratings())
        ratings.total += score
        ratings.count += 1
        return target
