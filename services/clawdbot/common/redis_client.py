"""Every Redis client of the mesh is built here (the cache's L2, job records, workflow
runs), so that the credentials and TLS of the `redis` config section reach all of them
and no call site has its own idea of how to connect.

Secrets come from the environment variables the section names (`password_env`,
`username_env`), never from YAML. A password written into a URL still wins: redis-py lets
a URL's parts override keyword arguments, and an operator who wrote one meant it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.connection import SSLConnection
from redis.exceptions import AuthenticationError, ResponseError

from clawdbot.common.config import ConfigError, RedisConfig


def redis_credentials(settings: RedisConfig, env: Mapping[str, str] | None = None) -> tuple[str | None, str | None]:
    """(username, password) from the variables the settings name; None for an unset or
    empty one. A user name without a password is a configuration error: Redis would
    refuse the AUTH, and the operator would only see "unavailable" later."""
    env = os.environ if env is None else env
    username = env.get(settings.username_env, "") if settings.username_env else ""
    password = env.get(settings.password_env, "") if settings.password_env else ""
    if username and not password:
        raise ConfigError(
            f"redis.username_env: {settings.username_env} is set but the password variable "
            f"{settings.password_env or '(redis.password_env is empty)'} is not"
        )
    return username or None, password or None


def redis_options(url: str, settings: RedisConfig, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments for redis.asyncio's from_url that carry the credentials and TLS."""
    username, password = redis_credentials(settings, env)
    options: dict[str, Any] = {}
    if password is not None:
        options["password"] = password
    if username is not None:
        options["username"] = username
    tls = settings.tls or urlsplit(url).scheme == "rediss"
    if settings.tls:
        options["connection_class"] = SSLConnection
    # ssl_* keywords only reach an SSL connection: a plain one refuses them.
    if tls and settings.ca_file:
        options["ssl_ca_certs"] = settings.ca_file
    if tls and settings.cert_file:
        options["ssl_certfile"] = settings.cert_file
        options["ssl_keyfile"] = settings.key_file
    return options


def redis_client(
    url: str, settings: RedisConfig | None = None, *, env: Mapping[str, str] | None = None, **options: Any
) -> aioredis.Redis:
    """A client for `url` with the settings' credentials; `options` are redis-py's own
    (timeouts, retry, client_name, max_connections...). Nothing connects here."""
    credentials = redis_options(url, settings or RedisConfig(), env)
    return aioredis.Redis.from_url(url, **{**options, **credentials})


def redis_blocking_pool(
    url: str, settings: RedisConfig | None = None, *, env: Mapping[str, str] | None = None, **options: Any
) -> aioredis.BlockingConnectionPool:
    """A bounded pool that waits for a free connection, with the settings' credentials."""
    credentials = redis_options(url, settings or RedisConfig(), env)
    return aioredis.BlockingConnectionPool.from_url(url, **{**options, **credentials})


def auth_failure(exc: BaseException, settings: RedisConfig | None = None) -> str | None:
    """What to tell the operator when `exc` is Redis refusing our credentials (or asking
    for some); None for any other error."""
    refused = isinstance(exc, AuthenticationError) or (
        isinstance(exc, ResponseError) and str(exc).startswith(("NOAUTH", "WRONGPASS"))
    )
    if not refused:
        return None
    variable = (settings or RedisConfig()).password_env or "redis.password_env"
    return f"Redis refused the credentials ({exc}): check {variable} (and redis.username_env)"
