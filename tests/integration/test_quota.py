"""Budgets and rate limits (common/quota) against a real redis-server: exactness under
concurrency, exactly-once settles, hold expiry, period rollover, counters re-seeded from
the ledger, token buckets with their headers, leases, and Redis going away."""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from clawdbot.common.errors import GatewayError
from clawdbot.common.quota import USD_NANO, Admission, BudgetBook, RateLimiter, RateLimits, key_tag
from tests.support import Proc, start_redis, wait_for_async

# Generous on a busy 2-core machine; conditions, not sleeps, decide when a test goes on.
WITHIN_S = 30.0


@dataclass
class RedisServer:
    tmp: Path
    proc: Proc
    port: int

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


def client(port: int) -> aioredis.Redis:
    # One quick retry instead of redis-py's default backoff (seconds per call against a
    # dead server): what the services' quota clients should do as well.
    return aioredis.Redis(
        port=port, socket_timeout=5, socket_connect_timeout=5, retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1)
    )


@dataclass
class Harness:
    server: RedisServer
    raw: aioredis.Redis
    clients: list[aioredis.Redis] = field(default_factory=list)

    def replica(self) -> aioredis.Redis:
        """A connection pool of its own, as another adapter or router replica has."""
        c = client(self.server.port)
        self.clients.append(c)
        return c


@pytest_asyncio.fixture
async def harness(redis_server: RedisServer) -> AsyncIterator[Harness]:
    redis_server.start()
    h = Harness(redis_server, client(redis_server.port))
    yield h
    for c in h.clients:
        await c.aclose()
    await h.raw.aclose()


@dataclass
class Ledger:
    """A stand-in for KeyStore.spend_total: what the ledger says each key spent."""

    spent: dict[str, float] = field(default_factory=dict)
    calls: list[tuple[str, datetime | None]] = field(default_factory=list)
    failing: bool = False

    async def __call__(self, key_id: str, since: datetime | None) -> float:
        self.calls.append((key_id, since))
        if self.failing:
            raise ConnectionError("the ledger database is down")
        return self.spent.get(key_id, 0.0)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def new_key() -> str:
    return f"key_{uuid.uuid4().hex[:12]}"


def hold_id() -> str:
    return uuid.uuid4().hex


async def counter_nano(raw: aioredis.Redis, key_id: str, period_id: str) -> int | None:
    value = await raw.get(f"{key_tag(key_id)}:b:{period_id}:spent")
    return None if value is None else int(value)


def today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


# --- budgets ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_fifty_concurrent_holds_admit_exactly_the_budget(harness: Harness) -> None:
    key = new_key()
    ledger = Ledger()
    # Two replicas, each with its own connections, share one budget.
    books = [BudgetBook(harness.replica(), ledger), BudgetBook(harness.replica(), ledger)]
    ids = [hold_id() for _ in range(50)]

    async def one(i: int) -> float | GatewayError:
        try:
            return await books[i % 2].hold(key, 0.01, "day", ids[i], 0.001)
        except GatewayError as exc:
            return exc

    results = await asyncio.gather(*(one(i) for i in range(50)))
    admitted = [i for i, r in enumerate(results) if isinstance(r, float)]
    refused = [r for r in results if isinstance(r, GatewayError)]
    assert len(admitted) == 10
    assert len(refused) == 40
    for err in refused:
        assert (err.status, err.type, err.code) == (429, "insufficient_quota", "insufficient_quota")
        assert "$0.01 per day" in err.message
    # Each admitted hold saw what was left after it: 9, 8, ... 0 thousandths, once each.
    assert sorted(round(r * 1000) for r in results if isinstance(r, float)) == list(range(10))
    assert await books[0].remaining(key, 0.01, "day") == 0.0

    # Settling each at its full hold spends exactly the budget, to the nano-dollar.
    for i in admitted:
        await books[i % 2].settle(key, 0.01, "day", ids[i], 0.001)
    assert await counter_nano(harness.raw, key, today()) == USD_NANO // 100
    assert await books[1].remaining(key, 0.01, "day") == 0.0
    with pytest.raises(GatewayError) as exc_info:
        await books[0].hold(key, 0.01, "day", hold_id(), 0.0)  # spent >= budget: even $0 is refused
    assert exc_info.value.code == "insufficient_quota"
    # The counter was seeded from the ledger once (or once per replica racing), not per hold.
    assert 1 <= len(ledger.calls) <= 2


