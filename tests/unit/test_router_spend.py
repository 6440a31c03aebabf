"""The router's budget holds, settlements and ledger records, per upstream attempt
(router/spend.py and the servicer's Complete/CompleteStream), against a real redis-server
for the BudgetBook and a fake connector in place of the upstream."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from clawdbot.common.config import Config
from clawdbot.common.errors import GatewayError
from clawdbot.common.metrics import Metrics
from clawdbot.common.quota import BudgetBook, LedgerWriter, SpendRecord
from clawdbot.gen.v1 import router_pb2
from clawdbot.router.connectors.base import Answer
from clawdbot.router.connectors.openai import UpstreamError
from clawdbot.router.registry import Instance
from clawdbot.router.server import RouterServicer
from clawdbot.router.spend import Spending, check_model, estimate, unreported_cost
from tests.support import Proc, handmade_wav, start_redis

PRICE = 0.1  # USD per 1k tokens, input and output alike
BUDGET = 1.0
MAX_TOKENS = 100
USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
MODELS = [
    {
        "name": "priced-1",
        "base_url": "http://upstream.invalid/v1",
        "pricing": {"input_per_1k": PRICE, "output_per_1k": PRICE},
    },
    # Two instances of one model: a retryable failure of the first falls back to the second.
    {
        "name": "pair",
        "instance": "pair-a",
        "base_url": "http://a.invalid/v1",
        "pricing": {"input_per_1k": PRICE, "output_per_1k": PRICE},
    },
    {
        "name": "pair",
        "instance": "pair-b",
        "base_url": "http://b.invalid/v1",
        "pricing": {"input_per_1k": PRICE, "output_per_1k": PRICE},
    },
    {"name": "free-1", "base_url": "http://free.invalid/v1"},
]


def cost_of(input_tokens: int, output_tokens: int) -> float:
    return (input_tokens + output_tokens) * PRICE / 1000


def upstream_error(retryable: bool) -> UpstreamError:
    return UpstreamError.make(
        502 if retryable else 400,
        "the upstream failed",
        "server_error" if retryable else "invalid_request_error",
        "upstream_error",
        retryable=retryable,
        kind="server_error" if retryable else "bad_request",
    )


def chunk(content: str) -> dict[str, Any]:
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "model": "x",
        "choices": [{"index": 0, "delta": {"content": content}}],
    }


@dataclass
class FakeConnector:
    """The upstream: answers with USAGE, or fails as told; streams `chunks`, and stalls
    after `stall_after` of them until `resume` is set (a client has time to leave)."""

    errors: list[UpstreamError] = field(default_factory=list)
    chunks: list[dict[str, Any]] = field(default_factory=list)
    stall_after: int | None = None
    hang: bool = False
    calls: list[str] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    stalled: asyncio.Event = field(default_factory=asyncio.Event)
    resume: asyncio.Event = field(default_factory=asyncio.Event)
    streams_closed: int = 0

    async def call(
        self,
        instance: Instance,
        task: str,
        body: dict[str, Any],
        trace_headers: Mapping[str, str],
        request_id: str,
        timeout_s: float,
        binary: bytes = b"",
    ) -> Answer:
        self.calls.append(instance.id)
        if self.errors:
            raise self.errors.pop(0)
        if self.hang:
            self.stalled.set()
            await self.resume.wait()
        message = {"role": "assistant", "content": "hello"}
        return Answer(
            {"id": "r", "model": body["model"], "choices": [{"index": 0, "message": message}], "usage": USAGE}
        )

    async def stream(
        self,
        instance: Instance,
        body: dict[str, Any],
        trace_headers: Mapping[str, str],
        request_id: str,
        timeout_s: float,
    ) -> AsyncIterator[bytes]:
        self.calls.append(instance.id)
        self.bodies.append(dict(body))
        if self.errors:
            raise self.errors.pop(0)
        try:
            for i, payload in enumerate(self.chunks):
                if i == self.stall_after:
                    self.stalled.set()
                    await self.resume.wait()
                yield orjson.dumps(payload)
        finally:
            self.streams_closed += 1

    async def close(self) -> None:
        return None


class Context:
    """What the servicer asks of a gRPC context: the caller's deadline (none here)."""

    def time_remaining(self) -> float | None:
        return None


