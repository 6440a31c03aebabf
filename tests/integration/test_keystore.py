"""The key store on a real SQLite file and a real PostgreSQL: keys stored hashed, the full
key life cycle, the change counter, the spend ledger, bounds, and several processes
opening (and migrating) the same database at once."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from clawdbot.common.config import StaticKey
from clawdbot.common.errors import GatewayError
from clawdbot.common.keystore import KeyNotFound, KeySpec, KeyStore, migrate
from clawdbot.common.keystore.grants import grant_of, grant_of_static
from tests.support import PostgresProc, postgres_bin, python_env, start_postgres

DIALECTS = ["sqlite", "postgres"]


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PostgresProc, str]]:
    proc, url = start_postgres(tmp_path_factory.mktemp("postgres"))
    yield proc, url
    proc.stop()


def _fresh_url(kind: str, tmp: Path, request: pytest.FixtureRequest) -> str:
    """An empty database: a new SQLite file, or a new database on the module's postgres."""
    if kind == "sqlite":
        return f"sqlite+aiosqlite:///{tmp / 'store' / 'keys.db'}"
    _, server_url = request.getfixturevalue("postgres")
    name = f"t_{uuid.uuid4().hex[:12]}"
    host_port = server_url.split("@", 1)[1].split("/", 1)[0]
    host, port = host_port.split(":")
    created = subprocess.run(
        [str(postgres_bin("createdb")), "-h", host, "-p", port, "-U", "postgres", name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert created.returncode == 0, created.stderr
    return f"postgresql+asyncpg://postgres@{host_port}/{name}"


@pytest.fixture(params=DIALECTS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return _fresh_url(request.param, tmp_path, request)


@pytest_asyncio.fixture
async def store(url: str) -> AsyncIterator[KeyStore]:
    opened = await KeyStore.open(url)
    yield opened
    await opened.close()


async def _rows(url: str, query: str) -> list[dict[str, Any]]:
    """Read the database directly, as someone holding a copy of it would."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            return [dict(row) for row in (await connection.execute(text(query))).mappings()]
    finally:
        await engine.dispose()


def _bad(call: Any, *args: Any) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        call(*args)
    assert caught.value.status == 400, caught.value
    return caught.value


@pytest.mark.asyncio
async def test_created_secret_finds_its_key_and_the_database_holds_only_its_hash(store: KeyStore, url: str) -> None:
    record, secret = await store.create(
        KeySpec.parse(
            {
                "name": "laptop agent",
                "models": ["mock-*", "gpt-4o-mini"],
                "budget": {"usd": 0.01, "period": "day"},
                "rate_limit": {"requests_per_minute": 60},
                "max_parallel": 4,
                "metadata": {"owner": "me"},
            }
        )
    )
    assert secret.startswith("sk-cb-") and len(secret) == len("sk-cb-") + 40
    assert record.id.startswith("key_") and len(record.id) == len("key_") + 24
    assert record.prefix == secret[6:14]
    found = await store.find_by_secret(secret)
    assert found == record
    assert found.allows_model("mock-a") and found.allows_model("gpt-4o-mini")
    assert not found.allows_model("gpt-4o") and not found.allows_model("MOCK-a")
    assert found.rate_limit == {"requests_per_minute": 60, "tokens_per_minute": None}
    assert found.usable(datetime.now(UTC))
    assert await store.find_by_secret(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert await store.find_by_secret("not-a-key") is None

    rows = await _rows(url, "SELECT * FROM api_keys")
    assert len(rows) == 1
    assert rows[0]["sha256"] == hashlib.sha256(secret.encode()).hexdigest()
    assert not any(secret in str(value) or secret[6:] in str(value) for value in rows[0].values())
    public = record.public()
    assert secret not in str(public) and "sha256" not in public
    assert public["budget"] == {"usd": 0.01, "period": "day"} and public["revoked_at"] is None


@pytest.mark.asyncio
async def test_list_get_update_revoke_and_the_version_grows(store: KeyStore) -> None:
    start = await store.version()
    first, _ = await store.create(KeySpec.parse({"name": "phone"}))
    second, secret = await store.create(KeySpec.parse({"name": "script", "admin": True}))
    assert await store.version() == start + 2
    assert [r.id for r in await store.list()] == [second.id, first.id]  # newest first
    assert await store.get(first.id) == first

    changed = await store.update(
        first.id, {"name": "phone 2", "models": ["mock-*"], "budget": {"usd": 5, "period": "month"}}
    )
    assert (changed.name, changed.models, changed.budget) == ("phone 2", ("mock-*",), {"usd": 5.0, "period": "month"})
    assert changed.updated_at > first.updated_at and changed.created_at == first.created_at
    assert await store.get(first.id) == changed
    assert await store.version() == start + 3
    cleared = await store.update(first.id, {"budget": None, "models": None})
    assert cleared.budget is None and cleared.models == () and cleared.allows_model("anything")
    assert await store.version() == start + 4

    revoked = await store.revoke(second.id)
    assert revoked.revoked_at is not None and not revoked.usable(datetime.now(UTC))
    found = await store.find_by_secret(secret)
    assert found is not None and not found.usable(datetime.now(UTC))
    again = await store.revoke(second.id)  # idempotent: the first revocation time stays
    assert again.revoked_at == revoked.revoked_at
    assert await store.version() >= start + 5
    listed = {r.id: r for r in await store.list()}
    assert listed[second.id].revoked_at == revoked.revoked_at  # revoked keys stay listed

    # Reads and the ledger are not key changes.
    before = await store.version()
    await store.list()
    await store.record_spend(
        key_id=first.id, model="m", instance="i", request_id="r", input_tokens=1, output_tokens=1, cost_usd=0.1
    )
    assert await store.version() == before

    for call in (store.get("key_missing"), store.update("key_missing", {"name": "x"}), store.revoke("key_missing")):
        with pytest.raises(KeyNotFound) as caught:
            await call
        assert (caught.value.status, caught.value.code) == (404, "key_not_found")
    assert await store.version() == before  # a failed change is rolled back with its bump


@pytest.mark.asyncio
async def test_expired_keys_are_not_usable(store: KeyStore) -> None:
    soon = datetime.now(UTC) + timedelta(minutes=5)
    # Naive means UTC.
    record, secret = await store.create(
        KeySpec.parse({"name": "friend", "expires_at": soon.replace(tzinfo=None).isoformat()})
    )
    assert record.expires_at == soon
    found = await store.find_by_secret(secret)
    assert found is not None and found.expires_at == soon
    assert found.usable(soon - timedelta(seconds=1))
    assert not found.usable(soon) and not found.usable(soon + timedelta(days=1))
    # An offset is honoured and stored as UTC.
    later = await store.update(record.id, {"expires_at": "2999-01-01T02:00:00+02:00"})
    assert later.expires_at == datetime(2999, 1, 1, tzinfo=UTC)
    assert (await store.get(record.id)).expires_at == datetime(2999, 1, 1, tzinfo=UTC)


@pytest.mark.asyncio
async def test_ledger_records_spend_per_model_once_per_request(store: KeyStore) -> None:
    key, _ = await store.create(KeySpec.parse({"name": "metered"}))
    other, _ = await store.create(KeySpec.parse({"name": "other"}))
    day = datetime(2026, 6, 1, tzinfo=UTC)

    async def pay(key_id: str, request_id: str, cost: float, at: datetime | None, model: str = "priced") -> None:
        await store.record_spend(
            key_id=key_id,
            model=model,
            instance=f"{model}-1",
            request_id=request_id,
            input_tokens=10,
            output_tokens=5,
            cost_usd=cost,
            at=at,
        )

    for n in range(10):
        await pay(key.id, f"req-{n}", 0.001, day + timedelta(hours=n))
    await pay(key.id, "req-3", 0.001, day)  # a repeated settlement is not billed twice
    await pay(key.id, "req-c", 0, day - timedelta(days=1), model="cheap")
    await pay(other.id, "req-0", 2.5, None)  # request ids are per key
    with pytest.raises(ValueError):
        await pay(key.id, "req-neg", -0.5, None)

    spent = await store.spend(key.id)
    assert spent == {"priced": 0.01, "cheap": 0.0}  # exact: ten $0.001 calls are $0.01, not a float more
    assert await store.spend(key.id, since=day + timedelta(hours=5)) == {"priced": 0.005}
    assert await store.spend(key.id, since=day.replace(tzinfo=None) + timedelta(hours=9)) == {"priced": 0.001}
    assert await store.spend(other.id) == {"priced": 2.5}
    assert await store.spend("key_nobody") == {}


@dataclass(frozen=True)
class Spent:
    """The shape of clawdbot.common.quota.SpendRecord (the store types it structurally)."""

    key_id: str
    model: str
    instance: str
    request_id: str
    input_tokens: int
    output_tokens: int
    cost_usd: float
    at: datetime


def _spent(key_id: str, request_id: str, cost: float, at: datetime, model: str = "priced", tokens: int = 10) -> Spent:
    return Spent(key_id, model, f"{model}-1", request_id, tokens, tokens // 2, cost, at)


@pytest.mark.asyncio
async def test_record_spends_is_one_idempotent_batch(store: KeyStore, url: str) -> None:
    day = datetime(2026, 6, 1, tzinfo=UTC)
    batch = [_spent("key_a", f"req-{n}", 0.001, day + timedelta(minutes=n)) for n in range(300)]
    # The same record twice in one batch, then the whole batch again (a retried write).
    await store.record_spends([*batch, batch[0]])
    await store.record_spends(batch)
    await store.record_spends([])
    rows = await _rows(url, "SELECT COUNT(*) AS n FROM spend_ledger")
    assert rows == [{"n": 300}]
    assert await store.spend_total("key_a", None) == 0.3  # exact: 300 x $0.001

    # Long text is shortened to its column, a long request id stays unique and idempotent;
    # unstorable records are skipped (logged) without losing the rest of the batch.
    long_id = "r" * 500
    await store.record_spends(
        [
            _spent("key_b", long_id, 1.0, day, model="m" * 300),
            _spent("key_b", long_id[:-1] + "s", 1.0, day),
            _spent("key_b", "neg", -1.0, day),
            _spent("key_b", "nan", float("nan"), day),
            _spent("k" * 41, "wide", 1.0, day),
            Spent("key_b", "m", "i", "neg-tokens", -1, 0, 1.0, day),
            _spent("key_b", "naive", 0.5, day.replace(tzinfo=None)),
        ]
    )
    await store.record_spends([_spent("key_b", long_id, 1.0, day)])
    assert await store.spend_total("key_b", None) == 2.5
    widths = await _rows(url, "SELECT MAX(LENGTH(request_id)) AS r, MAX(LENGTH(model)) AS m FROM spend_ledger")
    assert widths == [{"r": 200, "m": 200}]


@pytest.mark.asyncio
async def test_concurrent_writers_bill_each_request_once(url: str) -> None:
    """Two stores (two engines: two replicas) write overlapping batches at the same time."""
    stores = await asyncio.gather(KeyStore.open(url), KeyStore.open(url))
    try:
        day = datetime(2026, 6, 1, tzinfo=UTC)
        records = [_spent("key_c", f"req-{n}", 0.01, day) for n in range(400)]
        # Each writer: every record, in batches of 50, in its own order.
        writes = [
            s.record_spends(records[start : start + 50])
            for s, order in ((stores[0], range(0, 400, 50)), (stores[1], range(350, -1, -50)))
            for start in order
        ]
        await asyncio.wait_for(asyncio.gather(*writes), 120)
        assert await stores[0].spend_total("key_c", None) == 4.0
        assert await stores[1].spend_report("key", None, None) == [
            {"key_id": "key_c", "requests": 400, "input_tokens": 4000, "output_tokens": 2000, "cost_usd": 4.0}
        ]
    finally:
        for s in stores:
            await s.close()


@pytest.mark.asyncio
async def test_spend_total_and_report(store: KeyStore) -> None:
    june = datetime(2026, 6, 1, tzinfo=UTC)
    await store.record_spends(
        [
            _spent("key_a", "a1", 0.25, june - timedelta(seconds=1), model="gpt"),  # May
            _spent("key_a", "a2", 0.5, june, model="gpt", tokens=100),
            _spent("key_a", "a3", 0.125, june + timedelta(days=1), model="mock", tokens=20),
            _spent("key_b", "b1", 1.0, june + timedelta(days=2), model="gpt", tokens=1000),
            _spent("key_b", "b2", 0.0, june + timedelta(days=30), model="mock", tokens=2),  # July
        ]
    )
    assert await store.spend_total("key_a", None) == 0.875
    assert await store.spend_total("key_a", june) == 0.625  # since is inclusive
    assert await store.spend_total("key_a", june.replace(tzinfo=None)) == 0.625  # naive = UTC
    assert await store.spend_total("key_nobody", None) == 0.0

    july = june + timedelta(days=30)
    by_key = await store.spend_report("key", june, july)  # until is exclusive
    assert by_key == [
        {"key_id": "key_b", "requests": 1, "input_tokens": 1000, "output_tokens": 500, "cost_usd": 1.0},
        {"key_id": "key_a", "requests": 2, "input_tokens": 120, "output_tokens": 60, "cost_usd": 0.625},
    ]
    by_model = await store.spend_report("model", None, None)
    assert by_model == [
        {"model": "gpt", "requests": 3, "input_tokens": 1110, "output_tokens": 555, "cost_usd": 1.75},
        {"model": "mock", "requests": 2, "input_tokens": 22, "output_tokens": 11, "cost_usd": 0.125},
    ]
    both = await store.spend_report("key,model", june, None)
    assert [(r["key_id"], r["model"], r["requests"], r["cost_usd"]) for r in both] == [
        ("key_b", "gpt", 1, 1.0),
        ("key_a", "gpt", 1, 0.5),
        ("key_a", "mock", 1, 0.125),
        ("key_b", "mock", 1, 0.0),
    ]
    assert await store.spend_report("model,key", june, None) == both
    assert await store.spend_report("key", july + timedelta(days=1), None) == []
    for bad in ("instance", "", "key,key", "model,instance"):
        with pytest.raises(GatewayError) as caught:
            await store.spend_report(bad, None, None)
        assert (caught.value.status, caught.value.param) == (400, "group_by")


def test_bounds_are_400s_naming_the_parameter() -> None:
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    cases: list[tuple[Any, str | None]] = [
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"name": "k", "models": "mock-*"}, "models"),
        ({"name": "k", "models": ["m"] * 65}, "models"),
        ({"name": "k", "models": ["m" * 201]}, "models"),
        ({"name": "k", "models": [3]}, "models"),
        ({"name": "k", "budget": {"usd": 0, "period": "day"}}, "budget.usd"),
        ({"name": "k", "budget": {"usd": -1, "period": "day"}}, "budget.usd"),
        ({"name": "k", "budget": {"usd": 1e6 + 1, "period": "day"}}, "budget.usd"),
        ({"name": "k", "budget": {"usd": True, "period": "day"}}, "budget.usd"),
        ({"name": "k", "budget": {"usd": 1, "period": "week"}}, "budget.period"),
        ({"name": "k", "budget": {"usd": 1}}, "budget.period"),
        ({"name": "k", "budget": {"usd": 1, "period": "day", "soft": 1}}, "budget.soft"),
        ({"name": "k", "rate_limit": {"requests_per_minute": 0}}, "rate_limit.requests_per_minute"),
        ({"name": "k", "rate_limit": {"tokens_per_minute": 10**9 + 1}}, "rate_limit.tokens_per_minute"),
        ({"name": "k", "rate_limit": {"requests_per_minute": 1.5}}, "rate_limit.requests_per_minute"),
        ({"name": "k", "rate_limit": {"requests_per_hour": 5}}, "rate_limit.requests_per_hour"),
        ({"name": "k", "max_parallel": 0}, "max_parallel"),
        ({"name": "k", "max_parallel": 10_001}, "max_parallel"),
        ({"name": "k", "expires_at": past}, "expires_at"),
        ({"name": "k", "expires_at": "tomorrow"}, "expires_at"),
        ({"name": "k", "metadata": {"blob": "x" * 4096}}, "metadata"),
        ({"name": "k", "metadata": ["not", "an", "object"]}, "metadata"),
        ({"name": "k", "admin": "yes"}, "admin"),
        ({"name": "k", "secret": "sk-cb-mine"}, "secret"),
        ({"name": "k", "defaults": "cheapest"}, "defaults"),
        ({"name": "k", "defaults": {"strategy": "s" * 65}}, "defaults.strategy"),
        ({"name": "k", "defaults": {"strategy": 3}}, "defaults.strategy"),
        ({"name": "k", "defaults": {"cache": "public"}}, "defaults.cache"),
        ({"name": "k", "defaults": {"workflows": "triage"}}, "defaults.workflows"),
        ({"name": "k", "defaults": {"workflows": ["w"] * 65}}, "defaults.workflows"),
        ({"name": "k", "defaults": {"workflows": ["w" * 201]}}, "defaults.workflows"),
        ({"name": "k", "defaults": {"workflows": [""]}}, "defaults.workflows"),
        ({"name": "k", "defaults": {"model": "x"}}, "defaults.model"),
    ]
    for body, param in cases:
        assert _bad(KeySpec.parse, body).param == param, body
    assert _bad(KeySpec.parse, ["not", "an", "object"]).status == 400
    assert _bad(KeySpec.parse_changes, {"owner": "x"}).param == "owner"
    assert _bad(KeySpec.parse_changes, {"name": None}).param == "name"
    # The largest values allowed pass, and parse_changes reads its own output back.
    top = {
        "name": "x" * 100,
        "models": ["m" * 200] * 64,
        "budget": {"usd": 1e6, "period": "total"},
        "rate_limit": {"requests_per_minute": 10**9, "tokens_per_minute": 1},
        "max_parallel": 10_000,
        "metadata": {"blob": "x" * 4000},
        "defaults": {"strategy": "s" * 64, "cache": "private", "workflows": ["w" * 200] * 64},
    }
    assert KeySpec.parse(top).max_parallel == 10_000
    changes = KeySpec.parse_changes(top | {"expires_at": "2999-01-01T00:00:00Z"})
    assert KeySpec.parse_changes(changes) == changes


@pytest.mark.asyncio
async def test_a_bad_update_is_a_400_and_changes_nothing(store: KeyStore) -> None:
    record, _ = await store.create(KeySpec.parse({"name": "k"}))
    before = await store.version()
    with pytest.raises(GatewayError) as caught:
        await store.update(record.id, {"max_parallel": 0})
    assert (caught.value.status, caught.value.param) == (400, "max_parallel")
    with pytest.raises(GatewayError) as caught:
        await store.update(record.id, {"prefix": "abc"})
    assert (caught.value.status, caught.value.param) == (400, "prefix")
    assert await store.get(record.id) == record and await store.version() == before


@pytest.mark.asyncio
async def test_defaults_are_stored_patched_cleared_and_public(store: KeyStore) -> None:
    plain, _ = await store.create(KeySpec.parse({"name": "plain"}))
    assert plain.defaults == {"strategy": "", "cache": "", "workflows": []}
    assert plain.public()["defaults"] == plain.defaults
    record, secret = await store.create(
        KeySpec.parse(
            {
                "name": "home",
                "defaults": {"strategy": "cheapest", "cache": "private", "workflows": ["summarize-*", "triage"]},
            }
        )
    )
    want = {"strategy": "cheapest", "cache": "private", "workflows": ["summarize-*", "triage"]}
    assert record.defaults == want and record.public()["defaults"] == want
    assert (await store.find_by_secret(secret)) == record and (await store.get(record.id)).defaults == want
    # A PATCH replaces the whole object (missing fields: no default); null clears it.
    changed = await store.update(record.id, {"defaults": {"cache": "shared"}})
    assert changed.defaults == {"strategy": "", "cache": "shared", "workflows": []}
    assert (await store.get(record.id)).defaults == changed.defaults
    cleared = await store.update(record.id, {"defaults": None})
    assert cleared.defaults == {"strategy": "", "cache": "", "workflows": []}
    with pytest.raises(GatewayError) as caught:
        await store.update(record.id, {"defaults": {"cache": "everyone"}})
    assert (caught.value.status, caught.value.param) == (400, "defaults.cache")


@pytest.mark.asyncio
async def test_grants_carry_models_budget_and_cache_scope(store: KeyStore) -> None:
    record, _ = await store.create(
        KeySpec.parse(
            {
                "name": "granted",
                "models": ["mock-*"],
                "budget": {"usd": 0.01, "period": "day"},
                "defaults": {"cache": "private"},
            }
        )
    )
    grant = grant_of(record)
    assert list(grant.models) == ["mock-*"] and grant.stored
    assert (grant.budget_usd, grant.budget_period, grant.cache_scope) == (0.01, "day", "private")
    open_key, _ = await store.create(KeySpec.parse({"name": "open"}))
    grant = grant_of(open_key)
    assert (list(grant.models), grant.budget_usd, grant.budget_period, grant.cache_scope) == ([], 0.0, "", "")
    assert grant.stored

    static = StaticKey.model_validate(
        {
            "name": "yaml",
            "key_env": "SOME_KEY",
            "models": ["gpt-*"],
            "budget": {"usd": 5, "period": "month"},
            "defaults": {"cache": "shared"},
        }
    )
    grant = grant_of_static(static)
    assert list(grant.models) == ["gpt-*"] and not grant.stored
    assert (grant.budget_usd, grant.budget_period, grant.cache_scope) == (5.0, "month", "shared")
    bare = grant_of_static(StaticKey.model_validate({"name": "bare", "key_env": "K"}))
    assert (list(bare.models), bare.budget_period, bare.cache_scope, bare.stored) == ([], "", "", False)


@pytest.mark.asyncio
async def test_migration_0002_gives_existing_keys_empty_defaults(url: str) -> None:
    """A store made at 0001 with a key in it upgrades in place; the old key reads with
    no defaults and keeps working."""
    from alembic import command

    if url.startswith("sqlite"):
        Path(url.split(":///", 1)[1]).parent.mkdir(parents=True)
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:

            def to_0001(sync: Any) -> None:
                config = migrate.alembic_config()
                config.attributes["connection"] = sync
                command.upgrade(config, "0001")

            await connection.run_sync(to_0001)
            await connection.execute(
                text(
                    "INSERT INTO api_keys (id, name, prefix, sha256, models, metadata, admin, created_at, updated_at)"
                    " VALUES ('key_old', 'old', 'abcdefgh', :sha, '[]', '{}', false, :now, :now)"
                ),
                {"sha": "0" * 64, "now": datetime(2026, 1, 1, tzinfo=None if url.startswith("sqlite") else UTC)},
            )
            await connection.commit()
    finally:
        await engine.dispose()
    store = await KeyStore.open(url)
    try:
        old = await store.get("key_old")
        assert old.defaults == {"strategy": "", "cache": "", "workflows": []}
        assert grant_of(old).cache_scope == ""
        assert (await store.update("key_old", {"defaults": {"strategy": "fastest"}})).defaults["strategy"] == "fastest"
    finally:
        await store.close()
    assert await _rows(url, "SELECT version_num FROM alembic_version") == [{"version_num": "0002"}]


@pytest.mark.asyncio
async def test_concurrent_opens_migrate_once(url: str) -> None:
    """Replicas starting together on an empty database: one migrates, the others wait and
    find the schema at head; all of them work."""
    stores = await asyncio.wait_for(asyncio.gather(*(KeyStore.open(url) for _ in range(4))), 120)
    try:
        created = await asyncio.gather(
            *(s.create(KeySpec.parse({"name": f"replica {n}"})) for n, s in enumerate(stores))
        )
        for s in stores:
            assert {r.id for r in await s.list()} == {record.id for record, _ in created}
            assert await s.version() == 1 + len(stores)
    finally:
        for s in stores:
            await s.close()
    assert await _rows(url, "SELECT version_num FROM alembic_version") == [{"version_num": "0002"}]


_LEDGER_CHILD = """
import asyncio, sys
from datetime import UTC, datetime
from types import SimpleNamespace
from clawdbot.common.keystore.store import KeyStore

def spent(n):
    return SimpleNamespace(key_id="key_p", model="priced", instance="priced-1", request_id=f"req-{n}",
                           input_tokens=10, output_tokens=5, cost_usd=0.001, at=datetime(2026, 6, 1, tzinfo=UTC))

async def main() -> None:
    store = await KeyStore.open(sys.argv[1])
    for start in range(0, 300, 20):  # every child writes every record: overlapping batches
        await store.record_spends([spent(n) for n in range(start, start + 20)])
    await store.close()

asyncio.run(main())
"""


def test_processes_share_one_sqlite_ledger(tmp_path: Path) -> None:
    """Three processes write the same ledger records to one SQLite file at once: WAL and
    the busy timeout make them wait for each other, and each request is billed once."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'shared' / 'keys.db'}"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _LEDGER_CHILD, url],
            env=python_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for child in children:
        _out, err = child.communicate(timeout=180)
        assert child.returncode == 0, err

    async def check() -> None:
        store = await KeyStore.open(url, migrate=False)
        try:
            assert await store.spend_report("key", None, None) == [
                {"key_id": "key_p", "requests": 300, "input_tokens": 3000, "output_tokens": 1500, "cost_usd": 0.3}
            ]
        finally:
            await store.close()

    asyncio.run(check())


_CHILD = """
import asyncio, sys
from clawdbot.common.keystore import KeySpec, KeyStore

async def main() -> None:
    store = await KeyStore.open(sys.argv[1])
    for n in range(5):
        await store.create(KeySpec.parse({"name": f"{sys.argv[2]}-{n}"}))
    print(await store.version())
    await store.close()

asyncio.run(main())
"""


def test_processes_share_one_sqlite_file(tmp_path: Path) -> None:
    """Three processes open a new SQLite file at once (migrations serialized by the file
    lock) and write to it concurrently (WAL and the busy timeout): nothing is lost."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'shared' / 'keys.db'}"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, url, f"p{n}"],
            env=python_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(3)
    ]
    for child in children:
        _out, err = child.communicate(timeout=180)
        assert child.returncode == 0, err

    async def check() -> None:
        store = await KeyStore.open(url, migrate=False)
        try:
            names = sorted(r.name for r in await store.list())
            assert names == sorted(f"p{p}-{n}" for p in range(3) for n in range(5))
            assert await store.version() == 1 + 15
        finally:
            await store.close()
        mode = await _rows(url, "PRAGMA journal_mode")
        assert next(iter(mode[0].values())) == "wal"

        assert await _rows(url, "SELECT version_num FROM alembic_version") == [{"version_num": "0002"}]

    asyncio.run(check())
