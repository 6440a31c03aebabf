"""Redis with a password (`requirepass` from a 0600 file, as the runner starts it), against
every Redis client of the mesh: with the password from the variable `redis.password_env`
names they work; without it the cache carries on without its L2 ("redis unavailable",
with a log line naming the variable), and the job and run stores answer 503, never crash."""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from clawdbot.cache.entry import Entry
from clawdbot.cache.metrics import CacheMetrics
from clawdbot.cache.server import build_store
from clawdbot.common.config import CacheConfig, RedisConfig
from clawdbot.common.errors import GatewayError
from clawdbot.common.metrics import Metrics
from clawdbot.jobs.store import RedisJobStore
from clawdbot.orchestrator.run_state import RedisRunStore
from clawdbot.runner.__main__ import write_redis_auth
from clawdbot.runner.supervisor import redis_pong
from tests.support import Proc, start_server

# A variable of this test's own, so nothing of the shell's reaches it.
PASSWORD_ENV = "CLAWDBOT_TEST_REDIS_PASSWORD"
PASSWORD = 'a "pass word" with \\ quotes'
# Generous on a busy 2-core machine; a refusal takes milliseconds.
REFUSED_WITHIN_S = 1.0


def _answers(port: int) -> bool:
    """Up: PING answered at all (a Redis requiring a password answers -NOAUTH)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    tmp = tmp_path_factory.mktemp("redis-auth")
    conf = write_redis_auth(tmp / "run" / "redis-auth.conf", None, PASSWORD)
    assert conf.stat().st_mode & 0o777 == 0o600

    def argv(port: int) -> list[str]:
        return ["redis-server", str(conf), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp)]

    proc, port = start_server("redis-auth", tmp, argv, _answers, within_s=30)
    assert isinstance(proc, Proc)
    # The password is nowhere on the command line other local users can read (redis-server
    # rewrites its title once started: the argv it was given counts too).
    cmdline = Path(f"/proc/{proc.popen.pid}/cmdline").read_bytes()
    assert PASSWORD.encode() not in cmdline and PASSWORD not in " ".join(argv(port))
    yield port
    proc.stop()


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> RedisConfig:
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    return RedisConfig(password_env=PASSWORD_ENV)


def _url(port: int) -> str:
    return f"redis://127.0.0.1:{port}/0"


def _entry(body: bytes) -> Entry:
    now = time.time()
    return Entry(body, "application/json", now, now + 60, {})


@pytest.mark.asyncio
async def test_the_runners_readiness_check_needs_the_password(redis_port: int) -> None:
    assert await redis_pong("127.0.0.1", redis_port, PASSWORD)()
    assert not await redis_pong("127.0.0.1", redis_port)()
    assert not await redis_pong("127.0.0.1", redis_port, "wrong")()


@pytest.mark.asyncio
async def test_cache_l2_works_with_the_password_from_the_environment(redis_port: int, settings: RedisConfig) -> None:
    config = CacheConfig(redis_url=_url(redis_port))
    _, l2 = build_store(config, CacheMetrics(Metrics("cache")), settings)
    assert l2 is not None
    try:
        key = f"auth-{uuid.uuid4().hex}"
        assert await l2.ping(force=True)
        assert await l2.put(key, _entry(b"{}"))
        got = await l2.get(key)
        assert got is not None and got.body == b"{}" and l2.up
    finally:
        await l2.close()


@pytest.mark.asyncio
async def test_cache_without_the_password_runs_on_without_redis(
    redis_port: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    settings = RedisConfig(password_env=PASSWORD_ENV)
    store, l2 = build_store(CacheConfig(redis_url=_url(redis_port)), CacheMetrics(Metrics("cache")), settings)
    assert l2 is not None
    try:
        key = f"noauth-{uuid.uuid4().hex}"
        with caplog.at_level(logging.WARNING):
            started = time.monotonic()
            stored = await store.put(key, _entry(b"[]"))
            found = await store.get(key)
            took = time.monotonic() - started
        print(f"put+get with Redis refusing: {took * 1000:.1f} ms, stored in {stored}")
        assert took < REFUSED_WITHIN_S
        # L1 still serves; Redis is marked down, and the log says why and what to set.
        assert "l2" not in stored and found is not None and found[1] == "l1"
        assert not l2.up
        messages = [r.getMessage() for r in caplog.records]
        assert any("Redis refused the credentials" in m and PASSWORD_ENV in m for m in messages), messages
        assert any(m.startswith("redis unavailable") for m in messages), messages
    finally:
        await l2.close()


@pytest.mark.asyncio
async def test_job_store_with_and_without_the_password(redis_port: int, settings: RedisConfig) -> None:
    store = RedisJobStore(_url(redis_port), 60, settings)
    refused = RedisJobStore(_url(redis_port), 60, RedisConfig(password_env="CLAWDBOT_TEST_UNSET_VARIABLE"))
    try:
        assert await store.get("absent") is None
        started = time.monotonic()
        with pytest.raises(GatewayError) as caught:
            await refused.get("absent")
        took = time.monotonic() - started
        print(f"job store refused in {took * 1000:.1f} ms: {caught.value}")
        assert caught.value.status == 503 and caught.value.code == "job_store_unavailable"
        assert "AuthenticationError" in str(caught.value)
        assert took < REFUSED_WITHIN_S
    finally:
        await store.close()
        await refused.close()


@pytest.mark.asyncio
async def test_run_store_with_and_without_the_password(redis_port: int, settings: RedisConfig) -> None:
    runs = RedisRunStore(_url(redis_port), 60, settings=settings)
    refused = RedisRunStore(_url(redis_port), 60, settings=RedisConfig(password_env="CLAWDBOT_TEST_UNSET_VARIABLE"))
    run_id = f"run-{uuid.uuid4().hex}"
    try:
        await runs.save_step(run_id, "first", {"output": 1})
        assert (await runs.load(run_id)).steps["first"] == {"output": 1}
        with pytest.raises(GatewayError) as caught:
            await refused.load(run_id)
        assert caught.value.status == 503 and caught.value.code == "run_store_unavailable"
    finally:
        await runs.close()
        await refused.close()
