"""Issue 16 in the adapter: what a key restricts reaches the principal (stored and declared
keys alike) and meta.grant; every model request is admitted against the key's rate limits
before the cache or the router is asked and finished with the tokens it used (the router's
spend, 0 for a cache hit, a stream's `settled` event, which never reaches a protocol);
answers carry x-ratelimit-* and the budget left; the workflow allowlist holds.

The rate limiter here is a recording stand-in with RateLimiter's signatures (its own
behaviour is tested with it, in common/quota's tests); the router, orchestrator and cache
service are in-memory stand-ins; the cache client, the gateway and the protocols' header
code are the real ones."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from typing import Any, cast

import orjson
import pytest

from clawdbot.adapter.auth import Authenticator, Principal, caller, key_id
from clawdbot.adapter.gateway import Gateway
from clawdbot.adapter.jobs import job_tokens
from clawdbot.adapter.limits import Admitter, admitted, output_cap, token_estimate
from clawdbot.adapter.openai_requests import parse_chat, parse_embeddings
from clawdbot.adapter.protocols.base import routing_headers
from clawdbot.adapter.protocols.grpc_typed import send_error_headers
from clawdbot.adapter.protocols.rest import RestProtocol
from clawdbot.adapter.protocols.websocket import error_frame
from clawdbot.adapter.virtual_keys import principal_of
from clawdbot.common.clients.cache import ResponseCache, cache_scope
from clawdbot.common.config import CacheConfig, StaticKey
from clawdbot.common.errors import GatewayError
from clawdbot.common.keystore import KeyRecord
from clawdbot.common.metrics import Metrics
from clawdbot.common.quota import Admission, RateLimiter, RateLimits
from clawdbot.gen.v1 import cache_pb2, router_pb2

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
APP_SECRET = "app-secret"
ADMIN_SECRET = "admin-secret"
LIMITED = StaticKey.model_validate(
    {
        "name": "app",
        "key_env": "APP_KEY",
        "models": ["mock-*"],
        "budget": {"usd": 2.5, "period": "day"},
        "rate_limit": {"requests_per_minute": 60, "tokens_per_minute": 10_000},
        "max_parallel": 3,
        "defaults": {"strategy": "cheapest", "cache": "private", "workflows": ["daily-*"]},
    }
)


def record(**fields: Any) -> KeyRecord:
    values: dict[str, Any] = {
        "id": "key_stored0001",
        "name": "phone",
        "prefix": "sk-cb-abcd",
        "models": ("mock-*",),
        "budget": None,
        "rate_limit": None,
        "max_parallel": None,
        "expires_at": None,
        "metadata": {},
        "admin": False,
        "created_at": NOW,
        "updated_at": NOW,
        "revoked_at": None,
    }
    values.update(fields)
    return KeyRecord(**values)


# --- the principal ---------------------------------------------------------------------


def test_a_stored_key_carries_everything_it_restricts() -> None:
    principal = principal_of(
        record(
            budget={"usd": 0.01, "period": "month"},
            rate_limit={"requests_per_minute": 60, "tokens_per_minute": None},
            max_parallel=2,
            defaults={"strategy": "fastest", "cache": "shared", "workflows": ["summarise"]},
        )
    )
    assert principal.limits == RateLimits(requests_per_minute=60, tokens_per_minute=None, max_parallel=2)
    assert (principal.budget_usd, principal.budget_period) == (0.01, "month")
    assert (principal.strategy, principal.cache_scope, principal.workflows) == ("fastest", "shared", ("summarise",))
    assert principal.stored
    grant = principal.grant()
    assert list(grant.models) == ["mock-*"]
    assert (grant.budget_usd, grant.budget_period, grant.stored, grant.cache_scope) == (0.01, "month", True, "shared")


def test_a_stored_key_without_limits_or_defaults_restricts_nothing_more() -> None:
    # A record built without defaults (older code, or a test) reads as no defaults.
    principal = principal_of(record(models=()))
    assert not principal.limits.any
    assert principal.grant() == router_pb2.KeyGrant(stored=True)
    assert principal.allows_workflow("anything") and principal.allows_model("anything")


def test_declared_keys_carry_their_limits_and_admin_keys_none() -> None:
    auth = Authenticator([ADMIN_SECRET], [LIMITED], env={"APP_KEY": APP_SECRET})
    app = auth.check_key(APP_SECRET)
    assert app.key_id == key_id(APP_SECRET) and app.role == "user"
    assert app.limits == RateLimits(requests_per_minute=60, tokens_per_minute=10_000, max_parallel=3)
    assert (app.budget_usd, app.budget_period) == (2.5, "day")
    assert (app.strategy, app.cache_scope, app.workflows) == ("cheapest", "private", ("daily-*",))
    assert not app.stored
    assert app.grant() == router_pb2.KeyGrant(
        models=["mock-*"], budget_usd=2.5, budget_period="day", stored=False, cache_scope="private"
    )
    admin = auth.check_key(ADMIN_SECRET)
    assert admin == Principal(key_id(ADMIN_SECRET), "admin")
    assert not admin.limits.any and admin.grant() == router_pb2.KeyGrant()


# --- estimates and headers ---------------------------------------------------------------


def test_the_token_estimate_is_a_quarter_of_the_json_plus_the_output_cap() -> None:
    assert token_estimate(400, {}) == 100
    assert token_estimate(403, {"max_tokens": 50}) == 150
    assert token_estimate(400, {"max_completion_tokens": 7}) == 107
    assert token_estimate(400, {"max_tokens": None, "max_completion_tokens": 7}) == 107
    # Not a token count: ignored, as the router ignores it.
    assert output_cap({"max_tokens": True}) == 0
    assert output_cap({"max_tokens": "12"}) == 0
    # A transcription job's audio is no text: left out of its estimate.
    audio = {"model": "whisper", "file": "A" * 40_000}
    assert job_tokens(audio) == len(orjson.dumps({"model": "whisper"})) // 4
    chat = {"model": "mock-1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    assert job_tokens(chat) == len(orjson.dumps(chat)) // 4 + 20


RATE_HEADERS = (
    ("x-ratelimit-limit-requests", "60"),
    ("x-ratelimit-remaining-requests", "59"),
    ("x-ratelimit-reset-requests", "1s"),
)


@pytest.mark.asyncio
async def test_answers_carry_the_budget_left_and_the_admissions_rate_headers() -> None:
    response = router_pb2.ModelResponse(
        instance="mock-a",
        strategy="cheapest",
        cost_usd=0.000123,
        spend=router_pb2.Spend(budgeted=True, remaining_usd=1.23456789123, cost_usd=0.000123),
    )
    # Without an admission (a key without limits): no x-ratelimit-*.
    assert dict(routing_headers(response)) == {
        "x-clawdbot-model-instance": "mock-a",
        "x-clawdbot-strategy": "cheapest",
        "x-clawdbot-cost-usd": "0.00012300",
        "x-clawdbot-budget-remaining-usd": "1.23456789",
    }
    limiter = RecordingLimiter()
    caller.set(Principal("key_x", "user", limits=RateLimits(requests_per_minute=60)))
    await Admitter(cast(RateLimiter, limiter)).admit(10)
    headers = routing_headers(response)
    assert headers[-3:] == list(RATE_HEADERS)
    # No budget: no budget header (and never a "budget exceeded" either).
    unbudgeted = router_pb2.StreamEvent(instance="mock-a", strategy="s", spend=router_pb2.Spend(cost_usd=0))
    assert "x-clawdbot-budget-remaining-usd" not in dict(routing_headers(unbudgeted))
    # A stream's announcement: the budget left after its hold.
    announced = router_pb2.StreamEvent(instance="mock-a", spend=router_pb2.Spend(budgeted=True, remaining_usd=0.5))
    assert dict(routing_headers(announced))["x-clawdbot-budget-remaining-usd"] == "0.50000000"


REFUSED = GatewayError(
    429,
    "Rate limit reached for this key: 60 requests per minute. Try again in 1s.",
    "requests",
    "rate_limit_exceeded",
    None,
    "1",
    (("x-ratelimit-limit-requests", "60"), ("x-ratelimit-remaining-requests", "0")),
)


class MetadataContext:
    """A servicer context that records the initial metadata sent."""

    def __init__(self) -> None:
        self.sent: list[list[tuple[str, str]]] = []

    async def send_initial_metadata(self, metadata: Iterable[tuple[str, str]]) -> None:
        self.sent.append(list(metadata))


@pytest.mark.asyncio
async def test_a_refusal_carries_retry_after_and_the_rate_headers_on_every_protocol() -> None:
    rest = MetadataContext()
    body = await RestProtocol()._error(cast(Any, rest), REFUSED)
    assert orjson.loads(body.data)["error"]["code"] == "rate_limit_exceeded"
    assert rest.sent == [
        [
            ("x-clawdbot-status", "429"),
            ("retry-after", "1"),
            ("x-ratelimit-limit-requests", "60"),
            ("x-ratelimit-remaining-requests", "0"),
        ]
    ]
    typed = MetadataContext()
    await send_error_headers(cast(Any, typed), REFUSED)
    assert typed.sent == [rest.sent[0][1:]]
    frame = error_frame("c1", REFUSED)
    assert frame["status"] == 429 and frame["retry_after"] == "1"
    assert frame["headers"]["x-ratelimit-remaining-requests"] == "0"
    assert frame["error"]["code"] == "rate_limit_exceeded"
    # An error without any: no empty metadata sent, no empty fields.
    quiet = MetadataContext()
    await send_error_headers(cast(Any, quiet), GatewayError.bad_request("no"))
    assert quiet.sent == []
    assert "retry_after" not in error_frame("c2", GatewayError.bad_request("no"))


# --- the gateway: admission and finish ------------------------------------------------------


class RecordingLimiter:
    """RateLimiter's signatures; records what it is asked, refuses when told to."""

    def __init__(self, refuse: GatewayError | None = None) -> None:
        self.refuse = refuse
        self.admitted: list[tuple[str, RateLimits, int]] = []
        self.finished: list[int | None] = []

    async def admit(self, key_id: str, limits: RateLimits, tokens: int) -> Admission:
        if self.refuse is not None:
            raise self.refuse
        self.admitted.append((key_id, limits, tokens))
        return Admission(key_id, limits, tokens, "lease-1", RATE_HEADERS)

    async def finish(self, admission: Admission, actual_tokens: int | None) -> None:
        self.finished.append(actual_tokens)


