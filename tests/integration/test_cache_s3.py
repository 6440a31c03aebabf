"""L3 in a real S3-compatible server (moto, in its own process): values, sharing, expiry,
corruption, and the server going away and coming back."""

from __future__ import annotations

import hashlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import boto3  # type: ignore[import-untyped]
import pytest
import pytest_asyncio
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.stub import Stubber  # type: ignore[import-untyped]

from clawdbot.cache.entry import Entry
from clawdbot.cache.levels import Level
from clawdbot.cache.s3_level import S3Level
from tests.support import Proc, start_s3_server, wait_for_async

T = TypeVar("T")

# Generous: this runs on busy 2-core machines. Calls against a dead server take
# milliseconds; this only catches one that hangs.
HANG_S = 5.0
PREFIX = "clawdbot-cache/"
CREDENTIALS: dict[str, Any] = {"region": "us-east-1", "access_key": "testing", "secret_key": "testing"}


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class S3Server:
    tmp: Path
    proc: Proc
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.stop()

    def start(self) -> None:
        if not self.proc.alive():
            self.proc, _ = start_s3_server(self.tmp, self.port)


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    tmp = tmp_path_factory.mktemp("s3")
    proc, port = start_s3_server(tmp)
    server = S3Server(tmp, proc, port)
    yield server
    server.proc.stop()


@dataclass
class Harness:
    server: S3Server
    bucket: str
    raw: Any  # a plain boto3 client, to look behind the level's back
    corrupt: list[str] = field(default_factory=list)
    states: list[bool] = field(default_factory=list)
    levels: list[S3Level] = field(default_factory=list)

    def level(self, ttl_s: float = 3600, **options: Any) -> S3Level:
        options.setdefault("on_corrupt", self.corrupt.append)
        options.setdefault("on_state_change", self.states.append)
        level = S3Level(self.bucket, endpoint_url=self.server.url, ttl_s=ttl_s, **CREDENTIALS, **options)
        self.levels.append(level)
        return level

    def keys(self, under: str) -> list[str]:
        listed = self.raw.list_objects_v2(Bucket=self.bucket, Prefix=PREFIX + under)
        return sorted(item["Key"] for item in listed.get("Contents", []))


@pytest_asyncio.fixture
async def harness(s3_server: S3Server) -> AsyncIterator[Harness]:
    s3_server.start()  # a test that stopped it and failed must not break the next
    raw = boto3.session.Session().client(
        "s3",
        endpoint_url=s3_server.url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
    )
    h = Harness(s3_server, f"test-{uuid.uuid4().hex[:24]}", raw)
    raw.create_bucket(Bucket=h.bucket)
    yield h
    for level in h.levels:
        await level.close()
    raw.close()


def answer(body: bytes = b'{"answer": 42}', expires_at: float = 0.0, **attributes: str) -> Entry:
    return Entry(body, "application/json", time.time(), expires_at, attributes or {"instance": "mock-1"})


async def timed(awaitable: Awaitable[T]) -> T:
    start = time.monotonic()
    result = await awaitable
    assert time.monotonic() - start < HANG_S
    return result


@pytest.mark.asyncio
async def test_round_trip(harness: Harness) -> None:
    level = harness.level()
    assert isinstance(level, Level) and level.name == "l3" and level.up
    big = answer(bytes(range(256)) * 4096)
    assert await level.get("k") is None
    assert await level.put("k", big)
    assert await level.get("k") == big
    assert await harness.level().get("k") == big  # another instance reads it too
    digest = hashlib.sha256(big.body).hexdigest()
    assert harness.keys("blobs/") == [f"{PREFIX}blobs/{digest}"]
    assert harness.keys("index/") == [f"{PREFIX}index/{hashlib.sha256(b'k').hexdigest()}"]
    await level.delete("k")
    assert await level.get("k") is None
    await level.delete("k")
    assert harness.corrupt == [] and harness.states == []


@pytest.mark.asyncio
async def test_identical_bodies_are_stored_once(harness: Harness) -> None:
    level = harness.level()
    same = b"the same long answer" * 1000
    assert await level.put("a", answer(same, instance="one"))
    assert await level.put("b", answer(same, instance="two"))
    assert await level.put("c", answer(b"something else"))
    assert len(harness.keys("blobs/")) == 2
    assert len(harness.keys("index/")) == 3
    a, b = await level.get("a"), await level.get("b")
    assert a is not None and b is not None
    assert a.body == b.body == same
    assert (a.attributes["instance"], b.attributes["instance"]) == ("one", "two")
    # Deleting one key leaves the shared blob to the other.
    await level.delete("a")
    assert await level.get("a") is None
    assert await level.get("b") == b
    assert len(harness.keys("blobs/")) == 2


