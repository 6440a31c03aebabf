"""Multi-objective scoring of candidate instances, and the choice among the best.

For one request, every candidate gets three raw estimates:
  latency   expected seconds: time to first token + time per output token * expected
            output tokens when streams were measured, else the moving average of whole
            calls; an instance never measured gets the cold prior (the configured
            `cold_latency_s`, else the median of the measured candidates);
  cost      expected USD: input tokens * input price + expected output tokens * output
            price (expected output: the request's max_tokens, else what this instance
            usually answers with, else `default_output_tokens`);
  accuracy  the quality estimate for the task (prior moved by feedback).
Each is normalised across the candidates relative to the best one, into (0, 1] with 1 =
best: latency and cost as best/value (twice as slow or dear scores 0.5), accuracy as
value/best. Ratios rather than min-max, so one outlier (a very dear model) does not
squash the differences among the rest. The score is the strategy's weighted mean, less the
health service's penalty for an instance that behaves anomalously. Ineligible candidates
(breaker open, marked unavailable by the health service, at the in-flight limit, context
too short) are scored for the explanation but not chosen; if the health service's verdicts
would leave none, they are set aside (router/health_view.py).

The choice: among the best `top_k` eligible, power of two choices (the one with fewer
requests in flight, relative to its limit; ties to the higher score); with probability
`exploration`, a random other eligible candidate instead, so cold instances get
measured and none is herded. The rest follow in score order, as fallbacks.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from clawdbot.common.config import ModelRouterConfig, StrategyWeights
from clawdbot.router.breaker import CircuitBreaker
from clawdbot.router.health_view import Verdict
from clawdbot.router.prometheus_feed import FleetView
from clawdbot.router.quality import QualityBook
from clawdbot.router.registry import Instance
from clawdbot.router.stats import StatsStore

# Used when no candidate has been measured yet and no cold prior is configured: any
# value works, since equal latencies normalise to the same term.
_UNMEASURED_LATENCY_S = 1.0


@dataclass
class Terms:
    latency: float = 0.0
    accuracy: float = 0.0
    cost: float = 0.0


@dataclass
class Candidate:
    instance: Instance
    eligible: bool
    reason: str
    latency_s: float
    cost_usd: float
    quality: float
    cold: bool
    breaker: str
    in_flight: int
    latency_source: str = "local"
    qps: float = 0.0
    health: str = "available"
    penalty: float = 0.0
    terms: Terms = field(default_factory=Terms)
    score: float = 0.0


@dataclass(frozen=True)
class RequestShape:
    task: str
    input_tokens: int
    max_tokens: int | None = None


def _smaller_is_better(values: list[float], floor: float) -> list[float]:
    # The offset keeps free (0 USD) or instant candidates from making every other term 0;
    # 1% of the largest value keeps it negligible against real differences.
    offset = max(floor, 0.01 * max(values))
    best = min(values)
    return [(best + offset) / (v + offset) for v in values]


def _larger_is_better(values: list[float]) -> list[float]:
    best = max(values)
    return [v / best if best > 0 else 1.0 for v in values]


class Scorer:
    def __init__(
        self,
        config: ModelRouterConfig,
        stats: StatsStore,
        quality: QualityBook,
        breakers: dict[str, CircuitBreaker],
        rng: random.Random | None = None,
        fleet: Callable[[], FleetView] | None = None,
        health: Callable[[], dict[str, Verdict]] | None = None,
    ) -> None:
        self._config = config
        self._stats = stats
        self._quality = quality
        self._breakers = breakers
        self._rng = rng or random.Random()
        self._fleet = fleet
        self._health = health

    def _expected_output(self, instance: Instance, shape: RequestShape) -> float:
        if shape.max_tokens:
            return float(shape.max_tokens)
        usual = self._stats.get(instance.id).output_tokens
        return usual if usual is not None else float(self._config.default_output_tokens)

    def score(self, instances: list[Instance], shape: RequestShape, weights: StrategyWeights) -> list[Candidate]:
        """Every candidate with its estimates, terms and score; best first."""
        if not instances:
            return []
        outputs = [self._expected_output(i, shape) for i in instances]
        fleet = self._fleet() if self._fleet else FleetView({}, {})
        measured: list[float | None] = []
        sources: list[str] = []
        for instance, output in zip(instances, outputs, strict=True):
            local = self._stats.get(instance.id).expected_latency(output)
            shared = fleet.latency_s.get(instance.id)
            measured.append(local if local is not None else shared)
            sources.append("local" if local is not None else "prometheus" if shared is not None else "prior")
        known = [m for m in measured if m is not None]
        cold_latency = self._config.cold_latency_s or (statistics.median(known) if known else _UNMEASURED_LATENCY_S)
        verdicts = self._health() if self._health else {}
        candidates = []
        for instance, output, latency, source in zip(instances, outputs, measured, sources, strict=True):
            stats = self._stats.get(instance.id)
            breaker = self._breakers[instance.id]
            verdict = verdicts.get(instance.id)
            eligible, reason = True, ""
            if not breaker.allows():
                eligible, reason = False, f"circuit breaker {breaker.status()}"
            elif verdict is not None and verdict.excluded:
                eligible, reason = False, f"health: {verdict.status} ({verdict.reason})"
            elif instance.max_in_flight is not None and stats.in_flight >= instance.max_in_flight:
                eligible, reason = False, f"at its in-flight limit ({instance.max_in_flight})"
            elif instance.context_length is not None and shape.input_tokens + output > instance.context_length:
                eligible, reason = False, f"context of {instance.context_length} tokens is too short"
            candidates.append(
                Candidate(
                    instance=instance,
                    eligible=eligible,
                    reason=reason,
                    latency_s=latency if latency is not None else cold_latency,
                    cost_usd=instance.expected_cost(shape.input_tokens, int(output)),
                    quality=self._quality.estimate(instance.id, shape.task, instance.quality_for(shape.task)),
                    cold=latency is None,
                    breaker=breaker.status(),
                    in_flight=stats.in_flight,
                    latency_source=source,
                    qps=fleet.qps.get(instance.id, 0.0),
                    health=verdict.status if verdict else "available",
                    penalty=verdict.penalty if verdict else 0.0,
                )
            )
        if not any(c.eligible for c in candidates):
            # Panic: every instance is out by the health service's word (or for other
            # reasons too); those out only by its word are tried rather than none.
            for c in candidates:
                if c.reason.startswith("health: "):
                    c.eligible, c.reason = True, ""
        total = (weights.latency + weights.accuracy + weights.cost) or 1.0
        latency_terms = _smaller_is_better([c.latency_s for c in candidates], floor=self._config.latency_resolution_s)
        accuracy_terms = _larger_is_better([c.quality for c in candidates])
        cost_terms = _smaller_is_better([c.cost_usd for c in candidates], floor=1e-9)
        for c, lt, at, ct in zip(candidates, latency_terms, accuracy_terms, cost_terms, strict=True):
            c.terms = Terms(latency=lt, accuracy=at, cost=ct)
            c.score = (weights.latency * lt + weights.accuracy * at + weights.cost * ct) / total * (1 - c.penalty)
        # Stable sort: equal scores keep config order.
        return sorted(candidates, key=lambda c: (not c.eligible, -c.score))

    def _load(self, candidate: Candidate) -> float:
        limit = candidate.instance.max_in_flight
        return candidate.in_flight / limit if limit else float(candidate.in_flight)

    def order(self, ranked: list[Candidate]) -> list[Candidate]:
        """The eligible candidates in the order to try them: the choice first."""
        eligible = [c for c in ranked if c.eligible]
        if len(eligible) < 2:
            return eligible
        if self._config.exploration > 0 and self._rng.random() < self._config.exploration:
            chosen = self._rng.choice(eligible[1:])
        else:
            best = eligible[: self._config.top_k]
            if len(best) >= 2:
                a, b = self._rng.sample(best, 2)
                chosen = min((a, b), key=lambda c: (self._load(c), -c.score))
            else:
                chosen = best[0]
        return [chosen, *(c for c in eligible if c is not chosen)]


def explain_choice(ranked: list[Candidate], chosen: Candidate | None, weights: StrategyWeights) -> str:
    if chosen is None:
        reasons = "; ".join(f"{c.instance.id}: {c.reason}" for c in ranked) or "no instance serves it"
        return f"No instance can take the request now ({reasons})."
    parts = []
    for name, weight in (("latency", weights.latency), ("accuracy", weights.accuracy), ("cost", weights.cost)):
        if weight > 0:
            parts.append(f"{name} {getattr(chosen.terms, name):.2f}*{weight:g}")
    runner_up = next((c for c in ranked if c.eligible and c is not chosen), None)
    why = f"{chosen.instance.id} scores {chosen.score:.3f} ({', '.join(parts)})"
    if runner_up is not None:
        why += f" against {runner_up.instance.id} at {runner_up.score:.3f}"
    if chosen.cold:
        why += "; it has not been measured yet, so its latency is the cold prior"
    return why + "."
