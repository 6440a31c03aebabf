"""Where jobs are recorded: Redis (durable, shared by every process), or memory when the
mesh runs without Kafka. Terminal states are written once: a redelivered job finds its
result already stored and is not run again."""

from __future__ import annotations

import contextlib
import time
from typing import Final, Protocol

import redis.asyncio as redis

from clawdbot.common.config import Config
from clawdbot.common.errors import redis_available
from clawdbot.jobs.records import TERMINAL, Job

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


def store_url(config: Config) -> str:
    """Job records go to the jobs' own Redis, or else to the cache's."""
    return config.jobs.redis_url or config.cache.redis_url


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

    def __init__(self, url: str, retention_s: float) -> None:
        # A bounded pool that waits for a free connection: a burst of jobs queues briefly
        # instead of failing with "too many connections".
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=64, timeout=10, socket_timeout=5, socket_connect_timeout=5
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
    """For a mesh without Kafka: jobs live as long as the adapter process."""

    durable = False

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._stored: dict[str, int] = {}

    async def create(self, job: Job) -> None:
        self._jobs[job.id] = job

    async def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    async def list(self, api_key_id: str, limit: int) -> list[Job]:
        owned = [j for j in self._jobs.values() if j.api_key_id == api_key_id]
        return sorted(owned, key=lambda j: j.created_at, reverse=True)[:limit]

    async def update(self, job: Job) -> None:
        job.updated_at = time.time()
        self._jobs[job.id] = job

    async def finish(self, job: Job) -> bool:
        current = self._jobs.get(job.id)
        if current is not None and current.status in TERMINAL:
            return False
        job.updated_at = time.time()
        self._jobs[job.id] = job
        self._stored[job.id] = self._stored.get(job.id, 0) + 1
        return True

    async def results_stored(self, job_id: str) -> int:
        return self._stored.get(job_id, 0)

    async def close(self) -> None:
        return None