@pytest.mark.asyncio
async def test_expiry(harness: Harness) -> None:
    clock = FakeClock(1_700_000_000.0)
    level = harness.level(ttl_s=30, clock=clock)
    assert await level.put("level-ttl", answer(b"one"))
    assert await level.put("own-expiry", answer(b"two", expires_at=clock.now + 10))
    clock.advance(10)
    assert await level.get("own-expiry") is None
    assert await level.get("level-ttl") is not None
    clock.advance(20)
    assert await level.get("level-ttl") is None
    assert harness.keys("index/") == []  # expired records are removed as they are found
    assert not await level.put("late", answer(expires_at=clock.now - 1))
    # No level limit: only the entry's own expiry counts.
    unlimited = harness.level(ttl_s=0, clock=clock)
    assert await unlimited.put("forever", answer(b"three"))
    clock.advance(10**9)
    assert await unlimited.get("forever") is not None


@pytest.mark.asyncio
async def test_corrupt_blob_is_dropped_and_counted(harness: Harness) -> None:
    level = harness.level()
    value = answer(b"a precious answer")
    assert await level.put("k", value)
    assert await level.put("other", value)
    [blob] = harness.keys("blobs/")
    harness.raw.put_object(Bucket=harness.bucket, Key=blob, Body=b"a precious answeR")  # same size, one bit off
    assert await level.get("k") is None
    assert harness.corrupt == ["l3"]
    assert harness.keys("blobs/") == []  # the bad blob is gone, so a new put rewrites it
    assert await level.get("other") is None  # its blob is gone: dropped, counted
    assert harness.corrupt == ["l3", "l3"]
    assert harness.keys("index/") == []
    assert await level.put("k", value)
    assert await level.get("k") == value
    assert harness.states == []  # a bad object is not a bad server


@pytest.mark.asyncio
async def test_corrupt_index_record_is_dropped_and_counted(harness: Harness) -> None:
    level = harness.level()
    assert await level.put("k", answer())
    [record] = harness.keys("index/")
    harness.raw.put_object(
        Bucket=harness.bucket, Key=record, Body=b'{"key": "k", "stored_at": 1, "header": {"content_type": 1}}'
    )
    assert await level.get("k") is None
    assert harness.corrupt == ["l3"]
    assert harness.keys("index/") == []
    assert harness.states == []


@pytest.mark.asyncio
async def test_truncated_blob_is_rewritten_on_put(harness: Harness) -> None:
    level = harness.level()
    value = answer(b"0123456789")
    assert await level.put("k", value)
    [blob] = harness.keys("blobs/")
    harness.raw.put_object(Bucket=harness.bucket, Key=blob, Body=b"01234")
    assert await level.put("k2", value)
    assert harness.raw.get_object(Bucket=harness.bucket, Key=blob)["Body"].read() == value.body
    assert await level.get("k") == value


@pytest.mark.asyncio
async def test_ensure_bucket_creates_it_once(harness: Harness) -> None:
    bucket = f"new-{uuid.uuid4().hex[:24]}"
    level = S3Level(bucket, endpoint_url=harness.server.url, ttl_s=60, **CREDENTIALS)
    harness.levels.append(level)
    assert await level.ensure_bucket()
    assert await level.ensure_bucket()  # already there: fine
    assert await level.put("k", answer())
    assert harness.raw.list_objects_v2(Bucket=bucket)["KeyCount"] == 2
    # Another region needs a location constraint, or the server refuses the bucket.
    eu = S3Level(
        f"eu-{uuid.uuid4().hex[:24]}",
        endpoint_url=harness.server.url,
        ttl_s=60,
        **{**CREDENTIALS, "region": "eu-west-1"},
    )
    harness.levels.append(eu)
    assert await eu.ensure_bucket()
    assert await eu.put("k", answer())


@pytest.mark.asyncio
async def test_server_stops_and_comes_back(harness: Harness) -> None:
    level = harness.level(retry_after_s=0.5)
    assert await level.put("before", answer())
    harness.server.stop()
    try:
        assert await timed(level.get("before")) is None
        assert await timed(level.put("during", answer())) is False
        await timed(level.delete("before"))  # returns, never raises
        assert await timed(level.get("before")) is None
        assert not level.up
        assert harness.states == [False]  # once, however many calls failed
    finally:
        harness.server.start()

    async def back() -> bool:
        return await level.put("after", answer())

    # Nobody pokes it but the calls themselves: after retry_after_s one gets through, and
    # recreates the bucket the restarted (in-memory) server lost.
    await wait_for_async(back, 30, "the level to use the S3 server again")
    assert level.up
    assert harness.states == [False, True]
    assert await level.get("after") is not None
    assert await level.get("before") is None
    assert harness.corrupt == []


@pytest.mark.asyncio
async def test_down_level_does_not_touch_the_network(harness: Harness) -> None:
    clock = FakeClock(0.0)
    level = harness.level(retry_after_s=10, monotonic=clock)
    harness.server.stop()
    try:
        assert await level.get("k") is None
        assert harness.states == [False]
    finally:
        harness.server.start()
    harness.raw.create_bucket(Bucket=harness.bucket)
    # The server is back, but the level waits out retry_after_s before it looks.
    assert await level.put("k", answer()) is False
    assert await level.get("k") is None
    assert harness.keys("") == []
    assert harness.states == [False]
    clock.advance(10)
    assert await level.put("k", answer()) is True
    assert harness.states == [False, True]
    assert len(harness.keys("")) == 2