@pytest.mark.asyncio
async def test_settle_counts_exactly_once(harness: Harness) -> None:
    key = new_key()
    book = BudgetBook(harness.replica(), Ledger())
    first = hold_id()
    assert await book.hold(key, 1.0, "month", first, 0.5) == pytest.approx(0.5)
    # Two end callbacks of one call (a stream's usage event and its teardown), at once.
    answers = await asyncio.gather(
        book.settle(key, 1.0, "month", first, 0.2), book.settle(key, 1.0, "month", first, 0.2)
    )
    assert answers == [pytest.approx(0.8), pytest.approx(0.8)]
    assert await book.settle(key, 1.0, "month", first, 0.2) == pytest.approx(0.8)
    month = datetime.now(UTC).strftime("%Y-%m")
    assert await counter_nano(harness.raw, key, month) == 200_000_000
    # A release (cost 0) frees the whole hold.
    second = hold_id()
    assert await book.hold(key, 1.0, "month", second, 0.7) == pytest.approx(0.1)
    assert await book.settle(key, 1.0, "month", second, 0.0) == pytest.approx(0.8)
    assert await book.remaining(key, 1.0, "month") == pytest.approx(0.8)
    # The settled marker expires (the period counter lives on): bounded memory per call.
    marker_ttl = await harness.raw.ttl(f"{key_tag(key)}:settled:{first}")
    assert 0 < marker_ttl <= 1800
    assert 31 * 86_400 < await harness.raw.ttl(f"{key_tag(key)}:b:{month}:spent") <= 33 * 86_400


@pytest.mark.asyncio
async def test_unsettled_holds_lapse_and_a_late_settle_still_counts_once(harness: Harness) -> None:
    key = new_key()
    book = BudgetBook(harness.replica(), Ledger(), hold_ttl_s=1.0)
    leaked = hold_id()
    assert await book.hold(key, 0.01, "day", leaked, 0.01) == 0.0
    with pytest.raises(GatewayError):
        await book.hold(key, 0.01, "day", hold_id(), 0.001)
    started = time.monotonic()

    async def admitted() -> bool:
        try:
            await book.hold(key, 0.01, "day", hold_id(), 0.001)
        except GatewayError as exc:
            assert exc.code == "insufficient_quota"
            return False
        return True

    # The leaked hold is reaped by the script itself once its second is over.
    await wait_for_async(admitted, WITHIN_S, "the leaked hold to lapse")
    assert time.monotonic() - started >= 0.5
    holds = await harness.raw.hgetall(f"{key_tag(key)}:b:{today()}:holds")
    assert leaked.encode() not in holds
    # The call behind the leaked hold did finish after all: its cost counts, once.
    assert await book.settle(key, 0.01, "day", leaked, 0.004) == pytest.approx(0.005)
    assert await book.settle(key, 0.01, "day", leaked, 0.004) == pytest.approx(0.005)
    assert await counter_nano(harness.raw, key, today()) == 4_000_000


