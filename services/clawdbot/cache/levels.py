"""What the tiered store needs of a level: L1 memory, L2 Redis and L3 objects all fit it.

A level never raises for its storage being unavailable: a read is a miss (None), a write
is refused (False). Corrupt values are dropped and reported, never returned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from clawdbot.cache.entry import Entry

log = logging.getLogger(__name__)

# Called with the level name ("l2", "l3") for each corrupt value dropped.
OnCorrupt = Callable[[str], None]


def report_corrupt(level: str, key: str, reason: str, on_corrupt: OnCorrupt | None) -> None:
    """A corrupt value was dropped: logged, and counted by whoever listens."""
    log.warning("dropping a corrupt cache entry", extra={"cache_level": level, "key": key, "error": reason})
    if on_corrupt is not None:
        on_corrupt(level)


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


class Availability:
    """Up or down, for a level whose storage can go away (Redis, a directory, a bucket).

    Going down logs one warning and calls on_state_change(False); while down, calls are
    skipped without touching the storage until retry_after_s has passed; then one call at
    a time probes, and the first that succeeds logs one line and calls on_state_change(True).
    """

    def __init__(
        self,
        level: str,
        storage: str,
        retry_after_s: float,
        on_state_change: OnStateChange | None,
        monotonic: Callable[[], float],
        **where: str,
    ) -> None:
        self.up = True
        self._level = level
        self._storage = storage  # "redis", "object storage", ...: what the log lines name
        self._retry_after_s = retry_after_s
        self._on_state_change = on_state_change
        self._monotonic = monotonic
        self._where = where
        self._retry_at = 0.0
        self._probing = False

    def begin(self, force: bool = False) -> bool | None:
        """None: skip this call (down, and not its turn to probe); else whether it probes.
        `force` probes before retry_after_s is up (health checks, start-up)."""
        if self.up:
            return False
        if self._probing or (not force and self._monotonic() < self._retry_at):
            return None
        self._probing = True
        return True

    def end(self, probing: bool | None) -> None:
        if probing:
            self._probing = False

    def down(self, op: str, exc: BaseException) -> None:
        self._retry_at = self._monotonic() + self._retry_after_s
        context = {"cache_level": self._level, "op": op, "error": repr(exc), **self._where}
        if not self.up:
            log.debug(f"{self._storage} still unavailable", extra=context)
            return
        self.up = False
        log.warning(
            f"{self._storage} unavailable; the cache bypasses it",
            extra={**context, "retry_after_s": self._retry_after_s},
        )
        if self._on_state_change is not None:
            self._on_state_change(False)

    def back(self) -> None:
        if self.up:
            return
        self.up = True
        log.info(f"{self._storage} is back; the cache uses it again", extra={"cache_level": self._level, **self._where})
        if self._on_state_change is not None:
            self._on_state_change(True)