class StreamCall:
    def __init__(self, events: list[router_pb2.StreamEvent]) -> None:
        self._events = events
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[router_pb2.StreamEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[router_pb2.StreamEvent]:
        for event in self._events:
            yield event

    def cancel(self) -> None:
        self.cancelled = True


class FakeRouter:
    def __init__(
        self, response: router_pb2.ModelResponse | None = None, events: list[router_pb2.StreamEvent] | None = None
    ) -> None:
        self.response = response or router_pb2.ModelResponse()
        self.events = events or []
        self.requests: list[router_pb2.ModelRequest] = []

    async def Complete(self, request: router_pb2.ModelRequest, **_options: Any) -> router_pb2.ModelResponse:  # noqa: N802
        self.requests.append(request)
        answer = router_pb2.ModelResponse()
        answer.CopyFrom(self.response)
        return answer

    def CompleteStream(self, request: router_pb2.ModelRequest, **_options: Any) -> StreamCall:  # noqa: N802
        self.requests.append(request)
        return StreamCall(self.events)


class MemoryCacheStub:
    """The cache service's Lookup/Put/Delete over a dict."""

    def __init__(self) -> None:
        self.entries: dict[str, bytes] = {}

    async def Lookup(self, request: cache_pb2.CacheGetRequest, **_options: Any) -> cache_pb2.CacheChunk:  # noqa: N802
        data = self.entries.get(request.key)
        if data is None:
            return cache_pb2.CacheChunk(status="miss", lease="lease")
        return cache_pb2.CacheChunk(status="hit", level="l1", data=data, meta=cache_pb2.CacheEntryMeta(size=len(data)))

    async def Put(self, chunks: Iterable[cache_pb2.CachePutChunk], **_options: Any) -> cache_pb2.CachePutResponse:  # noqa: N802
        parts = list(chunks)
        self.entries[parts[0].key] = b"".join(part.data for part in parts)
        return cache_pb2.CachePutResponse(levels=["l1"])

    async def Delete(self, request: Any, **_options: Any) -> Any:  # noqa: N802
        self.entries.pop(request.key, None)
        return None


ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "mock-1",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
}


