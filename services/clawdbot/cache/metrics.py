"""The cache service's own instruments, on its service registry."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from clawdbot.common.metrics import Metrics


class CacheMetrics:
    def __init__(self, metrics: Metrics) -> None:
        registry = metrics.registry
        self.lookups = Counter(
            "clawdbot_cache_lookups",
            "Reads of one cache level, by result (hit or miss).",
            ["level", "result"],
            registry=registry,
        )
        self.stores = Counter(
            "clawdbot_cache_stores", "Entries written, by level and outcome.", ["level", "outcome"], registry=registry
        )
        self.bytes_stored = Counter(
            "clawdbot_cache_stored_bytes", "Bytes of values written, by level.", ["level"], registry=registry
        )
        self.evictions = Counter(
            "clawdbot_cache_evictions",
            "Entries dropped from memory, by reason.",
            ["level", "reason"],
            registry=registry,
        )
        self.corrupt = Counter(
            "clawdbot_cache_corrupt_entries",
            "Entries that failed their checksum or framing: dropped, never served.",
            ["level"],
            registry=registry,
        )
        self.level_up = Gauge(
            "clawdbot_cache_level_up", "1 while a level is reachable and writable.", ["level"], registry=registry
        )
        self.memory_bytes = Gauge("clawdbot_cache_memory_bytes", "Bytes held by L1.", registry=registry)
        self.coalesced = Counter(
            "clawdbot_cache_coalesced",
            "Reads that waited for an identical request's answer instead of reaching a model.",
            registry=registry,
        )
