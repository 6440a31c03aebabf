"""Issue 14's smaller bounds, one at a time: roles, feedback once per request and key,
admission control, bounded in-process jobs, the cache's hex digests, single-flight
pruning and the semantic index's amortised growth."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson
import pytest

from clawdbot.adapter.auth import Authenticator, Principal, key_id
from clawdbot.cache.entry import CorruptEntry, Entry, Header, index_record, load_index_record
from clawdbot.cache.memory import MemoryLevel
from clawdbot.cache.metrics import CacheMetrics
from clawdbot.cache.objects import ObjectLevel
from clawdbot.cache.semantic import SemanticIndex
from clawdbot.cache.singleflight import Flights
from clawdbot.cache.store import TieredStore
from clawdbot.common.admission import AdmissionControl
from clawdbot.common.config import ConfigError, StaticKey
from clawdbot.common.errors import GatewayError
from clawdbot.common.metrics import Metrics
from clawdbot.common.server_gate import GatedServer, ServerGate
from clawdbot.common.service import internal_channel
from clawdbot.jobs.queue import InProcessJobQueue
from clawdbot.jobs.records import Job
from clawdbot.jobs.store import MemoryJobStore
from clawdbot.router.quality import QualityBook

# --- roles ---------------------------------------------------------------------------


def test_static_keys_are_admin_and_declared_keys_carry_their_role() -> None:
    hashed = hashlib.sha256(b"tablet-secret").hexdigest()
    auth = Authenticator(
        ["admin-secret"],
        [
            StaticKey(name="phone", key_env="PHONE_KEY"),
            StaticKey(name="tablet", sha256=hashed, role="user"),
            StaticKey(name="ops", key_env="OPS_KEY", role="admin"),
        ],
        env={"PHONE_KEY": "phone-secret", "OPS_KEY": "ops-secret"},
    )
    assert auth.check("Bearer admin-secret") == Principal(key_id("admin-secret"), "admin")
    assert auth.check_key("phone-secret") == Principal(key_id("phone-secret"), "user")
    # A hashed key has the same id as the key itself would.
    assert auth.check_key("tablet-secret") == Principal(key_id("tablet-secret"), "user")
    assert auth.check_key("ops-secret").is_admin
    with pytest.raises(GatewayError) as info:
        auth.check_key(hashed)  # the digest is not the key
    assert info.value.status == 401


def test_a_declared_key_whose_variable_is_unset_fails_fast() -> None:
    with pytest.raises(ConfigError, match="PHONE_KEY"):
        Authenticator(["admin"], [StaticKey(name="phone", key_env="PHONE_KEY")], env={})
    with pytest.raises(ConfigError, match="twice"):
        Authenticator(["same"], [StaticKey(name="phone", key_env="K")], env={"K": "same"})


@pytest.mark.parametrize(
    "declared",
    [{"name": "x"}, {"name": "x", "key_env": "A", "sha256": "0" * 64}, {"name": "x", "sha256": "../" * 21 + "a"}],
)
def test_a_declared_key_needs_exactly_one_well_formed_source(declared: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        StaticKey.model_validate(declared)


# --- feedback ------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_feedback_counts_once_and_only_from_the_key_that_asked() -> None:
    book = QualityBook(10, remember=100, window_s=60)
    book.answered("r1", "inst", "chat", "key_a")
    with pytest.raises(GatewayError) as other:
        book.rate("r1", 1.0, "key_b")
    with pytest.raises(GatewayError) as unknown:
        book.rate("nope", 1.0, "key_a")
    # Another key's request looks exactly like one that does not exist.
    assert other.value.status == unknown.value.status == 404
    assert other.value.code == unknown.value.code == "request_not_found"
    assert book.rate("r1", 1.0, "key_a") == ("inst", "chat")
    with pytest.raises(GatewayError) as twice:
        book.rate("r1", 0.0, "key_a")
    assert twice.value.status == 409
    assert book.estimate("inst", "chat", 0.5) == pytest.approx((0.5 * 10 + 1.0) / 11)


def test_another_key_cannot_take_over_a_request_id() -> None:
    book = QualityBook(10)
    book.answered("r1", "inst", "chat", "key_a")
    book.answered("r1", "other-inst", "chat", "key_b")  # the same x-request-id, reused
    with pytest.raises(GatewayError):
        book.rate("r1", 1.0, "key_b")
    assert book.rate("r1", 1.0, "key_a") == ("inst", "chat")


def test_remembered_answers_are_bounded_in_number_and_age() -> None:
    clock = Clock()
    book = QualityBook(10, remember=3, window_s=60, clock=clock)
    for n in range(5):
        book.answered(f"r{n}", "inst", "chat", "k")
    with pytest.raises(GatewayError):
        book.rate("r1", 1.0, "k")  # pushed out by newer answers
    book.rate("r2", 1.0, "k")
    clock.now += 61
    with pytest.raises(GatewayError) as late:
        book.rate("r4", 1.0, "k")
    assert late.value.status == 404


# --- admission control ---------------------------------------------------------------


class _Slow:
    """A unary and a server-streaming method that wait until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0
        self.two_started = asyncio.Event()

    def _start(self) -> None:
        self.started += 1
        if self.started >= 2:
            self.two_started.set()

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self._start()
        await self.release.wait()
        return b"ok"

    async def stream(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        self._start()
        yield b"first"
        await self.release.wait()
        yield b"last"


_GATE_TOKEN = "unit-test-internal-token"


async def _serve(admission: AdmissionControl, slow: _Slow) -> tuple[grpc.aio.Server, int]:
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(slow.unary),
        "Stream": grpc.unary_stream_rpc_method_handler(slow.stream),
    }
    server = GatedServer(grpc.aio.server(), ServerGate(_GATE_TOKEN, admission))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Slow", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest.mark.asyncio
