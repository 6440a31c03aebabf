"""Single-flight: of concurrent misses for one key, one reaches the model; the rest wait.

Within one cache process the waiters share an event; across cache processes a short
Redis lock (SET NX PX) elects the filler and the others poll the store until its answer
lands. A filler that fails gives its lease up and the next waiter takes one; a filler
that vanishes is outlived by its lease's expiry. Without Redis, coordination is per
process, which is still one model call per key for a single cache instance.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field

from clawdbot.cache.entry import Entry
from clawdbot.cache.metrics import CacheMetrics
from clawdbot.cache.redis_level import RedisLevel
from clawdbot.cache.store import TieredStore

# How often a waiter on another cache instance's fill looks for the answer.
_POLL_S = 0.02


@dataclass
class Lookup:
    entry: Entry | None = None
    level: str = ""  # where a hit came from
    lease: str = ""  # on a miss: the token that fills (or gives up) the key


@dataclass
class _Flight:
    token: str
    expires: float
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Flights:
    def __init__(self, store: TieredStore, redis: RedisLevel | None, lease_s: float, metrics: CacheMetrics) -> None:
        self._store = store
        self._redis = redis
        self._lease_s = lease_s
        self._metrics = metrics
        self._flights: dict[str, _Flight] = {}
        self.coalesced = 0

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    async def get(self, key: str, max_age_s: float, lease: bool, wait_s: float) -> Lookup:
        deadline = time.monotonic() + wait_s
        waited = False
        while True:
            found = await self._store.get(key, max_age_s)
            if found is not None:
                if waited:
                    self.coalesced += 1
                    self._metrics.coalesced.inc()
                return Lookup(found[0], found[1])
            if not lease:
                return Lookup()
            remaining = deadline - time.monotonic()
            flight = self._flights.get(key)
            if flight is not None and flight.expires > time.monotonic() and remaining > 0:
                waited = True
                try:
                    await asyncio.wait_for(flight.done.wait(), remaining)
                except TimeoutError:
                    return Lookup(lease=self._token())  # waited long enough: fill it uncoordinated
                continue
            token = self._token()
            if self._redis is not None and remaining > 0 and not await self._take_shared_lock(key, token, deadline):
                waited = True
                continue  # another instance filled it, or gave up: look again
            now = time.monotonic()
            self._prune(now)
            stale = self._flights.pop(key, None)
            if stale is not None:
                stale.done.set()  # its filler vanished: whoever still waits looks again
            self._flights[key] = _Flight(token, now + self._lease_s)
            return Lookup(lease=token)

    def _prune(self, now: float) -> None:
        """Forget flights whose filler vanished without finish(), for keys nobody asks
        again (else they would stay forever). Every lease is lease_s long and a key's new
        flight is inserted anew, so insertion order is expiry order: only the front needs
        looking at."""
        flights = self._flights
        while flights:
            key, flight = next(iter(flights.items()))
            if flight.expires > now:
                return
            del flights[key]
            flight.done.set()

    async def _take_shared_lock(self, key: str, token: str, deadline: float) -> bool:
        """True when this process may fill the key; False when another filled or gave up."""
        assert self._redis is not None
        ttl_ms = int(self._lease_s * 1000)
        while time.monotonic() < deadline:
            locked = await self._redis.lock(key, token, ttl_ms)
            if locked is None:
                return True  # Redis is down: coordinate within this process only
            if locked:
                # The previous holder may have stored its answer and let go just now.
                if await self._redis.get(key) is not None:
                    await self._redis.unlock(key, token)
                    return False
                return True
            await asyncio.sleep(_POLL_S)
            if await self._redis.get(key) is not None:
                return False  # the other filler's answer is in L2 now
        return True  # waited long enough: fill it uncoordinated

    async def finish(self, key: str, token: str) -> None:
        """The lease holder stored its answer, or gave up: wake the waiters either way."""
        flight = self._flights.get(key)
        if flight is not None and flight.token == token:
            del self._flights[key]
            flight.done.set()
        if self._redis is not None:
            await self._redis.unlock(key, token)

    @staticmethod
    def _token() -> str:
        return secrets.token_hex(12)