@pytest.mark.asyncio
async def test_next_period_starts_fresh(harness: Harness) -> None:
    key = new_key()
    ledger = Ledger()
    clock = Clock(datetime(2026, 3, 31, 23, 59, 30, tzinfo=UTC))
    book = BudgetBook(harness.replica(), ledger, clock=clock)
    spent = hold_id()
    await book.hold(key, 0.01, "day", spent, 0.01)
    await book.settle(key, 0.01, "day", spent, 0.01)
    with pytest.raises(GatewayError):
        await book.hold(key, 0.01, "day", hold_id(), 0.001)
    assert ledger.calls == [(key, datetime(2026, 3, 31, tzinfo=UTC))]

    clock.now = datetime(2026, 4, 1, 0, 0, 1, tzinfo=UTC)
    assert await book.hold(key, 0.01, "day", hold_id(), 0.001) == pytest.approx(0.009)
    assert ledger.calls[-1] == (key, datetime(2026, 4, 1, tzinfo=UTC))
    assert await counter_nano(harness.raw, key, "2026-03-31") == 10_000_000
    assert await counter_nano(harness.raw, key, "2026-04-01") == 0

    # A monthly budget rolls over on the 1st; a total one never does.
    monthly, total = new_key(), new_key()
    clock.now = datetime(2026, 4, 30, 23, 0, tzinfo=UTC)
    for k, period in ((monthly, "month"), (total, "total")):
        h = hold_id()
        await book.hold(k, 0.01, period, h, 0.01)
        await book.settle(k, 0.01, period, h, 0.01)
    clock.now = datetime(2026, 5, 1, 0, 0, tzinfo=UTC) + timedelta(seconds=1)
    assert await book.remaining(monthly, 0.01, "month") == pytest.approx(0.01)
    assert await book.remaining(total, 0.01, "total") == 0.0
    assert (total, None) in ledger.calls
    assert await harness.raw.ttl(f"{key_tag(total)}:b:total:spent") == -1  # never expires


@pytest.mark.asyncio
async def test_lost_counters_are_seeded_from_the_ledger(harness: Harness) -> None:
    key = new_key()
    ledger = Ledger({key: 0.002})
    book = BudgetBook(harness.replica(), ledger)
    first = hold_id()
    # Seeded from the ledger's $0.002 before the first hold.
    assert await book.hold(key, 0.01, "day", first, 0.003) == pytest.approx(0.005)
    await book.settle(key, 0.01, "day", first, 0.003)
    assert await counter_nano(harness.raw, key, today()) == 5_000_000

    # Redis loses everything; by now the ledger has the settled call too.
    await harness.raw.flushall()
    ledger.spent[key] = 0.005
    assert await book.hold(key, 0.01, "day", hold_id(), 0.001) == pytest.approx(0.004)
    assert await counter_nano(harness.raw, key, today()) == 5_000_000

    # max(Redis, ledger): another replica counted more while this one read a stale ledger.
    await harness.raw.flushall()
    counter = f"{key_tag(key)}:b:{today()}:spent"

    async def stale_ledger(key_id: str, since: datetime | None) -> float:
        await harness.raw.set(counter, 8_000_000)
        return 0.003

    racing = BudgetBook(harness.replica(), stale_ledger)
    assert await racing.remaining(key, 0.01, "day") == pytest.approx(0.002)
    assert await counter_nano(harness.raw, key, today()) == 8_000_000

    # A ledger that cannot answer leaves nothing to go on: no hold (fail closed).
    await harness.raw.flushall()
    ledger.failing = True
    with pytest.raises(GatewayError) as exc_info:
        await book.hold(key, 0.01, "day", hold_id(), 0.001)
    assert (exc_info.value.status, exc_info.value.code) == (503, "budget_unavailable")
    # A settle in that state drops its hold, never raises, and leaves the counter for the
    # ledger to seed later (counting from zero would forget the ledger's spend).
    assert math.isfinite(await book.settle(key, 0.01, "day", hold_id(), 0.001))
    assert await counter_nano(harness.raw, key, today()) is None


# --- rate limits --------------------------------------------------------------------


def header(admission_or_error: Admission | GatewayError, name: str) -> str:
    return dict(admission_or_error.headers)[name]


