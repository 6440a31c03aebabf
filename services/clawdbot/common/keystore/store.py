"""KeyStore: virtual keys and the spend ledger on SQLAlchemy 2 (async), SQLite embedded by
default, PostgreSQL when database.url says so — the same code for both.

Every change to a key bumps the one-row `keystore_version` in the same transaction, and
bumps it first: on SQLite that first write takes the database's write lock at once (a
read-then-write transaction could fail on a concurrent writer instead of waiting), and
replicas learn about any change by reading one integer.
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import event, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from clawdbot.common.errors import GatewayError
from clawdbot.common.keystore import migrate
from clawdbot.common.keystore.models import ApiKey, KeystoreVersion, SpendEntry
from clawdbot.common.keystore.records import KeyNotFound, KeyRecord, KeySpec

log = logging.getLogger(__name__)

SECRET_PREFIX = "sk-cb-"
ID_PREFIX = "key_"
PREFIX_CHARS = 8
# How long a SQLite writer waits for another process's transaction before giving up.
SQLITE_BUSY_TIMEOUT_S = 30


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(30)  # 40 url-safe characters


def _new_id() -> str:
    return ID_PREFIX + secrets.token_urlsafe(18)  # 24 url-safe characters


def _record(row: ApiKey) -> KeyRecord:
    return KeyRecord(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        models=tuple(row.models or ()),
        budget=dict(row.budget) if row.budget is not None else None,
        rate_limit=dict(row.rate_limit) if row.rate_limit is not None else None,
        max_parallel=row.max_parallel,
        expires_at=row.expires_at,
        metadata=dict(row.meta or {}),
        admin=bool(row.admin),
        created_at=row.created_at,
        updated_at=row.updated_at,
        revoked_at=row.revoked_at,
    )


def _sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL; None for PostgreSQL. Refuses other dialects."""
    parsed = make_url(url)
    if parsed.drivername == "postgresql+asyncpg":
        return None
    if parsed.drivername != "sqlite+aiosqlite":
        raise ValueError(
            f"unsupported database URL {parsed.drivername}://…; use sqlite+aiosqlite or postgresql+asyncpg"
        )
    if not parsed.database or parsed.database == ":memory:":
        raise ValueError("the key store needs a SQLite file (several connections share it), not :memory:")
    return Path(parsed.database)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL: readers never block the writer, so two adapter processes can share the file;
    # busy_timeout: a writer waits for the other's transaction instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_S * 1000}")
    cursor.execute("PRAGMA journal_mode = WAL")
    # NORMAL is durable across process crashes in WAL mode (only a power cut may lose the
    # last commits), and spares an fsync per ledger write.
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.close()


class KeyStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._dialect = engine.dialect.name

    @classmethod
    async def open(cls, url: str, *, migrate: bool = True) -> KeyStore:
        """url: "sqlite+aiosqlite:///abs/path.db" or "postgresql+asyncpg://user@host:port/db".
        migrate=True: Alembic upgrade to head, serialized across processes."""
        path = _sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            engine = create_async_engine(url, pool_pre_ping=True)
        try:
            if migrate:
                await _migrate(engine, path)
        except BaseException:
            await engine.dispose()
            raise
        log.info("key store open", extra={"dialect": engine.dialect.name, "sqlite": str(path) if path else None})
        return cls(engine)

    async def close(self) -> None:
        await self._engine.dispose()

    @asynccontextmanager
    async def _change(self) -> AsyncIterator[AsyncSession]:
        """A write transaction that bumps the version first (see the module docstring)."""
        async with self._sessions() as session, session.begin():
            await session.execute(
                update(KeystoreVersion).where(KeystoreVersion.id == 1).values(version=KeystoreVersion.version + 1)
            )
            yield session

    # --- keys ------------------------------------------------------------------------

    async def create(self, spec: KeySpec) -> tuple[KeyRecord, str]:
        """(record, secret). The secret is returned here only; the store keeps its hash."""
        secret = _new_secret()
        now = datetime.now(UTC)
        row = ApiKey(
            id=_new_id(),
            name=spec.name,
            prefix=secret[len(SECRET_PREFIX) : len(SECRET_PREFIX) + PREFIX_CHARS],
            sha256=hash_secret(secret),
            models=list(spec.models),
            budget=spec.budget,
            rate_limit=spec.rate_limit,
            max_parallel=spec.max_parallel,
            expires_at=spec.expires_at,
            meta=dict(spec.metadata),
            admin=spec.admin,
            created_at=now,
            updated_at=now,
            revoked_at=None,
        )
        async with self._change() as session:
            session.add(row)
        record = _record(row)
        log.info("key created", extra={"key_id": record.id, "key_name": record.name, "admin": record.admin})
        return record, secret

    async def list(self) -> builtins.list[KeyRecord]:
        """Newest first, revoked keys included."""
        async with self._sessions() as session:
            rows = await session.scalars(select(ApiKey).order_by(ApiKey.created_at.desc(), ApiKey.id))
            return [_record(row) for row in rows]

    async def get(self, key_id: str) -> KeyRecord:
        async with self._sessions() as session:
            row = await session.get(ApiKey, key_id)
            if row is None:
                raise KeyNotFound(key_id)
            return _record(row)

    async def update(self, key_id: str, changes: dict[str, Any]) -> KeyRecord:
        """Apply a PATCH (validated again here: KeySpec.parse_changes is idempotent)."""
        changes = KeySpec.parse_changes(changes)
        if not changes:
            return await self.get(key_id)
        async with self._change() as session:
            row = await session.get(ApiKey, key_id)
            if row is None:
                raise KeyNotFound(key_id)
            for name, value in changes.items():
                if name == "metadata":
                    row.meta = value
                elif name == "models":
                    row.models = list(value)
                else:
                    setattr(row, name, value)
            row.updated_at = datetime.now(UTC)
        log.info("key updated", extra={"key_id": key_id, "fields": sorted(changes)})
        return _record(row)

    async def revoke(self, key_id: str) -> KeyRecord:
        """Idempotent: revoking a revoked key keeps its first revocation time."""
        async with self._change() as session:
            row = await session.get(ApiKey, key_id)
            if row is None:
                raise KeyNotFound(key_id)
            if row.revoked_at is None:
                now = datetime.now(UTC)
                row.revoked_at = now
                row.updated_at = now
        log.info("key revoked", extra={"key_id": key_id})
        return _record(row)

    async def find_by_secret(self, secret: str) -> KeyRecord | None:
        """The key this secret belongs to (revoked or expired included: check usable()),
        or None."""
        if not secret.startswith(SECRET_PREFIX):
            return None
        async with self._sessions() as session:
            row = await session.scalar(select(ApiKey).where(ApiKey.sha256 == hash_secret(secret)))
            return _record(row) if row is not None else None

    async def version(self) -> int:
        async with self._sessions() as session:
            value = await session.scalar(select(KeystoreVersion.version).where(KeystoreVersion.id == 1))
            if value is None:
                raise GatewayError.unavailable("the key store's schema is missing (not migrated)")
            return int(value)

    # --- the ledger --------------------------------------------------------------------

    async def record_spend(
        self,
        *,
        key_id: str,
        model: str,
        instance: str,
        request_id: str,
        input_tokens: int,
        output_tokens: int,
        cost_usd: float | Decimal,
        at: datetime | None = None,
    ) -> None:
        """One settled call. Idempotent per (key_id, request_id): a repeat is ignored, so a
        retried settlement never bills twice — give each billed attempt its own id."""
        if input_tokens < 0 or output_tokens < 0 or cost_usd < 0:
            raise ValueError("spend cannot be negative")
        when = at or datetime.now(UTC)
        when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
        values = {
            "key_id": key_id,
            "model": model,
            "instance": instance,
            "request_id": request_id,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cost_usd": cost_usd if isinstance(cost_usd, Decimal) else Decimal(str(cost_usd)),
            "at": when,
        }
        insert = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        statement = insert(SpendEntry).values(**values).on_conflict_do_nothing(index_elements=["key_id", "request_id"])
        async with self._sessions() as session, session.begin():
            await session.execute(statement)

    async def spend(self, key_id: str, since: datetime | None = None) -> dict[str, float]:
        """USD per model for this key, from `since` (inclusive) on, or ever."""
        query = (
            select(SpendEntry.model, func.sum(SpendEntry.cost_usd))
            .where(SpendEntry.key_id == key_id)
            .group_by(SpendEntry.model)
        )
        if since is not None:
            query = query.where(SpendEntry.at >= (since if since.tzinfo else since.replace(tzinfo=UTC)))
        async with self._sessions() as session:
            rows = (await session.execute(query)).all()
        return {model: float(total or 0) for model, total in rows}


async def _migrate(engine: AsyncEngine, path: Path | None) -> None:
    await migrate.upgrade(engine, path)
