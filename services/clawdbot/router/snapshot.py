"""One immutable view of what the router routes to: registry, routing config, scorer.

Replaced whole on reload (see reload.py); a request keeps the snapshot it started with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from clawdbot.common.config import Config, ModelRouterConfig
from clawdbot.router.breaker import CircuitBreaker
from clawdbot.router.registry import Registry
from clawdbot.router.scoring import Scorer


@dataclass(frozen=True)
class Snapshot:
    registry: Registry
    routing: ModelRouterConfig
    scorer: Scorer
    version: int


class SnapshotOwner(Protocol):
    """What a reload needs from whoever serves the live snapshot."""

    snapshot: Snapshot

    def build_snapshot(self, config: Config) -> Snapshot: ...

    def breaker(self, instance_id: str) -> CircuitBreaker: ...

    def in_flight(self, instance_id: str) -> int: ...

    def forget(self, instance_ids: set[str]) -> None: ...
