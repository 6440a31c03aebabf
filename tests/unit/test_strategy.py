from clawdbot.common.config import ModelEntry, StrategyWeights
from clawdbot.router.registry import AUTO_ALIAS, Registry
from clawdbot.router.strategy import rank


def registry() -> Registry:
    return Registry(
        (
            ModelEntry(
                name="fast",
                base_url="http://a",
                pricing={"input_per_1k": 1.0, "output_per_1k": 1.0},
                quality={"chat": 0.5},
            ),
            ModelEntry(name="cheap", base_url="http://b", quality={"chat": 0.4}),
            ModelEntry(
                name="smart",
                base_url="http://c",
                pricing={"input_per_1k": 5.0, "output_per_1k": 5.0},
                quality={"chat": 0.9},
            ),
            ModelEntry(name="embed", task="embeddings", base_url="http://d"),
        ),
        env={},
    )


def test_auto_covers_the_task_only() -> None:
    reg = registry()
    assert [i.name for i in reg.candidates(AUTO_ALIAS, "chat")] == ["fast", "cheap", "smart"]
    assert [i.name for i in reg.candidates(AUTO_ALIAS, "embeddings")] == ["embed"]
    assert reg.candidates("embed", "chat") == []
    assert not reg.knows("nope")


def test_weights_decide_the_order() -> None:
    reg = registry()
    by_name = {i.name: i for i in reg.instances()}
    by_name["fast"].stats.observe(0.05, ok=True)
    by_name["cheap"].stats.observe(0.50, ok=True)
    by_name["smart"].stats.observe(1.00, ok=True)
    candidates = reg.candidates(AUTO_ALIAS, "chat")
    assert rank(candidates, "chat", StrategyWeights(latency=1), 100)[0].name == "fast"
    assert rank(candidates, "chat", StrategyWeights(accuracy=1), 100)[0].name == "smart"
    assert rank(candidates, "chat", StrategyWeights(cost=1), 100)[0].name == "cheap"


def test_cold_instance_is_tried_not_starved() -> None:
    reg = registry()
    by_name = {i.name: i for i in reg.instances()}
    by_name["fast"].stats.observe(0.5, ok=True)  # "cheap" and "smart" have no measurement
    ranked = rank(reg.candidates(AUTO_ALIAS, "chat"), "chat", StrategyWeights(latency=1), 10)
    assert ranked[0].name == "fast"  # ties keep config order; the cold ones share the best latency
    assert {i.name for i in ranked} == {"fast", "cheap", "smart"}


def test_group_of_instances() -> None:
    reg = Registry((ModelEntry(name="g", base_url="http://a"), ModelEntry(name="g", base_url="http://b")), env={})
    assert [i.id for i in reg.candidates("g", "chat")] == ["g", "g#2"]
