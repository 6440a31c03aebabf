"""Ordering candidate instances by the configured strategy (first cut).

The rule, documented in README ("Routing"): each candidate gets
    score = w_latency * latency_term + w_accuracy * quality_term + w_cost * cost_term
with every term normalised to [0, 1] across the candidates (1 = best: fastest observed
moving-average latency, highest quality prior for the task, lowest expected price).
A candidate with no latency measurement yet gets the best observed latency, so a new
instance is tried rather than starved; an instance without a quality prior gets 0.5.
Candidates are tried best first; ties keep config order. The full scoring engine (time
to first token, feedback, exploration) is the router issue's work.
"""

from __future__ import annotations

from clawdbot.common.config import StrategyWeights
from clawdbot.router.registry import Instance

_DEFAULT_QUALITY = 0.5


def _normalise(values: list[float], higher_is_better: bool) -> list[float]:
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        return [1.0] * len(values)
    if higher_is_better:
        return [(v - lo) / (hi - lo) for v in values]
    return [(hi - v) / (hi - lo) for v in values]


def rank(candidates: list[Instance], task: str, weights: StrategyWeights, input_tokens: int) -> list[Instance]:
    if len(candidates) < 2:
        return list(candidates)
    observed = [c.stats.latency_ewma_s for c in candidates if c.stats.latency_ewma_s is not None]
    cold_latency = min(observed) if observed else 0.0
    latency = [c.stats.latency_ewma_s if c.stats.latency_ewma_s is not None else cold_latency for c in candidates]
    quality = [q if (q := c.quality_for(task)) is not None else _DEFAULT_QUALITY for c in candidates]
    # Output length is unknown before the call; assume it matches the input, which
    # keeps the comparison between candidates fair whatever the real length.
    cost = [c.expected_cost(input_tokens, input_tokens) for c in candidates]
    terms = zip(_normalise(latency, False), _normalise(quality, True), _normalise(cost, False), strict=True)
    scores = [weights.latency * lt + weights.accuracy * qt + weights.cost * ct for lt, qt, ct in terms]
    order = sorted(range(len(candidates)), key=lambda i: (-scores[i], i))
    return [candidates[i] for i in order]