@pytest.mark.asyncio
async def test_ensure_bucket_while_the_server_is_down(harness: Harness) -> None:
    clock = FakeClock(0.0)
    level = harness.level(retry_after_s=60, monotonic=clock)
    harness.server.stop()
    try:
        assert await timed(level.ensure_bucket()) is False
        assert harness.states == [False]
    finally:
        harness.server.start()
    # Forced: a startup or health check need not wait out retry_after_s.
    assert await level.ensure_bucket() is True
    assert harness.states == [False, True]
    assert await level.put("k", answer())


@pytest.mark.asyncio
async def test_a_server_that_never_answers_times_out(harness: Harness) -> None:
    # A socket that listens but never accepts: connects complete in the backlog, reads hang.
    with socket.socket() as sink:
        sink.bind(("127.0.0.1", 0))
        sink.listen(16)
        port = sink.getsockname()[1]
        level = S3Level(
            "bucket",
            endpoint_url=f"http://127.0.0.1:{port}",
            ttl_s=60,
            op_timeout_s=0.2,
            retry_after_s=60,
            on_state_change=harness.states.append,
            **CREDENTIALS,
        )
        harness.levels.append(level)
        assert await timed(level.get("k")) is None
        assert await timed(level.put("k", answer())) is False  # within retry_after_s: not even tried
        assert harness.states == [False]


# --- how answers are classified: a stubbed client, no server needed ---


@dataclass
class Stubbed:
    level: S3Level
    stubber: Stubber
    states: list[bool] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)  # every S3 operation the level made


def stubbed() -> Stubbed:
    states: list[bool] = []
    level = S3Level("bucket", endpoint_url="http://127.0.0.1:1", ttl_s=60, on_state_change=states.append, **CREDENTIALS)
    client = level._s3  # the level's own client: the stub answers in place of a server
    stub = Stubbed(level, Stubber(client), states)
    client.meta.events.register("before-parameter-build.s3", lambda model, **_: stub.calls.append(model.name))
    stub.stubber.activate()
    return stub


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("InternalError", 500),
        ("ServiceUnavailable", 503),
        ("SlowDown", 503),
        ("AccessDenied", 403),
        ("NoSuchBucket", 404),
    ],
)
async def test_answers_that_mark_the_level_down(code: str, status: int) -> None:
    stub = stubbed()
    stub.stubber.add_client_error("get_object", service_error_code=code, http_status_code=status)
    assert await stub.level.get("k") is None
    assert stub.states == [False]
    assert await stub.level.put("k", answer()) is False
    assert await stub.level.get("k") is None
    assert stub.calls == ["GetObject"]  # while down, nothing goes out
    stub.stubber.assert_no_pending_responses()
    await stub.level.close()


@pytest.mark.asyncio
async def test_a_refused_request_leaves_the_level_up() -> None:
    stub = stubbed()
    stub.stubber.add_client_error("get_object", service_error_code="NoSuchKey", http_status_code=404)
    stub.stubber.add_client_error("head_object", service_error_code="404", http_status_code=404)
    stub.stubber.add_client_error("put_object", service_error_code="EntityTooLarge", http_status_code=400)
    assert await stub.level.get("k") is None  # a plain miss
    assert await stub.level.put("k", answer()) is False  # this one request failed
    assert stub.level.up and stub.states == []
    assert stub.calls == ["GetObject", "HeadObject", "PutObject"]
    stub.stubber.assert_no_pending_responses()
    await stub.level.close()


@pytest.mark.asyncio
async def test_a_refused_probe_keeps_the_level_down_quietly() -> None:
    clock = FakeClock(0.0)
    states: list[bool] = []
    level = S3Level(
        "bucket",
        endpoint_url="http://127.0.0.1:1",
        ttl_s=60,
        retry_after_s=5,
        monotonic=clock,
        on_state_change=states.append,
        **CREDENTIALS,
    )
    stubber = Stubber(level._s3)
    stubber.activate()
    stubber.add_client_error("head_bucket", service_error_code="404", http_status_code=404)
    stubber.add_client_error("create_bucket", service_error_code="BucketAlreadyExists", http_status_code=409)
    assert await level.ensure_bucket() is False  # someone else's bucket: unusable
    assert states == [False]
    clock.advance(5)
    # The probe: the bucket first, then the call itself.
    stubber.add_response("head_bucket", {})
    stubber.add_client_error("get_object", service_error_code="InvalidRequest", http_status_code=400)
    assert await level.get("k") is None
    assert not level.up and states == [False]
    clock.advance(5)
    stubber.add_response("head_bucket", {})
    stubber.add_client_error("get_object", service_error_code="NoSuchKey", http_status_code=404)
    assert await level.get("k") is None
    assert level.up and states == [False, True]
    stubber.assert_no_pending_responses()
    await level.close()
