"""The one Redis client budgets and rate limits are counted in, built the same way in
every service that counts (the adapter's rate limits, the router's budget holds)."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from clawdbot.common.config import Config
from clawdbot.common.redis_client import redis_client


def quota_redis_url(config: Config) -> str:
    """quota.redis_url, else the cache's Redis when the cache is on; "" = none (counters
    then live in each process's memory, which the quota classes say loudly)."""
    if config.quota.redis_url:
        return config.quota.redis_url
    return config.cache.redis_url if config.cache.enabled else ""


def quota_redis(config: Config) -> aioredis.Redis | None:
    url = quota_redis_url(config)
    if not url:
        return None
    return redis_client(
        url,
        config.redis,
        # On the hot path: a Redis that does not answer is a quick 503, not a hang.
        socket_timeout=2,
        socket_connect_timeout=2,
        # One immediate retry on a dropped connection (a pooled socket a restarted Redis
        # closed); never on a timeout, which would double what a dead one costs.
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        client_name="clawdbot-quota",
    )
