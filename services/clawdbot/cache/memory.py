"""L1: answers in process memory, least recently used first out, bounded by bytes.

Only the event loop touches it and no method awaits, so each call is atomic without a lock.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from clawdbot.cache.entry import Entry
from clawdbot.cache.levels import OnEvict

# What an entry costs besides its body: the dataclass, the dict slot, headers, attributes.
ENTRY_OVERHEAD_BYTES = 200


@dataclass(slots=True)
class _Slot:
    entry: Entry
    expires: float  # effective expiry, unix seconds; math.inf = never
    size: int


def entry_cost(key: str, entry: Entry) -> int:
    return len(entry.body) + ENTRY_OVERHEAD_BYTES + len(key)


class MemoryLevel:
    name = "l1"

    def __init__(
        self,
        max_bytes: int,
        ttl_s: float,
        on_evict: OnEvict | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`ttl_s` caps how long an entry stays (<= 0: no cap beyond the entry's own expiry)."""
        self.max_bytes = max_bytes
        self._ttl_s = ttl_s
        self._on_evict = on_evict
        self._clock = clock
        self._items: OrderedDict[str, _Slot] = OrderedDict()
        self._bytes = 0

    @property
    def up(self) -> bool:
        return True  # memory is always there

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    async def get(self, key: str) -> Entry | None:
        slot = self._items.get(key)
        if slot is None:
            return None
        if self._clock() >= slot.expires:
            self._drop(key, "expired")
            return None
        self._items.move_to_end(key)
        return slot.entry

    async def put(self, key: str, entry: Entry) -> bool:
        now = self._clock()
        size = entry_cost(key, entry)
        expires = self._expiry(entry, now)
        # The old value goes whatever happens: after a refused write it would be stale.
        self._remove(key)
        if size > self.max_bytes or now >= expires:
            return False
        while self._bytes + size > self.max_bytes:
            oldest, slot = next(iter(self._items.items()))
            self._drop(oldest, "expired" if now >= slot.expires else "size")
        self._items[key] = _Slot(entry, expires, size)
        self._bytes += size
        return True

    async def delete(self, key: str) -> None:
        self._remove(key)

    def purge_expired(self) -> int:
        """Drop every expired entry (a full scan, for a periodic job); the number dropped."""
        now = self._clock()
        expired = [key for key, slot in self._items.items() if now >= slot.expires]
        for key in expired:
            self._drop(key, "expired")
        return len(expired)

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0

    def _expiry(self, entry: Entry, now: float) -> float:
        expires = entry.expires_at or math.inf
        if self._ttl_s > 0:
            expires = min(expires, now + self._ttl_s)
        return expires

    def _remove(self, key: str) -> _Slot | None:
        slot = self._items.pop(key, None)
        if slot is not None:
            self._bytes -= slot.size
        return slot

    def _drop(self, key: str, reason: str) -> None:
        if self._remove(key) is not None and self._on_evict is not None:
            self._on_evict(reason)
