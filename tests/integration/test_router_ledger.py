"""The router as started by create_server: budgets held in a real redis-server, spend
written to a SQLite ledger, against the mock provider over gRPC. At shutdown the ledger
is flushed; after Redis lost its counters, the budget is re-seeded from the ledger."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import orjson
import pytest
import pytest_asyncio

from clawdbot.common.config import Config
from clawdbot.common.errors import GatewayError
from clawdbot.common.keystore import KeyStore
from clawdbot.common.service import ServiceHost, internal_channel
from clawdbot.devtools.mock_upstream import start_mock
from clawdbot.gen.v1 import router_pb2, router_pb2_grpc
from clawdbot.router.server import create_server as create_router
from tests.support import Proc, start_redis

PRICE = 0.1  # USD per 1k tokens, input and output alike


@dataclass
class Redis:
    tmp: Path
    proc: Proc
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def restart(self) -> None:
        """Stopped and started on the same port: its data is gone (no persistence)."""
        self.proc.stop()
        self.proc, _ = start_redis(self.tmp, self.port)


@pytest.fixture
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    tmp = tmp_path_factory.mktemp("redis")
    proc, port = start_redis(tmp)
    server = Redis(tmp, proc, port)
    yield server
    server.proc.stop()


@dataclass
class Setup:
    config: Config
    database_url: str
    redis: Redis


@pytest_asyncio.fixture
async def setup(redis: Redis, tmp_path: Path) -> AsyncIterator[Setup]:
    mock_runner, mock_port = await start_mock(models=["mock-1"])
    pricing = {"input_per_1k": PRICE, "output_per_1k": PRICE}
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    config = Config.model_validate(
        {
            "router": {"grpc_port": 0, "http_port": 0, "shutdown_grace_s": 5},
            "database": {"url": database_url},
            "quota": {"redis_url": redis.url},
            "models": [
                {
                    "name": "priced-1",
                    "base_url": f"http://127.0.0.1:{mock_port}/v1",
                    "upstream_model": "mock-1",
                    "pricing": pricing,
                }
            ],
        }
    )
    yield Setup(config, database_url, redis)
    await mock_runner.cleanup()


def request(key_id: str, request_id: str, *, stream: bool = False, budget: float = 1.0) -> router_pb2.ModelRequest:
    grant = router_pb2.KeyGrant(budget_usd=budget, budget_period="day")
    body = {"model": "priced-1", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 50, "stream": stream}
    return router_pb2.ModelRequest(
        meta=router_pb2.RequestMeta(request_id=request_id, api_key_id=key_id, grant=grant),
        task="chat",
        model="priced-1",
        stream=stream,
        openai_json=orjson.dumps(body),
    )


async def started(config: Config) -> tuple[ServiceHost, grpc.aio.Channel]:
    router = create_router(config)
    await router.start()
    return router, internal_channel(f"127.0.0.1:{router.grpc_port}")


async def stopped(router: ServiceHost, channel: grpc.aio.Channel) -> None:
    await channel.close(grace=None)
    await router.stop(grace=1, drain_notice=0)


@pytest.mark.asyncio
async def test_the_router_holds_in_redis_and_writes_the_ledger_by_shutdown(setup: Setup) -> None:
    key_id = f"key-{uuid.uuid4().hex[:8]}"
    router, channel = await started(setup.config)
    try:
        stub = router_pb2_grpc.RouterStub(channel)
        unary = await stub.Complete(request(key_id, "same-request"))
        assert unary.spend.budgeted and unary.spend.cost_usd > 0
        assert unary.spend.remaining_usd == pytest.approx(1.0 - unary.spend.cost_usd, abs=1e-9)
        # The same request id again (a workflow's second step): its own ledger row.
        events = [e async for e in stub.CompleteStream(request(key_id, "same-request", stream=True))]
        assert events[0].spend.budgeted and events[0].spend.remaining_usd < unary.spend.remaining_usd
        settled = events[-1].settled
        assert settled.output_tokens > 0 and settled.cost_usd > 0
        # The usage chunk the router asked for is not relayed: the client did not ask.
        relayed = [orjson.loads(e.chunk_json) for e in events if e.WhichOneof("event") == "chunk_json"]
        assert relayed and all("usage" not in chunk for chunk in relayed)
        spent = unary.spend.cost_usd + settled.cost_usd
        assert settled.remaining_usd == pytest.approx(1.0 - spent, abs=1e-9)
        # A budget smaller than the worst case: refused, and nothing is called or written.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Complete(request(f"{key_id}-poor", "poor", budget=0.001))
        error = GatewayError.from_rpc_error(refused.value, "router")
        assert error.status == 429 and error.code == "insufficient_quota", error
    finally:
        await stopped(router, channel)
    store = await KeyStore.open(setup.database_url)
    try:
        assert await store.spend_total(key_id, None) == pytest.approx(spent, abs=1e-9)
        assert await store.spend_total(f"{key_id}-poor", None) == 0.0
        (row,) = [r for r in await store.spend_report("key", None, None) if r["key_id"] == key_id]
        assert row["requests"] == 2
    finally:
        await store.close()

    # Started again after Redis lost its counters: the budget is re-seeded from the
    # ledger (KeyStore.spend_total), not started afresh.
    setup.redis.restart()
    router, channel = await started(setup.config)
    try:
        again = await router_pb2_grpc.RouterStub(channel).Complete(request(key_id, "later"))
        assert again.spend.remaining_usd == pytest.approx(1.0 - spent - again.spend.cost_usd, abs=1e-9)
    finally:
        await stopped(router, channel)
