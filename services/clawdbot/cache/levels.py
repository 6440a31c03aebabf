"""What the tiered store needs of a level: L1 memory, L2 Redis and L3 objects all fit it.

A level never raises for its storage being unavailable: a read is a miss (None), a write
is refused (False). Corrupt values are dropped and reported, never returned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from clawdbot.cache.entry import Entry

# Called with the level name ("l2", "l3") for each corrupt value dropped.
OnCorrupt = Callable[[str], None]
# Called with True when a level comes back, False when it goes down; only on changes.
OnStateChange = Callable[[bool], None]
# Called with the reason ("size", "expired") for each entry L1 drops.
OnEvict = Callable[[str], None]


@runtime_checkable
class Level(Protocol):
    name: str

    @property
    def up(self) -> bool:
        """False while the level's storage is unreachable or unwritable."""
        ...

    async def get(self, key: str) -> Entry | None: ...

    async def put(self, key: str, entry: Entry) -> bool: ...

    async def delete(self, key: str) -> None: ...
