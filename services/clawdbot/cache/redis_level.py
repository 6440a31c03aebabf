"""L2: answers in Redis, shared by every cache instance.

Redis is an optimisation, never a dependency: when it is unreachable or slow the level
marks itself down, and for `retry_after_s` every call answers as a miss (None/False) at
once, without touching the network, so a dead Redis costs a request nothing. After that
one call at a time probes it; the first success marks the level up again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from clawdbot.cache.entry import CorruptEntry, Entry, decode, encode
from clawdbot.cache.levels import Availability, OnCorrupt, OnStateChange, report_corrupt
from clawdbot.common.config import RedisConfig
from clawdbot.common.redis_client import auth_failure, redis_client

log = logging.getLogger(__name__)

T = TypeVar("T")

# Deletes the lock only while it still holds the caller's token: a holder whose lock
# expired must not release the next holder's.
_UNLOCK: Final = """
if redis.call("GET", KEYS[1]) == ARGV[1] then
    return redis.call("DEL", KEYS[1])
end
return 0
"""


class _Unavailable:
    """What _call returns instead of a result when Redis could not answer."""


_UNAVAILABLE: Final = _Unavailable()


class RedisLevel:
    name = "l2"

    def __init__(
        self,
        url: str,
        ttl_s: float,
        *,
        op_timeout_s: float = 0.25,
        retry_after_s: float = 1.0,
        key_prefix: str = "clawdbot:cache:",
        on_corrupt: OnCorrupt | None = None,
        on_state_change: OnStateChange | None = None,
        max_connections: int | None = None,
        settings: RedisConfig | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """`ttl_s` caps how long Redis keeps an entry (<= 0: only the entry's own expiry);
        `settings`: the credentials and TLS (config `redis`; None: its defaults).

        Nothing connects here; the first call does.
        """
        self._ttl_s = ttl_s
        self._prefix = key_prefix
        self._lock_prefix = f"{key_prefix}lock:"
        self._on_corrupt = on_corrupt
        self._clock = clock
        # A connect plus a command, each bounded by the socket timeouts; this outer bound
        # only catches what those miss.
        self._deadline_s = 2 * op_timeout_s + 0.05
        pool_options: dict[str, Any] = {}
        if max_connections is not None:
            pool_options["max_connections"] = max_connections
        self._settings = settings
        self._redis = redis_client(
            url,
            settings,
            socket_timeout=op_timeout_s,
            socket_connect_timeout=op_timeout_s,
            # One immediate retry on a dropped connection (a pooled socket Redis closed on a
            # restart); never on a timeout, which would double the time a dead Redis costs.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            health_check_interval=30,
            client_name="clawdbot-cache",
            **pool_options,
        )
        self._unlock = self._redis.register_script(_UNLOCK)
        self._availability = Availability(self.name, "redis", retry_after_s, on_state_change, monotonic)

    @property
    def up(self) -> bool:
        return self._availability.up

    def _key(self, key: str) -> str:
        return self._prefix + key

    async def get(self, key: str) -> Entry | None:
        raw = await self._call("get", lambda: self._redis.get(self._key(key)))
        if not isinstance(raw, bytes):
            return None  # a miss, or Redis unavailable
        try:
            entry = decode(raw)
        except CorruptEntry as exc:
            await self._call("delete", lambda: self._redis.delete(self._key(key)))
            report_corrupt(self.name, key, str(exc), self._on_corrupt)
            return None
        # Redis expires whole milliseconds; never serve an entry past its own expiry.
        return None if entry.expired(self._clock()) else entry

    async def put(self, key: str, entry: Entry) -> bool:
        ttl_s = entry.remaining(self._clock())
        if self._ttl_s > 0:
            ttl_s = min(ttl_s, self._ttl_s)
        if ttl_s <= 0:
            return False
        px = None if math.isinf(ttl_s) else max(1, math.ceil(ttl_s * 1000))
        value = encode(entry)
        result = await self._call("set", lambda: self._redis.set(self._key(key), value, px=px))
        return result is True

    async def delete(self, key: str) -> None:
        await self._call("delete", lambda: self._redis.delete(self._key(key)))

    async def lock(self, key: str, token: str, ttl_ms: int) -> bool | None:
        """Take the lock on `key` for `ttl_ms` if nobody holds it; None when Redis is down."""
        result = await self._call("lock", lambda: self._redis.set(self._lock_prefix + key, token, nx=True, px=ttl_ms))
        if isinstance(result, _Unavailable):
            return None
        return result is True

    async def unlock(self, key: str, token: str) -> bool | None:
        """Release the lock if `token` still holds it; False if it does not, None when down."""
        result = await self._call("unlock", lambda: self._unlock(keys=[self._lock_prefix + key], args=[token]))
        if isinstance(result, _Unavailable):
            return None
        return bool(result)

    async def ping(self, *, force: bool = False) -> bool:
        """Whether Redis answers; `force` probes even while the level waits to retry."""
        result = await self._call("ping", self._redis.ping, force=force)
        return result is True

    async def close(self) -> None:
        await self._redis.aclose()

    async def _call(self, op: str, command: Callable[[], Awaitable[T]], *, force: bool = False) -> T | _Unavailable:
        probing = self._availability.begin(force)
        if probing is None:
            return _UNAVAILABLE
        try:
            async with asyncio.timeout(self._deadline_s):
                result = await command()
        except MaxConnectionsError as exc:
            # Our own pool is exhausted: Redis is fine, this call is just shed.
            log.warning(
                "redis connection pool exhausted", extra={"cache_level": self.name, "op": op, "error": str(exc)}
            )
            return _UNAVAILABLE
        except (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError) as exc:
            hint = auth_failure(exc, self._settings)
            if hint and self._availability.up:
                # Not a Redis that went away: one that will never let us in until the
                # operator fixes the credentials, so say which.
                log.error(hint, extra={"cache_level": self.name, "op": op})
            self._availability.down(op, exc)
            return _UNAVAILABLE
        except RedisError as exc:
            # Redis answered with an error (OOM, READONLY, ...): this call fails, the level is up.
            log.warning("redis refused a cache command", extra={"cache_level": self.name, "op": op, "error": str(exc)})
            return _UNAVAILABLE
        finally:
            self._availability.end(probing)
        self._availability.back()
        return result
