import pytest

from clawdbot.common.config import ModelEntry, ModelRouterConfig, RoutingRule
from clawdbot.common.errors import GatewayError
from clawdbot.router.registry import AUTO_ALIAS, Registry
from clawdbot.router.rules import Features, apply_rules, matches, modality_of

REGISTRY = Registry(
    (
        ModelEntry(name="text-small", base_url="http://a", labels={"modalities": "text", "context": "short"}),
        ModelEntry(name="vision", base_url="http://b", labels={"modalities": "text,image", "context": "long"}),
        ModelEntry(name="long", base_url="http://c", labels={"modalities": "text", "context": "long"}),
    ),
    env={},
)
RULES = ModelRouterConfig.model_validate(
    {
        "rules": [
            {"name": "images", "match": {"modality": "image"}, "require_labels": {"modalities": "image"}},
            {"name": "long-context", "match": {"min_input_tokens": 8000}, "require_labels": {"context": "long"}},
            {"name": "mobile-fast", "match": {"device_type": ["browser-mobile"]}, "strategy": "performance_first"},
            {
                "name": "premium",
                "match": {"headers": {"x-tier": "premium"}},
                "weights": {"latency": 0, "accuracy": 1, "cost": 0},
            },
        ]
    }
).rules


def features(**kw: object) -> Features:
    base: dict[str, object] = {"task": "chat", "model": AUTO_ALIAS, "modality": "text", "input_tokens": 100}
    return Features(**{**base, **kw})  # type: ignore[arg-type]


def names(routing_candidates: list) -> list[str]:
    return [i.name for i in routing_candidates]


def test_modality_from_content_parts() -> None:
    assert modality_of({"messages": [{"role": "user", "content": "hi"}]}) == "text"
    image = {"type": "image_url", "image_url": {"url": "data:..."}}
    assert modality_of({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, image]}]}) == "image"
    assert modality_of({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}) == "audio"


def test_image_and_long_requests_go_only_where_declared() -> None:
    candidates = REGISTRY.candidates(AUTO_ALIAS, "chat")
    assert names(apply_rules(RULES, features(), candidates).candidates) == ["text-small", "vision", "long"]
    routed = apply_rules(RULES, features(modality="image"), candidates)
    assert names(routed.candidates) == ["vision"] and routed.applied == ["images"]
    routed = apply_rules(RULES, features(input_tokens=9000), candidates)
    assert names(routed.candidates) == ["vision", "long"]


def test_rules_change_strategy_and_weights() -> None:
    candidates = REGISTRY.candidates(AUTO_ALIAS, "chat")
    assert apply_rules(RULES, features(device_type="browser-mobile"), candidates).strategy == "performance_first"
    routed = apply_rules(RULES, features(headers={"x-tier": "premium"}), candidates)
    assert routed.weights is not None and routed.weights.accuracy == 1


def test_nothing_left_is_a_clear_error() -> None:
    only_text = REGISTRY.candidates("text-small", "chat")
    with pytest.raises(GatewayError) as info:
        apply_rules(RULES, features(model="text-small", modality="image"), only_text)
    assert info.value.code == "no_matching_instance" and "images" in info.value.message


def test_match_needs_every_feature() -> None:
    rule = RoutingRule.model_validate({"name": "r", "match": {"task": "chat", "protocol": ["ws", "grpc"]}})
    assert matches(rule.match, features(protocol="ws"))
    assert not matches(rule.match, features(protocol="rest"))


def test_rule_with_unknown_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="rule 'x': strategy 'nope'"):
        ModelRouterConfig.model_validate({"rules": [{"name": "x", "strategy": "nope"}]})
