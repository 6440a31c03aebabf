"""common/quota without Redis: the in-process counters (same semantics as the Lua
scripts), the header and message formats, periods, and the LedgerWriter."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import TypeVar
from zoneinfo import ZoneInfo

import pytest

from clawdbot.common.errors import GatewayError
from clawdbot.common.quota import (
    USD_NANO,
    Admission,
    BudgetBook,
    LedgerWriter,
    RateLimiter,
    RateLimits,
    SpendRecord,
    budget_exhausted,
    openai_duration,
    period_id,
    period_start,
    ratelimit_headers,
    to_nano,
)
from clawdbot.common.retry import RetryPolicy
from tests.support import wait_for_async

T = TypeVar("T")


class FakeMs:
    """A millisecond clock the test moves."""

    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        return self.now


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class Ledger:
    def __init__(self, spent: float = 0.0) -> None:
        self.spent = spent
        self.calls: list[tuple[str, datetime | None]] = []
        self.failing = False

    async def __call__(self, key_id: str, since: datetime | None) -> float:
        self.calls.append((key_id, since))
        await asyncio.sleep(0)  # a real ledger read yields: concurrent holds interleave here
        if self.failing:
            raise ConnectionError("the ledger database is down")
        return self.spent


def hid() -> str:
    return uuid.uuid4().hex


async def outcome(call: Awaitable[T]) -> T | GatewayError:
    try:
        return await call
    except GatewayError as exc:
        return exc


# --- formats ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0s"),
        (-5, "0s"),
        (17, "17ms"),
        (250, "250ms"),
        (1000, "1s"),
        (1500, "1.5s"),
        (2999, "2.999s"),
        (60_000, "1m0s"),
        (90_000, "1m30s"),
        (360_000, "6m0s"),
        (3_600_000, "1h0m0s"),
        (3_723_400, "1h2m3.4s"),
    ],
)
def test_openai_duration(ms: int, text: str) -> None:
    assert openai_duration(ms) == text


def test_headers_only_for_the_limits_set() -> None:
    scale = 60_000  # bucket units per token
    both = RateLimits(requests_per_minute=60, tokens_per_minute=90_000)
    assert ratelimit_headers(both, 59 * scale, 84_000 * scale) == (
        ("x-ratelimit-limit-requests", "60"),
        ("x-ratelimit-remaining-requests", "59"),
        ("x-ratelimit-reset-requests", "1s"),
        ("x-ratelimit-limit-tokens", "90000"),
        ("x-ratelimit-remaining-tokens", "84000"),
        ("x-ratelimit-reset-tokens", "4s"),
    )
    # In debt: nothing remaining (never negative), and the wait until full.
    tokens_only = RateLimits(tokens_per_minute=1000)
    assert ratelimit_headers(tokens_only, 0, -500 * scale) == (
        ("x-ratelimit-limit-tokens", "1000"),
        ("x-ratelimit-remaining-tokens", "0"),
        ("x-ratelimit-reset-tokens", "1m30s"),
    )
    assert ratelimit_headers(RateLimits(max_parallel=3), -1, -1) == ()


def test_rate_limits_any() -> None:
    assert not RateLimits().any
    assert not RateLimits(0, 0, 0).any
    assert RateLimits(max_parallel=1).any
    assert RateLimits(tokens_per_minute=5).any


def test_periods() -> None:
    now = datetime(2026, 12, 4, 21, 48, 50, 123, tzinfo=UTC)
    assert period_start("day", now) == datetime(2026, 12, 4, tzinfo=UTC)
    assert period_start("month", now) == datetime(2026, 12, 1, tzinfo=UTC)
    assert period_start("total", now) is None
    assert [period_id(p, now) for p in ("day", "month", "total")] == ["2026-12-04", "2026-12", "total"]
    # Another zone, or none (taken as UTC): the UTC calendar decides.
    tokyo = datetime(2026, 12, 5, 6, 0, tzinfo=UTC).astimezone(ZoneInfo("Asia/Tokyo"))
    assert period_id("day", tokyo) == "2026-12-05"
    assert period_start("day", datetime(2026, 1, 31, 23, 59)) == datetime(2026, 1, 31, tzinfo=UTC)
    with pytest.raises(ValueError, match="week"):
        period_id("week", now)


def test_money_is_nano_dollars() -> None:
    assert USD_NANO == 1_000_000_000
    assert to_nano(0.001) == 1_000_000
    assert sum(to_nano(0.001) for _ in range(10)) == to_nano(0.01)
    assert to_nano(float("nan")) == to_nano(-1.0) == 0


def test_budget_exhausted_shape() -> None:
    err = budget_exhausted(0.01, "day")
    assert (err.status, err.type, err.code, err.param) == (429, "insufficient_quota", "insufficient_quota", None)
    assert err.message.startswith("You exceeded this key's budget of $0.01 per day;")
    assert err.to_dict()["error"]["type"] == "insufficient_quota"
    assert "$25.00 per month" in budget_exhausted(25, "month").message
    assert "$0.005 in total" in budget_exhausted(0.005, "total").message


# --- the in-process rate limiter ----------------------------------------------------


@pytest.mark.asyncio
async def test_local_limiter_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="clawdbot.common.quota.limits"):
        limiter = RateLimiter(None, now_ms=FakeMs())
        for _ in range(5):
            await limiter.admit("k", RateLimits(requests_per_minute=100), 0)
    warnings = [r for r in caplog.records if "this process only" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.asyncio
async def test_local_burst_and_countdown() -> None:
    clock = FakeMs()
    limiter = RateLimiter(None, now_ms=clock)
    limits = RateLimits(requests_per_minute=60)
    results = [await outcome(limiter.admit("k", limits, 0)) for _ in range(200)]
    admitted = [r for r in results if isinstance(r, Admission)]
    refused = [r for r in results if isinstance(r, GatewayError)]
    assert len(admitted) == 60 and len(refused) == 140
    assert [dict(a.headers)["x-ratelimit-remaining-requests"] for a in admitted[:3]] == ["59", "58", "57"]
    assert dict(admitted[-1].headers)["x-ratelimit-reset-requests"] == "1m0s"
    assert all(e.retry_after == "1" and e.type == "requests" for e in refused)
    assert dict(refused[0].headers)["x-ratelimit-remaining-requests"] == "0"
    # One a second after that, not before.
    clock.now += 999
    assert isinstance(await outcome(limiter.admit("k", limits, 0)), GatewayError)
    clock.now += 1
    assert isinstance(await outcome(limiter.admit("k", limits, 0)), Admission)
    # Keys do not share buckets.
    assert dict((await limiter.admit("other", limits, 0)).headers)["x-ratelimit-remaining-requests"] == "59"


@pytest.mark.asyncio
async def test_local_tokens_debt_and_refusals() -> None:
    clock = FakeMs()
    limiter = RateLimiter(None, now_ms=clock)
    limits = RateLimits(requests_per_minute=60, tokens_per_minute=1000)
    first = await limiter.admit("k", limits, 100)
    assert first.tokens_held == 100 and first.lease is None
    await limiter.finish(first, 1500)  # 500 below empty
    err = await outcome(limiter.admit("k", limits, 1))
    assert isinstance(err, GatewayError)
    assert (err.status, err.type, err.code, err.retry_after) == (429, "tokens", "rate_limit_exceeded", "31")
    # Refused: the request was not taken either.
    assert dict(err.headers)["x-ratelimit-remaining-requests"] == "59"
    clock.now += 30_059
    assert isinstance(await outcome(limiter.admit("k", limits, 1)), GatewayError)
    clock.now += 1  # (1 + 500) tokens at 1000 a minute: 30.06 s
    ok = await limiter.admit("k", limits, 1)
    assert dict(ok.headers)["x-ratelimit-remaining-tokens"] == "0"
    # None keeps the estimate; fewer tokens than held gives the rest back.
    refund = await limiter.admit("k2", limits, 600)
    await limiter.finish(refund, None)
    assert dict((await limiter.admit("k2", limits, 0)).headers)["x-ratelimit-remaining-tokens"] == "400"
    refund = await limiter.admit("k3", limits, 600)
    await limiter.finish(refund, 100)
    assert dict((await limiter.admit("k3", limits, 0)).headers)["x-ratelimit-remaining-tokens"] == "900"
    too_large = await outcome(limiter.admit("k4", limits, 1001))
    assert isinstance(too_large, GatewayError) and "can never be admitted" in too_large.message


@pytest.mark.asyncio
async def test_local_max_parallel() -> None:
    clock = FakeMs()
    limiter = RateLimiter(None, lease_ttl_s=10, now_ms=clock)
    limits = RateLimits(max_parallel=1)
    a = await limiter.admit("k", limits, 0)
    assert a.lease is not None and a.headers == ()
    refused = await outcome(limiter.admit("k", limits, 0))
    assert isinstance(refused, GatewayError) and refused.retry_after == "1"
    await limiter.finish(a, None)
    b = await limiter.admit("k", limits, 0)
    assert b.lease != a.lease
    clock.now += 10_000  # b's process died: its lease lapses
    assert (await limiter.admit("k", limits, 0)).lease is not None


@pytest.mark.asyncio
async def test_no_limits_no_work() -> None:
    limiter = RateLimiter(None)
    admission = await limiter.admit("k", RateLimits(), 123)
    assert admission == Admission("k", RateLimits(), 0, None, ())
    await limiter.finish(admission, 456)


# --- the in-process budget book -----------------------------------------------------


@pytest.mark.asyncio
async def test_local_budget_exact_under_concurrency() -> None:
    ledger = Ledger()
    book = BudgetBook(None, ledger)
    ids = [hid() for _ in range(50)]
    results = await asyncio.gather(*(outcome(book.hold("k", 0.01, "day", i, 0.001)) for i in ids))
    admitted = [ids[n] for n, r in enumerate(results) if isinstance(r, float)]
    refused = [r for r in results if isinstance(r, GatewayError)]
    assert len(admitted) == 10 and len(refused) == 40
    assert all(e.code == "insufficient_quota" for e in refused)
    assert len(ledger.calls) == 1  # the cold counter was read once for all fifty
    for i in admitted:
        await book.settle("k", 0.01, "day", i, 0.0005)
    assert await book.remaining("k", 0.01, "day") == pytest.approx(0.005)


@pytest.mark.asyncio
async def test_local_settle_once_reaping_and_rollover() -> None:
    clock = Clock(datetime(2026, 12, 4, 23, 59, 0, tzinfo=UTC))
    ledger = Ledger(0.002)
    book = BudgetBook(None, ledger, clock=clock, hold_ttl_s=30)
    a = hid()
    assert await book.hold("k", 0.01, "day", a, 0.005) == pytest.approx(0.003)  # seeded: $0.002
    assert await book.settle("k", 0.01, "day", a, 0.004) == pytest.approx(0.004)
    assert await book.settle("k", 0.01, "day", a, 0.004) == pytest.approx(0.004)  # once
    leaked = hid()
    await book.hold("k", 0.01, "day", leaked, 0.004)
    refused = await outcome(book.hold("k", 0.01, "day", hid(), 0.001))
    assert isinstance(refused, GatewayError)
    clock.now += timedelta(seconds=30)  # still the same day: the leaked hold lapses
    assert await book.hold("k", 0.01, "day", hid(), 0.001) == pytest.approx(0.003)
    # The next day starts fresh from its own ledger figure.
    clock.now = datetime(2026, 12, 5, 0, 0, 1, tzinfo=UTC)
    ledger.spent = 0.0
    assert await book.hold("k", 0.01, "day", hid(), 0.001) == pytest.approx(0.009)
    assert ledger.calls[-1] == ("k", datetime(2026, 12, 5, tzinfo=UTC))


@pytest.mark.asyncio
async def test_local_budget_fails_closed_on_an_unreadable_ledger() -> None:
    ledger = Ledger()
    ledger.failing = True
    book = BudgetBook(None, ledger)
    err = await outcome(book.hold("k", 1.0, "month", hid(), 0.1))
    assert isinstance(err, GatewayError) and (err.status, err.code) == (503, "budget_unavailable")
    assert await book.settle("k", 1.0, "month", hid(), 0.1) == pytest.approx(0.9)  # never raises
    ledger.failing = False
    ledger.spent = 0.25
    assert await book.remaining("k", 1.0, "month") == pytest.approx(0.75)


# --- the ledger writer --------------------------------------------------------------


def record(n: int) -> SpendRecord:
    return SpendRecord("k", "mock-1", "mock-1a", f"req-{n}", 10, 20, 0.001, datetime(2026, 12, 4, tzinfo=UTC))


class Store:
    def __init__(self, failures: int = 0) -> None:
        self.batches: list[list[SpendRecord]] = []
        self.failures = failures
        self.attempts = 0

    async def write(self, batch: list[SpendRecord]) -> None:
        self.attempts += 1
        await asyncio.sleep(0)
        if self.failures:
            self.failures -= 1
            raise OSError("database is locked")
        self.batches.append(list(batch))

    @property
    def written(self) -> list[str]:
        return [r.request_id for b in self.batches for r in b]


@pytest.mark.asyncio
async def test_ledger_batches_and_close_flushes() -> None:
    store = Store()
    writer = LedgerWriter(store.write, max_batch=3, interval_s=3600)
    for n in range(7):
        writer.add(record(n))
    assert store.batches == []  # add never writes
    await writer.close()
    assert [len(b) for b in store.batches] == [3, 3, 1]
    assert store.written == [f"req-{n}" for n in range(7)]
    assert (writer.written, writer.dropped, writer.queued) == (7, 0, 0)
    writer.add(record(99))  # after close: dropped, counted
    assert writer.dropped == 1 and store.written[-1] == "req-6"


@pytest.mark.asyncio
async def test_ledger_run_flushes_on_size_and_on_interval() -> None:
    store = Store()
    writer = LedgerWriter(store.write, max_batch=4, interval_s=3600)
    task = asyncio.create_task(writer.run())
    try:
        for n in range(4):
            writer.add(record(n))

        async def written(count: int) -> bool:
            return len(store.written) == count

        # A full batch goes at once, not after the (hour-long) interval.
        await wait_for_async(lambda: written(4), 10, "the full batch to be written")
    finally:
        writer.stop()
        await asyncio.wait_for(task, 10)

    store2 = Store()
    timed = LedgerWriter(store2.write, max_batch=100, interval_s=0.05)
    task = asyncio.create_task(timed.run())
    try:
        timed.add(record(1))
        await wait_for_async(lambda: written_of(store2, 1), 10, "the interval flush")
    finally:
        await timed.close()
        await asyncio.wait_for(task, 10)


async def written_of(store: Store, count: int) -> bool:
    return len(store.written) == count


@pytest.mark.asyncio
async def test_ledger_retries_a_failed_write() -> None:
    store = Store(failures=2)
    writer = LedgerWriter(store.write, max_batch=10, interval_s=3600, retry=RetryPolicy(max_attempts=3, base_s=0.01))
    for n in range(5):
        writer.add(record(n))
    await writer.close()
    assert store.written == [f"req-{n}" for n in range(5)]
    assert (store.attempts, writer.failed_writes, writer.dropped) == (3, 2, 0)


@pytest.mark.asyncio
async def test_ledger_keeps_records_while_the_store_is_down() -> None:
    store = Store(failures=5)
    writer = LedgerWriter(store.write, max_batch=10, interval_s=0.01, retry=RetryPolicy(max_attempts=2, base_s=0.01))
    task = asyncio.create_task(writer.run())
    try:
        writer.add(record(1))
        writer.add(record(2))
        # Two rounds of two attempts fail, the fifth attempt writes: nothing lost meanwhile.
        await wait_for_async(lambda: written_of(store, 2), 10, "the records to be written once the store is back")
        assert writer.dropped == 0 and writer.failed_writes == 5
    finally:
        await writer.close()
        await asyncio.wait_for(task, 10)


@pytest.mark.asyncio
async def test_ledger_drops_are_counted() -> None:
    store = Store(failures=100)
    writer = LedgerWriter(
        store.write, max_batch=2, interval_s=3600, max_queued=3, retry=RetryPolicy(max_attempts=2, base_s=0.01)
    )
    for n in range(5):
        writer.add(record(n))
    assert (writer.queued, writer.dropped) == (3, 2)  # over max_queued
    await writer.close()  # the store never comes back: what close cannot write is dropped
    assert (writer.queued, writer.dropped, writer.written) == (0, 5, 0)