def gateway_with(
    router: FakeRouter, limiter: RecordingLimiter, cache: ResponseCache | None = None, orchestrator: Any = None
) -> Gateway:
    auth = Authenticator([ADMIN_SECRET], [LIMITED], env={"APP_KEY": APP_SECRET})
    return Gateway(
        cast(Any, router),
        auth,
        Metrics("adapter"),
        10.0,
        cache,
        orchestrator=orchestrator,
        admitter=Admitter(cast(RateLimiter, limiter)),
    )


CHAT = {"model": "mock-1", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 40}
APP = {"authorization": f"Bearer {APP_SECRET}"}


@pytest.mark.asyncio
async def test_meta_carries_the_grant_and_the_keys_default_strategy() -> None:
    gateway = gateway_with(FakeRouter(), RecordingLimiter())
    meta = await gateway.accept(APP, "rest")
    assert meta.grant == router_pb2.KeyGrant(
        models=["mock-*"], budget_usd=2.5, budget_period="day", stored=False, cache_scope="private"
    )
    assert meta.strategy == "cheapest"
    # The caller's own choice wins over the key's default.
    meta = await gateway.accept({**APP, "x-clawdbot-strategy": "fastest"}, "rest")
    assert meta.strategy == "fastest"
    admin = await gateway.accept({"authorization": f"Bearer {ADMIN_SECRET}"}, "rest")
    assert admin.grant == router_pb2.KeyGrant() and admin.strategy == ""


