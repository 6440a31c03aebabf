"""L2 against a real redis-server: values, expiry, corruption, locks, and Redis going away."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from clawdbot.cache.entry import Entry
from clawdbot.cache.redis_level import RedisLevel
from tests.support import Proc, start_redis, wait_for_async

T = TypeVar("T")

# Generous: this runs on busy 2-core machines. Calls against a dead Redis take milliseconds;
# this only catches one that hangs.
HANG_S = 5.0


@dataclass
class RedisServer:
    tmp: Path
    proc: Proc
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.stop()

    def start(self) -> None:
        if not self.proc.alive():
            self.proc, _ = start_redis(self.tmp, self.port)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    tmp = tmp_path_factory.mktemp("redis")
    proc, port = start_redis(tmp)
    server = RedisServer(tmp, proc, port)
    yield server
    server.proc.stop()


@dataclass
class Events:
    corrupt: list[str] = field(default_factory=list)
    states: list[bool] = field(default_factory=list)


@dataclass
class Harness:
    server: RedisServer
    prefix: str
    events: Events
    raw: aioredis.Redis
    levels: list[RedisLevel] = field(default_factory=list)

    def level(self, ttl_s: float = 60, **options: float) -> RedisLevel:
        level = RedisLevel(
            self.server.url,
            ttl_s,
            key_prefix=self.prefix,
            on_corrupt=self.events.corrupt.append,
            on_state_change=self.events.states.append,
            **options,
        )
        self.levels.append(level)
        return level


@pytest_asyncio.fixture
async def harness(redis_server: RedisServer) -> AsyncIterator[Harness]:
    redis_server.start()  # a test that stopped it and failed must not break the next
    raw = aioredis.Redis(port=redis_server.port)
    h = Harness(redis_server, f"test:{uuid.uuid4().hex}:", Events(), raw)
    yield h
    for level in h.levels:
        await level.close()
    await raw.aclose()


def answer(body: bytes = b'{"answer": 42}', ttl_s: float = 0) -> Entry:
    now = time.time()
    return Entry(body, "application/json", now, now + ttl_s if ttl_s else 0, {"instance": "mock-1"})


async def timed(awaitable: Awaitable[T]) -> T:
    start = time.monotonic()
    result = await awaitable
    assert time.monotonic() - start < HANG_S
    return result


@pytest.mark.asyncio
async def test_round_trip(harness: Harness) -> None:
    level = harness.level()
    value = answer(bytes(range(256)) * 1000)
    assert await level.get("k") is None
    assert await level.put("k", value)
    assert await level.get("k") == value
    assert await harness.raw.exists(harness.prefix + "k")
    await level.delete("k")
    assert await level.get("k") is None
    assert await level.ping()
    assert level.up
    assert harness.events.states == []


@pytest.mark.asyncio
async def test_ttl_is_the_shorter_of_level_and_entry(harness: Harness) -> None:
    level = harness.level(ttl_s=60)
    await level.put("long", answer(ttl_s=3600))
    await level.put("short", answer(ttl_s=30))
    await level.put("forever", answer())
    assert 59_000 < await harness.raw.pttl(harness.prefix + "long") <= 60_000
    assert 29_000 < await harness.raw.pttl(harness.prefix + "short") <= 30_000
    assert 59_000 < await harness.raw.pttl(harness.prefix + "forever") <= 60_000
    # No level limit and none of its own: Redis keeps it until evicted.
    unlimited = harness.level(ttl_s=0)
    await unlimited.put("forever", answer())
    assert await harness.raw.pttl(harness.prefix + "forever") == -1
    assert not await level.put("expired", answer(ttl_s=-1))


@pytest.mark.asyncio
async def test_entries_expire(harness: Harness) -> None:
    level = harness.level(ttl_s=0.3)
    assert await level.put("k", answer())
    # PX was set (-1 would be no expiry); -2, already gone, is fine on a slow machine.
    assert await harness.raw.pttl(harness.prefix + "k") in (-2, *range(301))

    async def gone() -> bool:
        return await level.get("k") is None and not await harness.raw.exists(harness.prefix + "k")

    await wait_for_async(gone, 30, "the entry to expire")


@pytest.mark.asyncio
async def test_corrupt_value_is_dropped_and_counted(harness: Harness) -> None:
    level = harness.level()
    await harness.raw.set(harness.prefix + "garbage", b"\x00not an entry")
    good = answer(b"an answer")
    await level.put("flipped", good)
    raw = await harness.raw.get(harness.prefix + "flipped")
    await harness.raw.set(harness.prefix + "flipped", raw[:-1] + b"!")
    assert await level.get("garbage") is None
    assert await level.get("flipped") is None
    assert harness.events.corrupt == ["l2", "l2"]
    assert not await harness.raw.exists(harness.prefix + "garbage", harness.prefix + "flipped")
    assert harness.events.states == []  # a bad value is not a bad Redis


@pytest.mark.asyncio
async def test_lock_and_unlock(harness: Harness) -> None:
    level = harness.level()
    assert await level.lock("k", "token-a", 10_000) is True
    assert await level.lock("k", "token-b", 10_000) is False  # NX: taken
    assert await level.unlock("k", "token-b") is False  # not b's to release
    assert await level.lock("k", "token-b", 10_000) is False
    assert await level.unlock("k", "token-a") is True
    assert await level.unlock("k", "token-a") is False  # already released
    assert await level.lock("k", "token-b", 10_000) is True
    # Locks live apart from values.
    assert await level.get("k") is None
    await level.put("k", answer())
    assert await level.unlock("k", "token-b") is True
    assert await level.get("k") is not None


@pytest.mark.asyncio
async def test_lock_expires(harness: Harness) -> None:
    level = harness.level()
    assert await level.lock("k", "holder-that-died", 200)

    async def taken_over() -> bool:
        return bool(await level.lock("k", "next", 10_000))

    await wait_for_async(taken_over, 30, "the dead holder's lock to expire")
    assert await level.unlock("k", "holder-that-died") is False


@pytest.mark.asyncio
async def test_redis_stops_and_comes_back(harness: Harness) -> None:
    level = harness.level(retry_after_s=0.5)
    assert await level.put("before", answer())
    harness.server.stop()
    try:
        assert await timed(level.get("before")) is None
        assert await timed(level.put("during", answer())) is False
        assert await timed(level.delete("before")) is None
        assert await timed(level.lock("k", "t", 1000)) is None
        assert await timed(level.unlock("k", "t")) is None
        assert await timed(level.ping()) is False
        assert not level.up
        assert harness.events.states == [False]  # once, however many calls failed
    finally:
        harness.server.start()

    async def back() -> bool:
        return await level.put("after", answer())

    # Nobody pokes it but the calls themselves: after retry_after_s one gets through.
    await wait_for_async(back, 30, "the level to use Redis again")
    assert level.up
    assert harness.events.states == [False, True]
    assert await level.get("after") is not None
    assert await level.get("before") is None  # the restarted Redis kept nothing


@pytest.mark.asyncio
async def test_down_level_does_not_touch_the_network(harness: Harness) -> None:
    clock = [0.0]
    level = RedisLevel(
        harness.server.url,
        60,
        key_prefix=harness.prefix,
        retry_after_s=10,
        on_state_change=harness.events.states.append,
        monotonic=lambda: clock[0],
    )
    harness.levels.append(level)
    harness.server.stop()
    try:
        assert await level.get("k") is None
        assert harness.events.states == [False]
    finally:
        harness.server.start()
    # Redis is back, but the level waits out retry_after_s before it looks.
    assert await level.put("k", answer()) is False
    assert await level.ping() is False
    assert await harness.raw.dbsize() == 0
    assert await level.ping(force=True) is True  # a health check may look anyway
    assert harness.events.states == [False, True]
    assert await level.put("k", answer()) is True


@pytest.mark.asyncio
async def test_a_redis_that_never_answers_times_out(harness: Harness) -> None:
    # A socket that listens but never accepts: connects complete in the backlog, reads hang.
    with socket.socket() as sink:
        sink.bind(("127.0.0.1", 0))
        sink.listen(16)
        port = sink.getsockname()[1]
        states: list[bool] = []
        level = RedisLevel(
            f"redis://127.0.0.1:{port}/0", 60, op_timeout_s=0.2, retry_after_s=60, on_state_change=states.append
        )
        harness.levels.append(level)
        assert await timed(level.get("k")) is None
        assert await timed(level.put("k", answer())) is False  # within retry_after_s: not even tried
        assert states == [False]