async def test_calls_past_the_limit_are_refused_at_once_with_overloaded() -> None:
    slow = _Slow()
    admission = AdmissionControl("test", 2)
    server, port = await _serve(admission, slow)
    try:
        async with internal_channel(f"127.0.0.1:{port}", _GATE_TOKEN) as channel:
            unary = channel.unary_unary("/test.Slow/Unary", request_serializer=None, response_deserializer=None)
            stream = channel.unary_stream("/test.Slow/Stream", request_serializer=None, response_deserializer=None)
            held = asyncio.ensure_future(unary(b""))
            streaming = stream(b"")
            assert await anext(aiter(streaming)) == b"first"  # the stream holds a slot...
            await asyncio.wait_for(slow.two_started.wait(), 10)
            assert admission.in_flight == 2
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await unary(b"", timeout=5)
            err = GatewayError.from_rpc_error(refused.value, "test")
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert (err.status, err.code, err.type, err.retry_after) == (503, "overloaded", "service_unavailable", "1")
            slow.release.set()
            assert await held == b"ok"
            assert [m async for m in streaming] == [b"last"]  # ...until it ends
            assert admission.in_flight == 0 and admission.refused == 1
            slow.release = asyncio.Event()
            slow.release.set()
            assert await unary(b"", timeout=5) == b"ok"  # served again once drained
    finally:
        await server.stop(None)


