"""The cache service over gRPC, two instances sharing one real Redis: hits and promotion at
each level, single-flight within and across instances, and Redis going away and back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from clawdbot.cache.server import create_server
from clawdbot.common.clients.cache import CachePlan, ResponseCache
from clawdbot.common.config import CacheConfig, Config, S3Config
from clawdbot.common.service import ServiceHost, internal_channel
from clawdbot.gen.v1 import cache_pb2, cache_pb2_grpc, router_pb2
from tests.support import Proc, start_redis, start_s3_server, wait_for_async


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[tuple[Proc, int]]:
    proc, port = start_redis(tmp_path)
    yield proc, port
    proc.stop()


@asynccontextmanager
async def cache_service(
    tmp: Path, redis_port: int | None, objects: str, **options: object
) -> AsyncIterator[cache_pb2_grpc.CacheServiceStub]:
    settings = CacheConfig(
        grpc_port=0,
        http_port=0,
        redis_url=f"redis://127.0.0.1:{redis_port}/0" if redis_port else "",
        object_dir=str(tmp / objects),
        **options,  # type: ignore[arg-type]
    )
    host: ServiceHost = create_server(Config(cache=settings))
    await host.start()
    channel = internal_channel(f"127.0.0.1:{host.grpc_port}")
    try:
        yield cache_pb2_grpc.CacheServiceStub(channel)
    finally:
        await channel.close()
        await host.stop(grace=1, drain_notice=0)


async def get(
    stub: cache_pb2_grpc.CacheServiceStub, key: str, lease: bool = False, **kw: float
) -> tuple[str, str, bytes, str]:
    """(status, level, value, lease)."""
    chunks = [c async for c in stub.Get(cache_pb2.CacheGetRequest(key=key, lease=lease, **kw), timeout=30)]
    return chunks[0].status, chunks[0].level, b"".join(c.data for c in chunks), chunks[0].lease


async def put(
    stub: cache_pb2_grpc.CacheServiceStub, key: str, value: bytes, lease: str = "", ttl_s: float = 0
) -> list[str]:
    step = 100_000

    def chunks() -> Iterator[cache_pb2.CachePutChunk]:
        meta = cache_pb2.CacheEntryMeta(content_type="text/plain", attributes={"by": "test"})
        yield cache_pb2.CachePutChunk(key=key, lease=lease, meta=meta, ttl_s=ttl_s, data=value[:step])
        for start in range(step, len(value), step):
            yield cache_pb2.CachePutChunk(data=value[start : start + step])

    reply = await stub.Put(chunks(), timeout=30)
    return list(reply.levels)


@pytest.mark.asyncio
async def test_hits_come_from_each_level_and_fill_the_levels_above(tmp_path: Path, redis: tuple[Proc, int]) -> None:
    _, port = redis
    async with cache_service(tmp_path, port, "a") as first:
        assert (await get(first, "k"))[0] == "miss"
        assert await put(first, "k", b"answer") == ["l1", "l2", "l3"]
        assert (await get(first, "k"))[:3] == ("hit", "l1", b"answer")
    # A second instance: its memory is empty, Redis is shared.
    async with cache_service(tmp_path, port, "b") as second:
        assert (await get(second, "k"))[:3] == ("hit", "l2", b"answer")
        assert (await get(second, "k"))[1] == "l1"  # promoted
    # An instance without Redis that shares the first's object store: L3, then promoted.
    async with cache_service(tmp_path, None, "a") as third:
        assert (await get(third, "k"))[:3] == ("hit", "l3", b"answer")
        assert (await get(third, "k"))[1] == "l1"


@pytest.mark.asyncio
async def test_large_values_stream_and_live_in_l3_with_a_pointer_in_l2(tmp_path: Path, redis: tuple[Proc, int]) -> None:
    _, port = redis
    big = bytes(range(256)) * 8000  # 2 MB: many chunks each way
    async with cache_service(tmp_path, port, "a", large_value_bytes=1024) as first:
        assert await put(first, "big", big) == ["l2", "l3"]  # not in memory
        assert await get(first, "big") == ("hit", "l2", big, "")
    async with cache_service(tmp_path, port, "b", large_value_bytes=1024) as elsewhere:
        # Its L2 holds only the pointer; the value is in the other instance's store, not here.
        assert (await get(elsewhere, "big"))[0] == "miss"


@pytest.mark.asyncio
async def test_lookup_answers_in_one_message_and_the_client_reads_large_values_whole(tmp_path: Path) -> None:
    """The client's read: Lookup's single message for the usual small answer; a value too
    big for one (here speech audio) comes back as its size, and the client streams it."""
    async with cache_service(tmp_path, None, "a") as stub:
        cache = ResponseCache(stub, CacheConfig(), models=())
        plan = CachePlan("answer", True, 0.0, False, router_pb2.RequestMeta())
        miss = await cache.lookup(plan)
        assert miss.response is None and miss.lease  # a miss with the lease to fill it
        small = router_pb2.ModelResponse(openai_json=b'{"ok": true}', instance="mock-1", strategy="balanced")
        await cache.store(plan, miss.lease, small)
        one = await stub.Lookup(cache_pb2.CacheGetRequest(key="answer"), timeout=30)
        assert (one.status, one.level, one.data) == ("hit", "l1", small.SerializeToString())
        hit = await cache.lookup(plan)
        assert hit.response is not None and hit.response.openai_json == small.openai_json
        assert (hit.response.instance, hit.response.cache) == ("mock-1", "hit-l1")

        audio = router_pb2.ModelResponse(binary=bytes(range(256)) * 4000, content_type="audio/wav")  # 1 MB
        large = CachePlan("speech", True, 0.0, False, router_pb2.RequestMeta())
        await cache.store(large, "", audio)
        sized = await stub.Lookup(cache_pb2.CacheGetRequest(key="speech"), timeout=30)
        assert sized.status == "hit" and sized.data == b"" and sized.meta.size == audio.ByteSize()
        read = await cache.lookup(large)
        assert read.response is not None and read.response.binary == audio.binary


@pytest.mark.asyncio
async def test_ttl_and_max_age(tmp_path: Path, redis: tuple[Proc, int]) -> None:
    _, port = redis
    async with cache_service(tmp_path, port, "a") as stub:
        await put(stub, "short", b"x", ttl_s=0.3)
        assert (await get(stub, "short"))[0] == "hit"

        async def expired() -> bool:
            return (await get(stub, "short"))[0] == "miss"

        await wait_for_async(expired, 10, "the entry to expire")
        await put(stub, "aged", b"y")
        await asyncio.sleep(0.05)  # age the entry past the caller's max-age below
        assert (await get(stub, "aged", max_age_s=0.01))[0] == "miss"
        assert (await get(stub, "aged", max_age_s=60))[0] == "hit"


@pytest.mark.asyncio
async def test_concurrent_misses_make_one_fill_within_and_across_instances(
    tmp_path: Path, redis: tuple[Proc, int]
) -> None:
    _, port = redis
    async with cache_service(tmp_path, port, "a") as a, cache_service(tmp_path, port, "b") as b:
        leases: list[str] = []

        async def reader(stub: cache_pb2_grpc.CacheServiceStub) -> bytes:
            status, _, value, lease = await get(stub, "hot", lease=True, wait_s=20)
            if status == "miss":
                leases.append(lease)
                await asyncio.sleep(0.3)  # the model call
                await put(stub, "hot", b"the one answer", lease=lease)
                return b"the one answer"
            return value

        values = await asyncio.gather(*(reader(a if i % 2 else b) for i in range(40)))
        assert len(leases) == 1, leases
        assert set(values) == {b"the one answer"}


@pytest.mark.asyncio
async def test_a_fill_given_up_passes_the_lease_on(tmp_path: Path, redis: tuple[Proc, int]) -> None:
    _, port = redis
    async with cache_service(tmp_path, port, "a") as stub:
        status, _, _, lease = await get(stub, "flaky", lease=True)
        assert status == "miss" and lease
        waiter = asyncio.create_task(get(stub, "flaky", lease=True, wait_s=20))
        await asyncio.sleep(0.1)
        assert not waiter.done()  # waiting for the first fill
        await stub.Delete(cache_pb2.CacheDeleteRequest(key="flaky", lease=lease))
        status, _, _, second_lease = await waiter
        assert status == "miss" and second_lease and second_lease != lease


@pytest.mark.asyncio
async def test_redis_stopped_and_restarted(tmp_path: Path, redis: tuple[Proc, int]) -> None:
    proc, port = redis
    async with cache_service(tmp_path, port, "a") as stub:
        await put(stub, "before", b"1")
        proc.stop()
        # Redis is gone: every call still succeeds, on L1 and L3.
        for i in range(20):
            assert await put(stub, f"during-{i}", b"2") == ["l1", "l3"]
            assert (await get(stub, f"during-{i}"))[:2] == ("hit", "l1")
        stats = await stub.Stats(cache_pb2.CacheStatsRequest())
        assert {s.level: s.up for s in stats.levels}["l2"] is False
        restarted, _ = start_redis(tmp_path, port)
        try:

            async def l2_back() -> bool:
                return "l2" in await put(stub, "after", b"3")

            await wait_for_async(l2_back, 30, "L2 to resume by itself")
            async with cache_service(tmp_path, port, "b") as other:
                assert (await get(other, "after"))[:3] == ("hit", "l2", b"3")
        finally:
            restarted.stop()


@pytest.mark.asyncio
async def test_an_s3_compatible_bucket_as_object_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server, port = start_s3_server(tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    s3 = S3Config(bucket="answers", endpoint_url=f"http://127.0.0.1:{port}")
    try:
        async with cache_service(tmp_path, None, "unused", s3=s3, large_value_bytes=1024) as first:

            async def stored() -> bool:  # the bucket is made in the background at start
                return "l3" in await put(first, "big", b"x" * 5000)

            await wait_for_async(stored, 30, "the bucket to exist")
        # A new instance (empty memory, no Redis) finds it in the bucket.
        async with cache_service(tmp_path, None, "unused", s3=s3, large_value_bytes=1024) as second:
            assert await get(second, "big") == ("hit", "l3", b"x" * 5000, "")
        assert not (tmp_path / "unused").exists()  # the directory store was not used
    finally:
        server.stop()