@pytest.mark.asyncio
async def test_a_completion_is_admitted_first_and_finished_with_the_routers_spend() -> None:
    router = FakeRouter(
        router_pb2.ModelResponse(
            openai_json=orjson.dumps(ANSWER),
            instance="mock-a",
            spend=router_pb2.Spend(budgeted=True, remaining_usd=2.0, input_tokens=12, output_tokens=30),
        )
    )
    limiter = RecordingLimiter()
    gateway = gateway_with(router, limiter)
    meta = await gateway.accept(APP, "rest")
    raw = orjson.dumps(CHAT)
    request = await gateway.model_request(parse_chat(dict(CHAT)), meta, raw)
    assert limiter.admitted == [(key_id(APP_SECRET), LIMITED_LIMITS, len(raw) // 4 + 40)] and not router.requests
    response = await gateway.complete(request)
    assert limiter.finished == [42]
    assert dict(routing_headers(response))["x-ratelimit-remaining-requests"] == "59"
    assert response.cache == "miss"


LIMITED_LIMITS = RateLimits(requests_per_minute=60, tokens_per_minute=10_000, max_parallel=3)


@pytest.mark.asyncio
async def test_a_refused_request_never_reaches_the_cache_or_the_router() -> None:
    router = FakeRouter()
    stub = MemoryCacheStub()
    gateway = gateway_with(router, RecordingLimiter(refuse=REFUSED), ResponseCache(cast(Any, stub), CacheConfig(), ()))
    meta = await gateway.accept(APP, "rest")
    with pytest.raises(GatewayError) as refused:
        await gateway.model_request(parse_chat(dict(CHAT)), meta, None)
    assert refused.value is REFUSED
    assert not router.requests and not stub.entries


@pytest.mark.asyncio
async def test_a_cache_hit_counts_as_a_request_of_no_tokens_and_tells_no_stale_budget() -> None:
    router = FakeRouter(
        router_pb2.ModelResponse(
            openai_json=orjson.dumps(ANSWER),
            instance="mock-a",
            spend=router_pb2.Spend(budgeted=True, remaining_usd=2.0, input_tokens=12, output_tokens=30),
        )
    )
    limiter = RecordingLimiter()
    stub = MemoryCacheStub()
    gateway = gateway_with(router, limiter, ResponseCache(cast(Any, stub), CacheConfig(), ()))
    meta = await gateway.accept(APP, "rest")
    first = await gateway.complete(await gateway.model_request(parse_chat(dict(CHAT)), meta, None))
    assert first.cache == "miss" and first.spend.input_tokens == 12
    # What the call cost its key is no part of the stored answer.
    (stored,) = stub.entries.values()
    assert not router_pb2.ModelResponse.FromString(stored).HasField("spend")
    hit = await gateway.complete(await gateway.model_request(parse_chat(dict(CHAT)), meta, None))
    assert hit.cache == "hit-l1" and not hit.HasField("spend")
    assert "x-clawdbot-budget-remaining-usd" not in dict(routing_headers(hit))
    assert len(router.requests) == 1
    assert len(limiter.admitted) == 2 and limiter.finished == [42, 0]
    # Streamed from the cache too: admitted, 0 tokens.
    streaming = await gateway.model_request(parse_chat({**CHAT, "stream": True}), meta, None)
    events = [event async for event in gateway.stream(streaming)]
    assert events[0].cache == "hit-l1" and len(router.requests) == 1
    assert limiter.finished == [42, 0, 0]


def stream_events(settled: bool = True) -> list[router_pb2.StreamEvent]:
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "mock-1"}
    events = [
        router_pb2.StreamEvent(
            instance="mock-a", strategy="cheapest", spend=router_pb2.Spend(budgeted=True, remaining_usd=1.5)
        ),
        router_pb2.StreamEvent(
            chunk_json=orjson.dumps(
                {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "he"}}]}
            )
        ),
        router_pb2.StreamEvent(
            chunk_json=orjson.dumps(
                {**chunk, "choices": [{"index": 0, "delta": {"content": "llo"}, "finish_reason": "stop"}]}
            )
        ),
    ]
    if settled:
        events.append(
            router_pb2.StreamEvent(
                settled=router_pb2.Spend(budgeted=True, remaining_usd=1.9, input_tokens=9, output_tokens=2)
            )
        )
    return events