@pytest.mark.asyncio
async def test_the_gate_refuses_callers_without_the_credential_before_any_handler_runs() -> None:
    slow = _Slow()
    slow.release.set()
    admission = AdmissionControl("test", 2)
    server, port = await _serve(admission, slow)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for method in ("/test.Slow/Unary", "/test.Slow/Stream", "/test.Nobody/Serves"):
                call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
                for metadata in ((), (("x-clawdbot-internal-token", "wrong"),)):
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await call(b"", metadata=metadata, timeout=5)
                    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, (method, metadata)
        assert slow.started == 0 and admission.refused == 0
        async with internal_channel(f"127.0.0.1:{port}", _GATE_TOKEN) as channel:
            unknown = channel.unary_unary("/test.Nobody/Serves", request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await unknown(b"", timeout=5)
            assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(None)


# --- in-process jobs -----------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_memory_job_store_is_bounded_and_forgets_finished_jobs() -> None:
    clock = Clock()
    store = MemoryJobStore(max_jobs=2, retention_s=60, clock=clock)
    first, second, third = (Job(id=f"j{n}", kind="chat", api_key_id="k", request={}) for n in range(3))
    await store.create(first)
    await store.create(second)
    with pytest.raises(GatewayError) as full:
        await store.create(third)
    assert (full.value.status, full.value.code, full.value.retry_after) == (503, "overloaded", "5")
    assert await store.finish(Job(id="j0", kind="chat", api_key_id="k", request={}, status="succeeded"))
    with pytest.raises(GatewayError):
        await store.create(third)  # finished, but not yet past its retention
    clock.now += 61
    await store.create(third)
    assert await store.get("j0") is None and await store.get("j2") is third
    assert [job.id for job in await store.list("k", 10)] == ["j2", "j1"]


class _NeverDone:
    async def process(self, job: Job) -> None:
        await asyncio.Event().wait()

    async def close(self) -> None:
        return None


@pytest.mark.asyncio
async def test_the_in_process_queue_refuses_past_its_bound() -> None:
    queue = InProcessJobQueue(_NeverDone(), concurrency=1, max_queued=2)  # type: ignore[arg-type]
    try:
        for n in range(3):  # one taken by the worker, two waiting
            await queue.send(Job(id=f"j{n}", kind="chat", api_key_id="k", request={}))
            await asyncio.sleep(0)
        with pytest.raises(GatewayError) as full:
            await queue.send(Job(id="j9", kind="chat", api_key_id="k", request={}))
        assert (full.value.status, full.value.code) == (503, "overloaded")
    finally:
        await queue.close()


# --- cache ---------------------------------------------------------------------------


def test_a_non_hex_sha256_in_an_index_record_is_corrupt(tmp_path: Path) -> None:
    header = Header.of(Entry(b"answer", "application/json", 1.0, 0.0, {})).to_json()
    for bad in ("../" * 21 + "a", "A" * 64, "g" * 64):
        record = orjson.dumps({"key": "k", "stored_at": 1.0, "header": {**header, "sha256": bad}})
        with pytest.raises(CorruptEntry, match="hex"):
            load_index_record(record)
    level = ObjectLevel(tmp_path / "objects", 60)
    with pytest.raises(CorruptEntry):
        level.blob_path("../" * 21 + "a")


@pytest.mark.asyncio
async def test_a_traversing_index_record_reads_as_a_corrupt_miss(tmp_path: Path) -> None:
    corrupt: list[str] = []
    level = ObjectLevel(tmp_path / "objects", 3600, on_corrupt=corrupt.append)
    secret = tmp_path / "secret"
    secret.write_bytes(b"answer")
    header = Header.of(Entry(b"answer", "application/json", 1.0, 0.0, {}))
    index = level.index_path("k")
    index.parent.mkdir(parents=True)
    traversal = "../../../secret".rjust(64, "/")
    index.write_bytes(index_record("k", 1e12, header).replace(header.sha256.encode(), traversal.encode()))
    assert await level.get("k") is None
    assert corrupt == ["l3"] and secret.read_bytes() == b"answer"


@pytest.mark.asyncio
async def test_single_flight_entries_of_vanished_fillers_are_pruned() -> None:
    metrics = CacheMetrics(Metrics("cache"))
    flights = Flights(TieredStore(MemoryLevel(10_000, 60), None, None, 1000, metrics), None, 0.05, metrics)
    for n in range(50):
        lookup = await flights.get(f"never-again-{n}", 0, lease=True, wait_s=1)
        assert lookup.lease  # each filler then vanishes without finish()
    assert flights.in_flight == 50
    await asyncio.sleep(0.06)
    await flights.get("another", 0, lease=True, wait_s=1)
    assert flights.in_flight == 1


def test_the_semantic_index_grows_without_copying_on_every_add() -> None:
    index = SemanticIndex(max_entries=1000)
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(3000, 16)).astype(np.float32)
    reallocations = 0
    rows = None
    for n, vector in enumerate(vectors):
        index.add("ns", f"k{n}", vector)
        space = index._spaces["ns"]
        if space.rows is not rows:
            reallocations += 1
            rows = space.rows
    # Doubling up to 1024 rows, then moves within that array: a handful, not 3000.
    assert reallocations <= 6
    assert len(index) == 1000
    found = index.search("ns", vectors[2999], 0.999)
    assert found is not None and found[0] == "k2999"
    assert index.search("ns", vectors[1999], 0.999) is None  # dropped, oldest first
    found = index.search("ns", vectors[2000], 0.999)
    assert found is not None and found[0] == "k2000"
    index.add("ns", "k2500", vectors[0])  # a key already there is not added again
    assert len(index) == 1000
