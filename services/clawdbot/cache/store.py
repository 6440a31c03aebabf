"""Three levels read as one: L1 memory, L2 Redis, L3 object storage.

Reads go down the levels and a hit fills the levels above it. Writes go through every
level. A value larger than `large_value_bytes` stays out of memory and goes to L3, with a
pointer in L2 so that other cache instances find it there. A level that is down (Redis
stopped, a directory unwritable) reads as a miss and is skipped on writes; the levels
themselves notice when it is back.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Final

from clawdbot.cache.entry import Entry
from clawdbot.cache.levels import Level
from clawdbot.cache.memory import MemoryLevel
from clawdbot.cache.metrics import CacheMetrics
from clawdbot.cache.redis_level import RedisLevel

# An L2 entry with this attribute holds no value: the value is in L3 under the same key.
IN_L3: Final = "clawdbot.in_l3"


class TieredStore:
    def __init__(
        self,
        l1: MemoryLevel,
        l2: RedisLevel | None,
        l3: Level | None,
        large_value_bytes: int,
        metrics: CacheMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.l1, self.l2, self.l3 = l1, l2, l3
        self.levels: list[Level] = [level for level in (l1, l2, l3) if level is not None]
        self._large = large_value_bytes
        self._metrics = metrics
        self._clock = clock
        # By level name, for the Stats RPC (the metrics say the same to Prometheus).
        self.hits: Counter[str] = Counter()
        self.misses: Counter[str] = Counter()

    async def get(self, key: str, max_age_s: float = 0) -> tuple[Entry, str] | None:
        """The entry and the level it came from; None when no level has a fresh one."""
        for depth, level in enumerate(self.levels):
            entry = await level.get(key)
            if entry is not None and entry.attributes.get(IN_L3):
                entry = await self.l3.get(key) if self.l3 is not None else None
            if entry is None or (max_age_s and entry.age(self._clock()) > max_age_s):
                # An entry older than the caller accepts is a miss; lower levels are no newer.
                self._metrics.lookups.labels(level.name, "miss").inc()
                self.misses[level.name] += 1
                if entry is not None:
                    return None
                continue
            self._metrics.lookups.labels(level.name, "hit").inc()
            self.hits[level.name] += 1
            for upper in self.levels[:depth]:
                await self._put_one(upper, key, entry)
            return entry, level.name
        return None

    async def put(self, key: str, entry: Entry) -> list[str]:
        """Write through every level that takes it; the names of those that stored it."""
        # L3 first: an L2 pointer must never point at nothing.
        stored = []
        for level in reversed(self.levels):
            if await self._put_one(level, key, entry):
                stored.append(level.name)
        return stored[::-1]

    async def _put_one(self, level: Level, key: str, entry: Entry) -> bool:
        large = len(entry.body) > self._large
        if large and level is self.l1:
            return False  # memory is for many small answers, not a few big ones
        value = entry
        if large and level is self.l2 and self.l3 is not None:
            value = replace(entry, body=b"", attributes={**entry.attributes, IN_L3: "1"})
        ok = await level.put(key, value)
        self._metrics.stores.labels(level.name, "stored" if ok else "skipped").inc()
        if ok:
            self._metrics.bytes_stored.labels(level.name).inc(len(value.body))
        if level is self.l1:
            self._metrics.memory_bytes.set(self.l1.bytes_used)
        return ok

    async def delete(self, key: str) -> None:
        for level in self.levels:
            await level.delete(key)
