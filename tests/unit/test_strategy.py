"""Scoring: three candidates rank as each strategy's weights say, and the explanation agrees."""

import random

import pytest

from clawdbot.common.config import ModelEntry, ModelRouterConfig
from clawdbot.router.breaker import CircuitBreaker
from clawdbot.router.quality import QualityBook
from clawdbot.router.registry import AUTO_ALIAS, Registry
from clawdbot.router.scoring import RequestShape, Scorer, explain_choice
from clawdbot.router.stats import StatsStore

CONFIG = ModelRouterConfig(exploration=0.0, top_k=1)
SHAPE = RequestShape("chat", input_tokens=200, max_tokens=100)


def setup() -> tuple[Registry, StatsStore, QualityBook, Scorer]:
    registry = Registry(
        (
            ModelEntry(
                name="fast-expensive",
                base_url="http://a",
                quality={"chat": 0.5},
                pricing={"input_per_1k": 10.0, "output_per_1k": 30.0},
            ),
            ModelEntry(
                name="slow-cheap",
                base_url="http://b",
                quality={"chat": 0.7},
                pricing={"input_per_1k": 0.1, "output_per_1k": 0.2},
            ),
            ModelEntry(
                name="accurate-mid",
                base_url="http://c",
                quality={"chat": 0.95},
                pricing={"input_per_1k": 4.0, "output_per_1k": 12.0},
            ),
            ModelEntry(name="embed", task="embeddings", base_url="http://d"),
        ),
        env={},
    )
    stats, quality = StatsStore(), QualityBook(CONFIG.quality_prior_weight)
    breakers = {i.id: CircuitBreaker(CONFIG.breaker) for i in registry.instances()}
    for name, latency in (("fast-expensive", 0.05), ("slow-cheap", 2.0), ("accurate-mid", 1.5)):
        stats.get(name).record_success(latency, 100)
    return registry, stats, quality, Scorer(CONFIG, stats, quality, breakers, random.Random(7))


def test_auto_covers_the_task_only() -> None:
    registry, *_ = setup()
    assert [i.name for i in registry.candidates(AUTO_ALIAS, "chat")] == ["fast-expensive", "slow-cheap", "accurate-mid"]
    assert [i.name for i in registry.candidates(AUTO_ALIAS, "embeddings")] == ["embed"]
    assert registry.candidates("embed", "chat") == []
    assert not registry.knows("nope")


def test_each_strategy_ranks_as_its_weights_say() -> None:
    registry, _, _, scorer = setup()
    candidates = registry.candidates(AUTO_ALIAS, "chat")
    expected = {"performance_first": "fast-expensive", "cost_optimized": "slow-cheap", "quality_first": "accurate-mid"}
    for strategy, winner in expected.items():
        weights = CONFIG.weights(strategy)
        ranked = scorer.score(candidates, SHAPE, weights)
        assert ranked[0].instance.name == winner, (strategy, [(c.instance.id, c.score) for c in ranked])
        assert scorer.order(ranked)[0].instance.name == winner
        why = explain_choice(ranked, ranked[0], weights)
        assert why.startswith(f"{winner} scores {ranked[0].score:.3f}")
        assert ranked[1].instance.id in why
        assert all(0.0 < t <= 1.0 for c in ranked for t in (c.terms.latency, c.terms.cost, c.terms.accuracy))


def test_cold_instance_gets_the_median_prior() -> None:
    registry, _, _, scorer = setup()
    new = Registry(
        (
            *[ModelEntry(name=i.name, base_url=i.base_url) for i in registry.instances()],
            ModelEntry(name="newcomer", base_url="http://e"),
        ),
        env={},
    )
    scorer._breakers["newcomer"] = CircuitBreaker(CONFIG.breaker)
    ranked = scorer.score(new.candidates(AUTO_ALIAS, "chat"), SHAPE, CONFIG.weights("performance_first"))
    cold = next(c for c in ranked if c.instance.name == "newcomer")
    assert cold.cold and cold.latency_s == 1.5  # median of 0.05, 1.5, 2.0: neither starved nor flooded


def test_feedback_moves_accuracy_and_the_choice() -> None:
    registry, _, quality, scorer = setup()
    candidates = registry.candidates(AUTO_ALIAS, "chat")
    weights = CONFIG.weights("quality_first")
    assert scorer.score(candidates, SHAPE, weights)[0].instance.name == "accurate-mid"
    for n in range(40):
        quality.answered(f"r{n}", "accurate-mid", "chat")
        quality.rate(f"r{n}", 0.0)
        quality.answered(f"s{n}", "fast-expensive", "chat")
        quality.rate(f"s{n}", 1.0)
    assert quality.estimate("accurate-mid", "chat", 0.95) < 0.5
    assert scorer.score(candidates, SHAPE, weights)[0].instance.name == "fast-expensive"


def test_open_breaker_and_in_flight_limit_make_ineligible() -> None:
    registry, _, _, scorer = setup()
    candidates = registry.candidates(AUTO_ALIAS, "chat")
    breaker = scorer._breakers["fast-expensive"]
    for _ in range(CONFIG.breaker.consecutive_failures):
        breaker.record_failure()
    ranked = scorer.score(candidates, SHAPE, CONFIG.weights("performance_first"))
    blocked = next(c for c in ranked if c.instance.name == "fast-expensive")
    assert not blocked.eligible and "breaker open" in blocked.reason
    assert ranked[-1] is blocked
    assert scorer.order(ranked)[0].instance.name != "fast-expensive"


def test_power_of_two_prefers_the_less_loaded_of_the_best() -> None:
    registry, stats, _, _ = setup()
    config = ModelRouterConfig(exploration=0.0, top_k=2)
    breakers = {i.id: CircuitBreaker(config.breaker) for i in registry.instances()}
    scorer = Scorer(config, stats, QualityBook(10), breakers, random.Random(1))
    stats.get("fast-expensive").in_flight = 50
    ranked = scorer.score(registry.candidates(AUTO_ALIAS, "chat"), SHAPE, config.weights("performance_first"))
    assert ranked[0].instance.name == "fast-expensive"
    assert scorer.order(ranked)[0].instance.name == ranked[1].instance.name


def test_group_of_instances() -> None:
    reg = Registry((ModelEntry(name="g", base_url="http://a"), ModelEntry(name="g", base_url="http://b")), env={})
    assert [i.id for i in reg.candidates("g", "chat")] == ["g", "g#2"]


def test_one_deployment_serving_several_tasks_and_audio_pricing() -> None:
    reg = Registry(
        (
            ModelEntry(name="multi", tasks=("chat", "embeddings"), base_url="http://a"),
            ModelEntry(name="asr", task="transcription", base_url="http://b", pricing={"per_audio_second": 0.0001}),
        ),
        env={},
    )
    assert [i.name for i in reg.candidates("multi", "embeddings")] == ["multi"]
    assert [i.name for i in reg.candidates(AUTO_ALIAS, "chat")] == ["multi"]
    assert reg.candidates("asr", "chat") == []
    asr = reg.candidates("asr", "transcription")[0]
    assert asr.expected_cost(0, 0, audio_seconds=60) == pytest.approx(0.006)