@pytest.mark.asyncio
async def test_a_stream_is_finished_with_its_settled_tokens_which_no_protocol_sees() -> None:
    router = FakeRouter(events=stream_events())
    limiter = RecordingLimiter()
    gateway = gateway_with(router, limiter)
    meta = await gateway.accept(APP, "rest")
    request = await gateway.model_request(parse_chat({**CHAT, "stream": True}), meta, None)
    events = [event async for event in gateway.stream(request)]
    assert [event.WhichOneof("event") for event in events] == ["instance", "chunk_json", "chunk_json"]
    assert limiter.finished == [11]
    # The announcement's headers, before the first byte: budget left after the hold.
    headers = dict(routing_headers(events[0]))
    assert headers["x-clawdbot-budget-remaining-usd"] == "1.50000000"
    assert headers["x-ratelimit-limit-requests"] == "60"


@pytest.mark.asyncio
async def test_a_stream_cut_short_or_without_settlement_keeps_the_estimate() -> None:
    limiter = RecordingLimiter()
    gateway = gateway_with(FakeRouter(events=stream_events()), limiter)
    meta = await gateway.accept(APP, "rest")
    request = await gateway.model_request(parse_chat({**CHAT, "stream": True}), meta, None)
    stream = gateway.stream(request)
    await anext(stream)
    await anext(stream)
    await stream.aclose()  # the client went away
    assert limiter.finished == [None]
    gateway = gateway_with(FakeRouter(events=stream_events(settled=False)), limiter)
    meta = await gateway.accept(APP, "rest")
    request = await gateway.model_request(parse_chat({**CHAT, "stream": True}), meta, None)
    assert len([event async for event in gateway.stream(request)]) == 3
    assert limiter.finished == [None, None]


