"""The registry of model instances: what the router can send a request to.

A model name maps to a group of one or more instances (several deployments of one
model); the alias `auto` maps to every instance of the requested task and lets the
strategy choose. A registry is immutable once built: a reload builds a new one beside
it and swaps (see server.py); live measurements live in stats.StatsStore.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass

from clawdbot.common.config import ModelEntry, Pricing

AUTO_ALIAS = "auto"


@dataclass(frozen=True)
class Instance:
    id: str
    name: str
    task: str  # the first of `tasks`
    tasks: tuple[str, ...]
    connector: str
    base_url: str
    upstream_model: str
    api_key: str | None
    pricing: Pricing
    quality: dict[str, float]
    timeout_s: float
    labels: dict[str, str]
    created: int
    version: str = ""
    context_length: int | None = None
    max_in_flight: int | None = None
    # The upstream serves OpenAI's Responses API too (ModelEntry.responses_api).
    responses_api: bool = False

    def quality_for(self, task: str) -> float | None:
        return self.quality.get(task)

    def expected_cost(self, input_tokens: int, output_tokens: int, audio_seconds: float = 0.0) -> float:
        tokens = (input_tokens * self.pricing.input_per_1k + output_tokens * self.pricing.output_per_1k) / 1000.0
        return tokens + audio_seconds * self.pricing.per_audio_second


class Registry:
    def __init__(self, entries: tuple[ModelEntry, ...], env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        self._by_name: dict[str, list[Instance]] = defaultdict(list)
        self._by_task: dict[str, list[Instance]] = defaultdict(list)
        created = int(time.time())
        counts: dict[str, int] = defaultdict(int)
        for entry in entries:
            # name@version when versioned: a new version is a new instance, measured afresh.
            base = f"{entry.name}@{entry.version}" if entry.version else entry.name
            counts[base] += 1
            instance_id = entry.instance or (base if counts[base] == 1 else f"{base}#{counts[base]}")
            instance = Instance(
                id=instance_id,
                name=entry.name,
                task=(entry.tasks or (entry.task,))[0],
                tasks=entry.tasks or (entry.task,),
                connector=entry.connector,
                base_url=entry.base_url,
                upstream_model=entry.upstream_model or entry.name,
                api_key=env.get(entry.api_key_env) if entry.api_key_env else None,
                pricing=entry.pricing,
                quality=dict(entry.quality),
                timeout_s=entry.timeout_s,
                labels=dict(entry.labels),
                created=created,
                version=entry.version,
                context_length=entry.context_length,
                max_in_flight=entry.max_in_flight,
                responses_api=entry.responses_api,
            )
            self._by_name[entry.name].append(instance)
            for task in instance.tasks:
                self._by_task[task].append(instance)

    def candidates(self, model: str, task: str) -> list[Instance]:
        """Instances that may serve `model` (or `model@version`) for `task`; empty when none."""
        if model == AUTO_ALIAS:
            return list(self._by_task.get(task, ()))
        name, _, version = model.partition("@")
        return [i for i in self._by_name.get(name, ()) if task in i.tasks and (not version or i.version == version)]

    def knows(self, model: str) -> bool:
        if model == AUTO_ALIAS:
            return True
        name, _, version = model.partition("@")
        return any(not version or i.version == version for i in self._by_name.get(name, ()))

    def model_names(self) -> list[tuple[str, str]]:
        """(name, task) for each distinct model name, in config order."""
        return [(name, group[0].task) for name, group in self._by_name.items()]

    def instances(self) -> list[Instance]:
        return [i for group in self._by_name.values() for i in group]
