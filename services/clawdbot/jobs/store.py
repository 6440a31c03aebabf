"""Where jobs are recorded: Redis (durable, shared by every jobs process) with Kafka, or
this process's memory without (then the one jobs process runs them all, and a restart
loses them as it loses its in-process queue: a record outliving its queue would say
"queued" forever). Terminal states are written once: a redelivered job finds its
result already stored and is not run again."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Final, Protocol

import redis.asyncio as redis

from clawdbot.common.config import RedisConfig
from clawdbot.common.errors import GatewayError, redis_available
from clawdbot.common.jobs import TERMINAL
from clawdbot.common.redis_client import redis_blocking_pool
from clawdbot.jobs.records import Job

_PREFIX: Final = "clawdbot:job:"
_BY_KEY: Final = "clawdbot:jobs:"

# Finish a job unless it is finished already; count the results it ever stored.
_FINISH: Final = """
local raw = redis.call('GET', KEYS[1])
if not raw then return -1 end
local job = cjson.decode(raw)
if job.status == 'succeeded' or job.status == 'failed' then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
redis.call('HINCRBY', KEYS[2], 'stored', 1)
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""


class JobStore(Protocol):
    durable: bool

    async def create(self, job: Job) -> None: ...
    async def get(self, job_id: str) -> Job | None: ...
    async def list(self, api_key_id: str, limit: int) -> list[Job]: ...
    async def update(self, job: Job) -> None: ...
    async def finish(self, job: Job) -> bool:
        """Store a terminal state; False when the job had finished already."""
        ...

    async def results_stored(self, job_id: str) -> int: ...
    async def close(self) -> None: ...


def _available() -> contextlib.AbstractAsyncContextManager[None]:
    return redis_available("job store", "job_store_unavailable")


class RedisJobStore:
    durable = True

    def __init__(self, url: str, retention_s: float, settings: RedisConfig | None = None) -> None:
        # A bounded pool that waits for a free connection: a burst of jobs queues briefly
        # instead of failing with "too many connections".
        pool = redis_blocking_pool(
            url, settings, max_connections=64, timeout=10, socket_timeout=5, socket_connect_timeout=5
        )
        self._redis = redis.Redis(connection_pool=pool)
        self._retention = int(retention_s)
        self._finish = self._redis.register_script(_FINISH)

    async def create(self, job: Job) -> None:
        async with _available(), self._redis.pipeline(transaction=True) as pipe:
            pipe.set(_PREFIX + job.id, job.to_json(), ex=self._retention)
            pipe.zadd(_BY_KEY + job.api_key_id, {job.id: job.created_at})
            pipe.expire(_BY_KEY + job.api_key_id, self._retention)
            await pipe.execute()

    async def get(self, job_id: str) -> Job | None:
        async with _available():
            raw = await self._redis.get(_PREFIX + job_id)
            return Job.from_json(raw) if raw else None

    async def list(self, api_key_id: str, limit: int) -> list[Job]:
        async with _available():
            ids = await self._redis.zrevrange(_BY_KEY + api_key_id, 0, limit - 1)
            if not ids:
                return []
            raws = await self._redis.mget([_PREFIX + (i.decode() if isinstance(i, bytes) else str(i)) for i in ids])
            return [Job.from_json(raw) for raw in raws if raw]

    async def update(self, job: Job) -> None:
        async with _available():
            job.updated_at = time.time()
            await self._redis.set(_PREFIX + job.id, job.to_json(), keepttl=True)

    async def finish(self, job: Job) -> bool:
        async with _available():
            job.updated_at = time.time()
            done = await self._finish(
                keys=[_PREFIX + job.id, _PREFIX + job.id + ":results"], args=[job.to_json(), self._retention]
            )
            return bool(done == 1)

    async def results_stored(self, job_id: str) -> int:
        async with _available():
            value = await self._redis.hget(_PREFIX + job_id + ":results", "stored")
            return int(value or 0)

    async def close(self) -> None:
        await self._redis.aclose()


class MemoryJobStore:
    """For a mesh without Kafka: jobs live in the jobs process, at most `max_jobs` of
    them; a finished one is kept for `retention_s` after it finished. Full (of jobs not
    finished or not yet expired): a new job is refused with 503 `overloaded`."""

    durable = False

    def __init__(
        self, max_jobs: int = 10_000, retention_s: float = 3600.0, clock: Callable[[], float] = time.time
    ) -> None:
        self._jobs: dict[str, Job] = {}
        self._stored: dict[str, int] = {}
        self._max = max_jobs
        self._retention = retention_s
        self._clock = clock

    def _expired(self, job: Job, now: float) -> bool:
        return job.status in TERMINAL and now - job.updated_at >= self._retention

    def _drop(self, job_id: str) -> None:
        del self._jobs[job_id]
        self._stored.pop(job_id, None)

    def _sweep(self, now: float) -> None:
        # Cheap in the common case: the oldest jobs are first (insertion order) and are
        # the first to expire. A full sweep only when that leaves the store full.
        for job in list(self._jobs.values()):
            if not self._expired(job, now):
                break
            self._drop(job.id)
        if len(self._jobs) >= self._max:
            for job in [j for j in self._jobs.values() if self._expired(j, now)]:
                self._drop(job.id)

    async def create(self, job: Job) -> None:
        self._sweep(self._clock())
        if len(self._jobs) >= self._max:
            raise GatewayError(
                503,
                f"The jobs service holds its limit of {self._max} jobs in memory (no Kafka); retry later.",
                "service_unavailable",
                "overloaded",
                None,
                "5",
            )
        self._jobs[job.id] = job

    async def get(self, job_id: str) -> Job | None:
        job = self._jobs.get(job_id)
        if job is not None and self._expired(job, self._clock()):
            self._drop(job_id)
            return None
        return job

    async def list(self, api_key_id: str, limit: int) -> list[Job]:
        self._sweep(self._clock())
        owned = [j for j in self._jobs.values() if j.api_key_id == api_key_id]
        return sorted(owned, key=lambda j: j.created_at, reverse=True)[:limit]

    async def update(self, job: Job) -> None:
        job.updated_at = self._clock()
        self._jobs[job.id] = job

    async def finish(self, job: Job) -> bool:
        # The executor ran the very object stored here, so its status is terminal already:
        # what says another delivery finished it first is a recorded finish, not the status
        # (checking the status made every in-process finish "not stored": no callback ever).
        if self._stored.get(job.id):
            return False
        job.updated_at = self._clock()
        self._jobs[job.id] = job
        self._stored[job.id] = self._stored.get(job.id, 0) + 1
        return True

    async def results_stored(self, job_id: str) -> int:
        return self._stored.get(job_id, 0)

    async def close(self) -> None:
        return None