class SlowBook(BudgetBook):
    """A BudgetBook whose settlements wait for `go`: a settlement still under way when its
    caller is cancelled a second time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.go = asyncio.Event()
        self.settling = asyncio.Event()

    async def settle(self, key_id: str, budget_usd: float, period: str, hold_id: str, cost_usd: float) -> float:
        self.settling.set()
        await self.go.wait()
        return await super().settle(key_id, budget_usd, period, hold_id, cost_usd)


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    proc: Proc
    proc, port = start_redis(tmp_path_factory.mktemp("redis"))
    yield port
    proc.stop()


async def no_ledger_spend(key_id: str, since: datetime | None) -> float:
    return 0.0


@dataclass
class Rig:
    servicer: RouterServicer
    connector: FakeConnector
    book: BudgetBook
    spending: Spending
    writer: LedgerWriter
    written: list[SpendRecord]
    key_id: str
    holds: list[str]

    def request(
        self,
        model: str = "priced-1",
        *,
        budget: bool = True,
        budget_usd: float = BUDGET,
        models: Sequence[str] = (),
        request_id: str = "req-1",
        stream: bool = False,
        include_usage: bool = False,
        text: str = "hello",
    ) -> router_pb2.ModelRequest:
        grant = router_pb2.KeyGrant(models=list(models))
        if budget:
            grant.budget_usd, grant.budget_period = budget_usd, "day"
        meta = router_pb2.RequestMeta(request_id=request_id, api_key_id=self.key_id, grant=grant)
        body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": MAX_TOKENS}
        if stream:
            body["stream"] = True
        if include_usage:
            body["stream_options"] = {"include_usage": True}
        return router_pb2.ModelRequest(
            meta=meta, task="chat", model=model, stream=stream, openai_json=orjson.dumps(body)
        )

    def worst(self, request: router_pb2.ModelRequest) -> float:
        """The hold the router takes for `request`: its estimated input plus max_tokens."""
        return cost_of(len(request.openai_json) // 4, MAX_TOKENS)

    async def remaining(self) -> float:
        return await self.book.remaining(self.key_id, BUDGET, "day")

    async def records(self) -> list[SpendRecord]:
        await self.writer.close()  # flushes everything queued
        return self.written


@pytest_asyncio.fixture
async def rig(redis_port: int) -> AsyncIterator[Rig]:
    redis = aioredis.Redis(host="127.0.0.1", port=redis_port)
    book = SlowBook(redis, no_ledger_spend)
    book.go.set()  # settles at once unless a test says otherwise
    written: list[SpendRecord] = []

    async def write(records: list[SpendRecord]) -> None:
        written.extend(records)

    writer = LedgerWriter(write)
    spending = Spending(book, writer, default_max_tokens=4096)
    holds: list[str] = []
    real_hold = book.hold

    async def counted_hold(key_id: str, budget_usd: float, period: str, hold_id: str, amount_usd: float) -> float:
        holds.append(hold_id)
        return await real_hold(key_id, budget_usd, period, hold_id, amount_usd)

    book.hold = counted_hold  # type: ignore[method-assign]
    connector = FakeConnector()
    config = Config.model_validate({"models": MODELS})
    servicer = RouterServicer(config, {"openai": connector}, Metrics("router"), spending)
    yield Rig(servicer, connector, book, spending, writer, written, f"key-{uuid.uuid4().hex[:8]}", holds)
    book.go.set()
    await spending.drain()
    await writer.close()
    await redis.aclose()


async def complete(rig: Rig, request: router_pb2.ModelRequest) -> router_pb2.ModelResponse:
    return await rig.servicer.Complete(request, Context())  # type: ignore[arg-type]


async def collect(rig: Rig, request: router_pb2.ModelRequest) -> list[router_pb2.StreamEvent]:
    return [event async for event in rig.servicer.CompleteStream(request, Context())]  # type: ignore[arg-type]


# --- the allowlist -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_model_outside_the_grant_is_refused_403_before_anything(rig: Rig) -> None:
    for call in (complete, collect):
        with pytest.raises(GatewayError) as refused:
            await call(rig, rig.request("priced-1", models=["mock-*", "free-?"]))
        assert refused.value.status == 403 and refused.value.code == "model_not_allowed"
    assert rig.connector.calls == [] and rig.holds == []
    # A glob that matches lets it through (case-sensitive, as model ids are).
    answer = await complete(rig, rig.request("priced-1", models=["mock-*", "priced-*"]))
    assert answer.instance == "priced-1"
    with pytest.raises(GatewayError):
        check_model(router_pb2.KeyGrant(models=["PRICED-*"]), "priced-1")


# --- holds and settlements, unary ------------------------------------------------------


@pytest.mark.asyncio
async def test_a_refused_hold_is_429_insufficient_quota_and_the_upstream_is_never_called(rig: Rig) -> None:
    # A cent a day against a worst case of 1.2 cents (max_tokens 100 at $0.1 per 1k).
    request = rig.request("pair", budget_usd=0.01)
    assert rig.worst(request) > 0.01
    for call in (complete, collect):
        with pytest.raises(GatewayError) as refused:
            await call(rig, request)
        # Not retried on the other instance, not turned into a 503.
        assert refused.value.status == 429, refused.value
        assert refused.value.code == "insufficient_quota" and refused.value.type == "insufficient_quota"
    assert rig.connector.calls == []
    # Nothing was held or spent by the refusals.
    assert await rig.book.remaining(rig.key_id, 0.01, "day") == pytest.approx(0.01, abs=1e-9)
    assert await rig.records() == []


@pytest.mark.asyncio
async def test_a_successful_call_settles_its_real_cost(rig: Rig) -> None:
    answer = await complete(rig, rig.request())
    real = cost_of(USAGE["prompt_tokens"], USAGE["completion_tokens"])
    spend = answer.spend
    assert spend.budgeted and spend.cost_usd == pytest.approx(real)
    assert (spend.input_tokens, spend.output_tokens) == (10, 5)
    assert spend.remaining_usd == pytest.approx(BUDGET - real, abs=1e-9)
    assert await rig.remaining() == pytest.approx(BUDGET - real, abs=1e-9)
    assert answer.cost_usd == pytest.approx(real)


@pytest.mark.asyncio
async def test_an_upstream_error_releases_the_hold_and_bills_nothing(rig: Rig) -> None:
    rig.connector.errors = [upstream_error(retryable=False)]
    with pytest.raises(UpstreamError):
        await complete(rig, rig.request())
    assert len(rig.holds) == 1
    assert await rig.remaining() == pytest.approx(BUDGET, abs=1e-9)
    assert await rig.records() == []


@pytest.mark.asyncio
async def test_a_fallback_holds_again_and_only_the_served_attempt_is_billed(rig: Rig) -> None:
    rig.connector.errors = [upstream_error(retryable=True)]
    answer = await complete(rig, rig.request("pair"))
    assert len(rig.connector.calls) == 2 and answer.instance == rig.connector.calls[1]
    assert len(set(rig.holds)) == 2  # a fresh hold per attempt
    real = cost_of(10, 5)
    assert await rig.remaining() == pytest.approx(BUDGET - real, abs=1e-9)
    records = await rig.records()
    assert [r.instance for r in records] == [answer.instance]


@pytest.mark.asyncio
async def test_a_unary_call_cancelled_by_its_caller_settles_its_input_estimate(rig: Rig) -> None:
    rig.connector.hang = True
    request = rig.request()
    call = asyncio.create_task(complete(rig, request))
    await asyncio.wait_for(rig.connector.stalled.wait(), 30)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await rig.spending.drain()
    charged = cost_of(len(request.openai_json) // 4, 0)
    assert await rig.remaining() == pytest.approx(BUDGET - charged, abs=1e-9)
    (record,) = await rig.records()
    assert record.cost_usd == pytest.approx(charged) and record.output_tokens == 0


@pytest.mark.asyncio
async def test_an_unbudgeted_call_does_no_budget_io_but_is_recorded(rig: Rig) -> None:
    answer = await complete(rig, rig.request(budget=False))
    assert rig.holds == [] and not rig.book.settling.is_set() and not answer.spend.budgeted  # type: ignore[attr-defined]
    assert answer.spend.cost_usd == pytest.approx(cost_of(10, 5))
    (record,) = await rig.records()
    assert record.key_id == rig.key_id and record.cost_usd == pytest.approx(cost_of(10, 5))


@pytest.mark.asyncio
async def test_two_calls_under_one_request_id_are_two_ledger_records(rig: Rig) -> None:
    first = await complete(rig, rig.request(request_id="wf-run-7"))
    second = await complete(rig, rig.request("free-1", request_id="wf-run-7"))
    records = await rig.records()
    assert len(records) == 2
    ids = [r.request_id for r in records]
    assert len(set(ids)) == 2 and all(i.startswith("wf-run-7:") and len(i) == len("wf-run-7:") + 12 for i in ids)
    assert [(r.model, r.instance) for r in records] == [("priced-1", first.instance), ("free-1", second.instance)]
    assert [(r.input_tokens, r.output_tokens) for r in records] == [(10, 5), (10, 5)]
    assert records[1].cost_usd == 0.0  # an unpriced model: the call still counts


# --- streams ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_stream_announces_its_hold_and_settles_from_its_usage(rig: Rig) -> None:
    rig.connector.chunks = [chunk("a"), chunk("b"), {**chunk(""), "choices": [], "usage": USAGE}]
    request = rig.request(stream=True, include_usage=True)
    events = await collect(rig, request)
    announcement, last = events[0], events[-1]
    assert announcement.instance == "priced-1" and announcement.spend.budgeted
    assert announcement.spend.remaining_usd == pytest.approx(BUDGET - rig.worst(request), abs=1e-9)
    assert [e.WhichOneof("event") for e in events[1:]] == ["chunk_json"] * 3 + ["settled"]
    assert orjson.loads(events[3].chunk_json)["usage"] == USAGE  # asked for: relayed
    real = cost_of(10, 5)
    assert last.settled.cost_usd == pytest.approx(real) and last.settled.output_tokens == 5
    assert last.settled.remaining_usd == pytest.approx(BUDGET - real, abs=1e-9)
    assert await rig.remaining() == pytest.approx(BUDGET - real, abs=1e-9)
    (record,) = await rig.records()
    assert record.cost_usd == pytest.approx(real)


@pytest.mark.asyncio
async def test_a_stream_asks_the_upstream_for_usage_and_keeps_it_from_a_client_that_did_not(rig: Rig) -> None:
    with_null = [{**chunk("a"), "usage": None}, {**chunk("b"), "usage": None}]
    rig.connector.chunks = [*with_null, {**chunk(""), "choices": [], "usage": USAGE}]
    events = await collect(rig, rig.request(stream=True))
    assert rig.connector.bodies[0]["stream_options"] == {"include_usage": True}
    relayed = [orjson.loads(e.chunk_json) for e in events if e.WhichOneof("event") == "chunk_json"]
    assert len(relayed) == 2 and all("usage" not in c for c in relayed)
    assert events[-1].settled.cost_usd == pytest.approx(cost_of(10, 5))


@pytest.mark.asyncio
async def test_a_stream_without_usage_settles_what_it_relayed(rig: Rig) -> None:
    rig.connector.chunks = [chunk("a"), chunk("b"), chunk("c")]
    request = rig.request(stream=True)
    events = await collect(rig, request)
    produced = cost_of(len(request.openai_json) // 4, 3)
    assert events[-1].settled.cost_usd == pytest.approx(produced) and events[-1].settled.output_tokens == 3
    assert await rig.remaining() == pytest.approx(BUDGET - produced, abs=1e-9)


@pytest.mark.asyncio
async def test_a_stream_closed_by_the_client_settles_the_tokens_it_produced(rig: Rig) -> None:
    rig.connector.chunks = [chunk(str(i)) for i in range(50)]
    request = rig.request(stream=True)
    stream = rig.servicer.CompleteStream(request, Context())  # type: ignore[arg-type]
    events = [await anext(stream) for _ in range(4)]  # the announcement and three chunks
    assert events[0].instance == "priced-1"
    await stream.aclose()  # type: ignore[attr-defined]
    produced = cost_of(len(request.openai_json) // 4, 3)
    assert 0 < produced < rig.worst(request)
    assert await rig.remaining() == pytest.approx(BUDGET - produced, abs=1e-9)
    (record,) = await rig.records()
    assert record.output_tokens == 3 and record.cost_usd == pytest.approx(produced)


@pytest.mark.asyncio
async def test_a_stream_whose_call_is_cancelled_twice_still_settles(rig: Rig) -> None:
    """gRPC cancels the handler when the client goes; a second cancel (a server stopping)
    while the settlement is under way must not drop it."""
    rig.connector.chunks = [chunk(str(i)) for i in range(10)]
    rig.connector.stall_after = 2
    rig.book.go.clear()  # type: ignore[attr-defined]
    request = rig.request(stream=True)
    call = asyncio.create_task(collect(rig, request))
    await asyncio.wait_for(rig.connector.stalled.wait(), 30)
    call.cancel()
    await asyncio.wait_for(rig.book.settling.wait(), 30)  # type: ignore[attr-defined]
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    rig.book.go.set()  # type: ignore[attr-defined]
    await rig.spending.drain()
    produced = cost_of(len(request.openai_json) // 4, 2)
    assert await rig.remaining() == pytest.approx(BUDGET - produced, abs=1e-9)
    (record,) = await rig.records()
    assert record.output_tokens == 2


@pytest.mark.asyncio
async def test_a_stream_failing_midway_bills_what_it_relayed_and_one_failing_at_once_nothing(rig: Rig) -> None:
    class Midway(FakeConnector):
        async def stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[bytes]:
            yield orjson.dumps(chunk("a"))
            yield orjson.dumps(chunk("b"))
            raise upstream_error(retryable=False)

    request = rig.request(stream=True)
    rig.servicer._connectors = {"openai": Midway()}
    with pytest.raises(UpstreamError):
        await collect(rig, request)
    produced = cost_of(len(request.openai_json) // 4, 2)
    assert await rig.remaining() == pytest.approx(BUDGET - produced, abs=1e-9)
    rig.servicer._connectors = {"openai": rig.connector}
    rig.connector.errors = [upstream_error(retryable=False)]
    with pytest.raises(UpstreamError):
        await collect(rig, request)
    assert await rig.remaining() == pytest.approx(BUDGET - produced, abs=1e-9)
    records = await rig.records()
    assert [r.output_tokens for r in records] == [2]


@pytest.mark.asyncio
async def test_a_router_without_a_budget_book_refuses_budgeted_calls_and_serves_the_rest(rig: Rig) -> None:
    bare = RouterServicer(Config.model_validate({"models": MODELS}), {"openai": rig.connector}, Metrics("router"))
    with pytest.raises(GatewayError) as refused:
        await bare.Complete(rig.request(), Context())  # type: ignore[arg-type]
    assert refused.value.status == 503 and refused.value.code == "budget_unavailable"
    assert rig.connector.calls == []
    answer = await bare.Complete(rig.request(budget=False), Context())  # type: ignore[arg-type]
    assert answer.spend.cost_usd == pytest.approx(cost_of(10, 5))


# --- estimates --------------------------------------------------------------------------


def test_the_worst_case_of_each_task() -> None:
    assert estimate("chat", {}, b"", 100, None, 4096, 600.0).output_tokens == 4096
    assert estimate("chat", {}, b"", 100, 16, 4096, 600.0).output_tokens == 16
    assert estimate("embeddings", {}, b"", 100, None, 4096, 600.0).output_tokens == 0
    wav = handmade_wav(bytes(2 * 16000 * 2))
    assert estimate("transcription", {}, wav, 10, None, 4096, 600.0).audio_seconds == pytest.approx(2.0, abs=0.01)
    assert estimate("transcription", {}, b"not audio", 10, None, 4096, 600.0).audio_seconds == 600.0
    assert estimate("speech", {"input": "x" * 100}, b"", 10, None, 4096, 600.0).audio_seconds == pytest.approx(11.0)


def test_an_answer_without_usage_is_priced_on_its_input_and_audio() -> None:
    config = Config.model_validate(
        {
            "models": [
                {
                    "name": "tts",
                    "task": "speech",
                    "base_url": "http://x.invalid/v1",
                    "pricing": {"input_per_1k": 1.0, "per_audio_second": 0.01},
                }
            ]
        }
    )
    from clawdbot.router.registry import Registry

    (instance,) = Registry(config.models).instances()
    worst = estimate("speech", {"input": "hi"}, b"", 10, None, 4096, 600.0)
    assert unreported_cost(instance, worst, handmade_wav(bytes(3 * 16000 * 2))) == pytest.approx(0.01 + 0.03, abs=1e-4)
    assert unreported_cost(instance, worst, b"mp3 bytes") == pytest.approx(0.01)
