"""Routing rules on request features.

Every rule whose `match` holds applies, in config order: `require_labels` /
`exclude_labels` narrow the candidates (an image request only to instances labelled for
images, say), `strategy` or `weights` change how the rest are scored. A strategy the
caller asked for explicitly still wins over a rule's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from clawdbot.common.config import RoutingRule, RuleMatch, StrategyWeights
from clawdbot.common.errors import GatewayError
from clawdbot.router.registry import Instance

_IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})
_AUDIO_PARTS = frozenset({"input_audio", "audio"})


@dataclass(frozen=True)
class Features:
    task: str
    model: str
    modality: str
    input_tokens: int
    device_type: str = ""
    api_key_id: str = ""
    protocol: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)


def modality_of(body: Mapping[str, Any]) -> str:
    """image | audio | text: the richest kind of content among the messages' parts."""
    found = "text"
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in _IMAGE_PARTS:
                return "image"
            if kind in _AUDIO_PARTS:
                found = "audio"
    return found


def matches(match: RuleMatch, f: Features) -> bool:
    checks = (
        (match.task, f.task),
        (match.model, f.model),
        (match.modality, f.modality),
        (match.device_type, f.device_type),
        (match.api_key_id, f.api_key_id),
        (match.protocol, f.protocol),
    )
    if any(allowed and value not in allowed for allowed, value in checks):
        return False
    if match.min_input_tokens is not None and f.input_tokens < match.min_input_tokens:
        return False
    if match.max_input_tokens is not None and f.input_tokens > match.max_input_tokens:
        return False
    return all(f.headers.get(name.lower()) == value for name, value in match.headers.items())


def _labelled(instance: Instance, labels: Mapping[str, str]) -> bool:
    """Label values may list several, comma-separated: modalities: "text,image"."""
    for key, wanted in labels.items():
        have = {v.strip() for v in instance.labels.get(key, "").split(",")}
        if wanted not in have:
            return False
    return True


@dataclass
class Routing:
    candidates: list[Instance]
    strategy: str | None = None
    weights: StrategyWeights | None = None
    applied: list[str] = field(default_factory=list)


def apply_rules(rules: tuple[RoutingRule, ...], features: Features, candidates: list[Instance]) -> Routing:
    routing = Routing(list(candidates))
    for rule in rules:
        if not matches(rule.match, features):
            continue
        kept = [
            i
            for i in routing.candidates
            if _labelled(i, rule.require_labels) and not (rule.exclude_labels and _labelled(i, rule.exclude_labels))
        ]
        if not kept:
            raise GatewayError.bad_request(
                f"Routing rule `{rule.name}` leaves no instance of `{features.model}` for this request "
                f"({features.modality}, about {features.input_tokens} input tokens).",
                "model",
                "no_matching_instance",
            )
        routing.candidates = kept
        if rule.strategy is not None:
            routing.strategy = rule.strategy
        if rule.weights is not None:
            routing.weights = rule.weights
        routing.applied.append(rule.name)
    return routing