@pytest.mark.asyncio
async def test_burst_of_200_against_60_rpm(harness: Harness) -> None:
    key = new_key()
    limiters = [RateLimiter(harness.replica()), RateLimiter(harness.replica())]
    limits = RateLimits(requests_per_minute=60)

    async def one(i: int) -> Admission | GatewayError:
        try:
            return await limiters[i % 2].admit(key, limits, 0)
        except GatewayError as exc:
            return exc

    started = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(200)))
    elapsed = time.monotonic() - started
    admitted = [r for r in results if isinstance(r, Admission)]
    refused = [r for r in results if isinstance(r, GatewayError)]
    # The bucket holds 60 and refills one a second: 60, plus one per second the burst took.
    assert 60 <= len(admitted) <= 60 + int(elapsed)
    assert len(admitted) + len(refused) == 200
    for err in refused:
        assert (err.status, err.type, err.code) == (429, "requests", "rate_limit_exceeded")
        assert err.retry_after == "1"
        assert header(err, "x-ratelimit-limit-requests") == "60"
        assert header(err, "x-ratelimit-remaining-requests") == "0"
        assert "60 requests per minute" in err.message
    remaining = sorted(int(header(a, "x-ratelimit-remaining-requests")) for a in admitted)
    if elapsed < 1:
        assert remaining == list(range(60))  # 59, 58, ... 0, each once
    assert remaining[0] == 0

    # One more a second after that: a refused request waits about what Retry-After said.
    async def one_more() -> bool:
        return isinstance(await one(0), Admission)

    await wait_for_async(one_more, WITHIN_S, "the bucket to refill one request")


@pytest.mark.asyncio
async def test_headers_count_down(harness: Harness) -> None:
    key = new_key()
    limiter = RateLimiter(harness.replica())
    limits = RateLimits(requests_per_minute=60, tokens_per_minute=6000)
    seen = []
    for _ in range(5):
        admission = await limiter.admit(key, limits, 100)
        seen.append(dict(admission.headers))
        assert admission.tokens_held == 100
        await limiter.finish(admission, None)
    assert [h["x-ratelimit-remaining-requests"] for h in seen] == ["59", "58", "57", "56", "55"]
    assert [h["x-ratelimit-remaining-tokens"] for h in seen] == ["5900", "5800", "5700", "5600", "5500"]
    assert all(h["x-ratelimit-limit-requests"] == "60" and h["x-ratelimit-limit-tokens"] == "6000" for h in seen)
    # Time until full: one request of 60/min is 1s; 100 tokens of 6000/min is 1s as well.
    assert seen[0]["x-ratelimit-reset-requests"] == "1s"
    assert seen[0]["x-ratelimit-reset-tokens"] == "1s"
    assert re.fullmatch(r"5s|4(\.\d{1,3})?s", seen[4]["x-ratelimit-reset-requests"])
    # A key without limits: no I/O, no headers.
    free = await limiter.admit(key, RateLimits(), 10**9)
    assert free.headers == () and free.lease is None and free.tokens_held == 0


@pytest.mark.asyncio
async def test_tokens_are_corrected_to_the_actual_count(harness: Harness) -> None:
    key = new_key()
    limiter = RateLimiter(harness.replica())
    limits = RateLimits(tokens_per_minute=1000)

    # Used less than estimated: the difference goes back.
    estimate = await limiter.admit(key, limits, 500)
    assert header(estimate, "x-ratelimit-remaining-tokens") == "500"
    await limiter.finish(estimate, 100)
    after_refund = await limiter.admit(key, limits, 0)
    assert int(header(after_refund, "x-ratelimit-remaining-tokens")) >= 900

    # Used far more than held: the bucket goes into debt and the next request waits.
    other = new_key()
    small = await limiter.admit(other, limits, 100)
    await limiter.finish(small, 1500)  # 500 tokens below empty
    with pytest.raises(GatewayError) as exc_info:
        await limiter.admit(other, limits, 1)
    err = exc_info.value
    assert (err.status, err.type, err.code) == (429, "tokens", "rate_limit_exceeded")
    # 501 tokens at 1000/min: about 30 s.
    assert 29 <= int(err.retry_after or "0") <= 31
    assert header(err, "x-ratelimit-remaining-tokens") == "0"

    # Larger than the whole bucket: refused at once, saying why; nothing taken.
    third = new_key()
    with pytest.raises(GatewayError) as exc_info:
        await limiter.admit(third, limits, 1001)
    assert exc_info.value.type == "tokens" and "can never be admitted" in exc_info.value.message
    assert header(await limiter.admit(third, limits, 1000), "x-ratelimit-remaining-tokens") == "0"


