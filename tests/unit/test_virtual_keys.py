"""The adapter's virtual-key cache against a real key store (SQLite in a temporary
directory): a known key costs no I/O, an unknown one is looked up once (single-flight,
then remembered as unknown, in a bounded cache), lookups beyond a bound are refused rather
than queued, and a change made by another process reaches the cache by the version poll."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from clawdbot.adapter.auth import Authenticator, Principal, caller, require_model
from clawdbot.adapter.virtual_keys import VirtualKeys, period_start
from clawdbot.common.errors import GatewayError
from clawdbot.common.keystore import KeyRecord, KeySpec, KeyStore
from tests.support import wait_for_async


class CountingStore:
    """The real store, with its secret lookups counted (and held back when asked to)."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self.lookups = 0
        self.gate: asyncio.Event | None = None

    async def find_by_secret(self, secret: str) -> KeyRecord | None:
        self.lookups += 1
        if self.gate is not None:
            await self.gate.wait()
        return await self.store.find_by_secret(secret)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


@pytest_asyncio.fixture
async def url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}"


@pytest_asyncio.fixture
async def counted(url: str) -> AsyncIterator[CountingStore]:
    store = await KeyStore.open(url)
    yield CountingStore(store)
    await store.close()


def keys_over(counted: CountingStore, **options: Any) -> VirtualKeys:
    async def opener(_url: str) -> Any:
        return counted

    return VirtualKeys("unused", opener=opener, **options)


@pytest.mark.asyncio
async def test_a_known_key_costs_no_io(counted: CountingStore) -> None:
    record, secret = await counted.store.create(KeySpec.parse({"name": "app", "models": ["mock-*"]}))
    keys = keys_over(counted)
    assert await keys.principal(secret) == Principal(record.id, "user", ("mock-*",), stored=True)
    assert counted.lookups == 1
    for _ in range(1000):
        await keys.principal(secret)
    assert counted.lookups == 1


@pytest.mark.asyncio
async def test_an_unknown_secret_is_looked_up_once_and_remembered_boundedly(counted: CountingStore) -> None:
    keys = keys_over(counted, max_unknown=2)
    counted.gate = asyncio.Event()
    # 50 callers with the same made-up key at once: one query.
    waiting = [asyncio.create_task(keys.principal("sk-cb-made-up")) for _ in range(50)]
    await asyncio.sleep(0.05)
    counted.gate.set()
    outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(o, GatewayError) and o.status == 401 for o in outcomes)
    assert counted.lookups == 1
    # Remembered: no query again...
    with pytest.raises(GatewayError):
        await keys.principal("sk-cb-made-up")
    assert counted.lookups == 1
    # ...until two other unknown secrets push it out of the bounded cache.
    for other in ("sk-cb-other-1", "sk-cb-other-2"):
        with pytest.raises(GatewayError):
            await keys.principal(other)
    with pytest.raises(GatewayError):
        await keys.principal("sk-cb-made-up")
    assert counted.lookups == 4


@pytest.mark.asyncio
async def test_lookups_beyond_the_bound_are_refused_not_queued(counted: CountingStore) -> None:
    keys = keys_over(counted, max_lookups=1, max_waiting=2)
    counted.gate = asyncio.Event()
    held = [asyncio.create_task(keys.principal(f"sk-cb-flood-{i}")) for i in range(2)]
    await asyncio.sleep(0.05)
    with pytest.raises(GatewayError) as refused:
        await keys.principal("sk-cb-flood-2")
    assert refused.value.status == 503 and refused.value.retry_after
    counted.gate.set()
    await asyncio.gather(*held, return_exceptions=True)
    assert counted.lookups == 1 + 1  # the two held ones, one at a time; the refused one never


@pytest.mark.asyncio
async def test_a_change_elsewhere_reaches_the_cache_by_the_version(counted: CountingStore, url: str) -> None:
    record, secret = await counted.store.create(KeySpec.parse({"name": "phone"}))
    keys = keys_over(counted, poll_s=0.05)
    following = asyncio.create_task(keys.run())
    try:
        assert (await keys.principal(secret)).models == ()
        # Another replica (its own connection to the same database) changes, then revokes.
        other = await KeyStore.open(url)
        try:
            await other.update(record.id, KeySpec.parse_changes({"models": ["mock-*"]}))

            async def restricted() -> bool:
                return (await keys.principal(secret)).models == ("mock-*",)

            await wait_for_async(restricted, 1.0, "the change to reach the cache", interval=0.01)
            await other.revoke(record.id)

            async def refused() -> bool:
                try:
                    await keys.principal(secret)
                except GatewayError as err:
                    return err.status == 401
                return False

            await wait_for_async(refused, 1.0, "the revocation to reach the cache", interval=0.01)
        finally:
            await other.close()
        # Both came from the cache reloads, not from lookups per request.
        assert counted.lookups == 1
    finally:
        keys.stop()
        await following


@pytest.mark.asyncio
async def test_only_virtual_looking_keys_are_looked_up(counted: CountingStore) -> None:
    keys = keys_over(counted)
    auth = Authenticator(["admin-key"], virtual=keys)
    assert (await auth.authenticate("Bearer admin-key")).is_admin
    for header in ("Bearer random-guess", "Bearer sk-cb-" + "x" * 300):
        with pytest.raises(GatewayError) as info:
            await auth.authenticate(header)
        assert info.value.status == 401
    assert counted.lookups == 0


def test_the_model_allowlist() -> None:
    limited = Principal("key_x", "user", ("mock-*",))
    assert limited.allows_model("mock-1") and not limited.allows_model("MOCK-1")
    # A routing name is judged by its own name: "auto" is not a mock-* model.
    assert not limited.allows_model("auto")
    assert Principal("key_y", "user").allows_model("auto")
    token = caller.set(limited)
    try:
        require_model("mock-embed")
        with pytest.raises(GatewayError) as info:
            require_model("gpt-4o")
        assert (info.value.status, info.value.code, info.value.param) == (403, "model_not_allowed", "model")
    finally:
        caller.reset(token)


def test_the_budget_period_starts() -> None:
    from datetime import UTC, datetime

    now = datetime(2026, 12, 4, 20, 15, tzinfo=UTC)
    assert period_start({"usd": 1, "period": "day"}, now) == datetime(2026, 12, 4, tzinfo=UTC)
    assert period_start({"usd": 1, "period": "month"}, now) == datetime(2026, 12, 1, tzinfo=UTC)
    assert period_start({"usd": 1, "period": "total"}, now) is None
    assert period_start(None, now) is None