class FailingRouter(FakeRouter):
    def __init__(self, error: GatewayError) -> None:
        super().__init__()
        self.error = error

    async def Complete(self, request: router_pb2.ModelRequest, **_options: Any) -> router_pb2.ModelResponse:  # noqa: N802
        raise self.error


@pytest.mark.asyncio
async def test_a_refused_call_uses_no_tokens_and_a_failed_one_keeps_the_estimate() -> None:
    limiter = RecordingLimiter()
    for error in (
        GatewayError(429, "over budget", "insufficient_quota", "insufficient_quota"),
        GatewayError(504, "slow", "timeout", "timeout"),
    ):
        gateway = gateway_with(FailingRouter(error), limiter)
        meta = await gateway.accept(APP, "rest")
        request = await gateway.model_request(parse_embeddings({"model": "mock-e", "input": "x"}), meta, None)
        with pytest.raises(GatewayError):
            await gateway.complete(request)
    assert limiter.finished == [0, None]


# --- workflows ----------------------------------------------------------------------------


class FakeOrchestrator:
    def __init__(self) -> None:
        self.runs: list[str] = []

    async def Run(self, request: Any, **_options: Any) -> Any:  # noqa: N802
        self.runs.append(request.name)
        return type("Reply", (), {"json": orjson.dumps({"object": "workflow.run", "status": "completed"})})()

    async def List(self, request: Any, **_options: Any) -> Any:  # noqa: N802
        listed = {
            "object": "list",
            "data": [{"name": "daily-news"}, {"name": "summarise"}, {"name": "daily-weather"}],
            "problems": ["secret.yaml: broken"],
        }
        return type("Reply", (), {"json": orjson.dumps(listed)})()

    async def Describe(self, request: Any, **_options: Any) -> Any:  # noqa: N802
        return type("Reply", (), {"json": orjson.dumps({"name": request.name})})()