@pytest.mark.asyncio
async def test_a_refused_request_takes_nothing(harness: Harness) -> None:
    key = new_key()
    limiter = RateLimiter(harness.replica())
    limits = RateLimits(requests_per_minute=60, tokens_per_minute=100, max_parallel=5)
    first = await limiter.admit(key, limits, 90)
    for _ in range(3):
        with pytest.raises(GatewayError) as exc_info:
            await limiter.admit(key, limits, 50)  # the tokens say no
        assert header(exc_info.value, "x-ratelimit-remaining-requests") == "59"
    second = await limiter.admit(key, limits, 5)
    assert header(second, "x-ratelimit-remaining-requests") == "58"
    assert await harness.raw.zcard(f"{key_tag(key)}:rl:par") == 2
    await limiter.finish(first, None)
    await limiter.finish(second, None)
    assert await harness.raw.zcard(f"{key_tag(key)}:rl:par") == 0


@pytest.mark.asyncio
async def test_max_parallel_leases(harness: Harness) -> None:
    key = new_key()
    limiter = RateLimiter(harness.replica(), lease_ttl_s=2.0)
    limits = RateLimits(max_parallel=2)
    a = await limiter.admit(key, limits, 0)
    b = await limiter.admit(key, limits, 0)
    assert a.lease and b.lease and a.lease != b.lease
    assert a.headers == ()  # only per-minute limits have headers
    with pytest.raises(GatewayError) as exc_info:
        await limiter.admit(key, limits, 0)
    err = exc_info.value
    assert (err.status, err.type, err.code, err.retry_after) == (429, "requests", "rate_limit_exceeded", "1")
    assert "2 requests in flight" in err.message
    await limiter.finish(a, None)
    c = await limiter.admit(key, limits, 0)
    await limiter.finish(a, None)  # finishing twice gives back nothing more
    with pytest.raises(GatewayError):
        await limiter.admit(key, limits, 0)

    # Leases of a process that died lapse on their own (b and c are never finished).
    async def admitted() -> bool:
        try:
            await limiter.admit(key, limits, 0)
        except GatewayError:
            return False
        return True

    await wait_for_async(admitted, WITHIN_S, "the leaked leases to lapse")
    assert c.lease is not None


# --- Redis away ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_redis_away_fails_closed(tmp_path: Path) -> None:
    proc, port = start_redis(tmp_path)
    redis = client(port)
    try:
        key = new_key()
        book = BudgetBook(redis, Ledger())
        limiter = RateLimiter(redis)
        limits = RateLimits(requests_per_minute=60, max_parallel=4)
        held = hold_id()
        await book.hold(key, 1.0, "day", held, 0.1)
        admission = await limiter.admit(key, limits, 0)
        proc.stop()

        with pytest.raises(GatewayError) as exc_info:
            await book.hold(key, 1.0, "day", hold_id(), 0.1)
        assert (exc_info.value.status, exc_info.value.code) == (503, "budget_unavailable")
        with pytest.raises(GatewayError) as exc_info:
            await limiter.admit(key, limits, 0)
        assert (exc_info.value.status, exc_info.value.code) == (503, "rate_limiter_unavailable")
        with pytest.raises(GatewayError) as exc_info:
            await book.remaining(key, 1.0, "day")
        assert exc_info.value.status == 503
        # The ends of calls never raise: a best guess, a logged failure.
        assert await book.settle(key, 1.0, "day", held, 0.05) == pytest.approx(0.85)
        await limiter.finish(admission, 10)

        # Back (empty): the budget counter is seeded from the ledger again, and works.
        proc, _ = start_redis(tmp_path, port)
        assert await book.hold(key, 1.0, "day", hold_id(), 0.1) == pytest.approx(0.9)
        assert header(await limiter.admit(key, limits, 0), "x-ratelimit-remaining-requests") == "59"
    finally:
        await redis.aclose()
        proc.stop()