@pytest.mark.asyncio
async def test_a_key_with_allowed_workflows_runs_and_sees_those_alone() -> None:
    orchestrator = FakeOrchestrator()
    limiter = RecordingLimiter()
    gateway = gateway_with(FakeRouter(), limiter, orchestrator=orchestrator)
    meta = await gateway.accept(APP, "rest")
    for call in (
        gateway.run_workflow(meta, "summarise", b'{"text": "x"}'),
        gateway.describe_workflow(meta, "summarise"),
        anext(gateway.stream_workflow(meta, "summarise", b"null")),
    ):
        with pytest.raises(GatewayError) as refused:
            await call
        assert (refused.value.status, refused.value.type, refused.value.code) == (
            403,
            "permission_error",
            "workflow_not_allowed",
        )
    assert not orchestrator.runs and not limiter.admitted
    await gateway.run_workflow(meta, "daily-news", b'{"text": "x"}')
    assert orchestrator.runs == ["daily-news"]
    # A run is admitted as one request and finished after it.
    assert limiter.admitted == [(key_id(APP_SECRET), LIMITED_LIMITS, len(b'{"text": "x"}') // 4)]
    assert limiter.finished == [None]
    assert orjson.loads(await gateway.describe_workflow(meta, "daily-weather")) == {"name": "daily-weather"}
    listed = orjson.loads(await gateway.list_workflows(meta))
    assert [w["name"] for w in listed["data"]] == ["daily-news", "daily-weather"]
    assert listed["problems"] == []
    # A key without the restriction sees them all.
    await gateway.accept({"authorization": f"Bearer {ADMIN_SECRET}"}, "rest")
    assert len(orjson.loads(await gateway.list_workflows(meta))["data"]) == 3


# --- the cache scope ------------------------------------------------------------------------


def test_the_keys_cache_default_chooses_the_scope() -> None:
    def meta(scope: str) -> router_pb2.RequestMeta:
        return router_pb2.RequestMeta(api_key_id="key_a", grant=router_pb2.KeyGrant(cache_scope=scope))

    assert cache_scope(meta(""), shared=False) == "key_a"
    assert cache_scope(meta(""), shared=True) == "shared"
    assert cache_scope(meta("private"), shared=True) == "key_a"
    assert cache_scope(meta("shared"), shared=False) == "shared"


@pytest.mark.asyncio
async def test_admissions_do_not_leak_between_requests() -> None:
    # The admission of the request being served is a context variable: a request served
    # in another task (another RPC, another WebSocket frame) starts without one.
    limiter = RecordingLimiter()
    caller.set(Principal("key_x", "user", limits=RateLimits(requests_per_minute=60)))
    await Admitter(cast(RateLimiter, limiter)).admit(1)
    assert admitted.get() is not None

    async def elsewhere() -> bool:
        caller.set(Principal("key_y", "user"))
        await Admitter(cast(RateLimiter, limiter)).admit(1)  # no limits: nothing admitted
        return admitted.get() is None

    assert await asyncio.create_task(elsewhere())
    assert admitted.get() is not None


@pytest.mark.asyncio
async def test_with_the_real_limiter_a_finished_request_gives_its_place_back() -> None:
    # The in-process RateLimiter on a stopped clock: 2 requests a minute, 1 at a time.
    key = StaticKey.model_validate(
        {"name": "tight", "key_env": "TIGHT_KEY", "rate_limit": {"requests_per_minute": 2}, "max_parallel": 1}
    )
    auth = Authenticator([ADMIN_SECRET], [key], env={"TIGHT_KEY": "tight-secret"})
    router = FakeRouter(router_pb2.ModelResponse(openai_json=orjson.dumps(ANSWER)), stream_events())
    limiter = RateLimiter(None, now_ms=lambda: 0)
    gateway = Gateway(cast(Any, router), auth, Metrics("adapter"), 10.0, admitter=Admitter(limiter))
    meta = await gateway.accept({"authorization": "Bearer tight-secret"}, "rest")
    streaming = await gateway.model_request(parse_chat({**CHAT, "stream": True}), meta, None)
    stream = gateway.stream(streaming)
    first = await anext(stream)
    assert dict(routing_headers(first))["x-ratelimit-remaining-requests"] == "1"
    # While the stream runs, its lease is the key's one place.
    with pytest.raises(GatewayError) as busy:
        await gateway.model_request(parse_chat(dict(CHAT)), meta, None)
    assert busy.value.status == 429 and busy.value.code == "rate_limit_exceeded" and busy.value.retry_after
    await stream.aclose()
    # Closed: the place is free again; the refusal took nothing from the requests bucket.
    response = await gateway.complete(await gateway.model_request(parse_chat(dict(CHAT)), meta, None))
    assert dict(routing_headers(response))["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(GatewayError) as spent:
        await gateway.model_request(parse_chat(dict(CHAT)), meta, None)
    assert spent.value.status == 429 and spent.value.retry_after
    assert dict(spent.value.headers)["x-ratelimit-remaining-requests"] == "0"
    assert len(router.requests) == 2
